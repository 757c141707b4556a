"""Server interceptors shared by every service: error mapping, and an access log line plus RPC
metrics (``rpc.server.call.duration``, a histogram in seconds by method and status code, whose
count is the number of RPCs) for every call.

The tracing interceptor comes from opentelemetry-instrumentation-grpc (see ``telemetry``); the
bootstrap installs, outermost first: tracing, logging, errors.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_status import rpc_status
from opentelemetry import metrics

from .errors import DomainError, Unimplemented, internal_status, to_rpc_status
from .logs import REQUEST_ID, valid_request_id

log = logging.getLogger("stationthis.rpc")
_meter = metrics.get_meter("stationthis.rpc")
_durations = _meter.create_histogram(
    "rpc.server.call.duration", unit="s", description="gRPC calls served, by method and status code"
)
_attributes: dict[tuple[str, str], dict[str, str]] = {}  # built once per (method, code)

Behavior = Callable[..., Any]


def _rewrap(handler: grpc.RpcMethodHandler, wrap: Callable[[Behavior, bool, bool], Behavior]) -> grpc.RpcMethodHandler:
    """A copy of ``handler`` whose behaviour is ``wrap(behaviour, request_streaming, response_streaming)``."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap(handler.unary_unary, False, False), handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrap(handler.unary_stream, False, True), handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            wrap(handler.stream_unary, True, False), handler.request_deserializer, handler.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        wrap(handler.stream_stream, True, True), handler.request_deserializer, handler.response_serializer
    )


async def _call_unary(behavior: Behavior, request: Any, context: grpc.aio.ServicerContext) -> Any:
    result = behavior(request, context)
    if inspect.isawaitable(result):
        result = await result
    return result


async def _iterate(behavior: Behavior, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    result = behavior(request, context)
    if inspect.isawaitable(result):  # a coroutine that writes with context.write()
        await result
        return
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
    else:
        for item in result:
            yield item


class _Intercepting(grpc.aio.ServerInterceptor):
    """Base: wrap every method's behaviour with ``around`` (a coroutine taking a thunk)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method

        def wrap(behavior: Behavior, _req_stream: bool, resp_stream: bool) -> Behavior:
            if resp_stream:

                async def stream_behavior(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                    async with self.around(method, context):
                        async for item in _iterate(behavior, request, context):
                            yield item

                return stream_behavior

            async def unary_behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with self.around(method, context):
                    return await _call_unary(behavior, request, context)

            return unary_behavior

        return _rewrap(handler, wrap)

    def around(self, method: str, context: grpc.aio.ServicerContext) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


class _ErrorScope:
    def __init__(self, domain: str, context: grpc.aio.ServicerContext, method: str) -> None:
        self.domain = domain
        self.context = context
        self.method = method

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, (asyncio.CancelledError, grpc.aio.AbortError)):
            return False
        if isinstance(exc, DomainError):
            status = to_rpc_status(exc, self.domain)
        elif isinstance(exc, NotImplementedError):
            # The generated servicer base raises this for an RPC that is not implemented yet.
            status = to_rpc_status(Unimplemented(f"{self.method} is not implemented yet"), self.domain)
        else:
            log.error("unhandled exception in %s", self.method, exc_info=exc, extra={"rpc": self.method})
            status = internal_status(self.domain)
        await self.context.abort_with_status(rpc_status.to_status(status))
        return False


class ErrorInterceptor(_Intercepting):
    """Turns domain exceptions into ``google.rpc.Status``; anything else into a bare INTERNAL."""

    def __init__(self, domain: str) -> None:
        self.domain = domain

    def around(self, method: str, context: grpc.aio.ServicerContext) -> _ErrorScope:
        return _ErrorScope(self.domain, context, method)


class _LogScope:
    def __init__(self, context: grpc.aio.ServicerContext, method: str) -> None:
        self.context = context
        self.method = method
        self.start = 0.0

    async def __aenter__(self) -> None:
        self.start = time.perf_counter()
        for key, value in self.context.invocation_metadata() or ():
            if key == "x-request-id" and isinstance(value, str) and valid_request_id(value):
                REQUEST_ID.set(value)  # this RPC's task (and the tasks it starts) only

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        code = self.context.code()
        if exc is not None and isinstance(exc, asyncio.CancelledError):
            code = grpc.StatusCode.CANCELLED
        if code is None or code == grpc.StatusCode.OK:
            level = logging.DEBUG
            name = "OK"
        else:
            level = logging.WARNING if code != grpc.StatusCode.INTERNAL else logging.ERROR
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        seconds = time.perf_counter() - self.start
        attributes = _attributes.get((self.method, name))
        if attributes is None:
            attributes = _attributes[(self.method, name)] = {"rpc.method": self.method, "rpc.grpc.status_code": name}
        _durations.record(seconds, attributes)
        if log.isEnabledFor(level):
            log.log(
                level,
                "%s %s",
                self.method,
                name,
                extra={
                    "rpc": self.method,
                    "code": name,
                    "duration_ms": round(seconds * 1000, 3),
                    "peer": self.context.peer(),
                },
            )
        return False


class LoggingInterceptor(_Intercepting):
    """One structured line per RPC: method, status code, duration and peer (OK at DEBUG)."""

    def around(self, method: str, context: grpc.aio.ServicerContext) -> _LogScope:
        return _LogScope(context, method)
