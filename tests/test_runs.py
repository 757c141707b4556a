"""Runs end to end: CreateRun to settled points, against the real services, the emulator and the gateway."""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal

import pytest

from stationthis.comfyui.v1 import run_pb2 as R
from stationthis.points.v1 import points_pb2 as pt
from tests.runs_helpers import System, start_system


@pytest.fixture
async def system(redis_url, start_service, emulator):  # type: ignore[no-untyped-def]
    async for running in start_system(redis_url, start_service, emulator):
        yield running


def expected_cost(gpu_price: str, run: R.Run) -> int:
    seconds = Decimal(run.run_duration.ToNanoseconds()) / Decimal(10**9)
    raw = (seconds * Decimal(gpu_price) / Decimal("0.000337") * 2).to_integral_value(rounding=ROUND_CEILING)
    return max(3, int(raw))


async def test_happy_path_through_the_gateway(system: System) -> None:
    assert system.gateway is not None
    before = await system.account()
    response = await system.gateway.post(
        "/v1/runs",
        body='{"user_id": "alice", "workflow_name": "/make", "inputs": {"input_prompt": "a cat astronaut"}}',
        headers={"Idempotency-Key": "make-1"},
    )
    assert response.status_code == 200, response.text
    created = response.json()["run"]
    assert created["status"] == "RUN_STATUS_SUBMITTING" and created["workflow_name"] == "text2img"
    assert int(created["points_held"]) > 0
    run = await system.wait(created["run_id"])
    assert run.status == R.RUN_STATUS_SUCCESS, run
    assert run.outputs and all(o.url.startswith("http") for o in run.outputs if o.type == R.OUTPUT_TYPE_IMAGE)
    assert run.upstream_run_id and run.HasField("start_time") and run.HasField("end_time")
    assert run.cost_points == expected_cost("0.000337", run)  # A10G for text2img in the fixtures
    after = await system.account()
    assert after.exp == before.exp + run.cost_points
    assert after.points_held == 0 and not after.open_holds
    kinds = [pt.TransactionKind.Name(t.kind) for t in await system.transactions() if t.run_id == run.run_id]
    assert sorted(kinds) == ["TRANSACTION_KIND_HOLD_CAPTURED", "TRANSACTION_KIND_HOLD_RESERVED"], kinds
    # The same Idempotency-Key returns the same run, now finished, and starts nothing.
    again = await system.gateway.post(
        "/v1/runs",
        body='{"user_id": "alice", "workflow_name": "/make", "inputs": {"input_prompt": "a cat astronaut"}}',
        headers={"Idempotency-Key": "make-1"},
    )
    assert again.json()["run"]["run_id"] == run.run_id
    assert len([r for r in await system.emulator.runs() if r["id"] == run.upstream_run_id]) == 1
    assert len(await system.emulator.runs()) == 1
    # Webhooks did the work: upstream was asked once to queue it and once for the billed duration.
    routes = (await system.emulator.stats())["routes"]
    assert routes.get("POST /api/run/deployment/queue") == 1 and routes.get("GET /api/run/{run_id}") == 1, routes
    assert [d["state"] for d in await system.emulator.webhooks(run.upstream_run_id)].count("delivered") >= 4
