"""gRPC handlers of PointsService.

Not implemented yet: every RPC answers UNIMPLEMENTED (the generated base class raises
NotImplementedError, which the error interceptor reports as UNIMPLEMENTED). The logic lands with
issue 4 (points ledger); the README lists the state of each RPC.
"""

from __future__ import annotations

from stationthis.points.v1 import points_service_pb2_grpc


class PointsServicer(points_service_pb2_grpc.PointsServiceServicer):
    pass
