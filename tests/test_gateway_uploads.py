"""POST /v1/uploads: a raw or multipart HTTP body streamed to ComfyUIService.UploadFile, through the
real gateway, the real comfyui service and the ComfyUI Deploy emulator; the size limit enforced
before the body is read."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.conftest import Running
from tests.test_gateway import ERROR_INFO, KEYS, RunningGateway, detail, error_of, gateway_env, serve_gateway

LIMIT = 2 * 1024 * 1024


@pytest.fixture
async def gw(stack: dict[str, Running]) -> AsyncIterator[RunningGateway]:
    async with serve_gateway(gateway_env(stack, GATEWAY_MAX_UPLOAD_BYTES=str(LIMIT))) as running:
        yield running


async def fetched(url: str) -> bytes:
    async with httpx.AsyncClient(trust_env=False) as client:
        response = await client.get(url)
        assert response.status_code == 200, response.text
        return response.content


async def test_a_raw_body_is_streamed_to_upload_file(gw: RunningGateway) -> None:
    content = os.urandom(LIMIT - 1000)  # several chunks
    response = await gw.http.post(
        "/v1/uploads?user_id=alice&filename=cat.png",
        content=content,
        headers={"X-API-Key": KEYS[0], "Content-Type": "image/png", "Idempotency-Key": "up-1"},
    )
    assert response.status_code == 200, response.text
    reply = response.json()
    assert reply["size_bytes"] == str(len(content)) and reply["content_type"] == "image/png"
    assert reply["filename"].endswith(".png") and reply["file_id"] and reply["url"].startswith("http")
    assert hashlib.sha256(await fetched(reply["url"])).digest() == hashlib.sha256(content).digest()
    # The same Idempotency-Key: the first answer again.
    again = await gw.http.post(
        "/v1/uploads?user_id=alice&filename=cat.png",
        content=content,
        headers={"X-API-Key": KEYS[0], "Content-Type": "image/png", "Idempotency-Key": "up-1"},
    )
    assert again.status_code == 200 and again.json() == reply


async def test_a_multipart_body_is_streamed_to_upload_file(gw: RunningGateway) -> None:
    content = os.urandom(300_000)
    response = await gw.http.post(
        "/v1/uploads",
        data={"user_id": "bob"},
        files={"file": ("dog.webp", content, "image/webp")},
        headers={"X-API-Key": KEYS[1]},
    )
    assert response.status_code == 200, response.text
    reply = response.json()
    assert reply["size_bytes"] == str(len(content)) and reply["content_type"] == "image/webp"
    assert await fetched(reply["url"]) == content
    # The file name can be given as a field too.
    response = await gw.http.post(
        "/v1/uploads",
        data={"user_id": "bob", "filename": "renamed.jpg"},
        files={"file": ("x.bin", b"\xff\xd8\xff" + content[:1000], "image/jpeg")},
        headers={"X-API-Key": KEYS[1]},
    )
    assert response.status_code == 200 and response.json()["filename"].endswith(".jpg"), response.text


async def test_upload_errors_keep_the_error_shape(gw: RunningGateway) -> None:
    headers = {"X-API-Key": KEYS[0], "Content-Type": "text/plain"}
    # The service's own refusals come back unchanged.
    error = error_of(
        await gw.http.post("/v1/uploads?user_id=alice&filename=a.txt", content=b"hi", headers=headers),
        400,
        "INVALID_ARGUMENT",
    )
    assert detail(error, ERROR_INFO)["reason"] == "UNSUPPORTED_FILE_TYPE"
    error = error_of(
        await gw.http.post(
            "/v1/uploads?user_id=alice", content=b"hi", headers={**headers, "Content-Type": "image/png"}
        ),
        400,
        "INVALID_ARGUMENT",
    )
    assert "metadata.filename" in json.dumps(error)
    error = error_of(
        await gw.http.post("/v1/uploads?user_id=alice&filename=a.png&size=3", content=b"hi", headers=headers),
        400,
        "INVALID_ARGUMENT",
    )
    assert "size" in json.dumps(error)
    error_of(
        await gw.http.post("/v1/uploads", content=b"hi", headers={"Content-Type": "image/png"}), 401, "UNAUTHENTICATED"
    )
    response = await gw.get("/v1/uploads")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    error = error_of(
        await gw.http.post(
            "/v1/uploads", data={"user_id": "bob"}, files={"other": ("a.png", b"x")}, headers={"X-API-Key": KEYS[0]}
        ),
        400,
        "INVALID_ARGUMENT",
    )
    assert "file" in json.dumps(error)
    # A multipart body that is not one, or ends early: 400, never a 500.
    for body in (b"garbage", b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\nabc'):
        error = error_of(
            await gw.http.post(
                "/v1/uploads",
                content=body,
                headers={"X-API-Key": KEYS[0], "Content-Type": "multipart/form-data; boundary=b"},
            ),
            400,
            "INVALID_ARGUMENT",
        )
        assert "body" in json.dumps(error) or "file" in json.dumps(error)


async def exchange(port: int, head: bytes, body: bytes, within: float = 5.0) -> tuple[int, dict[str, Any], bool]:
    """Send ``head`` and as much of ``body`` as the server reads before it answers; (status, error,
    whether the server closed the connection before the whole body was sent)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = bytearray()

    async def collect() -> None:  # read as it arrives: a reset after the answer must not lose it
        try:
            while chunk := await reader.read(65536):
                received.extend(chunk)
        except ConnectionError:
            pass

    collector = asyncio.create_task(collect())
    sent = 0
    try:
        writer.write(head)
        for start in range(0, len(body), 65536):
            if collector.done():
                break
            writer.write(body[start : start + 65536])
            await writer.drain()
            sent += 65536
            await asyncio.sleep(0.002)
    except ConnectionError:
        pass
    await asyncio.wait_for(collector, within)
    writer.close()
    head_text, _, payload = bytes(received).partition(b"\r\n\r\n")
    status = int(head_text.split()[1])
    return status, json.loads(payload), sent < len(body)


async def test_the_size_limit_is_enforced_before_the_body_is_read(gw: RunningGateway) -> None:
    # A declared size over the limit: answered at once, nothing of the body read.
    head = (
        f"POST /v1/uploads?user_id=alice&filename=big.png HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEYS[0]}\r\n"
        f"Content-Type: image/png\r\nContent-Length: {LIMIT + 1}\r\n\r\n"
    ).encode()
    status, body, _ = await exchange(gw.port, head, b"")
    assert status == 413 and detail(body["error"], ERROR_INFO)["reason"] == "BODY_TOO_LARGE"
    # A multipart body that grows past the limit: cut off with 413 as soon as it does; the rest of a
    # much larger body is never read.
    boundary = "b0undary"
    prefix = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="user_id"\r\n\r\nalice\r\n--{boundary}\r\n'
        'Content-Disposition: form-data; name="file"; filename="big.png"\r\nContent-Type: image/png\r\n\r\n'
    )
    huge = prefix.encode() + b"x" * (LIMIT * 8)
    head = (
        f"POST /v1/uploads HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEYS[0]}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunked = b"".join(
        b"%x\r\n%s\r\n" % (len(huge[i : i + 65536]), huge[i : i + 65536]) for i in range(0, len(huge), 65536)
    )
    status, body, cut = await exchange(gw.port, head, chunked, within=10)
    assert status == 413 and detail(body["error"], ERROR_INFO)["reason"] == "BODY_TOO_LARGE"
    assert cut, "the whole body was read"
    # Raw bodies need their length (it is the size UploadFile is told first).
    head = (
        f"POST /v1/uploads?user_id=alice&filename=a.png HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEYS[0]}\r\n"
        "Content-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    status, body, _ = await exchange(gw.port, head, b"3\r\nabc\r\n0\r\n\r\n")
    assert status == 411 and detail(body["error"], ERROR_INFO)["reason"] == "LENGTH_REQUIRED"


async def test_a_refusal_that_races_the_upload_is_still_the_services_answer(gw: RunningGateway) -> None:
    """The service refuses on the metadata while the bytes are still being sent: grpc.aio may then
    report the call as INTERNAL ("Internal error from Core"); the gateway answers the service's own
    status, which is in the trailers. (Without that, about 1 in 60 of these was a 500.)"""
    answers: dict[int, int] = {}
    for index in range(240):
        response = await gw.http.post(
            "/v1/uploads",
            data={"user_id": "not a user id", "filename": "\x13bad"},
            files={"file": ("file.gif", b"GIF87a" + os.urandom(index * 10), "image/gif")},
            headers={"X-API-Key": KEYS[0]},
        )
        answers[response.status_code] = answers.get(response.status_code, 0) + 1
        assert response.status_code == 400, response.text


async def test_when_grpc_loses_the_services_answer_the_metadata_is_asked_again(
    gw: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway import exchange, transcode, uploads

    real = exchange.status_of
    lost = [True]

    def losing(exc: Any, method: str) -> Any:  # the first answer is lost as grpc.aio loses it
        if lost:
            lost.clear()
            return transcode.simple_status(exchange.grpc.StatusCode.INTERNAL, exchange.CORE_WRITE_ERROR, "X")
        return real(exc, method)

    monkeypatch.setattr(uploads, "status_of", losing)
    response = await gw.http.post("/v1/uploads?user_id=not%20valid&filename=a.png", content=b"x" * 5000,
                                  headers={"X-API-Key": KEYS[0], "Content-Type": "image/png"})  # fmt: skip
    error = error_of(response, 400, "INVALID_ARGUMENT")
    assert "metadata.user_id" in json.dumps(error) and not lost
