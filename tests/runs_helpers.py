"""The whole system for run tests: Redis, the emulator, points, workflows, comfyui replicas and the
gateway, in-process on free loopback ports, wired as `make run` wires them (webhooks reach the gateway)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import grpc
import redis.asyncio as aioredis

from devtools.redis_server import free_port
from services.comfyui.config import ComfyUIConfig
from services.comfyui.server import build as build_comfyui
from services.points.config import PointsConfig
from services.points.server import build as build_points
from services.workflows.config import WorkflowsConfig
from services.workflows.server import build as build_workflows
from stationthis.comfyui.v1 import comfyui_service_pb2 as svc
from stationthis.comfyui.v1 import comfyui_service_pb2_grpc
from stationthis.comfyui.v1 import run_pb2 as R
from stationthis.points.v1 import points_service_pb2 as pts
from stationthis.points.v1 import points_service_pb2_grpc
from tests.conftest import Running, StartService, wait_serving
from tests.test_gateway import KEYS, RunningGateway, gateway_env, serve_gateway

TERMINAL = (R.RUN_STATUS_SUCCESS, R.RUN_STATUS_FAILED, R.RUN_STATUS_TIMEOUT, R.RUN_STATUS_CANCELLED)
FAST_RUNS = {
    "COMFYUI_POLL_AFTER_SECONDS": "30",
    "COMFYUI_RECONCILE_INTERVAL_SECONDS": "0.1",
}


@dataclass
class System:
    emulator: Any
    redis: aioredis.Redis
    points: Running
    workflows: Running
    comfyui: list[Running]
    gateway: RunningGateway | None
    start_comfyui: Callable[..., Any] = field(repr=False)

    @property
    def runs(self) -> comfyui_service_pb2_grpc.ComfyUIServiceStub:
        return comfyui_service_pb2_grpc.ComfyUIServiceStub(self.comfyui[0].channel)

    def runs_on(self, replica: int) -> comfyui_service_pb2_grpc.ComfyUIServiceStub:
        return comfyui_service_pb2_grpc.ComfyUIServiceStub(self.comfyui[replica].channel)

    @property
    def ledger(self) -> points_service_pb2_grpc.PointsServiceStub:
        return points_service_pb2_grpc.PointsServiceStub(self.points.channel)

    async def create(self, user: str = "alice", workflow: str = "text2img", **fields: Any) -> R.Run:
        fields.setdefault("inputs", {"input_prompt": "a cat astronaut"})
        request = svc.CreateRunRequest(user_id=user, workflow_name=workflow, **{k: v for k, v in fields.items()
                                                                              if k != "inputs"})  # fmt: skip
        request.inputs.update(fields["inputs"])
        return (await self.runs.CreateRun(request, timeout=30)).run

    async def get(self, run_id: str, replica: int = 0) -> R.Run:
        return (await self.runs_on(replica).GetRun(svc.GetRunRequest(run_id=run_id), timeout=10)).run

    async def wait(self, run_id: str, statuses: tuple[int, ...] = TERMINAL, settled: bool = True,
                   within: float = 30) -> R.Run:  # fmt: skip
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            run = await self.get(run_id)
            if run.status in statuses and (not settled or run.HasField("settle_time")):
                return run
            assert loop.time() < deadline, f"run {run_id} is {R.RunStatus.Name(run.status)}: {run}"
            await asyncio.sleep(0.05)

    async def account(self, user: str = "alice") -> Any:
        return (await self.ledger.GetAccount(pts.GetAccountRequest(user_id=user), timeout=10)).account

    async def transactions(self, user: str = "alice") -> list[Any]:
        reply = await self.ledger.ListTransactions(pts.ListTransactionsRequest(user_id=user, page_size=200), timeout=10)
        return list(reply.transactions)


async def start_system(
    redis_url: str,
    start_service: StartService,
    emulator: Any,
    replicas: int = 1,
    gateway: bool = True,
    **comfyui_env: str,
) -> AsyncIterator[System]:
    env = {"REDIS_URL": redis_url, "COMFYDEPLOY_API_URL": emulator.base_url, "COMFYDEPLOY_API_KEY": emulator.api_key}
    points = await start_service(build_points, PointsConfig, env)
    workflows = await start_service(build_workflows, WorkflowsConfig, env)
    gateway_port = free_port()
    runs_env = {
        **env,
        **FAST_RUNS,
        "POINTS_SERVICE_ADDR": points.address,
        "WORKFLOWS_SERVICE_ADDR": workflows.address,
        "COMFYUI_PUBLIC_URL": f"http://127.0.0.1:{gateway_port}",
        **comfyui_env,
    }

    async def start_comfyui(**extra: str) -> Running:
        running = await start_service(build_comfyui, ComfyUIConfig, {**runs_env, **extra})
        await wait_serving(running)
        return running

    comfyui = [await start_comfyui() for _ in range(replicas)]
    for running in (points, workflows):
        await wait_serving(running)
    client = aioredis.Redis.from_url(redis_url)
    async with AsyncExitStack() as stack:
        gw = None
        if gateway:
            backends = {"points": points, "workflows": workflows, "comfyui": comfyui[0]}
            gw = await stack.enter_async_context(serve_gateway(gateway_env(backends), port=gateway_port))
        try:
            yield System(emulator, client, points, workflows, comfyui, gw, start_comfyui)
        finally:
            await client.aclose()


async def ensure_points(system: System, user: str, qoints: int = 10_000) -> None:
    """Give ``user`` qoints on top of the free allowance (so several runs can be held at once)."""
    await system.ledger.CreditQoints(
        pts.CreditQointsRequest(request_id=f"credit-{user}", user_id=user, qoints=qoints,
                                external_reference=f"test-{user}", source=1),
        timeout=10,
    )  # fmt: skip


def grpc_code(error: BaseException) -> grpc.StatusCode:
    assert isinstance(error, grpc.aio.AioRpcError), error
    return error.code()


__all__ = ["KEYS", "System", "ensure_points", "grpc_code", "start_system"]
