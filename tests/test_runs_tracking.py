"""Tracking a run to its end whatever the webhooks do: polling alone, upstream failure, our deadline,
duplicate/reordered/late callbacks, forged callbacks."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from devtools.redis_server import free_port
from stationthis.comfyui.v1 import comfyui_service_pb2 as svc
from stationthis.comfyui.v1 import run_pb2 as R
from stationthis.points.v1 import points_pb2 as pt
from tests.runs_helpers import (
    System,
    ensure_points,
    eventually,
    expected_cost,
    kinds,
    ledger_of,
    open_system,
    run_hash,
    settled_ledger,
    upstream_runs_of,
)
from tests.support import expect_failure

COMFYUI_DOMAIN = "comfyui.stationthis.dev"
INVALID_TOKEN = ("WEBHOOK_TOKEN_INVALID", COMFYUI_DOMAIN)
RESERVED, CAPTURED, RELEASED = (
    "TRANSACTION_KIND_HOLD_RESERVED",
    "TRANSACTION_KIND_HOLD_CAPTURED",
    "TRANSACTION_KIND_HOLD_RELEASED",
)


async def assert_captured_once(system: System, run: R.Run) -> None:
    """SUCCESS with outputs, charged the right cost, one hold taken and captured, nothing left held."""
    assert run.status == R.RUN_STATUS_SUCCESS, run
    assert run.outputs and run.upstream_run_id
    assert run.cost_points == expected_cost("0.000337", run), run  # A10G for text2img in the fixtures
    ledger = await settled_ledger(system, run.run_id)
    assert kinds(ledger) == [CAPTURED, RESERVED], ledger
    captured = next(t for t in ledger if t.kind == pt.TRANSACTION_KIND_HOLD_CAPTURED)
    assert captured.exp_delta == run.cost_points, captured  # the cost charged is the cost reported
    account = await system.account()
    assert account.points_held == 0 and account.qoints_held == 0 and not account.open_holds, account


async def assert_refunded(system: System, run: R.Run, before: Any, reason: int) -> None:
    """The hold was released in full with ``reason``: the account is back where it was."""
    ledger = await settled_ledger(system, run.run_id)
    assert kinds(ledger) == [RELEASED, RESERVED], ledger
    released = next(t for t in ledger if t.kind == pt.TRANSACTION_KIND_HOLD_RELEASED)
    assert released.release_reason == reason, released
    assert run.cost_points == 0
    after = await system.account()
    assert (after.points_used, after.qoints, after.exp) == (before.points_used, before.qoints, before.exp)
    assert after.points_held == 0 and after.qoints_held == 0 and not after.open_holds, after


@pytest.mark.parametrize("silence", ["webhook_drop", "closed_port"])
async def test_polling_alone_ends_success_and_captures_once(
    redis_url: str, start_service: Any, emulator: Any, silence: str
) -> None:
    env = {"COMFYUI_POLL_AFTER_SECONDS": "0.3"}
    if silence == "closed_port":
        env["COMFYUI_PUBLIC_URL"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with open_system(redis_url, start_service, emulator, **env) as system:
        if silence == "webhook_drop":
            await system.emulator.set_faults(webhook_drop=1.0)
        created = await system.create()
        run = await system.wait(created.run_id)
        await assert_captured_once(system, run)
        hooks = await system.emulator.webhooks(run.upstream_run_id)
        assert hooks and not [h for h in hooks if h["state"] == "delivered"], hooks  # polling did it all
        routes = (await system.emulator.stats())["routes"]
        assert routes.get("POST /api/run/deployment/queue") == 1, routes
        assert routes.get("GET /api/run/{run_id}", 0) >= 2, routes  # polls, then the billed duration


async def test_upstream_failure_ends_failed_and_refunds_in_full(
    redis_url: str, start_service: Any, emulator: Any
) -> None:
    async with open_system(redis_url, start_service, emulator) as system:
        before = await system.account()
        await system.emulator.set_faults(next_run_outcomes=["failed"])
        created = await system.create()
        run = await system.wait(created.run_id)
        assert run.status == R.RUN_STATUS_FAILED, run
        assert (run.error.reason, run.error.domain) == ("RUN_FAILED", COMFYUI_DOMAIN), run.error
        await assert_refunded(system, run, before, pt.RELEASE_REASON_RUN_FAILED)
        [upstream] = await upstream_runs_of(system, run.run_id)
        assert upstream["status"] == "failed"


async def test_stuck_run_times_out_is_cancelled_upstream_and_refunded(
    redis_url: str, start_service: Any, emulator: Any
) -> None:
    # Polling stays slow (30 s, FAST_RUNS): the deadline alone must end the run.
    async with open_system(redis_url, start_service, emulator, COMFYUI_RUN_TIMEOUT_SECONDS="1.5") as system:
        before = await system.account()
        await system.emulator.set_faults(next_run_outcomes=["stuck"])
        created = await system.create()
        run = await system.wait(created.run_id, within=10)
        assert run.status == R.RUN_STATUS_TIMEOUT, run
        assert (run.error.reason, run.error.domain) == ("RUN_TIMED_OUT", COMFYUI_DOMAIN), run.error
        assert run.error.metadata["source"] == "deadline", run.error
        assert run.end_time.ToMilliseconds() - run.submit_time.ToMilliseconds() >= 1500
        await system.emulator.wait_run(run.upstream_run_id, ("cancelled",), within=5)
        await assert_refunded(system, run, before, pt.RELEASE_REASON_RUN_TIMED_OUT)
        assert (await system.get(run.run_id)).status == R.RUN_STATUS_TIMEOUT  # upstream's "cancelled" changed nothing


async def test_duplicate_reordered_and_late_webhooks_change_nothing(
    redis_url: str, start_service: Any, emulator: Any
) -> None:
    async with open_system(redis_url, start_service, emulator) as system:
        assert system.gateway is not None
        await system.emulator.set_faults(webhook_duplicate=1.0, webhook_reorder=0.5, seed=11)
        created = await system.create()
        run = await system.wait(created.run_id)
        await assert_captured_once(system, run)

        async def all_sent() -> list[dict[str, Any]] | None:
            hooks = await system.emulator.webhooks(run.upstream_run_id)
            return hooks if hooks and all(h["state"] != "pending" for h in hooks) else None

        hooks = await eventually(all_sent, "every webhook of the run sent")
        assert any(h["duplicate"] for h in hooks) and any(h["reordered"] for h in hooks), hooks
        assert all(h["state"] == "delivered" for h in hooks), hooks
        stored = await run_hash(system, run.run_id)
        events = await system.redis.xlen(f"run:{{{run.run_id}}}:ev")
        ledger = await ledger_of(system, run.run_id)
        account = await system.account()
        # Late: every callback again, after the run is settled.
        for hook in hooks:
            response = await system.gateway.http.post(hook["url"], content=json.dumps(hook["payload"]),
                                                      headers={"Content-Type": "application/json"})  # fmt: skip
            assert response.status_code == 200, response.text
            body = response.json()
            assert body == {"accepted": True, "run_id": run.run_id, "duplicate": True}, (hook, body)
        assert await run_hash(system, run.run_id) == stored  # rev, update_time: all unchanged
        assert await system.redis.xlen(f"run:{{{run.run_id}}}:ev") == events
        assert await ledger_of(system, run.run_id) == ledger
        assert await system.account() == account
        assert len(await upstream_runs_of(system, run.run_id)) == 1


async def test_forged_webhooks_are_refused_and_change_nothing(
    redis_url: str, start_service: Any, emulator: Any
) -> None:
    # Two stuck runs fill the deployment (concurrency 2); A and B then wait upstream, NOT_STARTED, and
    # nothing moves them: any change to them would be the forgery's.
    async with open_system(redis_url, start_service, emulator, points_env={"POINTS_MAX_OPEN_HOLDS": "10"}) as system:
        gateway = system.gateway
        assert gateway is not None
        await ensure_points(system, "alice")
        await system.emulator.set_faults(next_run_outcomes=["stuck", "stuck"])
        for _ in range(2):
            blocker = await system.create()
            await system.wait(blocker.run_id, (R.RUN_STATUS_RUNNING,), settled=False)
        a = await system.create()
        b = await system.create()
        a_run = await system.wait(a.run_id, (R.RUN_STATUS_NOT_STARTED,), settled=False)
        b_run = await system.wait(b.run_id, (R.RUN_STATUS_NOT_STARTED,), settled=False)
        [a_upstream] = await upstream_runs_of(system, a.run_id)
        assert a_upstream["status"] == "not-started"
        before = (await run_hash(system, a.run_id), await run_hash(system, b.run_id))
        a_token = a_upstream["webhook"].split("token=", 1)[1]
        a_secret = a_token.split(".", 1)[1]
        b_token_with_a_secret = f"{b.run_id}.{a_secret}"

        def payload(run_id: str, status: str = "success") -> str:
            return json.dumps({"event_type": "run.updated", "status": status, "live_status": "forged",
                               "progress": 1, "run_id": run_id, "outputs": []})  # fmt: skip

        refused = [
            ("/v1/webhooks/comfydeploy", a_run.upstream_run_id),  # no token
            ("/v1/webhooks/comfydeploy?token=", a_run.upstream_run_id),  # an empty token
            ("/v1/webhooks/comfydeploy?token=garbage", a_run.upstream_run_id),
            (f"/v1/webhooks/comfydeploy?token={a.run_id}.not-the-secret", a_run.upstream_run_id),
            (f"/v1/webhooks/comfydeploy?token={a.run_id}", a_run.upstream_run_id),  # no secret at all
            (f"/v1/webhooks/comfydeploy?token={b_token_with_a_secret}", b_run.upstream_run_id),  # A's secret, B
        ]
        for path, upstream_id in refused:
            response = await gateway.post(path, payload(upstream_id), key=None)
            assert response.status_code == 401, (path, response.text)
            error = response.json()["error"]
            assert error["status"] == "UNAUTHENTICATED", error
            [info] = [d for d in error["details"] if d["@type"].endswith("ErrorInfo")]
            refusal = (info["reason"], info["domain"])
            if "token=" not in path or path.endswith("token="):  # the gateway may refuse a missing token itself
                assert refusal in (INVALID_TOKEN, ("WEBHOOK_TOKEN_MISSING", "gateway.stationthis.dev")), info
            else:
                assert refusal == INVALID_TOKEN, info
            assert a_secret not in response.text
        # The service itself, reached without the gateway.
        for token in ("", "garbage", f"{a.run_id}.not-the-secret", b_token_with_a_secret):
            request = svc.HandleWebhookRequest(token=token)
            json_format.Parse(payload(a_run.upstream_run_id), request.payload)
            await expect_failure(
                system.runs.HandleWebhook(request, timeout=10), grpc.StatusCode.UNAUTHENTICATED, *INVALID_TOKEN
            )
        # A valid token of run A carrying run B's upstream id: not applied to either run.
        response = await gateway.post(f"/v1/webhooks/comfydeploy?token={a_token}", payload(b_run.upstream_run_id),
                                      key=None)  # fmt: skip
        assert response.status_code == 200, response.text
        assert response.json().get("accepted", False) is False, response.text
        assert (await run_hash(system, a.run_id), await run_hash(system, b.run_id)) == before
        for run_id in (a.run_id, b.run_id):
            assert (await system.get(run_id)).status == R.RUN_STATUS_NOT_STARTED
            assert len(await ledger_of(system, run_id)) == 1  # the hold only: nothing settled


async def test_a_stale_webhook_changes_nothing(redis_url: str, start_service: Any, emulator: Any) -> None:
    """Callbacks about a run that is still going, delivered late: an earlier status, or the same status
    with less progress, is a duplicate and changes nothing (its live_status is old news too)."""
    async with open_system(redis_url, start_service, emulator, points_env={"POINTS_MAX_OPEN_HOLDS": "10"}) as system:
        gateway = system.gateway
        assert gateway is not None
        await ensure_points(system, "alice")
        await system.emulator.set_faults(next_run_outcomes=["stuck", "stuck"])
        for _ in range(2):  # fill the deployment: the next run waits upstream and nothing moves it
            blocker = await system.create()
            await system.wait(blocker.run_id, (R.RUN_STATUS_RUNNING,), settled=False)
        created = await system.create()
        waiting = await system.wait(created.run_id, (R.RUN_STATUS_NOT_STARTED,), settled=False)
        [upstream] = await upstream_runs_of(system, created.run_id)
        path = "/v1/webhooks/comfydeploy?token=" + upstream["webhook"].split("token=", 1)[1]

        async def send(status: str, progress: float, live_status: str) -> dict[str, Any]:
            body = {"event_type": "run.updated", "status": status, "live_status": live_status, "progress": progress,
                    "run_id": waiting.upstream_run_id, "outputs": []}  # fmt: skip
            response = await gateway.post(path, json.dumps(body), key=None)
            assert response.status_code == 200, response.text
            reply: dict[str, Any] = response.json()
            assert reply["accepted"] is True and reply["run_id"] == created.run_id, reply
            return reply

        assert (await send("running", 0.5, "Executing KSampler")).get("duplicate", False) is False
        run = await system.get(created.run_id)
        assert (run.status, run.live_status, round(run.progress, 2)) == (
            R.RUN_STATUS_RUNNING,
            "Executing KSampler",
            0.5,
        )
        stored = await run_hash(system, created.run_id)
        for stale in (
            ("running", 0.5, "Executing KSampler"),  # a repeat
            ("running", 0.25, "Executing CLIPTextEncode"),  # sent before the one above
            ("started", 0.0, "Preparing"),  # an earlier status
            ("queued", 0.0, ""),
        ):
            assert (await send(*stale)).get("duplicate") is True, stale
            assert await run_hash(system, created.run_id) == stored, stale
