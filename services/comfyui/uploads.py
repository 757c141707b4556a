"""UploadFile: a client stream (metadata, then chunks of bytes) relayed to ComfyUI Deploy's POST /file/upload.

Before a byte is read, the metadata is checked: its fields (INVALID_REQUEST), the type
(UNSUPPORTED_FILE_TYPE: ``content_type`` must be image/*, video/*, audio/* or application/*, and so
must the type the file name implies, because upstream decides by the name's extension and would
refuse the file after it was streamed), and the declared size against ``COMFYUI_MAX_UPLOAD_BYTES``
(FILE_TOO_LARGE). While reading, chunks hold at most 1 MiB, and the stream stops being read, with
FILE_TOO_LARGE, as soon as more bytes arrive than were declared: at most ``size_bytes`` are ever held.
Fewer bytes than declared is FILE_SIZE_MISMATCH. Then one upstream upload (retried by the client
where safe) with what is left of the caller's deadline, at most ``UPLOAD_SECONDS``.

Idempotent by ``request_id``; the fingerprint covers the metadata, not the bytes. A repeat still
streams its bytes: they are read, checked and discarded, and the first answer is returned.
"""

from __future__ import annotations

import mimetypes
import re
from collections.abc import AsyncIterator

import grpc

from comfydeploy import errors as cd
from common.errors import FieldViolation, InvalidArgument
from common.validation import Violations
from stationthis.comfyui.v1 import comfyui_service_pb2

from .admin import Upstream, deadline_of, remember, remembered, upstream_error

SVC = comfyui_service_pb2
MAX_CHUNK_BYTES = 1 << 20
MAX_FILENAME = 255
UPLOAD_SECONDS = 600.0
UPSTREAM_LIMIT_BYTES = 250 * 1024 * 1024  # §2.5 "File size exceeds 250MB limit"
FAMILIES = ("image/", "video/", "audio/", "application/")
MIME_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*")


def too_large(limit: int, size: int, received: int | None = None) -> InvalidArgument:
    metadata = {"limit_bytes": str(limit), "size_bytes": str(size)}
    if received is None:
        message = f"size_bytes {size} exceeds the limit of {limit} bytes"
        field = FieldViolation("metadata.size_bytes", f"must be at most {limit}")
    else:
        metadata["received_bytes"] = str(received)
        message = f"more bytes arrived ({received} so far) than size_bytes declared ({size})"
        field = FieldViolation("chunk", f"the bytes sent exceed size_bytes ({size})")
    return InvalidArgument(message, reason="FILE_TOO_LARGE", metadata=metadata, violations=[field])


def size_mismatch(size: int, received: int, message: str) -> InvalidArgument:
    return InvalidArgument(
        message, reason="FILE_SIZE_MISMATCH", metadata={"size_bytes": str(size), "received_bytes": str(received)}
    )


def unsupported(content_type: str, field: str, description: str) -> InvalidArgument:
    return InvalidArgument(
        f"unsupported file type: {description}",
        reason="UNSUPPORTED_FILE_TYPE",
        metadata={"content_type": content_type},
        violations=[FieldViolation(field, description)],
    )


def _invalid(field: str, description: str) -> InvalidArgument:
    return InvalidArgument.for_fields([FieldViolation(field, description)], reason="INVALID_REQUEST")


def check_metadata(meta: SVC.UploadFileMetadata, limit: int) -> None:
    check = Violations()
    if meta.request_id:
        check.request_id(meta.request_id, "metadata.request_id")
    check.user_id("metadata.user_id", meta.user_id)
    name = meta.filename
    check.text("metadata.filename", name, MAX_FILENAME, required=True)
    if "/" in name or "\\" in name:
        check.add("metadata.filename", "must be a bare file name, without path separators")
    elif name in (".", "..") or any(ord(char) < 32 or ord(char) == 127 for char in name):
        check.add("metadata.filename", "must be a printable file name")
    if not MIME_TYPE.fullmatch(meta.content_type):
        check.add("metadata.content_type", "is required: a MIME type such as image/png")
    if meta.size_bytes < 1:
        check.add("metadata.size_bytes", "must be at least 1")
    check.check()
    if not meta.content_type.lower().startswith(FAMILIES):
        raise unsupported(
            meta.content_type, "metadata.content_type", "must be image/*, video/*, audio/* or application/*"
        )
    implied = mimetypes.guess_type(name)[0]
    if implied is None or not implied.startswith(FAMILIES):
        raise unsupported(
            meta.content_type,
            "metadata.filename",
            f"the extension must be one of an image, video, audio or application type (ComfyUI Deploy stores "
            f"the file by its name; this one reads as {implied or 'unknown'})",
        )
    if meta.size_bytes > limit:
        raise too_large(limit, meta.size_bytes)


async def read_bytes(messages: AsyncIterator[SVC.UploadFileRequest], size: int, *, keep: bool) -> bytes:
    """The chunks after the metadata, exactly ``size`` bytes of them (kept only if ``keep``)."""
    parts: list[bytes] = []
    received = 0
    async for message in messages:
        if message.WhichOneof("content") == "metadata":
            raise _invalid("metadata", "only the first message may carry metadata")
        chunk = message.chunk
        if len(chunk) > MAX_CHUNK_BYTES:
            raise _invalid("chunk", f"must be at most {MAX_CHUNK_BYTES} bytes")
        received += len(chunk)
        if received > size:
            raise too_large(size, size, received)  # stop reading: nothing beyond size_bytes is held
        if keep:
            parts.append(chunk)
    if received != size:
        raise size_mismatch(size, received, f"{received} bytes arrived, size_bytes declared {size}")
    return b"".join(parts)


class UploadHandlers:
    """UploadFile, mixed into ComfyUIServicer (which sets ``upstream``)."""

    upstream: Upstream

    async def UploadFile(
        self, request_iterator: AsyncIterator[SVC.UploadFileRequest], context: grpc.aio.ServicerContext
    ) -> SVC.UploadFileResponse:
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None or first.WhichOneof("content") != "metadata":
            raise size_mismatch(0, 0, "the first message of UploadFile must carry the metadata")
        meta = first.metadata
        limit = self.upstream.max_upload_bytes
        check_metadata(meta, limit)
        fp, answer = await remembered(self.upstream, "UploadFile", meta, SVC.UploadFileResponse)
        content = await read_bytes(messages, meta.size_bytes, keep=answer is None)
        if answer is not None:
            return answer
        try:
            uploaded = await self.upstream.client.upload_file(
                meta.filename, content, meta.content_type, deadline=deadline_of(context, UPLOAD_SECONDS)
            )
        except cd.ValidationFailed as exc:
            detail = exc.detail.lower()
            if "unsupported file type" in detail:
                raise unsupported(meta.content_type, "metadata.filename", "refused by ComfyUI Deploy") from exc
            if "exceeds" in detail:  # "File size exceeds 250MB limit": COMFYUI_MAX_UPLOAD_BYTES is above upstream's
                raise too_large(UPSTREAM_LIMIT_BYTES, len(content)) from exc
            raise upstream_error(exc) from exc
        except cd.ComfyDeployError as exc:
            raise upstream_error(exc) from exc
        response = SVC.UploadFileResponse(
            file_id=uploaded.file_id,
            url=uploaded.file_url or "",
            size_bytes=len(content),
            content_type=meta.content_type,
            filename=uploaded.file_name or meta.filename,
        )
        return await remember(self.upstream, "UploadFile", meta.request_id, fp, response)
