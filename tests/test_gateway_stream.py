"""What the gateway keeps while it cuts work from the hot path: deadlines (its own and a shorter
``grpc-timeout``), cancellation of a server stream when the HTTP client goes away, the caller's
trace context and request id as call metadata, and the services' error details.

Stand-in services (generic gRPC handlers in-process) record what each call received.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from stationthis.comfyui.v1 import comfyui_service_pb2, run_pb2
from stationthis.points.v1 import points_service_pb2
from tests.conftest import StartService
from tests.test_gateway import KEYS, error_of, gateway_env, serve_gateway
from tests.test_gateway import exported_spans as exported_spans  # the fixture
from tests.test_grpcurl import start_contract_only


class StandIn:
    """PointsService.GetAccount (sleeps ``delay``; fails with a rich status for user "bad") and
    ComfyUIService.WatchRun (a result every 20 ms until cancelled)."""

    def __init__(self) -> None:
        self.deadlines: list[float | None] = []
        self.metadata: list[dict[str, str]] = []
        self.delay = 0.0
        self.stream_cancelled = asyncio.Event()
        self.server = grpc.aio.server()
        self.address = ""

    async def start(self) -> None:
        async def get_account(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            self.deadlines.append(context.time_remaining())
            self.metadata.append(dict(context.invocation_metadata() or ()))  # type: ignore[arg-type]
            if points_service_pb2.GetAccountRequest.FromString(request).user_id == "bad":
                detail = any_pb2.Any()
                detail.Pack(error_details_pb2.ErrorInfo(reason="ACCOUNT_LOCKED", domain="points.stationthis.dev",
                                                        metadata={"why": "test"}))  # fmt: skip
                status = status_pb2.Status(code=code_pb2.FAILED_PRECONDITION, message="locked", details=[detail])
                await context.abort_with_status(rpc_status.to_status(status))
            await asyncio.sleep(self.delay)
            return points_service_pb2.GetAccountResponse().SerializeToString()

        async def watch_run(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            try:
                while True:
                    reply = comfyui_service_pb2.WatchRunResponse(run=run_pb2.Run(run_id="r-1", progress=0.5))
                    yield reply.SerializeToString()
                    await asyncio.sleep(0.02)
            except asyncio.CancelledError:
                self.stream_cancelled.set()
                raise

        self.server.add_generic_rpc_handlers((
            grpc.method_handlers_generic_handler("stationthis.points.v1.PointsService", {
                "GetAccount": grpc.unary_unary_rpc_method_handler(get_account)}),
            grpc.method_handlers_generic_handler("stationthis.comfyui.v1.ComfyUIService", {
                "WatchRun": grpc.unary_stream_rpc_method_handler(watch_run)}),
        ))  # fmt: skip
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        await self.server.start()


@pytest.fixture
async def stand_in() -> AsyncIterator[StandIn]:
    found = StandIn()
    await found.start()
    yield found
    await found.server.stop(0)


@pytest.fixture
async def env(start_service: StartService, stand_in: StandIn) -> dict[str, str]:
    found = gateway_env(await start_contract_only(start_service), GATEWAY_RPC_TIMEOUT_SECONDS="2")
    found["POINTS_SERVICE_ADDR"] = found["COMFYUI_SERVICE_ADDR"] = stand_in.address
    return found


async def test_deadlines_reach_the_service_and_a_late_reply_is_504(env: dict[str, str], stand_in: StandIn) -> None:
    async with serve_gateway(env) as gw:
        assert (await gw.get("/v1/accounts/alice")).status_code == 200
        assert stand_in.deadlines[-1] is not None and 1.0 < stand_in.deadlines[-1] <= 2.1  # timer granularity
        assert (await gw.get("/v1/accounts/alice", headers={"grpc-timeout": "500m"})).status_code == 200
        assert stand_in.deadlines[-1] is not None and stand_in.deadlines[-1] <= 0.6  # not the 2 s default
        stand_in.delay = 1.0
        error = error_of(await gw.get("/v1/accounts/alice", headers={"grpc-timeout": "100m"}), 504,
                         "DEADLINE_EXCEEDED")  # fmt: skip
        assert error["message"]


async def test_error_details_pass_through_unchanged(env: dict[str, str]) -> None:
    async with serve_gateway(env) as gw:
        error = error_of(await gw.get("/v1/accounts/bad"), 400, "FAILED_PRECONDITION")
        assert error["message"] == "locked"
        assert error["details"] == [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "ACCOUNT_LOCKED",
                                     "domain": "points.stationthis.dev", "metadata": {"why": "test"}}]  # fmt: skip


async def test_the_trace_context_and_request_id_travel_as_metadata(
    env: dict[str, str], stand_in: StandIn, exported_spans: Any
) -> None:
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    async with serve_gateway(env) as gw:
        # A raw request: the test's own HTTP client is instrumented and would send its own traceparent.
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(f"GET /v1/accounts/alice HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEYS[0]}\r\nConnection: close\r\n"
                     f"traceparent: 00-{trace_id}-{parent}-01\r\nbaggage: tenant=t1\r\nX-Request-Id: req-7\r\n\r\n"
                     .encode())  # fmt: skip
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200")
    assert f"x-trace-id: {trace_id}".encode() in answer
    metadata = stand_in.metadata[-1]
    version, sent_trace, sent_parent, flags = metadata["traceparent"].split("-")
    assert (version, sent_trace, flags) == ("00", trace_id, "01") and sent_parent != parent  # the gateway's span
    assert metadata["baggage"] == "tenant=t1" and metadata["x-request-id"] == "req-7"


async def test_a_client_that_goes_away_cancels_the_server_stream(env: dict[str, str], stand_in: StandIn) -> None:
    async with serve_gateway(env) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(f"GET /v1/runs/r-1:watch HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEYS[0]}\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
        events = 0
        while events < 3:
            line = await asyncio.wait_for(reader.readline(), 10)
            if line.startswith(b"data: "):
                assert json.loads(line[6:])["result"]["run"]["run_id"] == "r-1"
                events += 1
        writer.close()
        await asyncio.wait_for(stand_in.stream_cancelled.wait(), 5)
