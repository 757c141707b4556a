"""``POST /v1/uploads``: an HTTP body streamed to ComfyUIService.UploadFile (client streaming).

No ``google.api.http`` annotation can describe a byte stream, so this one route is the gateway's own;
it is in the OpenAPI document like the others. Two ways to send a file:

- **raw**: the file is the body, its ``Content-Type`` the file's type, ``Content-Length`` required
  (it is the ``size_bytes`` UploadFile must be told first; without it: 411), ``user_id`` and
  ``filename`` in the query. The body goes to the service as it arrives, in chunks of up to
  ``CHUNK_BYTES``: nothing beyond one chunk is held.
- **multipart/form-data**: fields ``user_id`` and optionally ``filename`` (else the file part's own
  name), and one ``file`` part whose ``Content-Type`` is the file's. A part's size is known only at
  its end, so the file part is spooled (in memory up to 1 MiB, then to a temporary file) before it is
  streamed.

The size limit (``GATEWAY_MAX_UPLOAD_BYTES``) is enforced before the body is read: a larger
``Content-Length`` is answered 413 at once; a body that grows past the limit is cut off with 413 as
soon as it does. In both cases the rest of the body is never read: the connection is closed after the
answer. A client that pauses longer than ``GATEWAY_BODY_TIMEOUT_SECONDS`` gets 408. If the service
refuses the file (type, size, user) while it is being sent, its answer is returned at once and the
rest of the body is not read either. ``Idempotency-Key`` fills ``request_id``.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator, Mapping
from typing import IO, Any, Protocol

import grpc
from google.rpc import error_details_pb2
from python_multipart.multipart import MultipartParser, parse_options_header

from common.errors import FieldViolation
from stationthis.comfyui.v1 import comfyui_service_pb2

from . import jsonmap, transcode
from .config import GatewayConfig
from .exchange import CORE_WRITE_ERROR, Exchange, Refused, refusal, status_of, too_large


class Backend(Protocol):
    """What the uploads route needs of the gateway: its stubs by method, and its settings."""

    @property
    def calls(self) -> Mapping[str, Any]: ...

    @property
    def config(self) -> GatewayConfig: ...


SVC = comfyui_service_pb2
METHOD = "/stationthis.comfyui.v1.ComfyUIService/UploadFile"
PATH = "/v1/uploads"
CHUNK_BYTES = 256 * 1024  # UploadFile takes up to 1 MiB a message
UPLOAD_SECONDS = 600.0  # the service's own bound for one upload
MAX_FIELD_BYTES = 1024
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and small fields around the file
SPOOL_MEMORY_BYTES = 1 << 20


def _bad(field: str, description: str) -> Any:

    return Refused(transcode.invalid([FieldViolation(field, description)]))


class _Stop:
    """Why the body stopped being read before its end (a Refused to answer instead)."""

    def __init__(self) -> None:
        self.refused: Any = None
        self.complete = False


async def _receive(exchange: Exchange, pause: float, stop: _Stop) -> bytes | None:
    """The next piece of the body (b"" at its end), or None after recording why there is none."""
    try:
        async with asyncio.timeout(pause):
            message = await exchange.receive()
    except TimeoutError:
        stop.refused = refusal(
            grpc.StatusCode.DEADLINE_EXCEEDED, "the upload paused for too long", "REQUEST_TIMEOUT", 408
        )
        return None
    if message["type"] == "http.disconnect":
        stop.refused = refusal(grpc.StatusCode.CANCELLED, "the client went away", "CLIENT_CLOSED_REQUEST")
        return None
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        stop.complete = exchange.body_done = True
    return body


async def handle(gateway: Backend, exchange: Exchange) -> None:

    config = gateway.config
    limit = config.max_upload_bytes
    query: dict[str, str] = {}
    for name, value in exchange.query():
        if name not in ("user_id", "filename"):
            raise _bad(name, "unknown field (the query takes user_id and filename)")
        if name in query:
            raise _bad(name, "is given more than once")
        query[name] = value
    content_type = exchange.header(b"content-type") or ""
    stop = _Stop()
    spool: IO[bytes] | None = None
    if content_type.lower().startswith("multipart/form-data"):
        fields, spool, size, file_type, file_name = await _read_multipart(
            exchange, content_type, limit, config.body_timeout_seconds
        )
        user_id = fields.get("user_id", query.get("user_id", ""))
        filename = fields.get("filename") or query.get("filename") or file_name
        content_type = file_type
        source = _from_spool(spool)
    else:
        declared = exchange.headers.get(b"content-length")
        if declared is None or not declared.isdigit():
            exchange.close = True
            raise refusal(
                grpc.StatusCode.INVALID_ARGUMENT,
                "Content-Length is required (or send multipart/form-data)",
                "LENGTH_REQUIRED",
                411,
            )
        size = int(declared)
        if size > limit:
            exchange.close = True
            raise too_large(limit)
        user_id, filename = query.get("user_id", ""), query.get("filename", "")
        source = _from_body(exchange, config.body_timeout_seconds, stop)
    metadata = SVC.UploadFileMetadata(
        request_id=exchange.header(b"idempotency-key") or "",
        user_id=user_id,
        filename=filename,
        content_type=content_type.split(";")[0].strip(),
        size_bytes=size,
    )
    call: Any = None

    async def messages() -> AsyncIterator[SVC.UploadFileRequest]:
        yield SVC.UploadFileRequest(metadata=metadata)
        async for chunk in source:
            if call is not None and call.done():
                return  # the service has answered (a refusal): a write now would only race its status
            yield SVC.UploadFileRequest(chunk=chunk)
        if stop.refused is not None and call is not None:
            call.cancel()  # the client failed us: the service must not see a short file as complete

    try:
        call = gateway.calls[METHOD](
            messages(), timeout=max(UPLOAD_SECONDS, config.rpc_timeout_seconds), metadata=exchange.metadata()
        )
        try:
            reply = await call
        except asyncio.CancelledError:
            if stop.refused is None:
                raise
            reply = None
        except grpc.aio.AioRpcError as exc:
            if stop.refused is None:
                if not stop.complete:
                    exchange.close = True  # the service answered before the end: the rest stays unread
                status = status_of(exc, METHOD)
                if status.code == grpc.StatusCode.INTERNAL.value[0] and status.message == CORE_WRITE_ERROR:
                    status = await _ask_again(gateway, exchange, metadata)
                raise Refused(status) from None
            reply = None
    finally:
        if spool is not None:
            spool.close()
    if stop.refused is not None:
        exchange.close = True
        raise stop.refused
    await exchange.answer(200, jsonmap.dumps(jsonmap.to_dict(reply)))


async def _ask_again(gateway: Backend, exchange: Exchange, metadata: SVC.UploadFileMetadata) -> Any:
    """The service's answer to the metadata alone, when grpc.aio lost its answer to the upload.

    A service that refuses an upload on its metadata does so while the bytes are still being sent,
    and grpc.aio then sometimes reports the call as INTERNAL ("Internal error from Core") without the
    service's status. Sending the metadata alone asks the same question again without side effects
    (nothing is stored before all the bytes arrived): a refusal of the metadata is the answer; the
    expected complaint about the missing bytes means the first refusal was about something else,
    which is lost, and the client is told to retry.
    """

    async def only_metadata() -> AsyncIterator[SVC.UploadFileRequest]:
        yield SVC.UploadFileRequest(metadata=metadata)

    try:
        await gateway.calls[METHOD](only_metadata(), timeout=gateway.config.rpc_timeout_seconds,
                                    metadata=exchange.metadata())  # fmt: skip
    except grpc.aio.AioRpcError as exc:
        status = status_of(exc, METHOD)
        reasons = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
        info = error_details_pb2.ErrorInfo()
        if reasons and reasons[0].Unpack(info) and info.reason != "FILE_SIZE_MISMATCH":
            return status
    return transcode.simple_status(grpc.StatusCode.UNAVAILABLE, "the upload was interrupted; send it again",
                                   "UPLOAD_INTERRUPTED")  # fmt: skip


async def _from_body(exchange: Exchange, pause: float, stop: _Stop) -> AsyncIterator[bytes]:
    """The body in pieces of up to CHUNK_BYTES, as it arrives (uvicorn stops at Content-Length)."""
    pending = bytearray()
    while not stop.complete:
        piece = await _receive(exchange, pause, stop)
        if piece is None:
            return
        pending += piece
        while len(pending) >= CHUNK_BYTES:
            yield bytes(pending[:CHUNK_BYTES])
            del pending[:CHUNK_BYTES]
    if pending:
        yield bytes(pending)


async def _from_spool(spool: IO[bytes]) -> AsyncIterator[bytes]:
    spool.seek(0)
    while True:
        chunk = await asyncio.to_thread(spool.read, CHUNK_BYTES)
        if not chunk:
            return
        yield chunk


async def _read_multipart(
    exchange: Exchange, content_type: str, limit: int, pause: float
) -> tuple[dict[str, str], IO[bytes], int, str, str]:
    """(fields, the spooled file, its size, its type, its name) of a multipart body, read to its end."""

    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise _bad("Content-Type", "multipart/form-data needs a boundary")
    declared = exchange.headers.get(b"content-length")
    total_limit = limit + MULTIPART_OVERHEAD
    if declared is not None and declared.isdigit() and int(declared) > total_limit:
        exchange.close = True
        raise too_large(limit)
    spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)
    fields: dict[str, str] = {}
    state: dict[str, Any] = {
        "headers": {},
        "field": b"",
        "value": b"",
        "name": None,
        "file": None,
        "size": 0,
        "files": 0,
        "error": None,
        "text": bytearray(),
    }

    def header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def header_end() -> None:
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def headers_finished() -> None:
        _, disposition = parse_options_header(state["headers"].get(b"content-disposition", b""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        state["name"] = name
        if name == "file":
            state["files"] += 1
            state["file"] = (
                disposition.get(b"filename", b"").decode("utf-8", "replace"),
                state["headers"].get(b"content-type", b"application/octet-stream").decode("latin-1"),
            )
        state["text"] = bytearray()

    def part_data(data: bytes, start: int, end: int) -> None:
        if state["error"] is not None:
            return
        if state["name"] == "file":
            if state["files"] > 1:
                return
            state["size"] += end - start
            if state["size"] > limit:
                state["error"] = "too large"
                return
            spool.write(data[start:end])
        else:
            state["text"] += data[start:end]
            if len(state["text"]) > MAX_FIELD_BYTES:
                state["error"] = f"the field {state['name']} is longer than {MAX_FIELD_BYTES} bytes"

    def part_end() -> None:
        if state["name"] in ("user_id", "filename") and state["error"] is None:
            fields[state["name"]] = bytes(state["text"]).decode("utf-8", "replace")
        state["headers"] = {}

    parser = MultipartParser(
        boundary,
        {
            "on_header_field": header_field,
            "on_header_value": header_value,
            "on_header_end": header_end,
            "on_headers_finished": headers_finished,
            "on_part_data": part_data,
            "on_part_end": part_end,
            "on_end": lambda: state.__setitem__("ended", True),
        },  # type: ignore[arg-type]
    )
    stop = _Stop()
    read = 0
    try:
        while not stop.complete:
            piece = await _receive(exchange, pause, stop)
            if piece is None:
                raise stop.refused
            read += len(piece)
            if read > total_limit:
                exchange.close = True
                raise too_large(limit)
            try:
                parser.write(piece)
            except Exception:
                exchange.close = not stop.complete
                raise _bad("body", "is not valid multipart/form-data") from None
            if state["error"] == "too large":
                exchange.close = True
                raise too_large(limit)
            if state["error"] is not None:
                exchange.close = not stop.complete
                raise _bad("body", state["error"])
        try:
            parser.finalize()
        except Exception:
            state["ended"] = False
        if not state.get("ended"):
            raise _bad("body", "is not valid multipart/form-data (no closing boundary)")
    except BaseException:
        spool.close()
        raise
    if state["files"] != 1:
        spool.close()
        raise _bad("file", "exactly one part named file is required")
    file_name, file_type = state["file"]
    return fields, spool, state["size"], file_type, file_name
