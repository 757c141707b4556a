"""The shared server bootstrap: error model, health, graceful stop, logs. Real gRPC on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
import subprocess
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common import logs
from common.bootstrap import GrpcServer, Probe, redis_probe
from common.redis_client import connect
from devtools.redis_server import RedisServer, free_port
from tests.conftest import FAST, PYTHON, ROOT, python_env
from tests.support import TEST_SERVICE, make_test_service, rpc_details

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
async def test_server():
    server = GrpcServer(make_test_service(), FAST)
    port = await server.start("127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield channel
    await channel.close()
    await server.stop(0)


def call(channel: grpc.aio.Channel, method: str):
    return channel.unary_unary(f"/{TEST_SERVICE}/{method}")


details = rpc_details


async def test_ok_call_passes_through(test_server):
    assert await call(test_server, "Echo")(b"hello", timeout=5) == b"hello"


async def test_invalid_argument_carries_field_violations(test_server):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(test_server, "Invalid")(b"", timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, bad = details(caught.value)
    assert info is not None and info.reason == "INVALID_ARGUMENT" and info.domain == "test.stationthis.dev"
    assert bad is not None
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("user_id", "must not be empty"),
        ("amount", "must be positive"),
    ]


async def test_domain_error_carries_reason_and_metadata(test_server):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(test_server, "Precondition")(b"", timeout=5)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info, bad = details(caught.value)
    assert info is not None and info.reason == "INSUFFICIENT_POINTS" and dict(info.metadata) == {"needed": "100"}
    assert bad is None


async def test_unexpected_exception_reveals_nothing(test_server):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(test_server, "Crash")(b"", timeout=5)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert caught.value.details() == "internal error"
    text = repr(caught.value) + str(caught.value.trailing_metadata())
    assert "secret-internal-detail" not in text and "Traceback" not in text and "app.py" not in text


async def test_not_implemented_is_unimplemented(test_server):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(test_server, "Unimplemented")(b"", timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_stream_error_after_items(test_server):
    stream = test_server.unary_stream(f"/{TEST_SERVICE}/Stream")(b"", timeout=5)
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for item in stream:
            received.append(item)
    assert received == [b"0", b"1", b"2"]
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(caught.value)[0].reason == "STREAM_BROKEN"


async def health_of(channel: grpc.aio.Channel, service: str = "") -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    return reply.status


async def eventually(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


async def test_health_not_serving_until_dependency_answers(tmp_path):
    """Health follows the dependency: NOT_SERVING while Redis is down, SERVING once it answers, and back."""
    port = free_port()
    client = connect(f"redis://127.0.0.1:{port}/0", timeout=0.2)
    server = GrpcServer(make_test_service([redis_probe(client, timeout=0.2)]), FAST)
    bound = await server.start("127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{bound}")
    redis = RedisServer(tmp_path / "redis", port=port)
    try:
        await asyncio.sleep(0.3)  # several probe rounds with nothing listening
        assert await health_of(channel) == NOT_SERVING
        assert await health_of(channel, TEST_SERVICE) == NOT_SERVING
        redis.start()
        await eventually(lambda: _is(channel, SERVING))
        assert await health_of(channel, TEST_SERVICE) == SERVING
        redis.stop()
        await eventually(lambda: _is(channel, NOT_SERVING))
    finally:
        redis.stop()
        await channel.close()
        await server.stop(0)
        await client.aclose()


async def _is(channel: grpc.aio.Channel, status: int) -> bool:
    return await health_of(channel) == status


async def test_failing_probe_keeps_not_serving_and_stop_reports_not_serving():
    async def broken() -> None:
        raise ConnectionError("nope")

    server = GrpcServer(make_test_service([Probe("broken", broken)]), FAST)
    port = await server.start("127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        await asyncio.sleep(0.2)
        assert await health_of(channel) == NOT_SERVING
    finally:
        await channel.close()
        await server.stop(0)


def test_sigterm_drains_in_flight_rpc():
    """SIGTERM: health turns NOT_SERVING, the in-flight RPC still completes OK, the process exits 0."""
    process = subprocess.Popen(
        [PYTHON, "-m", "tests.slow_server"], cwd=ROOT, env=python_env(), stderr=subprocess.PIPE, text=True
    )
    try:
        port = None
        assert process.stderr is not None
        for line in process.stderr:
            entry = json.loads(line)
            if "port" in entry:
                port = entry["port"]
                break
        assert port, "server never said where it listens"

        async def scenario() -> tuple[bytes, list[int], grpc.StatusCode]:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await eventually(lambda: _is(channel, SERVING))
                watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=20)
                statuses = [(await watch.read()).status]
                in_flight = asyncio.ensure_future(call(channel, "Sleep")(b"1.5", timeout=20))
                await asyncio.sleep(0.3)  # the RPC is now running on the server
                process.send_signal(signal.SIGTERM)
                statuses.append((await watch.read()).status)  # health goes NOT_SERVING first
                await asyncio.sleep(0.2)
                try:
                    await call(channel, "Echo")(b"late", timeout=2)
                    late = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    late = exc.code()
                return await in_flight, statuses, late

        reply, statuses, late = asyncio.run(scenario())
        assert reply == b"done", "the in-flight RPC did not finish"
        assert statuses == [SERVING, NOT_SERVING]
        assert late == grpc.StatusCode.UNAVAILABLE, "a new RPC was accepted while draining"
        assert process.wait(timeout=20) == 0
        rest = process.stderr.read()
        assert "stopped" in rest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_json_logs_carry_trace_id_and_redact_secrets():
    from opentelemetry.sdk.trace import TracerProvider

    stream = io.StringIO()
    logs.configure("unit", "INFO", secrets=["sk-very-secret-key"], stream=stream)
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        logging.getLogger("x").info("calling with key %s", "sk-very-secret-key", extra={"url": "?k=sk-very-secret-key"})
        trace_id = format(span.get_span_context().trace_id, "032x")
    try:
        raise ValueError("boom sk-very-secret-key")
    except ValueError:
        logging.getLogger("x").exception("failed")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["trace_id"] == trace_id and lines[0]["service"] == "unit"
    assert "sk-very-secret-key" not in stream.getvalue()
    assert "[REDACTED]" in lines[0]["msg"] and "[REDACTED]" in lines[0]["url"]
    assert "ValueError" in lines[1]["exc"]


async def test_unexpected_exception_is_logged_with_trace(test_server, caplog):
    with caplog.at_level(logging.ERROR, logger="stationthis.rpc"):
        with pytest.raises(grpc.aio.AioRpcError):
            await call(test_server, "Crash")(b"", timeout=5)
    assert any("Crash" in r.getMessage() for r in caplog.records)


async def test_blocking_reads_have_their_own_timeout(redis_server: RedisServer) -> None:
    """An ordinary client gives up a read after 2 s; the blocking-read client waits out XREAD BLOCK."""
    import redis.exceptions

    from common.redis_client import connect_for_blocking_reads

    plain = connect(redis_server.url, timeout=0.3)
    blocking = connect_for_blocking_reads(redis_server.url, block_seconds=2.0, timeout=0.3)
    try:
        with pytest.raises(redis.exceptions.TimeoutError):
            await plain.xread({"test:blocking-stream": "$"}, block=1000)
        started = time.monotonic()
        assert await blocking.xread({"test:blocking-stream": "$"}, block=1000) == []
        assert time.monotonic() - started >= 0.9
    finally:
        await plain.aclose()
        await blocking.aclose()
