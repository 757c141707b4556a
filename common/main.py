"""Process entry point shared by the services: parse config, set up logs and tracing, serve."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol, TypeVar

from . import logs, telemetry
from .bootstrap import Assembled, serve
from .config import ConfigError, ServerConfig, load, secrets_of


class ProcessConfig(Protocol):
    @property
    def metrics_addr(self) -> str: ...


class ServiceConfig(ProcessConfig, Protocol):
    @property
    def listen_addr(self) -> str: ...


C = TypeVar("C", bound=ServiceConfig)


T = TypeVar("T", bound=ProcessConfig)


def prepare(name: str, config_cls: type[T], environ: Mapping[str, str] | None = None) -> tuple[T, ServerConfig]:
    """Parse the process's config, set up JSON logs, tracing and metrics; exit 2 naming a bad variable."""
    environ = os.environ if environ is None else environ
    try:
        config = load(config_cls, environ)
        server_config = load(ServerConfig, environ)
    except ConfigError as exc:
        print(f"stationthis-{name}: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    logs.configure(name, server_config.log_level, secrets_of(config))
    telemetry.setup(f"stationthis-{name}", environ)
    try:
        telemetry.setup_metrics(f"stationthis-{name}", config.metrics_addr, environ)
    except OSError as exc:
        print(f"stationthis-{name}: cannot serve metrics on {config.metrics_addr}: {exc.strerror}", file=sys.stderr)
        raise SystemExit(2) from None
    return config, server_config


def run(
    name: str,
    config_cls: type[C],
    build: Callable[[C], Awaitable[Assembled]],
    environ: Mapping[str, str] | None = None,
) -> None:
    """Start service ``name`` and serve it until SIGTERM or SIGINT."""
    config, server_config = prepare(name, config_cls, environ)

    async def main() -> None:
        assembled = await build(config)
        await serve(assembled.service, config.listen_addr, server_config)

    asyncio.run(main())
