"""CancelRun: before submission, after, on a terminal run, repeated, and against an upstream whose cancel
answers 500."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from stationthis.comfyui.v1 import comfyui_service_pb2 as svc
from stationthis.comfyui.v1 import run_pb2 as R
from stationthis.points.v1 import points_pb2 as pt
from tests.runs_helpers import (
    System,
    ensure_points,
    eventually,
    kinds,
    ledger_of,
    run_hash,
    settled_ledger,
    start_system,
    upstream_runs_of,
)
from tests.support import expect_failure

COMFYUI_DOMAIN = "comfyui.stationthis.dev"
CANCEL_ROUTE = "POST /api/run/{run_id}/cancel"


@pytest.fixture
async def system(redis_url: str, start_service: Any, emulator: Any) -> AsyncIterator[System]:
    async for running in start_system(redis_url, start_service, emulator):
        yield running


async def cancel(system: System, run_id: str, request_id: str = "") -> R.Run:
    reply = await system.runs.CancelRun(svc.CancelRunRequest(run_id=run_id, request_id=request_id), timeout=30)
    return reply.run


async def assert_cancel_refunded(system: System, run_id: str, before: Any) -> None:
    ledger = await settled_ledger(system, run_id)
    assert kinds(ledger) == ["TRANSACTION_KIND_HOLD_RELEASED", "TRANSACTION_KIND_HOLD_RESERVED"], ledger
    released = next(t for t in ledger if t.kind == pt.TRANSACTION_KIND_HOLD_RELEASED)
    assert released.release_reason == pt.RELEASE_REASON_RUN_CANCELLED, released
    after = await system.account()
    assert (after.points_used, after.qoints, after.exp) == (before.points_used, before.qoints, before.exp)
    assert after.points_held == 0 and not after.open_holds, after


async def stuck_running(system: System) -> R.Run:
    await system.emulator.set_faults(next_run_outcomes=["stuck"])
    created = await system.create()
    return await system.wait(created.run_id, (R.RUN_STATUS_RUNNING,), settled=False)


async def test_cancel_while_the_queue_request_is_in_flight(system: System) -> None:
    before = await system.account()
    await system.emulator.set_faults(latency_ms=1500, next_run_outcomes=["stuck"])
    created = await system.create()
    assert created.status == R.RUN_STATUS_SUBMITTING
    ran = await system.emulator.stats()
    cancelled = await cancel(system, created.run_id)
    assert cancelled.status == R.RUN_STATUS_CANCELLED, cancelled
    assert (cancelled.error.reason, cancelled.error.domain) == ("RUN_CANCELLED", COMFYUI_DOMAIN)
    assert not await upstream_runs_of(system, created.run_id)  # the queue answer is still to come
    assert (await system.emulator.stats())["routes"].get(CANCEL_ROUTE) is None, ran
    await assert_cancel_refunded(system, created.run_id, before)
    await system.emulator.set_faults()
    # The queue answer arrives: the upstream run it created is cancelled too, and ours stays CANCELLED.

    async def cancelled_upstream() -> dict[str, Any] | None:
        found = await upstream_runs_of(system, created.run_id)
        return found[0] if found and found[0]["status"] == "cancelled" else None

    upstream = await eventually(cancelled_upstream, "the orphan upstream run cancelled")
    assert len(await upstream_runs_of(system, created.run_id)) == 1

    async def recorded() -> R.Run | None:
        run = await system.get(created.run_id)
        return run if run.upstream_run_id else None

    run = await eventually(recorded, "the late upstream run id recorded")
    assert run.upstream_run_id == upstream["id"]
    assert run.status == R.RUN_STATUS_CANCELLED and run.error.reason == "RUN_CANCELLED", run
    assert len(await ledger_of(system, created.run_id)) == 2  # nothing settled twice


async def test_cancel_while_the_submission_is_unknown_leaves_no_orphan(system: System) -> None:
    """The queue answer was lost and no webhook comes: the run is cancelled here at once, and the upstream
    run the lost request created is still found and cancelled."""
    before = await system.account()
    await system.emulator.set_faults(
        next_errors=[{"route": "queue", "action": "lose_response"}], webhook_drop=1.0, next_run_outcomes=["stuck"]
    )
    created = await system.create()

    async def unknown() -> bool:
        return (await run_hash(system, created.run_id)).get(b"submit") == b"unknown"

    await eventually(unknown, "the submission's outcome unknown")
    cancelled = await cancel(system, created.run_id)
    assert cancelled.status == R.RUN_STATUS_CANCELLED, cancelled
    await assert_cancel_refunded(system, created.run_id, before)
    [upstream] = await upstream_runs_of(system, created.run_id)
    await system.emulator.wait_run(upstream["id"], ("cancelled",), within=15)
    run = await system.get(created.run_id)
    assert run.status == R.RUN_STATUS_CANCELLED and run.error.reason == "RUN_CANCELLED", run
    assert len(await ledger_of(system, created.run_id)) == 2
    assert (await system.emulator.stats())["routes"].get("POST /api/run/deployment/queue") == 1


async def test_cancel_a_running_run(system: System) -> None:
    before = await system.account()
    running = await stuck_running(system)
    cancelled = await cancel(system, running.run_id)
    assert cancelled.status == R.RUN_STATUS_CANCELLED, cancelled
    assert cancelled.error.reason == "RUN_CANCELLED"
    await system.emulator.wait_run(running.upstream_run_id, ("cancelled",), within=1)
    run = await system.wait(running.run_id)
    assert run.status == R.RUN_STATUS_CANCELLED and run.cost_points == 0, run
    await assert_cancel_refunded(system, running.run_id, before)


async def test_cancel_a_finished_run_changes_nothing(system: System) -> None:
    created = await system.create()
    run = await system.wait(created.run_id)
    assert run.status == R.RUN_STATUS_SUCCESS
    stored = await run_hash(system, run.run_id)
    ledger = await ledger_of(system, run.run_id)
    assert await cancel(system, run.run_id) == run
    assert await cancel(system, run.run_id, request_id="cancel-done") == run
    assert await run_hash(system, run.run_id) == stored
    assert await ledger_of(system, run.run_id) == ledger
    assert (await system.emulator.stats())["routes"].get(CANCEL_ROUTE) is None


async def test_cancel_is_idempotent_with_request_id(system: System) -> None:
    await ensure_points(system, "alice")
    running = await stuck_running(system)
    first = await cancel(system, running.run_id, request_id="cancel-1")
    assert first.status == R.RUN_STATUS_CANCELLED
    calls = (await system.emulator.stats())["routes"].get(CANCEL_ROUTE)
    assert calls == 1
    await system.wait(running.run_id)
    assert await cancel(system, running.run_id, request_id="cancel-1") == first  # the first answer, replayed
    assert (await system.emulator.stats())["routes"].get(CANCEL_ROUTE) == calls
    other = await stuck_running(system)
    await expect_failure(
        system.runs.CancelRun(svc.CancelRunRequest(run_id=other.run_id, request_id="cancel-1"), timeout=10),
        grpc.StatusCode.INVALID_ARGUMENT,
        "REQUEST_ID_REUSED",
        COMFYUI_DOMAIN,
    )
    assert (await system.get(other.run_id)).status == R.RUN_STATUS_RUNNING
    assert len(await upstream_runs_of(system, other.run_id)) == 1
    assert (await upstream_runs_of(system, other.run_id))[0]["status"] == "running"


@pytest.mark.parametrize(
    "fault",
    [
        {"route": "cancel", "action": "lose_response", "status": 500},  # applied upstream, answered 500
        {"route": "cancel", "status": 500},  # refused once with a 500, then applied
    ],
    ids=["applied-then-500", "500-then-applied"],
)
async def test_cancel_survives_an_upstream_500(system: System, fault: dict[str, Any]) -> None:
    before = await system.account()
    running = await stuck_running(system)
    await system.emulator.set_faults(next_errors=[fault])
    cancelled = await cancel(system, running.run_id)
    assert cancelled.status == R.RUN_STATUS_CANCELLED, cancelled
    assert (await system.emulator.stats())["faults"], "the 500 was never injected"
    await system.emulator.wait_run(running.upstream_run_id, ("cancelled",), within=1)
    await assert_cancel_refunded(system, running.run_id, before)
