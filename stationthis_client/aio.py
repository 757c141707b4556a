"""``AsyncClient``: the three services over gRPC, for asyncio code (bots, the web back end).

Each service gets one channel from the shared factory ``common.channels.open_channel`` (a span and
W3C ``traceparent`` per call, keepalive pings, and gRPC's own retries of UNAVAILABLE through the
service config), opened on first use. On top of that the client:

* gives every unary call a deadline: ``timeout`` seconds (30 by default) for the call as a whole,
  retries included; a watch stream has no deadline (the channel's keepalive notices a dead peer);
* retries a call the service did not take (UNAVAILABLE: not reachable, restarting, shutting down)
  with capped exponential backoff and full jitter for up to ``retry_window`` seconds (within the
  deadline). A mutation carries one ``request_id`` (a UUID unless the caller gives one) for all of
  its attempts, so a retry whose first attempt did reach the service changes nothing twice;
* raises every failure as a ``StationThisError`` subclass decoded from the service's
  ``google.rpc.Status`` (``errors.py``);
* re-opens a broken WatchRun stream after the last event received (``RunWatch``).
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from common.channels import TracedChannel, open_channel
from stationthis.comfyui.v1 import comfyui_service_pb2 as svc
from stationthis.comfyui.v1 import comfyui_service_pb2_grpc
from stationthis.points.v1 import points_service_pb2_grpc
from stationthis.workflows.v1 import workflows_service_pb2_grpc

from ._common import (
    CHUNK_BYTES,
    COMFYUI,
    DEFAULT_RESUME_WINDOW,
    DEFAULT_RETRY_WINDOW,
    DEFAULT_TIMEOUT,
    POINTS,
    WORKFLOWS,
    Generation,
    M,
    RunWatch,
    Surface,
    backoff,
    log,
)
from .endpoints import Endpoints
from .errors import StationThisError, Unavailable, from_status, make_error, status_from_trailers

_STUBS: dict[str, Any] = {
    POINTS: points_service_pb2_grpc.PointsServiceStub,
    WORKFLOWS: workflows_service_pb2_grpc.WorkflowsServiceStub,
    COMFYUI: comfyui_service_pb2_grpc.ComfyUIServiceStub,
}


class AsyncClient(Surface):
    """The points, workflows and comfyui services over gRPC.

    ``async with AsyncClient() as client:`` (or ``await client.close()``). ``endpoints`` defaults to
    ``Endpoints.discover()``.
    """

    def __init__(
        self,
        endpoints: Endpoints | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retry_window: float = DEFAULT_RETRY_WINDOW,
        resume_window: float = DEFAULT_RESUME_WINDOW,
    ) -> None:
        self.endpoints = endpoints if endpoints is not None else Endpoints.discover()
        self.timeout = timeout
        self.retry_window = retry_window
        self.resume_window = resume_window
        self._addresses = {
            POINTS: self.endpoints.points,
            WORKFLOWS: self.endpoints.workflows,
            COMFYUI: self.endpoints.comfyui,
        }
        self._channels: dict[str, TracedChannel] = {}  # by address
        self._stubs: dict[str, Any] = {}
        self._closed = False

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: types.TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channels (calls still running are cancelled)."""
        self._closed = True
        channels, self._channels, self._stubs = list(self._channels.values()), {}, {}
        for channel in channels:
            await channel.close()

    # --- the transport -----------------------------------------------------------------------------

    def _stub(self, service: str) -> Any:
        stub = self._stubs.get(service)
        if stub is None:
            if self._closed:
                raise RuntimeError("the client is closed")
            address = self._addresses[service]
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = open_channel(address, self.timeout)
            stub = self._stubs[service] = _STUBS[service](channel)
        return stub

    def _error(self, error: grpc.aio.AioRpcError, service: str) -> StationThisError:
        return grpc_error(error, service, self._addresses[service], self.timeout)

    async def _unary(self, service: str, method: str, request: Message, response_type: type[M]) -> M:
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + self.timeout
        attempt = 0
        while True:
            call = getattr(self._stub(service), method)
            try:
                reply: M = await call(request, timeout=max(0.001, deadline - loop.time()))
                return reply
            except grpc.aio.AioRpcError as exc:
                error = self._error(exc, service)
            if not isinstance(error, Unavailable):
                raise error
            delay = backoff(attempt)
            now = loop.time()
            if now + delay > min(deadline, start + self.retry_window):
                raise error
            log.info("%s.%s: %s; retrying (attempt %d)", service, method, error.message, attempt + 2)
            await asyncio.sleep(delay)
            attempt += 1

    async def _open_watch(self, request: svc.WatchRunRequest) -> AsyncGenerator[svc.WatchRunResponse, None]:
        call = self._stub(COMFYUI).WatchRun(request)  # no deadline: a run may take an hour
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, COMFYUI) from None
        finally:
            call.cancel()

    async def _upload(self, metadata: svc.UploadFileMetadata, path: Path) -> svc.UploadFileResponse:
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + self.upload_timeout(metadata.size_bytes)
        attempt = 0
        while True:
            call = self._stub(COMFYUI).UploadFile
            try:
                reply: svc.UploadFileResponse = await call(
                    _chunks(metadata, path), timeout=max(0.001, deadline - loop.time())
                )
                return reply
            except grpc.aio.AioRpcError as exc:
                error = self._error(exc, COMFYUI)
            if not isinstance(error, Unavailable):
                raise error
            delay = backoff(attempt)
            if loop.time() + delay > min(deadline, start + self.retry_window):
                raise error
            log.info("comfyui.UploadFile: %s; retrying (attempt %d)", error.message, attempt + 2)
            await asyncio.sleep(delay)
            attempt += 1


async def _chunks(metadata: svc.UploadFileMetadata, path: Path) -> AsyncIterator[svc.UploadFileRequest]:
    """UploadFile's messages: the metadata, then the file in chunks (read off the event loop)."""
    yield svc.UploadFileRequest(metadata=metadata)
    handle = await asyncio.to_thread(path.open, "rb")
    try:
        while True:
            chunk = await asyncio.to_thread(handle.read, CHUNK_BYTES)
            if not chunk:
                return
            yield svc.UploadFileRequest(chunk=chunk)
    finally:
        handle.close()


def grpc_error(error: grpc.aio.AioRpcError, service: str, address: str, timeout: float) -> StationThisError:
    """The exception for a failed call: the service's own ``google.rpc.Status`` when it sent one,
    else (it was not reached, the deadline passed) a message of ours naming the service."""
    code = error.code()
    status = status_from_trailers(error.trailing_metadata())  # type: ignore[arg-type]
    if status is not None and status.code == code.value[0]:
        return from_status(status)
    name = code.name
    if code == grpc.StatusCode.UNAVAILABLE:
        message = f"the {service} service at {address} is not available; retry"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        message = f"the {service} service did not answer within {timeout:g} s"
    elif code == grpc.StatusCode.CANCELLED:
        message = f"the call to the {service} service was cancelled"
    elif code == grpc.StatusCode.UNIMPLEMENTED:
        message = f"the {service} service at {address} does not implement this call"
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        message = f"the {service} service refused the message: too large or too many"
    else:
        message = f"the {service} service failed ({name})"
    return make_error(name, message)


__all__ = ["AsyncClient", "Generation", "RunWatch"]
