"""gRPC handlers of ComfyUIService: thin, validating at the edge and calling the domain code.

The runs (CreateRun, GetRun, ListRuns, WatchRun, CancelRun, HandleWebhook) are orchestrated by
``runs.Runs``; the pass-through RPCs (machines, deployments, workflow versions, UploadWorkflow) are in
``admin.py`` and UploadFile in ``uploads.py``, mixed in here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from common.idempotency import fingerprint
from stationthis.comfyui.v1 import comfyui_service_pb2 as svc
from stationthis.comfyui.v1 import comfyui_service_pb2_grpc

from .admin import AdminHandlers, Upstream
from .runs import Runs
from .uploads import UploadHandlers


class ComfyUIServicer(AdminHandlers, UploadHandlers, comfyui_service_pb2_grpc.ComfyUIServiceServicer):
    def __init__(self, upstream: Upstream, runs: Runs) -> None:
        self.upstream = upstream
        self.runs = runs

    async def CreateRun(
        self, request: svc.CreateRunRequest, context: grpc.aio.ServicerContext
    ) -> svc.CreateRunResponse:
        return svc.CreateRunResponse(run=await self.runs.create(request, context))

    async def QuoteRun(self, request: svc.QuoteRunRequest, context: grpc.aio.ServicerContext) -> svc.QuoteRunResponse:
        return await self.runs.quote_run(request, context)

    async def RegenerateRun(
        self, request: svc.RegenerateRunRequest, context: grpc.aio.ServicerContext
    ) -> svc.RegenerateRunResponse:
        return svc.RegenerateRunResponse(run=await self.runs.regenerate(request, context))

    async def GetRun(self, request: svc.GetRunRequest, context: grpc.aio.ServicerContext) -> svc.GetRunResponse:
        return svc.GetRunResponse(run=await self.runs.get(request.run_id))

    async def ListRuns(self, request: svc.ListRunsRequest, context: grpc.aio.ServicerContext) -> svc.ListRunsResponse:
        return await self.runs.list(request)

    async def WatchRun(
        self, request: svc.WatchRunRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[svc.WatchRunResponse]:
        async for message in self.runs.watch(request.run_id, request.after_event_id):
            yield message

    async def CancelRun(
        self, request: svc.CancelRunRequest, context: grpc.aio.ServicerContext
    ) -> svc.CancelRunResponse:
        ids = self.runs.ids
        fp = fingerprint(request)
        if request.request_id:
            replayed = await ids.replay("CancelRun", request.request_id, fp, svc.CancelRunResponse)
            if replayed is not None:
                return replayed
        response = svc.CancelRunResponse(run=await self.runs.cancel(request))
        if request.request_id:
            response = await ids.once("CancelRun", request.request_id, fp, response)
        return response

    async def HandleWebhook(
        self, request: svc.HandleWebhookRequest, context: grpc.aio.ServicerContext
    ) -> svc.HandleWebhookResponse:
        return await self.runs.webhook(request)
