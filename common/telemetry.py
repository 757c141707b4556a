"""OpenTelemetry, wired once and explicitly at process start.

A ``TracerProvider`` named after the service; W3C TraceContext and Baggage propagation; OTLP export
only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (the exporter reads the standard ``OTEL_*``
variables itself); nothing exported otherwise. Redis and httpx clients are instrumented here so every
outbound call joins the caller's trace (the points ledger records one span per script call instead of
the per-command span: docs/decisions/0008). Health and reflection RPCs stay out of traces unless the
caller sends a trace context (see ``_traced``).

Metrics: ``setup_metrics`` installs a ``MeterProvider`` in every process. Its metrics are served in
Prometheus text format at ``http://<metrics address>/metrics`` (each process has its own address,
e.g. ``POINTS_METRICS_ADDR``), and also exported by OTLP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set.
Without a provider the instruments the code defines would record nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from opentelemetry import metrics, propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_UNTRACED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _traced(details: Any) -> bool:
    """Health checks and reflection stay out of traces, unless the call carries a trace context.

    Probes (orchestrators, load balancers, our own dependency checks) send no ``traceparent`` and
    would only flood the traces; a caller that does send one made the call part of a traced
    operation, so it joins that trace like any other RPC. A plain prefix test: the library's
    composable filters split the method with os.path on every call, a measurable share of a cheap
    RPC's cost.
    """
    method = getattr(details, "method", "")
    if isinstance(method, bytes):
        method = method.decode()
    if not str(method).startswith(_UNTRACED_PREFIXES):
        return True
    metadata = getattr(details, "invocation_metadata", None) or ()
    return any(item[0] == "traceparent" for item in metadata)


_provider: TracerProvider | None = None
_meter_provider: Any = None
log = logging.getLogger("stationthis.telemetry")


def setup(
    service_name: str, environ: Mapping[str, str] | None = None, extra: SpanProcessor | None = None
) -> TracerProvider:
    """Install the global tracer provider and propagators (idempotent within a process)."""
    global _provider
    environ = os.environ if environ is None else environ
    propagate.set_global_textmap(CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()]))
    if _provider is None:
        name = environ.get("OTEL_SERVICE_NAME") or service_name
        _provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
        if environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(_provider)
        _instrument_clients()
    if extra is not None:
        _provider.add_span_processor(extra)
    return _provider


def _instrument_clients() -> None:
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    if not RedisInstrumentor().is_instrumented_by_opentelemetry:
        RedisInstrumentor().instrument()
    if not HTTPXClientInstrumentor().is_instrumented_by_opentelemetry:
        HTTPXClientInstrumentor().instrument()


def server_interceptor() -> Any:
    """The grpc.aio server interceptor that continues the caller's trace."""
    return aio_server_interceptor(filter_=_traced)


def setup_metrics(service_name: str, listen_addr: str, environ: Mapping[str, str] | None = None) -> int | None:
    """Install the global MeterProvider (once per process); serve ``/metrics`` on ``listen_addr``
    (``host:port``, port 0 picks one; empty: not served). Returns the port served, if any."""
    global _meter_provider
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader

    environ = os.environ if environ is None else environ
    if _meter_provider is not None:
        return None
    readers: list[MetricReader] = []
    port = None
    if listen_addr:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        host, _, wanted = listen_addr.rpartition(":")
        server, _thread = start_http_server(int(wanted), addr=host.strip("[]"))
        port = int(server.server_port)
        readers.append(PrometheusMetricReader())
    if environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    name = environ.get("OTEL_SERVICE_NAME") or service_name
    _meter_provider = MeterProvider(resource=Resource.create({SERVICE_NAME: name}), metric_readers=readers)
    metrics.set_meter_provider(_meter_provider)
    if port is not None:
        log.info("metrics at http://%s:%d/metrics", host, port, extra={"metrics_port": port})
    return port


def shutdown() -> None:
    if _provider is not None:
        _provider.force_flush(timeout_millis=2000)
    if _meter_provider is not None:
        _meter_provider.shutdown(timeout_millis=2000)
