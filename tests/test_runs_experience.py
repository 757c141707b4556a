"""What a chat user sees: place in queue and ETA, the quote that is the hold, a deadline per run,
re-rolls from a stored snapshot, refunds by failure class with a receipt, results pushed to the
adapter (signed as Standard Webhooks). Against the real services, the emulator and the gateway."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import statistics
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal
from typing import Any

import grpc
import pytest
import uvicorn
from google.protobuf import duration_pb2, json_format
from standardwebhooks.webhooks import Webhook

from devtools.redis_server import free_port
from emulator.testing import DEPLOYMENTS, WORKFLOWS
from services.comfyui.config import ComfyUIConfig
from services.comfyui.server import build as build_comfyui
from stationthis.comfyui.v1 import comfyui_service_pb2 as svc
from stationthis.comfyui.v1 import run_pb2 as R
from stationthis.points.v1 import points_pb2 as pt
from stationthis.type.v1 import gpu_pb2
from stationthis.workflows.v1 import workflow_pb2, workflows_service_pb2, workflows_service_pb2_grpc
from tests.runs_helpers import System, ensure_points, open_system, stop_surely
from tests.support import expect_failure

COMFYUI = "comfyui.stationthis.dev"
A10G_POINTS_PER_SECOND = Decimal(2)  # 0.000337 USD/s / 0.000337 USD per point x 2


def cost_of(seconds: Decimal) -> int:
    return max(3, int((seconds * A10G_POINTS_PER_SECOND).to_integral_value(rounding=ROUND_CEILING)))


def seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


@pytest.fixture
async def system(redis_url, start_service, emulator) -> AsyncIterator[System]:  # type: ignore[no-untyped-def]
    async with open_system(redis_url, start_service, emulator, COMFYUI_POLL_AFTER_SECONDS="0.5") as running:
        yield running


async def finished(system: System, **fields: Any) -> R.Run:
    run = await system.create(**fields)
    return await system.wait(run.run_id)


# --- queue position and ETA ------------------------------------------------------------------------


async def test_no_history_no_eta_then_the_median_of_known_durations(system: System) -> None:
    first = await system.create()
    assert not first.HasField("estimated_end_time"), "no history: no estimate is invented"
    done = [await system.wait(first.run_id)] + [await finished(system) for _ in range(2)]
    durations = [r.run_duration.ToNanoseconds() / 1e9 for r in done]
    median = statistics.median(durations)
    await system.emulator.set_faults(next_run_outcomes=["stuck"])
    await ensure_points(system, "alice")
    stuck = await system.create()
    running = await system.wait(stuck.run_id, (R.RUN_STATUS_RUNNING,), settled=False)
    assert running.HasField("estimated_end_time"), running
    expected_ms = running.start_time.ToMilliseconds() + int(median * 1000)
    assert abs(running.estimated_end_time.ToMilliseconds() - expected_ms) <= 5, (durations, running)
    # Every WatchRun event of a live run carries it too.
    watch = system.runs.WatchRun(svc.WatchRunRequest(run_id=stuck.run_id))
    snapshot = await watch.read()
    assert snapshot.run.estimated_end_time == running.estimated_end_time
    watch.cancel()
    await system.runs.CancelRun(svc.CancelRunRequest(run_id=stuck.run_id), timeout=30)
    ended = await system.wait(stuck.run_id)
    assert not ended.HasField("estimated_end_time")


async def test_a_waiting_run_shows_its_place_in_the_queue(system: System) -> None:
    # The staging deployment runs one at a time: the second waits behind the first.
    await ensure_points(system, "alice")
    await system.emulator.set_faults(next_run_outcomes=["stuck", "stuck"])
    first = await system.create(environment=2)
    await system.wait(first.run_id, (R.RUN_STATUS_RUNNING,), settled=False)
    second = await system.create(environment=2)

    async def waiting() -> R.Run | None:
        run = await system.get(second.run_id)
        if run.status in (R.RUN_STATUS_NOT_STARTED, R.RUN_STATUS_QUEUED) and run.HasField("queue_position"):
            return run
        await asyncio.sleep(0.1)
        return None

    found = None
    for _ in range(100):
        found = await waiting()
        if found is not None:
            break
    assert found is not None and found.queue_position >= 0, await system.get(second.run_id)
    for run in (first, second):
        await system.runs.CancelRun(svc.CancelRunRequest(run_id=run.run_id), timeout=30)


# --- the quote is the hold -------------------------------------------------------------------------


async def test_the_quote_comes_from_history_and_is_what_create_run_holds(system: System) -> None:
    quote = await system.runs.QuoteRun(svc.QuoteRunRequest(user_id="alice", workflow_name="/make"), timeout=10)
    assert quote.basis == "default" and quote.history_runs == 0 and quote.gpu == gpu_pb2.GPU_TYPE_A10G
    assert quote.gpu_time.ToSeconds() == 60 and quote.cost_points == cost_of(Decimal(60)) == 120
    assert quote.affordable and quote.available_points == 370 and quote.shortfall_points == 0
    run = await system.create(workflow="/make")
    assert run.points_held == run.quoted_points == quote.cost_points
    done = [await system.wait(run.run_id)] + [await finished(system) for _ in range(3)]
    durations = sorted(Decimal(r.run_duration.ToNanoseconds()) / Decimal(10**9) for r in done)
    after = await system.runs.QuoteRun(svc.QuoteRunRequest(user_id="alice", workflow_name="text2img"), timeout=10)
    assert after.basis == "history" and after.history_runs == 4
    p90 = durations[-1]  # nearest rank of 0.9 over 4 values: the largest
    assert Decimal(after.gpu_time.ToNanoseconds()) / Decimal(10**9) == p90
    assert after.cost_points == cost_of(p90)
    assert after.typical_gpu_time.ToNanoseconds() > 0
    next_run = await system.create()
    assert next_run.points_held == after.cost_points  # the price the user saw is what is held
    await system.wait(next_run.run_id)


async def test_a_quote_for_a_user_who_cannot_afford_it_says_so_and_holds_nothing(
    redis_url: str, start_service: Any, emulator: Any
) -> None:
    async with open_system(redis_url, start_service, emulator, COMFYUI_DEFAULT_QUOTE_SECONDS="500") as system:
        assert system.gateway is not None
        response = await system.gateway.post("/v1/runs:quote", body='{"user_id": "bob", "workflow_name": "/make"}')
        assert response.status_code == 200, response.text
        quote = response.json()
        assert "affordable" not in quote  # false: proto3 JSON leaves defaults out
        assert int(quote["cost_points"]) == 1000
        assert int(quote["shortfall_points"]) == 1000 - 370
        account = await system.account("bob")
        assert not account.open_holds and account.points_held == 0
        assert not [t for t in await system.transactions("bob")]


# --- a deadline per run ----------------------------------------------------------------------------


async def test_cancel_after_cancels_upstream_and_refunds_in_full(system: System) -> None:
    before = await system.account()
    await system.emulator.set_faults(next_run_outcomes=["stuck"])
    run = await system.create(cancel_after=seconds(1.5))
    assert run.cancel_after.ToNanoseconds() == 1_500_000_000
    ended = await system.wait(run.run_id, within=20)
    assert ended.status == R.RUN_STATUS_CANCELLED and ended.error.metadata["source"] == "cancel_after", ended
    assert ended.receipt.rule == R.SETTLEMENT_RULE_DEADLINE_REFUNDED
    assert ended.receipt.points_refunded == ended.points_held and ended.receipt.points_charged == 0
    upstream = [r for r in await system.emulator.runs() if r["id"] == ended.upstream_run_id]
    assert [r["status"] for r in upstream] == ["cancelled"]
    after = await system.account()
    assert (after.points_used, after.points_held) == (before.points_used, 0)


async def test_a_deadline_passed_while_no_replica_ran_is_enforced_after_the_restart(system: System) -> None:
    before = await system.account()
    await system.emulator.set_faults(next_run_outcomes=["stuck"])
    run = await system.create(cancel_after=seconds(1.5))
    await system.wait(run.run_id, (R.RUN_STATUS_RUNNING,), settled=False)
    await stop_surely(system.comfyui[0])  # the only replica goes away with the run upstream
    await asyncio.sleep(2.0)  # the deadline passes while nobody is there to see it
    assert [r["status"] for r in await system.emulator.runs() if r["status"] == "running"] == ["running"]
    system.comfyui[0] = await system.start_comfyui()  # a new replica: its reconciler finds the run
    ended = await system.wait(run.run_id, within=30)
    assert ended.status == R.RUN_STATUS_CANCELLED and ended.error.metadata["source"] == "cancel_after", ended
    assert ended.receipt.rule == R.SETTLEMENT_RULE_DEADLINE_REFUNDED and ended.receipt.points_charged == 0
    upstream = [r for r in await system.emulator.runs() if r["id"] == ended.upstream_run_id]
    assert [r["status"] for r in upstream] == ["cancelled"]
    after = await system.account()
    assert (after.points_used, after.points_held) == (before.points_used, 0)


async def test_cancel_after_is_checked(system: System) -> None:
    for bad in (0.2, 90_000):
        request = svc.CreateRunRequest(user_id="alice", workflow_name="text2img", cancel_after=seconds(bad))
        _, details = await expect_failure(system.runs.CreateRun(request, timeout=10), grpc.StatusCode.INVALID_ARGUMENT,
                                          "INVALID_REQUEST", COMFYUI)  # fmt: skip
        assert [v.field for v in details.field_violations] == ["cancel_after"]


# --- re-roll and edit from a stored snapshot -------------------------------------------------------


async def test_a_reroll_starts_from_the_snapshot_with_a_new_seed(system: System) -> None:
    await ensure_points(system, "alice")
    original = await finished(system, inputs={"input_prompt": "a cat astronaut", "input_steps": 30, "input_seed": -1})
    seed = original.inputs["input_seed"]
    assert seed != -1 and float(seed).is_integer() and 0 <= seed < 2**32, "the seed actually used is stored"
    upstream = {r["id"]: r for r in await system.emulator.runs()}
    assert upstream[original.upstream_run_id]["workflow_inputs"]["input_seed"] == seed  # what was sent
    rerolled = (await system.runs.RegenerateRun(svc.RegenerateRunRequest(run_id=original.run_id), timeout=30)).run
    assert rerolled.regenerated_from == original.run_id and rerolled.run_id != original.run_id
    assert rerolled.deployment_id == original.deployment_id and rerolled.workflow_id == original.workflow_id
    assert rerolled.inputs["input_seed"] != seed
    same = dict(rerolled.inputs)
    del same["input_seed"]
    expected = dict(original.inputs)
    del expected["input_seed"]
    assert same == expected and same["input_steps"] == 30  # the snapshot's values, not today's defaults
    kept = (await system.runs.RegenerateRun(
        svc.RegenerateRunRequest(run_id=original.run_id, same_seed=True), timeout=30)).run  # fmt: skip
    assert kept.inputs["input_seed"] == seed
    edit = svc.RegenerateRunRequest(run_id=original.run_id, same_seed=True)
    edit.input_overrides.update({"input_prompt": "a dog astronaut"})
    edited = (await system.runs.RegenerateRun(edit, timeout=30)).run
    assert edited.inputs["input_prompt"] == "a dog astronaut" and edited.inputs["input_seed"] == seed
    for run in (rerolled, kept, edited):
        assert (await system.wait(run.run_id)).status == R.RUN_STATUS_SUCCESS


OLD_DEFAULTS = {"input_cfg": 7.0, "input_negative": "blurry, lowres, watermark, text", "input_width": 1024}
NEW_DEFAULTS = {"input_cfg": 4.5, "input_negative": "oversaturated, jpeg artifacts", "input_width": 768}


async def _change_defaults_upstream(system: System, defaults: dict[str, Any]) -> str:
    """What a ComfyUI Deploy user does: save a new version of text2img whose external input nodes
    have other default_values, and point the production deployment at it. Its id."""
    async with system.emulator.client() as api:
        deployment = (await api.get(f"/deployment/{DEPLOYMENTS['text2img']}")).json()
        current = (await api.get(f"/workflow-version/{deployment['workflow_version_id']}")).json()
        graph = json.loads(json.dumps(current["workflow_api"]))
        changed = set()
        for node in graph.values():
            input_id = node["inputs"].get("input_id")
            if isinstance(input_id, str) and input_id in defaults:
                node["inputs"]["default_value"] = defaults[input_id]
                changed.add(input_id)
        assert changed == set(defaults), changed
        created = await api.post(f"/workflow/{WORKFLOWS['text2img']}/version",
                                 json={"workflow": current["workflow"], "workflow_api": graph,
                                       "comment": "new defaults"})  # fmt: skip
        assert created.status_code == 200, created.text
        version_id: str = created.json()["id"]
        moved = await api.patch(f"/deployment/{DEPLOYMENTS['text2img']}", json={"workflow_version_id": version_id})
        assert moved.status_code == 200 and moved.json()["workflow_version_id"] == version_id, moved.text
        return version_id


def _defaults(workflow: workflow_pb2.Workflow) -> dict[str, Any]:
    return {i.input_id: json_format.MessageToDict(i.default_value) for i in workflow.inputs
            if i.HasField("default_value")}  # fmt: skip


async def test_todays_catalog_defaults_never_leak_into_a_reroll(system: System) -> None:
    await ensure_points(system, "alice")
    original = await finished(system, inputs={"input_prompt": "a cat astronaut"})  # the rest defaulted
    assert original.status == R.RUN_STATUS_SUCCESS, original
    assert {k: original.inputs[k] for k in OLD_DEFAULTS} == OLD_DEFAULTS  # stored in the snapshot
    sent = {r["id"]: r for r in await system.emulator.runs()}[original.upstream_run_id]["workflow_inputs"]
    assert {k: sent[k] for k in OLD_DEFAULTS} == OLD_DEFAULTS
    # Upstream, the defaults change; the catalog, refreshed, now says so.
    version_id = await _change_defaults_upstream(system, NEW_DEFAULTS)
    assert version_id != original.workflow_version_id
    catalog = workflows_service_pb2_grpc.WorkflowsServiceStub(system.workflows.channel)
    await catalog.RefreshCatalog(workflows_service_pb2.RefreshCatalogRequest(), timeout=30)
    production = workflows_service_pb2.GetWorkflowRequest(
        workflow_id=original.workflow_id, environment=workflow_pb2.ENVIRONMENT_PRODUCTION
    )
    got = (await catalog.GetWorkflow(production, timeout=10)).workflow
    resolved = await catalog.ResolveWorkflow(workflows_service_pb2.ResolveWorkflowRequest(name="text2img"), timeout=10)
    assert resolved.deployment.deployment_id == original.deployment_id
    for workflow in (got, resolved.workflow):
        today = _defaults(workflow)
        assert {k: today[k] for k in NEW_DEFAULTS} == NEW_DEFAULTS, today
    # Re-rolls (plain, and with another input edited) keep the snapshot's defaults...
    edit = svc.RegenerateRunRequest(run_id=original.run_id)
    edit.input_overrides.update({"input_steps": 12})
    rerolls = [(await system.runs.RegenerateRun(request, timeout=30)).run
               for request in (svc.RegenerateRunRequest(run_id=original.run_id), edit)]  # fmt: skip
    # ... while a new run takes today's.
    fresh = await system.create(inputs={"input_prompt": "a cat astronaut"})
    assert {k: fresh.inputs[k] for k in NEW_DEFAULTS} == NEW_DEFAULTS, fresh.inputs
    assert fresh.workflow_version_id == version_id
    done = {run.run_id: await system.wait(run.run_id) for run in (*rerolls, fresh)}
    upstream = {r["id"]: r for r in await system.emulator.runs()}
    for run in rerolls:
        ended = done[run.run_id]
        assert ended.status == R.RUN_STATUS_SUCCESS and ended.regenerated_from == original.run_id, ended
        # The deployment runs its new version now (with the snapshot's inputs): the record says so.
        assert ended.workflow_version_id == upstream[ended.upstream_run_id]["workflow_version_id"] == version_id
        sent = upstream[ended.upstream_run_id]["workflow_inputs"]
        for inputs in (dict(ended.inputs), sent):
            assert {k: inputs[k] for k in OLD_DEFAULTS} == OLD_DEFAULTS, inputs
            assert inputs["input_prompt"] == "a cat astronaut" and inputs["input_seed"] != original.inputs["input_seed"]
    assert done[rerolls[0].run_id].inputs["input_steps"] == original.inputs["input_steps"] == 20
    assert done[rerolls[1].run_id].inputs["input_steps"] == 12
    assert upstream[done[rerolls[1].run_id].upstream_run_id]["workflow_inputs"]["input_steps"] == 12
    assert done[fresh.run_id].status == R.RUN_STATUS_SUCCESS
    sent = upstream[done[fresh.run_id].upstream_run_id]["workflow_inputs"]
    assert {k: sent[k] for k in NEW_DEFAULTS} == NEW_DEFAULTS, sent


async def test_reroll_overrides_are_validated_like_any_run(system: System) -> None:
    original = await finished(system)
    bad = svc.RegenerateRunRequest(run_id=original.run_id)
    bad.input_overrides.update({"input_steps": "many", "no_such_input": 1})
    _, details = await expect_failure(system.runs.RegenerateRun(bad, timeout=10), grpc.StatusCode.INVALID_ARGUMENT,
                                      "INVALID_INPUTS", "workflows.stationthis.dev")  # fmt: skip
    assert {v.field for v in details.field_violations} == {"inputs.input_steps", "inputs.no_such_input"}
    await expect_failure(
        system.runs.RegenerateRun(svc.RegenerateRunRequest(run_id="00000000-0000-4000-8000-000000000000"),
                                  timeout=10),
        grpc.StatusCode.NOT_FOUND, "RUN_NOT_FOUND", COMFYUI,
    )  # fmt: skip


# --- refunds by failure class, with a receipt ------------------------------------------------------


async def _receipt_agrees_with_the_ledger(system: System, run: R.Run) -> None:
    receipt = run.receipt
    assert receipt.transaction_id, run
    [tx] = [t for t in await system.transactions(run.user_id) if t.transaction_id == receipt.transaction_id]
    assert tx.run_id == run.run_id
    charged = tx.points_used_delta - tx.qoints_delta + tx.unpaid_delta  # what the settlement took
    assert charged == receipt.points_charged == run.cost_points, (tx, receipt)
    assert -(tx.points_held_delta + tx.qoints_held_delta) == receipt.points_held == run.points_held
    assert receipt.points_refunded == max(0, receipt.points_held - receipt.points_charged)
    assert receipt.explanation and receipt.multiplier == "2"


async def test_success_is_charged_and_the_receipt_agrees_with_the_ledger(system: System) -> None:
    run = await finished(system)
    assert run.receipt.rule == R.SETTLEMENT_RULE_SUCCESS_CHARGED
    assert run.receipt.usd_per_second == "0.000337" and run.receipt.gpu == gpu_pb2.GPU_TYPE_A10G
    assert run.receipt.gpu_time == run.run_duration
    assert pt.TransactionKind.Name((await system.transactions())[0].kind) == "TRANSACTION_KIND_HOLD_CAPTURED"
    await _receipt_agrees_with_the_ledger(system, run)


@pytest.mark.parametrize(
    ("outcome", "rule"),
    [("failed", R.SETTLEMENT_RULE_PROVIDER_FAILURE_REFUNDED), ("timeout", R.SETTLEMENT_RULE_TIMEOUT_REFUNDED)],
)
async def test_provider_failures_and_timeouts_are_refunded_in_full(system: System, outcome: str, rule: int) -> None:
    await system.emulator.set_faults(next_run_outcomes=[outcome])
    run = await finished(system)
    assert run.receipt.rule == rule and run.receipt.points_charged == 0, run
    await _receipt_agrees_with_the_ledger(system, run)


async def test_our_own_faults_are_refunded_in_full(system: System) -> None:
    await system.emulator.set_faults(next_errors=[{"route": "queue", "status": 500}])
    run = await finished(system)
    assert run.status == R.RUN_STATUS_FAILED and run.error.reason == "SUBMIT_FAILED"
    assert run.receipt.rule == R.SETTLEMENT_RULE_SERVICE_FAULT_REFUNDED
    await _receipt_agrees_with_the_ledger(system, run)


async def test_a_cancel_before_the_start_is_refunded_in_full(system: System) -> None:
    await system.emulator.set_faults(latency_ms=1500)
    run = await system.create()
    await system.runs.CancelRun(svc.CancelRunRequest(run_id=run.run_id), timeout=30)
    await system.emulator.set_faults()
    ended = await system.wait(run.run_id)
    assert ended.receipt.rule == R.SETTLEMENT_RULE_CANCELLED_BEFORE_START_REFUNDED, ended
    await _receipt_agrees_with_the_ledger(system, ended)


async def test_a_cancel_after_the_start_charges_nothing_by_default(system: System) -> None:
    await system.emulator.set_faults(next_run_outcomes=["stuck"])
    run = await system.create()
    await system.wait(run.run_id, (R.RUN_STATUS_RUNNING,), settled=False)
    await system.runs.CancelRun(svc.CancelRunRequest(run_id=run.run_id), timeout=30)
    ended = await system.wait(run.run_id)
    assert ended.receipt.rule == R.SETTLEMENT_RULE_CANCELLED_AFTER_START and ended.receipt.points_charged == 0
    await _receipt_agrees_with_the_ledger(system, ended)


async def test_a_cancel_after_the_start_charges_the_configured_share(
    redis_url: str, start_service: Any, emulator: Any
) -> None:
    async with open_system(redis_url, start_service, emulator, COMFYUI_CANCEL_CHARGE_SHARE="0.5") as system:
        await system.emulator.set_faults(next_run_outcomes=["stuck"])
        run = await system.create()
        await system.wait(run.run_id, (R.RUN_STATUS_RUNNING,), settled=False)
        await asyncio.sleep(1.0)  # a second of GPU time used
        await system.runs.CancelRun(svc.CancelRunRequest(run_id=run.run_id), timeout=30)
        ended = await system.wait(run.run_id)
        receipt = ended.receipt
        assert receipt.rule == R.SETTLEMENT_RULE_CANCELLED_AFTER_START, ended
        used = Decimal(ended.run_duration.ToNanoseconds()) / Decimal(10**9)
        assert Decimal(receipt.gpu_time.ToNanoseconds()) == (
            Decimal(ended.run_duration.ToNanoseconds()) / 2
        ).to_integral_value(rounding="ROUND_DOWN")
        assert receipt.points_charged == cost_of(used / 2) > 0
        await _receipt_agrees_with_the_ledger(system, ended)


async def test_a_run_past_its_quote_pays_the_overage_and_the_receipt_says_so(
    redis_url: str, start_service: Any, emulator: Any
) -> None:
    # Quoted on 0.1 s of GPU time (the 3-point minimum); the run takes longer.
    async with open_system(redis_url, start_service, emulator, COMFYUI_DEFAULT_QUOTE_SECONDS="0.1") as system:
        run = await system.create()
        assert run.points_held == 3
        ended = await system.wait(run.run_id)
        receipt = ended.receipt
        if receipt.points_charged > receipt.points_held:
            assert receipt.overage_points == receipt.points_charged - 3 and "beyond the hold" in receipt.explanation
        await _receipt_agrees_with_the_ledger(system, ended)


# --- results pushed to the adapters ----------------------------------------------------------------


@dataclass
class Receiver:
    """An adapter's HTTP endpoint: records every request; answers from ``script`` (then 200)."""

    port: int
    script: list[int] = field(default_factory=list)
    received: list[tuple[dict[str, str], bytes, int]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/stationthis"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        status = self.script.pop(0) if self.script else 200
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.received.append((headers, body, status))
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@asynccontextmanager
async def receiver() -> AsyncIterator[Receiver]:
    app = Receiver(free_port())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=app.port, log_config=None, lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield app
    finally:
        server.should_exit = True
        await task


SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
OLD_SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


async def test_callbacks_are_signed_ordered_retried_and_survive_a_restart(
    redis_url: str, start_service: Any, emulator: Any
) -> None:
    async with receiver() as hooks, open_system(
        redis_url, start_service, emulator,
        COMFYUI_CALLBACK_ORIGINS=f"default=http://127.0.0.1:{hooks.port}",
        COMFYUI_CALLBACK_SECRETS=f"default={SECRET},default={OLD_SECRET}",
    ) as system:  # fmt: skip
        assert system.gateway is not None
        hooks.script = [503]  # the first delivery fails: it is retried
        body = json.dumps({"user_id": "alice", "workflow_name": "text2img", "callback_url": hooks.url,
                           "inputs": {"input_prompt": "a cat astronaut"}})  # fmt: skip
        created = await system.gateway.post("/v1/runs", body=body)
        assert created.status_code == 200, created.text
        run_id = created.json()["run"]["run_id"]
        # While the first callback waits for its retry, the service restarts (same address, new
        # process state): the outbox is in Redis, nothing is lost.
        for _ in range(200):
            if hooks.received:
                break
            await asyncio.sleep(0.01)
        old = system.comfyui[0]
        environ = {
            "REDIS_URL": redis_url, "COMFYDEPLOY_API_URL": emulator.base_url, "COMFYDEPLOY_API_KEY": emulator.api_key,
            "POINTS_SERVICE_ADDR": system.points.address, "WORKFLOWS_SERVICE_ADDR": system.workflows.address,
            "COMFYUI_PUBLIC_URL": f"http://127.0.0.1:{system.gateway.port}",
            "COMFYUI_RECONCILE_INTERVAL_SECONDS": "0.1",
            "COMFYUI_CALLBACK_ORIGINS": f"default=http://127.0.0.1:{hooks.port}",
            "COMFYUI_CALLBACK_SECRETS": f"default={SECRET},default={OLD_SECRET}",
        }  # fmt: skip
        await old.server.stop(0)
        system.comfyui[0] = await start_service(build_comfyui, ComfyUIConfig, environ, address=old.address)
        await system.wait(run_id)
        for _ in range(200):
            if any(json.loads(b)["type"] == "run.finished" for _, b, s in hooks.received if s == 200):
                break
            await asyncio.sleep(0.05)
        delivered = [(h, b) for h, b, s in hooks.received if s == 200]
        assert hooks.received[0][2] == 503 and hooks.received[1][0]["webhook-id"] == hooks.received[0][0]["webhook-id"]
        # Both keys verify (rotation), with an independent implementation of the spec.
        for key in (SECRET, OLD_SECRET):
            for headers, raw in delivered:
                Webhook(key).verify(raw, headers)
        events = [json.loads(raw) for _, raw in delivered]
        statuses = [e["data"]["run"]["status"] for e in events]
        order = [R.RunStatus.Value(s) for s in statuses]
        assert order == sorted(order) and events[-1]["type"] == "run.finished", statuses
        assert statuses[0] == "RUN_STATUS_SUBMITTING" and "RUN_STATUS_SUCCESS" in statuses
        assert len({h["webhook-id"] for h, _ in delivered}) == len(delivered)  # each event once


async def test_a_receiver_that_answers_410_is_not_called_again(
    redis_url: str, start_service: Any, emulator: Any
) -> None:
    async with receiver() as hooks, open_system(
        redis_url, start_service, emulator,
        COMFYUI_CALLBACK_ORIGINS=f"default=http://127.0.0.1:{hooks.port}",
        COMFYUI_CALLBACK_SECRETS=f"default={SECRET}",
    ) as system:  # fmt: skip
        hooks.script = [410]
        request = svc.CreateRunRequest(user_id="alice", workflow_name="text2img", callback_url=hooks.url)
        run = (await system.runs.CreateRun(request, timeout=30, metadata=(("x-stationthis-adapter", "default"),))).run
        await system.wait(run.run_id)
        await asyncio.sleep(0.5)
        assert [s for _, _, s in hooks.received] == [410]


async def test_a_callback_url_must_be_an_allowed_origin_of_the_callers_adapter(system: System) -> None:
    request = svc.CreateRunRequest(user_id="alice", workflow_name="text2img", callback_url="https://evil.example/x")
    _, details = await expect_failure(system.runs.CreateRun(request, timeout=10), grpc.StatusCode.INVALID_ARGUMENT,
                                      "INVALID_REQUEST", COMFYUI)  # fmt: skip
    assert [v.field for v in details.field_violations] == ["callback_url"]
    assert not [k async for k in system.redis.scan_iter("run:*")]
