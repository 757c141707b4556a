"""The comfyui service killed (a real process, SIGKILL) in the middle of runs, then restarted: every run
reaches its terminal state and every hold is settled exactly once, as the points ledger's own
transaction log shows; no run is queued upstream twice."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from collections import Counter
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from devtools.redis_server import free_port
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
from tests.conftest import PYTHON, ROOT, python_env, wait_serving
from tests.test_gateway import gateway_env, serve_gateway

USERS = [f"crash-{i}" for i in range(4)]
SETTLING = {"TRANSACTION_KIND_HOLD_CAPTURED", "TRANSACTION_KIND_HOLD_RELEASED"}


@pytest.fixture
async def slow_emulator():  # type: ignore[no-untyped-def]
    """Runs that take a couple of seconds (0.1 s a step), so some are in flight when the service dies."""
    from emulator.testing import start_for_tests

    running = await start_for_tests(step_seconds=0.1)
    yield running
    await running.close()


class ComfyUIProcess:
    def __init__(self, environ: dict[str, str]) -> None:
        self.environ = environ
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [PYTHON, "-m", "services.comfyui"], cwd=ROOT, env=self.environ, stderr=subprocess.PIPE, text=True
        )
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with contextlib.suppress(ValueError):
                if "port" in json.loads(line):
                    break
        else:
            raise AssertionError("the comfyui service never said where it listens")
        os.set_blocking(self.process.stderr.fileno(), False)  # keep the pipe from filling up unread

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()


async def _serving(address: str) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        for _ in range(600):
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.05)
    raise AssertionError("the comfyui service did not become SERVING")


async def test_a_killed_service_leaves_no_run_unfinished_and_no_hold_settled_twice(
    redis_url: str, start_service: Any, slow_emulator: Any
) -> None:
    env = {
        "REDIS_URL": redis_url,
        "COMFYDEPLOY_API_URL": slow_emulator.base_url,
        "COMFYDEPLOY_API_KEY": slow_emulator.api_key,
    }
    points = await start_service(build_points, PointsConfig, env)
    workflows = await start_service(build_workflows, WorkflowsConfig, env)
    await wait_serving(points)
    await wait_serving(workflows)
    ledger = points_service_pb2_grpc.PointsServiceStub(points.channel)
    for user in USERS:
        credit = pts.CreditQointsRequest(
            request_id=f"c-{user}", user_id=user, qoints=5000, external_reference=f"crash-{user}", source=1
        )
        await ledger.CreditQoints(credit, timeout=10)
    address, gateway_port = f"127.0.0.1:{free_port()}", free_port()
    service = ComfyUIProcess(
        python_env(
            **env,
            COMFYUI_LISTEN_ADDR=address,
            POINTS_SERVICE_ADDR=points.address,
            WORKFLOWS_SERVICE_ADDR=workflows.address,
            COMFYUI_PUBLIC_URL=f"http://127.0.0.1:{gateway_port}",
            COMFYUI_POLL_AFTER_SECONDS="0.5",
            COMFYUI_RECONCILE_INTERVAL_SECONDS="0.1",
            COMFYUI_SUBMIT_UNKNOWN_SECONDS="4",
            COMFYUI_PENDING_GRACE_SECONDS="2",
            GRPC_GRACE_SECONDS="1",
        )
    )
    backends: dict[str, Any] = {"points": points, "workflows": workflows, "comfyui": SimpleNamespace(address=address)}
    try:
        service.start()
        await _serving(address)
        async with (
            serve_gateway(gateway_env(backends), port=gateway_port),
            grpc.aio.insecure_channel(address) as channel,
        ):
            runs = comfyui_service_pb2_grpc.ComfyUIServiceStub(channel)

            async def create(user: str, n: int) -> str | None:
                request = svc.CreateRunRequest(request_id=f"{user}-{n}", user_id=user, workflow_name="text2img")
                request.inputs.update({"input_prompt": f"crash {n}"})
                try:
                    return str((await runs.CreateRun(request, timeout=10)).run.run_id)
                except grpc.aio.AioRpcError:
                    return None  # cut by the kill: the run may or may not exist; ListRuns says

            first = await asyncio.gather(*(create(user, n) for user in USERS for n in range(2)))
            await asyncio.sleep(0.6)  # some queued, some running, webhooks on their way
            late = [asyncio.create_task(create(user, 2)) for user in USERS]  # in flight at the kill
            await asyncio.sleep(0.05)
            service.kill()
            await asyncio.gather(*late)
            await asyncio.sleep(1.0)  # upstream moves on while nobody listens
            service.start()
            await _serving(address)

            loop = asyncio.get_running_loop()
            deadline = loop.time() + 90
            while True:
                listed: list[R.Run] = []
                for user in USERS:
                    reply = await runs.ListRuns(svc.ListRunsRequest(user_id=user, page_size=50), timeout=10)
                    listed.extend(reply.runs)
                if listed and all(r.HasField("settle_time") for r in listed):
                    break
                assert loop.time() < deadline, [
                    (r.run_id, R.RunStatus.Name(r.status), r.HasField("settle_time")) for r in listed
                ]
                await asyncio.sleep(0.2)
    finally:
        service.stop()

    assert {r for r in first if r} <= {r.run_id for r in listed}, "a run CreateRun answered was lost"
    assert all(r.status in (R.RUN_STATUS_SUCCESS, R.RUN_STATUS_FAILED, R.RUN_STATUS_CANCELLED) for r in listed)
    assert sum(r.status == R.RUN_STATUS_SUCCESS for r in listed) >= len(first) // 2, "most runs should succeed"
    for user in USERS:
        account = (await ledger.GetAccount(pts.GetAccountRequest(user_id=user), timeout=10)).account
        assert not account.open_holds and account.points_held == 0 and account.qoints_held == 0, account
        txs = (await ledger.ListTransactions(pts.ListTransactionsRequest(user_id=user, page_size=200),
                                             timeout=10)).transactions  # fmt: skip
        per_run: dict[str, Counter[str]] = {}
        for tx in txs:
            if tx.run_id:
                per_run.setdefault(tx.run_id, Counter())[pt.TransactionKind.Name(tx.kind)] += 1
        for run in (r for r in listed if r.user_id == user):
            kinds = per_run.get(run.run_id, Counter())
            if run.hold_id:
                assert kinds["TRANSACTION_KIND_HOLD_RESERVED"] == 1, (run.run_id, kinds)
                assert sum(kinds[k] for k in SETTLING) == 1, (run.run_id, kinds)
                expected = "TRANSACTION_KIND_HOLD_CAPTURED" if run.status == R.RUN_STATUS_SUCCESS else (
                    "TRANSACTION_KIND_HOLD_RELEASED")  # fmt: skip
                assert kinds[expected] == 1, (run.run_id, R.RunStatus.Name(run.status), kinds)
    # Never queued twice: each upstream run belongs to one of our runs, each of our runs to at most one.
    upstream = await slow_emulator.runs()
    tokens = Counter(r["webhook"].split("token=")[1].split(".")[0] for r in upstream if r.get("webhook"))
    assert all(count == 1 for count in tokens.values()), tokens
    assert set(tokens) <= {r.run_id for r in listed}
    # A run given up as lost was never queued, or what was queued was stopped (no orphan runs on).
    by_token = {r["webhook"].split("token=")[1].split(".")[0]: r for r in upstream if r.get("webhook")}
    for run in listed:
        if run.error.reason == "SUBMIT_OUTCOME_UNKNOWN" and run.run_id in by_token:
            assert by_token[run.run_id]["status"] == "cancelled", by_token[run.run_id]
