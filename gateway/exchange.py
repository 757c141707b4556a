"""One HTTP exchange as the gateway handles it, and the refusals it may answer with: the pieces the
request handlers (app.py) and the uploads route (uploads.py) share."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any
from urllib.parse import parse_qsl

import grpc
from google.rpc import status_pb2
from grpc_status import rpc_status
from opentelemetry import trace

from common.errors import status_from_trailers

from . import jsonmap, transcode

log = logging.getLogger("stationthis.gateway")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
JSON = b"application/json"
WEBHOOK_ADAPTER = "comfydeploy-webhook"  # the adapter name of ComfyUI Deploy's callbacks


class Refused(Exception):
    """An answer in the error shape, raised from anywhere in a request's handling."""

    def __init__(
        self, status: status_pb2.Status, http_status: int | None = None, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        super().__init__(status.message)
        self.status = status
        self.http_status = http_status
        self.headers = list(headers)


def refusal(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    http_status: int | None = None,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> Refused:
    return Refused(transcode.simple_status(code, message, reason), http_status, headers)


class Exchange:
    """One request as the gateway handles it: what it read of it, and what it will answer."""

    __slots__ = (
        "adapter",
        "body_done",
        "close",
        "headers",
        "method",
        "path",
        "receive",
        "request_id",
        "route",
        "scope",
        "send",
        "span",
        "started",
        "status",
    )

    def __init__(self, scope: Scope, receive: Receive, send: Send, headers: dict[bytes, bytes]) -> None:
        self.scope = scope
        self.receive = receive
        self.send = send
        self.headers = headers
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.adapter = ""
        self.route = ""  # the route template, for logs, spans and metrics
        self.request_id = ""
        self.status = 0
        self.started = False
        self.close = False  # answer with Connection: close (a body was left unread)
        self.body_done = False  # the whole body was read
        self.span: trace.Span = trace.INVALID_SPAN

    def header(self, name: bytes) -> str | None:
        value = self.headers.get(name)
        return None if value is None else value.decode("latin-1")

    def query(self) -> list[tuple[str, str]]:
        raw = self.scope.get("query_string", b"")
        return parse_qsl(raw.decode("latin-1"), keep_blank_values=True) if raw else []

    def response_headers(self, content_type: bytes, length: int | None) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", content_type)]
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        headers.append((b"x-request-id", self.request_id.encode()))
        span_context = self.span.get_span_context()
        if span_context.is_valid:
            trace_id = f"{span_context.trace_id:032x}"
            headers.append((b"x-trace-id", trace_id.encode()))
            traceresponse = f"00-{trace_id}-{span_context.span_id:016x}-{span_context.trace_flags:02x}"
            headers.append((b"traceresponse", traceresponse.encode()))
        if self.close:
            headers.append((b"connection", b"close"))
        return headers

    async def answer(
        self, status: int, body: bytes, content_type: bytes = JSON, extra: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        self.status = status
        headers = self.response_headers(content_type, len(body))
        headers.extend(extra)
        self.started = True
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})

    async def error(self, refused: Refused) -> None:
        if not self.body_done and (
            self.headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in self.headers
        ):
            self.close = True  # refused before its body was read (401, 429, 404...): the rest is not read
        body = transcode.error_body(refused.status)
        if refused.http_status is not None:
            body["error"]["code"] = refused.http_status
        await self.answer(body["error"]["code"], jsonmap.dumps(body), extra=refused.headers)

    def metadata(self) -> list[tuple[str, str]]:
        """What every call to a service carries: the trace context, the request id and the caller's
        adapter (which callback origins the comfyui service allows it)."""
        metadata = [("x-request-id", self.request_id)]
        if self.adapter and self.adapter != WEBHOOK_ADAPTER:
            metadata.append(("x-stationthis-adapter", self.adapter))
        span_context = self.span.get_span_context()
        if span_context.is_valid:
            metadata.append(
                (
                    "traceparent",
                    f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{span_context.trace_flags:02x}",
                )
            )
            if span_context.trace_state:
                metadata.append(("tracestate", span_context.trace_state.to_header()))
        baggage = self.headers.get(b"baggage")
        if baggage:
            metadata.append(("baggage", baggage.decode("latin-1")))
        return metadata

    async def read_body(self, limit: int, seconds: float) -> bytes:
        """The whole body; 413 as soon as it is larger than ``limit`` (checked before and while
        reading), 408 if it takes longer than ``seconds``. Either leaves the rest unread and closes."""
        declared = self.headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            self.close = True
            raise too_large(limit)
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(seconds):
                while True:
                    message = await self.receive()
                    if message["type"] == "http.disconnect":
                        raise refusal(grpc.StatusCode.CANCELLED, "the client went away", "CLIENT_CLOSED_REQUEST")
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        self.close = True
                        raise too_large(limit)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        self.body_done = True
                        return b"".join(chunks)
        except TimeoutError:
            self.close = True
            raise refusal(
                grpc.StatusCode.DEADLINE_EXCEEDED, "the request body did not arrive in time", "REQUEST_TIMEOUT", 408
            ) from None


def new_request_id() -> str:
    """32 hex digits. Not a secret, so not from the OS's entropy (a system call per request)."""
    return f"{random.getrandbits(128):032x}"


def too_large(limit: int) -> Refused:
    return refusal(
        grpc.StatusCode.INVALID_ARGUMENT, f"request body too large (at most {limit} bytes)", "BODY_TOO_LARGE", 413
    )


CORE_WRITE_ERROR = "Internal error from Core"


def status_of(exc: grpc.aio.AioRpcError, method: str) -> status_pb2.Status:
    try:
        rich = rpc_status.from_call(exc)  # type: ignore[arg-type]
    except ValueError:  # a rich status that contradicts the call's own code
        rich = None
        if exc.code() == grpc.StatusCode.INTERNAL and exc.details() == CORE_WRITE_ERROR:
            # grpc.aio turns a client-streaming call into INTERNAL when a write races the service's
            # answer (the service refused the upload while its bytes were still being sent); the
            # service's own status is in the trailers, and it is the answer.
            rich = status_from_trailers(exc.trailing_metadata())  # type: ignore[arg-type]
        if rich is None:
            log.warning("inconsistent rich status from %s", exc.code().name, exc_info=True)
    if rich is not None and rich.details:
        return rich
    if exc.code() == grpc.StatusCode.INTERNAL and exc.details() == CORE_WRITE_ERROR:
        return status_pb2.Status(code=exc.code().value[0], message=CORE_WRITE_ERROR)  # uploads ask again
    # No status of ours: the service was not reached, or gRPC itself ended the call. Its text is the
    # library's (connection refused, GOAWAY, ...), never for a client: say what happened in our words.
    return own_status(exc.code(), method)


_OWN_WORDS = {
    grpc.StatusCode.UNAVAILABLE: ("the {service} service is not available; retry", "DEPENDENCY_UNAVAILABLE"),
    grpc.StatusCode.DEADLINE_EXCEEDED: ("the {service} service did not answer in time", "DEADLINE_EXCEEDED"),
    grpc.StatusCode.CANCELLED: ("the call to the {service} service was cancelled", "CANCELLED"),
    grpc.StatusCode.UNIMPLEMENTED: ("{method} is not implemented", "NOT_IMPLEMENTED"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: ("the {service} service is overloaded; retry", "DEPENDENCY_OVERLOADED"),
}


def own_status(code: grpc.StatusCode, method: str) -> status_pb2.Status:
    service = method.lstrip("/").split("/")[0].split(".")[1] if method.count(".") >= 2 else "called"
    words, reason = _OWN_WORDS.get(code, ("internal error", "INTERNAL"))
    if code not in _OWN_WORDS:
        code = grpc.StatusCode.INTERNAL
    return transcode.simple_status(code, words.format(service=service, method=method.rsplit("/", 1)[-1]), reason)
