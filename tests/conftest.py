"""Shared fixtures: a real Redis server process and the services in-process on 127.0.0.1:0."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.bootstrap import Assembled, GrpcServer
from common.config import ServerConfig, load
from devtools.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
FAST = ServerConfig(log_level="INFO", grace_seconds=5.0, health_interval_seconds=0.05)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server process for the session, on a free loopback port."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The session's Redis, emptied before each test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url


@dataclass
class Running:
    server: GrpcServer
    address: str
    channel: grpc.aio.Channel
    app: Any  # what the service's build() returned (PointsApp, WorkflowsApp, ...)

    async def health(self, service: str = "") -> int:
        reply = await health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
        return int(reply.status)


async def wait_serving(running: Running, service: str = "", timeout: float = 10.0) -> None:
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if await running.health(service) == health_pb2.HealthCheckResponse.SERVING:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{service or 'server'} not SERVING within {timeout}s")


StartService = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_service() -> AsyncIterator[StartService]:
    """Start a service the way its process does, but in-process on 127.0.0.1:0."""
    started: list[Running] = []

    async def start(
        build: Callable[[Any], Awaitable[Assembled]], config_cls: type, environ: dict[str, str],
        address: str = "127.0.0.1:0",
    ) -> Running:  # fmt: skip
        config = load(config_cls, environ)
        app = await build(config)
        server = GrpcServer(app.service, FAST)
        port = await server.start(address)
        running = Running(server, f"127.0.0.1:{port}", grpc.aio.insecure_channel(f"127.0.0.1:{port}"), app)
        started.append(running)
        return running

    yield start
    for running in reversed(started):
        await running.channel.close()
        await running.server.stop(0)


@pytest.fixture
async def stack(redis_url: str, start_service: StartService, emulator: Any) -> dict[str, Running]:
    """points, workflows and comfyui, wired to each other, the test Redis and the emulator, all SERVING."""
    from services.comfyui.config import ComfyUIConfig
    from services.comfyui.server import build as build_comfyui
    from services.points.config import PointsConfig
    from services.points.server import build as build_points
    from services.workflows.config import WorkflowsConfig
    from services.workflows.server import build as build_workflows

    env = {"REDIS_URL": redis_url, "COMFYDEPLOY_API_URL": emulator.base_url, "COMFYDEPLOY_API_KEY": emulator.api_key}
    points = await start_service(build_points, PointsConfig, env)
    workflows = await start_service(build_workflows, WorkflowsConfig, env)
    comfyui = await start_service(
        build_comfyui,
        ComfyUIConfig,
        {**env, "POINTS_SERVICE_ADDR": points.address, "WORKFLOWS_SERVICE_ADDR": workflows.address},
    )
    for running in (points, workflows, comfyui):
        await wait_serving(running)
    return {"points": points, "workflows": workflows, "comfyui": comfyui}


def python_env(**extra: str) -> dict[str, str]:
    """Environment for a child Python process of this repo (generated code on the path)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "gen")])
    for variable in METRICS_VARIABLES:  # a free port each, unless a test names one
        env[variable] = "127.0.0.1:0"
    env.update(extra)
    return env


METRICS_VARIABLES = ("POINTS_METRICS_ADDR", "WORKFLOWS_METRICS_ADDR", "COMFYUI_METRICS_ADDR", "GATEWAY_METRICS_ADDR")


PYTHON = sys.executable


@pytest.fixture
async def emulator() -> AsyncIterator[Any]:
    """The ComfyUI Deploy emulator in-process on a free loopback port, on a fast clock (0.02 s a step).

    Yields an ``emulator.testing.RunningEmulator``: ``base_url`` (…/api), ``api_key``, ``other_api_key``,
    ``client()``, ``set_faults(...)``, ``stats()``, ``runs()``, ``webhooks()``, ``wait_run()``, ``reset()``.
    """
    from emulator.testing import start_for_tests

    running = await start_for_tests()
    yield running
    await running.close()
