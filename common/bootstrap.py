"""One gRPC server bootstrap for every service.

``GrpcServer`` wires a ``grpc.aio`` server the same way everywhere: interceptors (tracing, logging,
errors), ``grpc.health.v1`` health that stays NOT_SERVING until the service's dependencies answer,
server reflection for grpcurl, the service's background tasks, and a graceful stop (health
NOT_SERVING, then ``stop(grace)`` so in-flight RPCs finish, then the background tasks are cancelled
and awaited). ``serve`` runs one until SIGTERM or SIGINT.

Background work (``Background``) belongs to the service and lives exactly as long as its server:
started once the server is up (``after_serving``: once health first reports SERVING), cancelled and
awaited on stop. A task that raises is logged and restarted after a capped, jittered backoff; one
that returns is done. None is ever lost silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from . import telemetry
from .backoff import backoff_delay
from .channels import SERVER_KEEPALIVE_OPTIONS
from .config import ServerConfig
from .errors import DomainError
from .interceptors import ErrorInterceptor, LoggingInterceptor

log = logging.getLogger("stationthis.server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Probe:
    """A dependency check: ``check`` returns normally when the dependency answers, raises otherwise."""

    name: str
    check: Callable[[], Awaitable[Any]]


@dataclass(frozen=True)
class Background:
    """A long-running task of a service. ``run`` raising is logged and restarted with backoff
    (``min_backoff`` doubling to ``max_backoff``, full jitter; reset after a run that lasted
    ``max_backoff``); returning ends it for good. ``after_serving``: start once health is SERVING
    (else as soon as the server listens, e.g. a warm-up that health waits for)."""

    name: str
    run: Callable[[], Awaitable[None]]
    after_serving: bool = True
    min_backoff: float = 0.5
    max_backoff: float = 30.0


@dataclass
class Service:
    """What a service brings to the bootstrap."""

    name: str  # short name, e.g. "points"; used for logs and telemetry
    domain: str  # ErrorInfo domain, e.g. "points.stationthis.dev"
    service_names: Sequence[str]  # full gRPC service names, e.g. "stationthis.points.v1.PointsService"
    register: Callable[[grpc.aio.Server], None]  # adds the servicers
    probes: Sequence[Probe] = ()
    on_stop: Sequence[Callable[[], Awaitable[Any]]] = field(default_factory=list)
    background: Sequence[Background] = ()

    @property
    def service(self) -> Service:
        """A bare Service is already assembled (see ``Assembled``): what test services return."""
        return self


class Assembled(Protocol):
    """What a service's ``build(config)`` returns: the ``Service`` for the bootstrap, plus whatever
    typed parts tests and benchmarks reach into (the ledger, the catalog cache, ...)."""

    @property
    def service(self) -> Service: ...


async def supervise(task: Background, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
    """Run ``task`` until it returns or is cancelled; restart it after a crash, with backoff."""
    failures = 0
    while True:
        started = time.monotonic()
        try:
            await task.run()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if time.monotonic() - started >= task.max_backoff:
                failures = 0  # it ran well for a while: this is a new incident
            delay = backoff_delay(failures, task.min_backoff, task.max_backoff)
            failures += 1
            extra = {"task": task.name, "restarts": failures, "delay_seconds": round(delay, 3)}
            if isinstance(exc, DomainError):  # an expected failure (a dependency is down): no traceback
                log.warning("background task %s failed (%s); retrying in %.2fs", task.name, exc.message, delay,
                            extra={**extra, "reason": exc.reason})  # fmt: skip
            else:
                log.exception("background task %s crashed; restarting in %.2fs", task.name, delay, extra=extra)
            await sleep(delay)


def redis_probe(client: Any, timeout: float = 1.0) -> Probe:
    async def check() -> None:
        await asyncio.wait_for(client.ping(), timeout)

    return Probe("redis", check)


def grpc_health_probe(name: str, channel: grpc.aio.Channel, service: str = "", timeout: float = 1.0) -> Probe:
    """The peer at ``channel`` reports SERVING for ``service``."""
    stub = health_pb2_grpc.HealthStub(channel)

    async def check() -> None:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        if reply.status != SERVING:
            raise RuntimeError(f"{name} is {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")

    return Probe(name, check)


class GrpcServer:
    def __init__(self, service: Service, config: ServerConfig | None = None) -> None:
        self.service = service
        self.config = config or ServerConfig()
        self.health = HealthServicer()
        self.server = grpc.aio.server(
            interceptors=[
                telemetry.server_interceptor(),
                LoggingInterceptor(),
                ErrorInterceptor(service.domain),
            ],
            options=[("grpc.so_reuseport", 0), *SERVER_KEEPALIVE_OPTIONS],
        )
        service.register(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [
                *service.service_names,
                reflection.SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            ],
            self.server,
        )
        self.port = 0
        self._monitor: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._served = False  # health has been SERVING at least once
        self._serving: bool | None = None
        self._stopping = False

    async def start(self, address: str) -> int:
        """Bind ``address`` (``host:0`` picks a free port), start serving and return the port."""
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"could not bind {address}")
        await self._set_all(NOT_SERVING)
        await self.server.start()
        self._start_background(after_serving=False)
        self._monitor = asyncio.create_task(self._watch_dependencies(), name=f"{self.service.name}-health")
        return self.port

    def _start_background(self, after_serving: bool) -> None:
        for task in self.service.background:
            if task.after_serving == after_serving:
                self._tasks.append(asyncio.create_task(supervise(task), name=f"{self.service.name}-{task.name}"))

    async def check_dependencies(self) -> list[str]:
        """Names and errors of the dependencies that do not answer now (empty = all healthy)."""
        probes = self.service.probes
        # A probe gets at least a second however often health is checked: a slow moment on a busy
        # machine is not an outage. Each coroutine is created inside its own wait_for.
        timeout = max(1.0, self.config.health_interval_seconds)

        async def run(probe: Probe) -> Any:
            # The probe's coroutine is made here, inside the task: cancelled before it starts, the
            # task leaves no coroutine behind un-awaited.
            return await asyncio.wait_for(probe.check(), timeout)

        results = await asyncio.gather(*(run(p) for p in probes), return_exceptions=True)
        return [
            f"{probe.name}: {type(result).__name__} {result}".strip()
            for probe, result in zip(probes, results, strict=False)
            if isinstance(result, BaseException)
        ]

    async def _watch_dependencies(self) -> None:
        while not self._stopping:
            failures = await self.check_dependencies()
            serving = not failures
            if serving != self._serving and not self._stopping:
                self._serving = serving
                await self._set_all(SERVING if serving else NOT_SERVING)
                if serving:
                    log.info("dependencies answer; health is SERVING")
                    if not self._served:
                        self._served = True
                        self._start_background(after_serving=True)
                else:
                    log.warning("health is NOT_SERVING", extra={"failing": failures})
            await asyncio.sleep(self.config.health_interval_seconds)

    async def _set_all(self, status: int) -> None:
        for name in ("", *self.service.service_names):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Health to NOT_SERVING, then stop accepting RPCs and let in-flight ones finish."""
        if self._stopping:
            return
        self._stopping = True
        await self.health.enter_graceful_shutdown()
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        await self.server.stop(self.config.grace_seconds if grace is None else grace)
        await _cancel_all(self._tasks)
        for hook in self.service.on_stop:
            try:
                await hook()
            except Exception:  # a failing close must not hide the others
                log.exception("error while closing %s", self.service.name)


async def _cancel_all(tasks: Sequence[asyncio.Task[Any]], within: float = 10.0) -> None:
    """Cancel the background tasks and wait for them. A task whose cancel was swallowed is cancelled
    again: Python 3.11's asyncio.wait_for (which redis-py sends with when a socket timeout is set)
    returns its result instead of raising a cancel that lands as the write completes, and the task
    would then run on. After ``within`` seconds the stop goes on without it (logged)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    for task in tasks:
        task.cancel()
    pending = {task for task in tasks if not task.done()}
    while pending:
        _, pending = await asyncio.wait(pending, timeout=0.5)
        for task in pending:
            if loop.time() >= deadline:
                log.error("background task %s did not stop; leaving it", task.get_name())
            else:
                log.warning("background task %s ignored its cancel; cancelled again", task.get_name())
                task.cancel()
        if loop.time() >= deadline:
            break
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.error("background task %s ended with an error", task.get_name(), exc_info=task.exception())


async def serve(service: Service, address: str, config: ServerConfig) -> None:
    """Run ``service`` on ``address`` until SIGTERM or SIGINT, then stop gracefully."""
    server = GrpcServer(service, config)
    port = await server.start(address)
    host = address.rpartition(":")[0]
    log.info("%s listening on %s:%d", service.name, host, port, extra={"port": port})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("%s stopping (grace %.1fs)", service.name, config.grace_seconds)
    await server.stop()
    telemetry.shutdown()
    log.info("%s stopped", service.name)
