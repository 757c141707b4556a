"""gRPC handlers of ComfyUIService.

The pass-through RPCs (machines, deployments, workflow versions, UploadWorkflow) are in ``admin.py``
and UploadFile in ``uploads.py``, mixed in here. The run RPCs (CreateRun, GetRun, ListRuns, WatchRun,
CancelRun, HandleWebhook) still answer UNIMPLEMENTED: the generated base class raises
NotImplementedError, which the error interceptor reports as UNIMPLEMENTED.
"""

from __future__ import annotations

from stationthis.comfyui.v1 import comfyui_service_pb2_grpc

from .admin import AdminHandlers, Upstream
from .uploads import UploadHandlers


class ComfyUIServicer(AdminHandlers, UploadHandlers, comfyui_service_pb2_grpc.ComfyUIServiceServicer):
    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
