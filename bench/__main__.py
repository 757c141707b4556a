"""`make bench`: run every benchmark in turn (each prints its figures side by side, and the ratio)."""

from . import catalog, gateway, points, rpc_overhead, runs, upstream

if __name__ == "__main__":
    rpc_overhead.main()
    points.main()
    upstream.main()
    catalog.main()
    gateway.main()
    runs.main()
