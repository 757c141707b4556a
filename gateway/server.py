"""Runs the gateway under uvicorn, traced by the OpenTelemetry ASGI middleware."""

from __future__ import annotations

import logging

import uvicorn
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

from .app import create_app
from .config import GatewayConfig


def asgi_app(config: GatewayConfig) -> OpenTelemetryMiddleware:
    """The gateway app wrapped for tracing; health endpoints stay out of traces."""
    # One server span per request: the per-message "receive"/"send" spans add cost and no insight.
    return OpenTelemetryMiddleware(
        create_app(config), excluded_urls="healthz,readyz", exclude_spans=["receive", "send"]
    )


def _silence_access_log() -> None:
    # uvicorn's access log prints the query string, which may carry a webhook token: keep it off
    # whatever handlers exist (the gateway logs each request itself, without the query).
    logging.getLogger("uvicorn.access").disabled = True


def uvicorn_server(config: GatewayConfig, grace_seconds: float = 10.0, port: int | None = None) -> uvicorn.Server:
    _silence_access_log()
    host, _, listen_port = config.listen_addr.rpartition(":")
    return uvicorn.Server(
        uvicorn.Config(
            asgi_app(config),
            host=host.strip("[]"),
            port=int(listen_port) if port is None else port,
            log_config=None,  # our JSON logging handles uvicorn's loggers too
            access_log=False,  # the gateway logs each request itself, without the query string
            lifespan="on",
            timeout_graceful_shutdown=int(grace_seconds) or 1,
        )
    )
