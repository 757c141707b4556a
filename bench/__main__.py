"""`make bench`: run every benchmark in turn."""

from . import catalog, rpc_overhead, upstream

if __name__ == "__main__":
    rpc_overhead.main()
    upstream.main()
    catalog.main()
