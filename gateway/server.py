"""Runs the gateway under uvicorn (uvloop, httptools with bounded request heads)."""

from __future__ import annotations

import logging

import uvicorn

from .app import Gateway, create_app
from .config import GatewayConfig
from .protocol import guarded

KEEPALIVE_SECONDS = 5


def asgi_app(config: GatewayConfig) -> Gateway:
    """The gateway app: it traces each request itself (one server span; docs/decisions/0012)."""
    return create_app(config)


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
            loop="uvloop",  # used when uvicorn runs the loop (python -m gateway); tests bring their own
            http=guarded(config.max_header_bytes, config.header_timeout_seconds),
            h11_max_incomplete_event_size=config.max_header_bytes,  # should anyone switch to h11
            timeout_keep_alive=KEEPALIVE_SECONDS,
            proxy_headers=False,  # no proxy in front is trusted to set the client address
            server_header=False,
            log_config=None,  # our JSON logging handles uvicorn's loggers too
            access_log=False,  # the gateway logs each request itself, without the query string
            lifespan="on",
            timeout_graceful_shutdown=int(grace_seconds) or 1,
        )
    )
