"""`make bench`: run every benchmark in turn."""

from . import rpc_overhead

if __name__ == "__main__":
    rpc_overhead.main()
