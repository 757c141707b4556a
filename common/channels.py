"""Calls between services: one channel factory, used by the gateway and the comfyui service.

``open_channel(address)`` returns a ``grpc.aio`` channel that every generated stub can use, with:

* **trace context**: each call gets a CLIENT span (named ``/<service>/<method>``, as the
  OpenTelemetry gRPC instrumentation names it) and its W3C
  ``traceparent`` is written straight into the call's metadata. The OpenTelemetry client
  interceptor does the same but runs each call in a second asyncio task (70-90 us a call measured
  here, docs/decisions/0009); this wrapper adds no task.
* **a default deadline**: a call made without ``timeout=`` gets ``default_timeout``;
  ``remaining(context)`` passes on what is left of a server's own caller's deadline.
* **retries by gRPC itself** (a service config retry policy): UNAVAILABLE only (the peer was not
  reached or refused before doing anything; our mutations are idempotent by ``request_id`` anyway),
  at most 4 attempts, exponential backoff from 0.1 s capped at 2 s, with gRPC's full jitter.
* **keepalive** pings every 30 s while calls are open (long WatchRun streams), so a dead peer is
  noticed in 40 s instead of at the next TCP timeout. Servers accept such pings (bootstrap options).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Generator, Sequence
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from .errors import DeadlineExceeded, DomainError, Relayed, Unavailable
from .logs import REQUEST_ID

DEFAULT_TIMEOUT_SECONDS = 30.0
RETRY_POLICY = {
    "maxAttempts": 4,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
SERVICE_CONFIG = json.dumps({"methodConfig": [{"name": [{}], "retryPolicy": RETRY_POLICY}]})
CHANNEL_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.service_config", SERVICE_CONFIG),
    ("grpc.enable_retries", 1),
    # A peer that was down is dialled again within 5 s of coming back (gRPC's default backoff grows
    # to 120 s, so a long outage would outlast the service's return by up to two minutes).
    ("grpc.max_reconnect_backoff_ms", 5_000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
)
# What a server accepts from such clients (common.bootstrap): pings at most every 10 s.
SERVER_KEEPALIVE_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
)

_tracer = trace.get_tracer("stationthis.channels")


def remaining(context: grpc.aio.ServicerContext | None, cap: float = DEFAULT_TIMEOUT_SECONDS) -> float:
    """Seconds left of the caller's deadline (at most ``cap``), for a call made on its behalf.

    A caller that set no deadline gets ``cap``; an expired deadline gives a tiny positive value so
    the outbound call fails at once with DEADLINE_EXCEEDED rather than running unbounded.
    """
    left: float | None = context.time_remaining() if context is not None else None
    if left is None:
        return cap
    return max(0.001, min(cap, left))


def peer_error(error: grpc.aio.AioRpcError, service: str) -> DomainError:
    """What to answer when a call to another of our services failed: its own error, unchanged, when
    it answered one (a ``google.rpc.Status`` with an ErrorInfo); else DEPENDENCY_UNAVAILABLE (it was
    not reached) or DEADLINE_EXCEEDED."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is not None and any(d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR) for d in status.details):
        return Relayed(status)
    if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{service} did not answer in time", reason="DEADLINE_EXCEEDED",
                                metadata={"service": service})  # fmt: skip
    return Unavailable(
        f"{service} is not available; retry", reason="DEPENDENCY_UNAVAILABLE", metadata={"service": service}
    )


def _start(method: str, metadata: Any) -> tuple[trace.Span, list[tuple[str, str]]]:
    """A CLIENT span for ``method`` and the call's metadata with its ``traceparent`` added."""
    service, _, name = method.lstrip("/").partition("/")
    span = _tracer.start_span(
        method,
        kind=SpanKind.CLIENT,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
    )
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    request_id = REQUEST_ID.get()
    if request_id:
        carrier["x-request-id"] = request_id  # the request being served, passed on
    merged = [(k, v) for k, v in (metadata or ()) if k not in carrier]
    merged.extend(carrier.items())
    return span, merged


def _finish(span: trace.Span, error: BaseException | None) -> None:
    if isinstance(error, grpc.aio.AioRpcError):
        span.set_attribute("rpc.grpc.status_code", error.code().value[0])
        span.set_status(Status(StatusCode.ERROR, error.code().name))
    elif error is not None:
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
    else:
        span.set_attribute("rpc.grpc.status_code", 0)
    span.end()


class _TracedUnaryCall:
    """Awaitable like the call it wraps (whose other methods it passes through); ends the span."""

    __slots__ = ("_call", "_span")

    def __init__(self, call: Any, span: trace.Span) -> None:
        self._call = call
        self._span = span

    def __await__(self) -> Generator[Any, None, Any]:
        try:
            response = yield from self._call.__await__()
        except BaseException as exc:
            _finish(self._span, exc)
            raise
        _finish(self._span, None)
        return response

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


class _TracedStreamCall:
    """Async-iterable like the streaming call it wraps; ends the span when the stream ends."""

    __slots__ = ("_call", "_span")

    def __init__(self, call: Any, span: trace.Span) -> None:
        self._call = call
        self._span = span

    async def _iterate(self) -> AsyncIterator[Any]:
        try:
            async for item in self._call:
                yield item
        except BaseException as exc:
            _finish(self._span, exc)
            raise
        _finish(self._span, None)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


class _Callable:
    __slots__ = ("_default_timeout", "_inner", "_method", "_wrap")

    def __init__(self, inner: Any, method: str, default_timeout: float | None, wrap: type) -> None:
        self._inner = inner
        self._method = method
        self._default_timeout = default_timeout
        self._wrap = wrap

    def __call__(self, request: Any, *, timeout: float | None = None, metadata: Any = None, **kwargs: Any) -> Any:
        span, merged = _start(self._method, metadata)
        try:
            call = self._inner(
                request, timeout=self._default_timeout if timeout is None else timeout, metadata=merged, **kwargs
            )
        except BaseException as exc:
            _finish(span, exc)
            raise
        return self._wrap(call, span)


class TracedChannel:
    """A ``grpc.aio.Channel`` whose unary and server-streaming calls are traced and bounded."""

    def __init__(self, channel: grpc.aio.Channel, default_timeout: float) -> None:
        self.channel = channel
        self.default_timeout = default_timeout

    def unary_unary(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                    **kwargs: Any) -> Any:  # fmt: skip
        inner = self.channel.unary_unary(method, request_serializer, response_deserializer, **kwargs)
        return _Callable(inner, method, self.default_timeout, _TracedUnaryCall)

    def unary_stream(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                     **kwargs: Any) -> Any:  # fmt: skip
        inner = self.channel.unary_stream(method, request_serializer, response_deserializer, **kwargs)
        # A stream lives as long as its reader wants (WatchRun): no default deadline.
        return _Callable(inner, method, None, _TracedStreamCall)

    def stream_unary(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                     **kwargs: Any) -> Any:  # fmt: skip
        return self.channel.stream_unary(method, request_serializer, response_deserializer, **kwargs)

    def stream_stream(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                      **kwargs: Any) -> Any:  # fmt: skip
        return self.channel.stream_stream(method, request_serializer, response_deserializer, **kwargs)

    async def close(self, grace: float | None = None) -> None:
        await self.channel.close(grace)

    async def channel_ready(self) -> None:
        await self.channel.channel_ready()

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.channel.get_state(try_to_connect)


def open_channel(address: str, default_timeout: float = DEFAULT_TIMEOUT_SECONDS) -> TracedChannel:
    """The channel to another of our services at ``address`` (``host:port``)."""
    return TracedChannel(grpc.aio.insecure_channel(address, options=list(CHANNEL_OPTIONS)), default_timeout)
