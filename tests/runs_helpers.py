"""The whole system for run tests: Redis, the emulator, points, workflows, comfyui replicas and the
gateway, in-process on free loopback ports, wired as `make run` wires them (webhooks reach the gateway)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal
from typing import Any, TypeVar

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
from stationthis.points.v1 import points_pb2 as pt
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
    points_env: dict[str, str] | None = None,
    **comfyui_env: str,
) -> AsyncIterator[System]:
    """``points_env``: extra PointsService variables (e.g. POINTS_HOLD_ESTIMATE); ``comfyui_env``:
    extra ComfyUIService variables, over FAST_RUNS."""
    env = {"REDIS_URL": redis_url, "COMFYDEPLOY_API_URL": emulator.base_url, "COMFYDEPLOY_API_KEY": emulator.api_key}
    points = await start_service(build_points, PointsConfig, {**env, **(points_env or {})})
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

    started: list[Running] = [points, workflows]

    async def start_comfyui(**extra: str) -> Running:
        running = await start_service(build_comfyui, ComfyUIConfig, {**runs_env, **extra})
        started.append(running)
        await wait_serving(running)
        return running

    try:
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
    finally:
        for running in reversed(started):  # before start_service's teardown, which then has nothing to do
            await stop_surely(running)


async def stop_surely(running: Running, within: float = 30) -> None:
    """Stop a service as start_service's teardown does, within a bound (the server's stop cancels
    again a background task whose cancel was swallowed, common/bootstrap._cancel_all)."""
    await asyncio.wait_for(running.server.stop(0), within)


open_system = asynccontextmanager(start_system)  # ``async with open_system(...) as system``

T = TypeVar("T")


async def eventually(check: Callable[[], Awaitable[T | None]], what: str, within: float = 15) -> T:
    """Call ``check`` until it returns something other than None (or False); AssertionError after
    ``within`` seconds, naming ``what``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        found = await check()
        if found is not None and found is not False:
            return found
        assert loop.time() < deadline, f"not within {within}s: {what}"
        await asyncio.sleep(0.02)


async def redis_snapshot(client: aioredis.Redis, skip: tuple[str, ...] = ("runs:reconciler:lease",)) -> dict[str, Any]:
    """Every key in Redis with its full value (by type), to compare before and after."""
    found: dict[str, Any] = {}
    async for raw in client.scan_iter(count=1000):
        key = raw.decode()
        if key in skip:
            continue
        kind = (await client.type(raw)).decode()
        if kind == "string":
            value: Any = await client.get(raw)
        elif kind == "hash":
            value = await client.hgetall(raw)
        elif kind == "zset":
            value = await client.zrange(raw, 0, -1, withscores=True)
        elif kind == "set":
            value = sorted(await client.smembers(raw))
        elif kind == "list":
            value = await client.lrange(raw, 0, -1)
        elif kind == "stream":
            value = await client.xrange(raw)
        else:
            value = kind
        found[key] = (kind, value)
    return found


async def run_hash(system: System, run_id: str) -> dict[bytes, bytes]:
    """The run's stored hash, byte for byte (run:{<id>})."""
    raw: dict[bytes, bytes] = await system.redis.hgetall(f"run:{{{run_id}}}")
    return raw


async def upstream_runs_of(system: System, run_id: str) -> list[dict[str, Any]]:
    """The emulator's runs queued for our run ``run_id`` (its id is in the webhook URL's token)."""
    return [r for r in await system.emulator.runs() if f"token={run_id}." in (r.get("webhook") or "")]


async def ledger_of(system: System, run_id: str, user: str = "alice") -> list[Any]:
    """The user's ledger entries for ``run_id``, oldest first."""
    return [t for t in await system.transactions(user) if t.run_id == run_id]


def kinds(transactions: list[Any]) -> list[str]:
    return sorted(pt.TransactionKind.Name(t.kind) for t in transactions)


async def settled_ledger(system: System, run_id: str, user: str = "alice", within: float = 10) -> list[Any]:
    """The run's ledger entries once it has two (the hold and its settlement)."""

    async def two() -> list[Any] | None:
        found = await ledger_of(system, run_id, user)
        return found if len(found) >= 2 else None

    return await eventually(two, f"run {run_id} settled in the ledger", within)


def expected_cost(gpu_price: str, run: R.Run) -> int:
    """The points a SUCCESS run costs: GPU seconds at ``gpu_price`` USD/s, x2, in 0.000337 USD points, min 3."""
    seconds = Decimal(run.run_duration.ToNanoseconds()) / Decimal(10**9)
    raw = (seconds * Decimal(gpu_price) / Decimal("0.000337") * 2).to_integral_value(rounding=ROUND_CEILING)
    return max(3, int(raw))


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


__all__ = [
    "KEYS",
    "System",
    "ensure_points",
    "eventually",
    "expected_cost",
    "grpc_code",
    "kinds",
    "ledger_of",
    "open_system",
    "redis_snapshot",
    "run_hash",
    "settled_ledger",
    "start_system",
    "upstream_runs_of",
]
