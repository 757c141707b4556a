"""gRPC handlers of WorkflowsService.

Not implemented yet: every RPC answers UNIMPLEMENTED (the generated base class raises
NotImplementedError, which the error interceptor reports as UNIMPLEMENTED). The logic lands with
issue 6 (workflow catalog); the README lists the state of each RPC.
"""

from __future__ import annotations

from stationthis.workflows.v1 import workflows_service_pb2_grpc


class WorkflowsServicer(workflows_service_pb2_grpc.WorkflowsServiceServicer):
    pass
