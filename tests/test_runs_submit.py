"""Submission: a queue request is never sent twice. Lost answers are reconciled (by the first webhook
carrying the run's token, or by finding the run upstream), a request lost before upstream took it ends
FAILED and refunded, and CreateRun's request_id makes a repeat return the same run."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from stationthis.comfyui.v1 import comfyui_service_pb2 as svc
from stationthis.comfyui.v1 import run_pb2 as R
from stationthis.points.v1 import points_pb2 as pt
from tests.runs_helpers import (
    System,
    ensure_points,
    expected_cost,
    kinds,
    open_system,
    settled_ledger,
    upstream_runs_of,
)
from tests.support import expect_failure

COMFYUI_DOMAIN = "comfyui.stationthis.dev"
QUEUE = "POST /api/run/deployment/queue"
SEARCH = "GET /api/deployment/{deployment_id}/runs"


async def assert_one_upstream_run_captured_once(system: System, run: R.Run) -> None:
    assert run.status == R.RUN_STATUS_SUCCESS, run
    assert run.outputs and run.cost_points == expected_cost("0.000337", run), run
    [upstream] = await upstream_runs_of(system, run.run_id)
    assert upstream["id"] == run.upstream_run_id and upstream["status"] == "success"
    assert len(await system.emulator.runs()) == 1
    assert (await system.emulator.stats())["routes"].get(QUEUE) == 1
    assert kinds(await settled_ledger(system, run.run_id)) == [
        "TRANSACTION_KIND_HOLD_CAPTURED",
        "TRANSACTION_KIND_HOLD_RESERVED",
    ]
    account = await system.account()
    assert account.points_held == 0 and not account.open_holds, account


async def test_lost_queue_response_is_reconciled_by_the_first_webhook(
    redis_url: str, start_service: Any, emulator: Any
) -> None:
    async with open_system(redis_url, start_service, emulator) as system:
        await system.emulator.set_faults(next_errors=[{"route": "queue", "action": "lose_response"}])
        created = await system.create()
        run = await system.wait(created.run_id)
        assert (await system.emulator.stats())["faults"] == {"lose_response::queue": 1}
        await assert_one_upstream_run_captured_once(system, run)
        # The webhook did it: nobody had to look for the run among the deployment's runs.
        assert (await system.emulator.stats())["routes"].get(SEARCH) is None


async def test_lost_queue_response_is_found_upstream_without_webhooks(
    redis_url: str, start_service: Any, emulator: Any
) -> None:
    async with open_system(redis_url, start_service, emulator, COMFYUI_POLL_AFTER_SECONDS="0.3") as system:
        await system.emulator.set_faults(lose_queue_response=1.0, webhook_drop=1.0)
        created = await system.create()
        run = await system.wait(created.run_id, within=20)
        assert (await system.emulator.stats())["faults"] == {"lose_response::queue": 1}
        await assert_one_upstream_run_captured_once(system, run)
        assert (await system.emulator.stats())["routes"].get(SEARCH, 0) >= 1
        hooks = await system.emulator.webhooks(run.upstream_run_id)
        assert hooks and all(h["state"] == "dropped" for h in hooks)


async def test_queue_request_dropped_before_upstream_took_it_fails_and_refunds(
    redis_url: str, start_service: Any, emulator: Any
) -> None:
    async with open_system(redis_url, start_service, emulator, COMFYUI_SUBMIT_UNKNOWN_SECONDS="1") as system:
        before = await system.account()
        await system.emulator.set_faults(next_errors=[{"route": "queue", "action": "drop"}])
        created = await system.create()
        run = await system.wait(created.run_id, within=20)
        assert run.status == R.RUN_STATUS_FAILED, run
        assert (run.error.reason, run.error.domain) == ("SUBMIT_OUTCOME_UNKNOWN", COMFYUI_DOMAIN), run.error
        assert not run.upstream_run_id
        assert await system.emulator.runs() == []  # upstream never had it ...
        routes = (await system.emulator.stats())["routes"]
        assert routes.get(QUEUE) == 1, routes  # ... and it was never sent again
        assert routes.get(SEARCH, 0) >= 1, routes  # it was looked for before giving up
        ledger = await settled_ledger(system, run.run_id)
        assert kinds(ledger) == ["TRANSACTION_KIND_HOLD_RELEASED", "TRANSACTION_KIND_HOLD_RESERVED"], ledger
        released = next(t for t in ledger if t.kind == pt.TRANSACTION_KIND_HOLD_RELEASED)
        assert released.release_reason == pt.RELEASE_REASON_SUBMIT_FAILED, released
        after = await system.account()
        assert (after.points_used, after.qoints) == (before.points_used, before.qoints)
        assert after.points_held == 0 and not after.open_holds, after


async def test_create_run_is_idempotent_with_request_id(redis_url: str, start_service: Any, emulator: Any) -> None:
    async with open_system(redis_url, start_service, emulator) as system:
        first = await system.create(request_id="make-42")
        again = await system.create(request_id="make-42")
        assert again.run_id == first.run_id
        run = await system.wait(first.run_id)
        late = await system.create(request_id="make-42")
        assert late == await system.get(first.run_id) and late.status == R.RUN_STATUS_SUCCESS
        await assert_one_upstream_run_captured_once(system, run)
        # The same request_id with other parameters is refused, and starts nothing.
        for other in ({"inputs": {"input_prompt": "a dog"}}, {"workflow": "img2img"}, {"labels": {"chat": "1"}}):
            await expect_failure(
                system.create(request_id="make-42", **other),
                grpc.StatusCode.INVALID_ARGUMENT,
                "REQUEST_ID_REUSED",
                COMFYUI_DOMAIN,
            )
        # Another user's request_id is their own.
        await ensure_points(system, "bob")
        bobs = await system.create(user="bob", request_id="make-42")
        assert bobs.run_id != first.run_id
        await system.wait(bobs.run_id)
        listed = await system.runs.ListRuns(svc.ListRunsRequest(user_id="alice"), timeout=10)
        assert [r.run_id for r in listed.runs] == [first.run_id]
        assert (await system.emulator.stats())["routes"].get(QUEUE) == 2


async def test_concurrent_create_runs_with_one_request_id_make_one_run(
    redis_url: str, start_service: Any, emulator: Any
) -> None:
    async with open_system(redis_url, start_service, emulator, replicas=2) as system:
        request = svc.CreateRunRequest(user_id="alice", workflow_name="text2img", request_id="burst-1")
        request.inputs.update({"input_prompt": "a cat astronaut"})
        calls = [system.runs_on(i % 2).CreateRun(request, timeout=30) for i in range(8)]
        replies = await asyncio.gather(*calls, return_exceptions=True)
        failures = [r for r in replies if isinstance(r, BaseException)]
        assert not failures, failures
        run_ids = {r.run.run_id for r in replies if not isinstance(r, BaseException)}
        assert len(run_ids) == 1, run_ids
        run = await system.wait(run_ids.pop())
        await assert_one_upstream_run_captured_once(system, run)
