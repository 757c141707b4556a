"""gRPC handlers of ComfyUIService.

Not implemented yet: every RPC answers UNIMPLEMENTED (the generated base class raises
NotImplementedError, which the error interceptor reports as UNIMPLEMENTED). The ComfyUI Deploy client
lands with issue 5 and the generation orchestration after it; the README lists the state of each RPC.
"""

from __future__ import annotations

from stationthis.comfyui.v1 import comfyui_service_pb2_grpc


class ComfyUIServicer(comfyui_service_pb2_grpc.ComfyUIServiceServicer):
    pass
