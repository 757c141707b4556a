"""Who may call the gateway, and how much: adapters and their keys, rate limits in Redis shared by
replicas, request ids, and clients that are too big or too slow.

The gateway runs under uvicorn over real sockets; Redis is the session's real server. A small
points service stand-in records the metadata each call carries.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from common.config import ConfigError, load
from gateway.config import GatewayConfig
from stationthis.points.v1 import points_service_pb2
from tests.conftest import Running, StartService
from tests.test_gateway import (
    ERROR_INFO,
    KEYS,
    detail,
    error_of,
    gateway_env,
    gateway_refused,
    serve_gateway,
)
from tests.test_grpcurl import start_contract_only

TELEGRAM, DISCORD = "telegram-key-123", "discord-key-456"
ADAPTER_KEYS = f"telegram={TELEGRAM},discord={DISCORD}"


# --- a points stand-in that records metadata -------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []
        self.server: grpc.aio.Server | None = None
        self.address = ""

    async def start(self) -> None:
        async def get_account(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            self.metadata.append({k: v for k, v in context.invocation_metadata() or ()})  # type: ignore[misc]
            return points_service_pb2.GetAccountResponse().SerializeToString()

        handler = grpc.method_handlers_generic_handler(
            "stationthis.points.v1.PointsService", {"GetAccount": grpc.unary_unary_rpc_method_handler(get_account)}
        )
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((handler,))
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"
        await self.server.start()


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    found = Recorder()
    await found.start()
    yield found
    assert found.server is not None
    await found.server.stop(0)


@pytest.fixture
async def backends(start_service: StartService, recorder: Recorder, redis_url: str) -> dict[str, Any]:
    """Contract-only servers, the recorder as the points service, and the test Redis."""
    found: dict[str, Any] = dict(await start_contract_only(start_service))
    return {"backends": found, "recorder": recorder, "redis_url": redis_url}


def env_of(backends: dict[str, Any], **overrides: str) -> dict[str, str]:
    env = gateway_env(backends["backends"], **overrides)
    env["POINTS_SERVICE_ADDR"] = backends["recorder"].address
    env.setdefault("REDIS_URL", backends["redis_url"])
    if "REDIS_URL" in overrides:
        env["REDIS_URL"] = overrides["REDIS_URL"]
    return env


# --- adapters --------------------------------------------------------------------------------------


def test_api_keys_name_their_adapter() -> None:
    config = load(GatewayConfig, {"GATEWAY_API_KEYS": f"{ADAPTER_KEYS}, plain-key-789 ,discord=discord-key-2"})
    assert [(k, k.adapter) for k in config.api_keys] == [
        (TELEGRAM, "telegram"),
        (DISCORD, "discord"),
        ("plain-key-789", "default"),
        ("discord-key-2", "discord"),
    ]
    assert config.adapters == ("telegram", "discord", "default")
    # A key with "=" in it (base64 padding) is still a bare key unless named.
    assert load(GatewayConfig, {"GATEWAY_API_KEYS": "QUJDREVGR0g="}).api_keys[0].adapter == "default"
    for bad in ("telegram=", f"{TELEGRAM},x={TELEGRAM}", " , "):
        with pytest.raises(ConfigError) as raised:
            load(GatewayConfig, {"GATEWAY_API_KEYS": bad})
        assert "GATEWAY_API_KEYS" in str(raised.value) and TELEGRAM not in str(raised.value)


async def test_the_adapter_is_logged_and_traced_never_the_key(
    backends: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="stationthis.gateway")
    async with serve_gateway(env_of(backends, GATEWAY_API_KEYS=ADAPTER_KEYS)) as gw:
        for key, adapter in ((TELEGRAM, "telegram"), (DISCORD, "discord")):
            response = await gw.get("/v1/accounts/alice", key=key)
            assert response.status_code == 200, response.text
            [line] = [r for r in caplog.records if getattr(r, "request_id", None) == response.headers["x-request-id"]]
            assert line.adapter == adapter and line.status == 200  # type: ignore[attr-defined]
            assert line.route == "/v1/accounts/{user_id}"  # type: ignore[attr-defined]
        gateway_refused(await gw.get("/v1/accounts/alice", key=TELEGRAM + "x"), 401, "UNAUTHENTICATED")
    for record in caplog.records:
        assert TELEGRAM not in repr(vars(record)) and DISCORD not in repr(vars(record))


# --- rate limits -----------------------------------------------------------------------------------


def limited(backends: dict[str, Any], **overrides: str) -> dict[str, str]:
    defaults = {
        "GATEWAY_API_KEYS": ADAPTER_KEYS,
        "GATEWAY_RATE_LIMIT": "0.5",
        "GATEWAY_RATE_BURST": "3",
        "GATEWAY_MUTATION_RATE_LIMIT": "0.5",
        "GATEWAY_MUTATION_RATE_BURST": "1",
    }
    return env_of(backends, **{**defaults, **overrides})


def rate_limited(response: Any) -> int:
    error = gateway_refused(response, 429, "RESOURCE_EXHAUSTED")
    assert detail(error, ERROR_INFO)["reason"] == "RATE_LIMITED"
    assert "telegram" in error["message"] or "discord" in error["message"] or "webhook" in error["message"]
    seconds = int(response.headers["retry-after"])
    assert seconds >= 1
    return seconds


async def test_each_adapter_has_its_own_bucket_and_429_says_when_to_retry(backends: dict[str, Any]) -> None:
    async with serve_gateway(limited(backends)) as gw:
        for _ in range(3):  # the burst
            assert (await gw.get("/v1/accounts/alice", key=TELEGRAM)).status_code == 200
        assert rate_limited(await gw.get("/v1/accounts/alice", key=TELEGRAM)) == 2  # one token at 0.5/s
        assert rate_limited(await gw.get("/v1/accounts/alice", key=TELEGRAM)) >= 1
        # Another adapter is not affected.
        assert (await gw.get("/v1/accounts/alice", key=DISCORD)).status_code == 200
        # Health, readiness and the documents have no limit.
        for path in ("/healthz", "/readyz", "/openapi.json", "/docs"):
            assert (await gw.http.get(path)).status_code in (200, 503), path


async def test_mutations_have_a_budget_of_their_own(backends: dict[str, Any]) -> None:
    async with serve_gateway(limited(backends)) as gw:
        first = await gw.post("/v1/accounts/alice/holds", "{}", key=DISCORD)
        assert first.status_code == 501, first.text  # reached the (contract-only) service
        rate_limited(await gw.post("/v1/accounts/alice:creditQoints", "{}", key=DISCORD))
        # Reads still have budget left.
        assert (await gw.get("/v1/accounts/alice", key=DISCORD)).status_code == 200


async def test_replicas_share_one_bucket_in_redis(backends: dict[str, Any]) -> None:
    env = limited(backends, GATEWAY_RATE_BURST="4")
    async with serve_gateway(env) as one, serve_gateway(env) as two:
        answers = []
        for index in range(8):
            replica = one if index % 2 else two
            answers.append((await replica.get("/v1/accounts/alice", key=TELEGRAM)).status_code)
        assert answers.count(200) == 4 and answers.count(429) == 4, answers


async def test_the_webhook_route_has_its_own_rules(backends: dict[str, Any]) -> None:
    env = limited(backends, GATEWAY_WEBHOOK_RATE_LIMIT="0.5", GATEWAY_WEBHOOK_RATE_BURST="2")
    async with serve_gateway(env) as gw:
        # No token: refused before the body is looked at, whatever the body.
        error = gateway_refused(
            await gw.post("/v1/webhooks/comfydeploy", "{not json", key=None), 401, "UNAUTHENTICATED"
        )
        assert detail(error, ERROR_INFO)["reason"] == "WEBHOOK_TOKEN_MISSING"
        for _ in range(2):
            response = await gw.post("/v1/webhooks/comfydeploy?token=t", "{}", key=None)
            assert response.status_code == 501, response.text
        rate_limited(await gw.post("/v1/webhooks/comfydeploy?token=t", "{}", key=None))
        # The adapters' budgets are untouched by callbacks.
        assert (await gw.get("/v1/accounts/alice", key=TELEGRAM)).status_code == 200


async def test_without_redis_the_limit_is_not_enforced(
    backends: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        env = limited(backends, REDIS_URL=f"redis://127.0.0.1:{closed.getsockname()[1]}/0")
        async with serve_gateway(env) as gw:
            for _ in range(6):
                assert (await gw.get("/v1/accounts/alice", key=TELEGRAM)).status_code == 200
    warnings = [r for r in caplog.records if "rate limit not enforced" in r.getMessage()]
    assert len(warnings) == 1, warnings


# --- routes nobody has: the same answer for everyone -----------------------------------------------


async def test_unknown_routes_and_methods_answer_the_same_with_and_without_a_key(backends: dict[str, Any]) -> None:
    async with serve_gateway(limited(backends, GATEWAY_RATE_BURST="1000", GATEWAY_RATE_LIMIT="1000")) as gw:
        for method, path in (
            ("GET", "/v1/nothing"),
            ("GET", "/admin"),
            ("DELETE", "/v1/accounts/alice"),
            ("PUT", "/v1/runs"),
            ("GET", "/v1/uploads"),
            ("PATCH", "/v1/accounts/a/holds"),
            ("POST", "/v1/workflows/x/inputs.schema.json"),
            ("GET", "/v1/accounts/a:creditQoints"),
        ):
            seen = set()
            for headers in ({}, {"X-API-Key": "wrong-key-000"}, {"X-API-Key": TELEGRAM}):
                response = await gw.http.request(method, path, headers=headers)
                assert response.status_code in (404, 405), (method, path, response.text)
                seen.add((response.status_code, response.text, response.headers.get("allow")))
            assert len(seen) == 1, (method, path, seen)


# --- request ids -----------------------------------------------------------------------------------


async def test_request_id_is_accepted_or_made_passed_on_logged_and_returned(
    backends: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="stationthis.gateway")
    recorder: Recorder = backends["recorder"]
    async with serve_gateway(env_of(backends)) as gw:
        response = await gw.get("/v1/accounts/alice", headers={"X-Request-Id": "bot-42:msg/7"})
        assert response.headers["x-request-id"] == "bot-42:msg/7"
        assert recorder.metadata[-1]["x-request-id"] == "bot-42:msg/7"
        assert any(getattr(r, "request_id", None) == "bot-42:msg/7" for r in caplog.records)
        made = set()
        for bad in (None, "", "has space", "x" * 129, "new\u00e9line"):
            headers = {} if bad is None else {"X-Request-Id": bad.encode("utf-8")}
            response = await gw.get("/v1/accounts/alice", headers=headers)
            given = response.headers["x-request-id"]
            assert len(given) == 32 and int(given, 16) >= 0 and given not in made
            assert recorder.metadata[-1]["x-request-id"] == given
            made.add(given)
        # Errors carry it too.
        error = await gw.get("/v1/nothing", headers={"X-Request-Id": "r-404"})
        assert error.status_code == 404 and error.headers["x-request-id"] == "r-404"


# --- too big, too slow -----------------------------------------------------------------------------


async def raw(port: int, data: bytes, pause: float = 0.0, rest: bytes = b"", within: float = 10.0) -> bytes:
    """Send ``data`` (then after ``pause`` seconds ``rest``) and read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if pause:
            await asyncio.sleep(pause)
        if rest:
            try:
                writer.write(rest)
                await writer.drain()
            except ConnectionError:
                pass
        return await asyncio.wait_for(reader.read(), within)
    finally:
        writer.close()


def parsed(answer: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body) if body else None


async def test_oversized_heads_are_refused_and_the_connection_closed(backends: dict[str, Any]) -> None:
    async with serve_gateway(env_of(backends, GATEWAY_MAX_HEADER_BYTES="2048")) as gw:
        fine = f"GET /v1/accounts/alice HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEYS[0]}\r\nConnection: close\r\n\r\n"
        assert parsed(await raw(gw.port, fine.encode()))[0] == 200
        big = f"GET /v1/accounts/alice HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEYS[0]}\r\nX-Big: {'a' * 3000}\r\n\r\n"
        status, headers, body = parsed(await raw(gw.port, big.encode()))
        assert status == 431 and headers["connection"] == "close"
        assert body["error"]["code"] == 431 and detail(body["error"], ERROR_INFO)["reason"] == "HEADERS_TOO_LARGE"
        long_url = f"GET /v1/accounts/{'a' * 3000} HTTP/1.1\r\nHost: x\r\n\r\n"
        assert parsed(await raw(gw.port, long_url.encode()))[0] == 431


async def test_slow_clients_are_cut_off(backends: dict[str, Any]) -> None:
    env = env_of(backends, GATEWAY_HEADER_TIMEOUT_SECONDS="0.5", GATEWAY_BODY_TIMEOUT_SECONDS="0.5")
    async with serve_gateway(env) as gw:
        start = time.monotonic()
        # Half a head, then nothing: 408 and closed.
        status, headers, body = parsed(await raw(gw.port, b"GET /v1/accounts/alice HTTP/1.1\r\nHost: x\r\n"))
        assert status == 408 and headers["connection"] == "close" and body["error"]["code"] == 408
        # A connection that never sends anything is closed.
        assert await raw(gw.port, b"") == b""
        # A head sent a byte at a time keeps no connection open past the limit.
        slow = await raw(gw.port, b"G", pause=0.8, rest=b"ET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert slow == b"" or parsed(slow)[0] == 408
        # Part of a body, then nothing: 408 and closed.
        head = (
            f"POST /v1/accounts/alice/holds HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEYS[0]}\r\n"
            'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"req'
        )
        status, headers, body = parsed(await raw(gw.port, head.encode()))
        assert status == 408 and headers["connection"] == "close"
        assert detail(body["error"], ERROR_INFO)["reason"] == "REQUEST_TIMEOUT"
        assert time.monotonic() - start < 8


async def test_an_oversized_body_is_refused_before_it_is_read(backends: dict[str, Any]) -> None:
    async with serve_gateway(env_of(backends)) as gw:
        head = (
            f"POST /v1/accounts/alice/holds HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEYS[0]}\r\n"
            "Content-Type: application/json\r\nContent-Length: 50000000\r\n\r\n"
        )
        # Only the head is sent: the answer comes at once, and the connection is closed.
        status, headers, body = parsed(await raw(gw.port, head.encode(), within=5))
        assert status == 413 and headers["connection"] == "close"
        error_of_body = body["error"]
        assert detail(error_of_body, ERROR_INFO)["reason"] == "BODY_TOO_LARGE"
        # A body without a declared length is cut off as soon as it is too large.
        chunked = (
            f"POST /v1/accounts/alice/holds HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEYS[0]}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        )
        piece = b"%x\r\n%s\r\n" % (3000, b"x" * 3000)
        status, headers, _ = parsed(await raw(gw.port, chunked.encode() + piece * 2, within=5))
        assert status == 413 and headers["connection"] == "close"


async def test_errors_of_the_gateway_itself_keep_the_shape(backends: dict[str, Any]) -> None:
    async with serve_gateway(env_of(backends)) as gw:
        error_of(await gw.get("/v1/nothing"), 404, "NOT_FOUND")


__all__ = ["Running"]


async def test_a_body_refused_before_it_is_read_is_not_read(backends: dict[str, Any]) -> None:
    """401 (or 429, 404) on a request with a body: answered at once, the connection closed, the body
    never read."""
    async with serve_gateway(env_of(backends)) as gw:
        head = (
            "POST /v1/accounts/alice/holds HTTP/1.1\r\nHost: x\r\nX-API-Key: wrong-key-000\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        )
        status, headers, body = parsed(await raw(gw.port, head.encode(), within=5))
        assert status == 401 and headers["connection"] == "close"
        assert body["error"]["status"] == "UNAUTHENTICATED"
        # Without a body the connection stays open.
        fine = f"GET /v1/nothing HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEYS[0]}\r\n\r\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(fine.encode() * 2)  # two requests on one connection: both answered
        first = await asyncio.wait_for(reader.readuntil(b"}}"), 5)
        second = await asyncio.wait_for(reader.readuntil(b"}}"), 5)
        writer.close()
        assert first.startswith(b"HTTP/1.1 404") and b"HTTP/1.1 404" in second
