"""OpenTelemetry, wired once and explicitly at process start.

A ``TracerProvider`` named after the service; W3C TraceContext and Baggage propagation; OTLP export
only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (the exporter reads the standard ``OTEL_*``
variables itself); nothing exported otherwise. Redis and httpx clients are instrumented here so every
outbound call joins the caller's trace (the points ledger records one span per script call instead of
the per-command span: docs/decisions/0008). Health and reflection RPCs stay out of traces unless the
caller sends a trace context (see ``_traced``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
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


def client_interceptors() -> list[Any]:
    """grpc.aio client interceptors that start a span and send ``traceparent``."""
    interceptors: list[Any] = aio_client_interceptors(filter_=_traced)
    return interceptors


def shutdown() -> None:
    if _provider is not None:
        _provider.force_flush(timeout_millis=2000)
