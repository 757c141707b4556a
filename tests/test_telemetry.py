"""OTLP export: only when OTEL_EXPORTER_OTLP_ENDPOINT is set, to a real OTLP/gRPC receiver."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.conftest import PYTHON, ROOT, python_env


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A minimal OTLP trace receiver: remembers (service.name, span name, trace id) of every span."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str]] = []

    def Export(self, request, context):
        for resource_spans in request.resource_spans:
            service = next(
                (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), ""
            )
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.spans.append((service, span.name, span.trace_id.hex()))
        return trace_service_pb2.ExportTraceServiceResponse()


def _run_points(redis_url: str, extra: dict[str, str]) -> tuple[subprocess.Popen[str], int]:
    env = python_env(REDIS_URL=redis_url, POINTS_LISTEN_ADDR="127.0.0.1:0", **extra)
    for name in [n for n in env if n.startswith("OTEL_EXPORTER_") and n not in extra]:
        del env[name]
    process = subprocess.Popen([PYTHON, "-m", "services.points"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    for line in process.stderr:
        entry = json.loads(line)
        if "port" in entry:
            return process, int(entry["port"])
    raise AssertionError("the service never said where it listens")


def _call_with_traceparent(port: int, trace_id: str, health_trace_id: str = "") -> None:
    """GetAccount within trace ``trace_id``; then health checks: a bare probe and, if
    ``health_trace_id`` is given, one within that trace."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from stationthis.points.v1 import points_service_pb2, points_service_pb2_grpc

    async def call() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = points_service_pb2_grpc.PointsServiceStub(channel)
            metadata = (("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),)
            for _ in range(100):  # until the service answers
                try:
                    await stub.GetAccount(points_service_pb2.GetAccountRequest(user_id="otel"), metadata=metadata)
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    await asyncio.sleep(0.05)
            health = health_pb2_grpc.HealthStub(channel)
            await health.Check(health_pb2.HealthCheckRequest())
            if health_trace_id:
                traced = (("traceparent", f"00-{health_trace_id}-00f067aa0ba902b7-01"),)
                await health.Check(health_pb2.HealthCheckRequest(), metadata=traced)

    asyncio.run(call())


def _stop(process: subprocess.Popen[str]) -> str:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    return process.stderr.read() if process.stderr else ""


def test_spans_are_exported_over_otlp_when_the_endpoint_is_set(redis_url):
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        process, service_port = _run_points(
            redis_url,
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                "OTEL_EXPORTER_OTLP_INSECURE": "true",
                "OTEL_SERVICE_NAME": "points-under-test",
            },
        )
        trace_id, health_trace_id = "4bf92f3577b34da6a3ce929d0e0e4736", "6cf92f3577b34da6a3ce929d0e0e4737"
        _call_with_traceparent(service_port, trace_id, health_trace_id)
        _stop(process)  # shutdown flushes the batch processor
    finally:
        server.stop(0)
    ours = [s for s in collector.spans if s[0] == "points-under-test"]
    assert any(name.endswith("GetAccount") and tid == trace_id for _, name, tid in ours), collector.spans
    # Probes (no trace context) stay out of traces; a health check sent within a trace joins it.
    health_spans = [tid for _, name, tid in ours if "Health" in name]
    assert health_spans == [health_trace_id], collector.spans


def test_nothing_is_exported_without_the_endpoint(redis_url):
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    # Listen where an OTLP exporter sends by default (localhost:4317), so a default export is caught.
    try:
        port = server.add_insecure_port("127.0.0.1:4317")
    except RuntimeError:
        port = server.add_insecure_port("127.0.0.1:0")  # 4317 is taken here; still a live receiver
    server.start()
    try:
        process, service_port = _run_points(redis_url, {"OTEL_SERVICE_NAME": "points-silent"})
        _call_with_traceparent(service_port, "5bf92f3577b34da6a3ce929d0e0e4736")
        _stop(process)
    finally:
        server.stop(0)
    assert port
    assert collector.spans == []
