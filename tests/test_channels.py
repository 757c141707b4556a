"""Calls between services (common/channels.py): deadlines passed on, retries, trace context."""

from __future__ import annotations

import asyncio
import secrets

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from common import telemetry
from common.bootstrap import GrpcServer, Service
from common.channels import open_channel, remaining
from common.errors import InvalidArgument, Unavailable
from tests.conftest import FAST

SERVICE = "stationthis.test.v1.ChannelTest"
_EXPORTER = InMemorySpanExporter()
_TRACING: list[bool] = []


class Peer:
    """A server whose handlers record what they saw and fail on demand."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail_first = 0
        self.error: type[Exception] = Unavailable
        self.seen_remaining: list[float | None] = []
        self.seen_traceparent: list[str] = []
        self.seen_request_ids: list[str] = []
        self.forward_to: object | None = None

    async def echo(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.calls += 1
        self.seen_remaining.append(context.time_remaining())
        self.seen_traceparent.extend(v for k, v in context.invocation_metadata() or () if k == "traceparent")
        self.seen_request_ids.extend(v for k, v in context.invocation_metadata() or () if k == "x-request-id")
        if self.calls <= self.fail_first:
            raise self.error("not now")
        return request

    async def forward(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """After 0.3 s of its own work, calls the other peer's Echo with what is left of this call's deadline."""
        assert self.forward_to is not None
        await asyncio.sleep(0.3)
        call = self.forward_to.unary_unary(f"/{SERVICE}/Echo")  # type: ignore[attr-defined]
        return await call(request, timeout=remaining(context))  # type: ignore[no-any-return]

    def service(self) -> Service:
        handlers = {
            "Echo": grpc.unary_unary_rpc_method_handler(self.echo),
            "Forward": grpc.unary_unary_rpc_method_handler(self.forward),
        }
        return Service(
            name="peer",
            domain="test.stationthis.dev",
            service_names=[SERVICE],
            register=lambda server: server.add_generic_rpc_handlers(
                [grpc.method_handlers_generic_handler(SERVICE, handlers)]
            ),
        )


@pytest.fixture
async def peers():
    started = []

    async def start() -> tuple[Peer, str]:
        peer = Peer()
        server = GrpcServer(peer.service(), FAST)
        port = await server.start("127.0.0.1:0")
        started.append(server)
        return peer, f"127.0.0.1:{port}"

    yield start
    for server in started:
        await server.stop(0)


async def test_a_deadline_passed_on_shrinks(peers) -> None:
    front, front_address = await peers()
    back, back_address = await peers()
    front.forward_to = open_channel(back_address)
    client = open_channel(front_address)
    try:
        await client.unary_unary(f"/{SERVICE}/Forward")(b"x", timeout=5.0)
        await client.unary_unary(f"/{SERVICE}/Forward")(b"x", timeout=1.0)
        await client.unary_unary(f"/{SERVICE}/Forward")(b"x")  # the channel's default deadline (30 s)
    finally:
        await client.close()
        await front.forward_to.close()  # type: ignore[attr-defined]
    five, short, default = back.seen_remaining
    # What the front had left after its own 0.3 s of work was passed on, not a fresh deadline.
    assert five is not None and 0 < five < 4.75
    assert short is not None and 0 < short < 0.75
    assert default is not None and 5.0 < default <= 30.0


def test_remaining_without_a_caller_deadline_is_the_cap() -> None:
    assert remaining(None, 7.0) == 7.0


async def test_unavailable_is_retried_and_invalid_argument_is_not(peers) -> None:
    peer, address = await peers()
    channel = open_channel(address)
    echo = channel.unary_unary(f"/{SERVICE}/Echo")
    try:
        peer.fail_first = 2
        assert await echo(b"hi", timeout=10) == b"hi"
        assert peer.calls == 3  # two UNAVAILABLE answers retried by the channel itself

        peer.calls, peer.fail_first, peer.error = 0, 1, InvalidArgument
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await echo(b"hi", timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert peer.calls == 1

        peer.calls, peer.fail_first, peer.error = 0, 10, Unavailable
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await echo(b"hi", timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert peer.calls == 4  # at most 4 attempts
    finally:
        await channel.close()


async def test_each_call_gets_a_client_span_and_sends_its_traceparent(peers) -> None:
    if not _TRACING:
        telemetry.setup("test", {}, extra=SimpleSpanProcessor(_EXPORTER))
        _TRACING.append(True)
    peer, address = await peers()
    channel = open_channel(address)
    tracer = trace.get_tracer("test")
    parent_trace = secrets.token_hex(4)
    try:
        with tracer.start_as_current_span(f"parent-{parent_trace}") as parent:
            await channel.unary_unary(f"/{SERVICE}/Echo")(b"x", timeout=10)
    finally:
        await channel.close()
    trace_id = format(parent.get_span_context().trace_id, "032x")
    [client_span] = [
        s
        for s in _EXPORTER.get_finished_spans()
        if s.kind == SpanKind.CLIENT and s.name == f"/{SERVICE}/Echo" and s.context.trace_id == int(trace_id, 16)
    ]
    assert client_span.parent is not None and client_span.parent.span_id == parent.get_span_context().span_id
    assert client_span.attributes is not None and client_span.attributes["rpc.grpc.status_code"] == 0
    [traceparent] = peer.seen_traceparent
    assert traceparent.split("-")[1] == trace_id
    assert traceparent.split("-")[2] == format(client_span.context.span_id, "016x")


async def test_the_request_id_is_logged_and_passed_on(peers, caplog) -> None:  # type: ignore[no-untyped-def]
    """The gateway's X-Request-Id reaches every service a request touches, and their log lines."""
    import io
    import json
    import logging

    from common.logs import JsonFormatter

    front, front_address = await peers()
    back, back_address = await peers()
    front.forward_to = open_channel(back_address)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("test"))
    rpc_log = logging.getLogger("stationthis.rpc")
    rpc_log.addHandler(handler)
    level = rpc_log.level
    rpc_log.setLevel(logging.DEBUG)
    client = grpc.aio.insecure_channel(front_address)
    try:
        call = client.unary_unary(f"/{SERVICE}/Forward")
        await call(b"x", timeout=5, metadata=(("x-request-id", "req-7f3a"),))
        await call(b"x", timeout=5, metadata=(("x-request-id", "not valid!"),))
    finally:
        rpc_log.removeHandler(handler)
        rpc_log.setLevel(level)
        await client.close()
        await front.forward_to.close()  # type: ignore[attr-defined]
    assert back.seen_request_ids == ["req-7f3a"]  # passed on; an invalid one is dropped
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert {line.get("request_id") for line in lines if line["rpc"].endswith("/Forward")} == {"req-7f3a", None}
