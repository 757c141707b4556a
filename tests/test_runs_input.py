"""Bad input on every run RPC: the right code and field details, and nothing written anywhere (Redis, the
ledger, upstream). Refusals by the points ledger leave no run."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from stationthis.comfyui.v1 import comfyui_service_pb2 as svc
from stationthis.comfyui.v1 import run_pb2 as R
from tests.runs_helpers import System, ensure_points, open_system, redis_snapshot, start_system
from tests.support import expect_failure

COMFYUI = "comfyui.stationthis.dev"
WORKFLOWS = "workflows.stationthis.dev"
POINTS = "points.stationthis.dev"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
UPSTREAM_RUN_ROUTES = ("queue", "run", "cancel")


@pytest.fixture
async def system(redis_url: str, start_service: Any, emulator: Any) -> AsyncIterator[System]:
    async for running in start_system(redis_url, start_service, emulator):
        yield running


def create_request(**fields: Any) -> svc.CreateRunRequest:
    inputs = fields.pop("inputs", {"input_prompt": "a cat astronaut"})
    fields.setdefault("user_id", "alice")
    if "workflow_id" not in fields and "no_workflow" not in fields:
        fields.setdefault("workflow_name", "text2img")
    fields.pop("no_workflow", None)
    request = svc.CreateRunRequest(**fields)
    request.inputs.update(inputs)
    return request


async def untouched(system: System, calls: list[Callable[[], Awaitable[Any]]]) -> None:
    """Make each call, expecting it to fail; afterwards Redis, the ledger and the upstream's run routes
    are exactly as before."""
    before = await redis_snapshot(system.redis)
    ledger = await system.transactions()
    groups = dict((await system.emulator.stats())["groups"])
    for call in calls:
        await call()
    assert await redis_snapshot(system.redis) == before
    assert await system.transactions() == ledger
    after = (await system.emulator.stats())["groups"]
    assert {g: after.get(g) for g in UPSTREAM_RUN_ROUTES} == {g: groups.get(g) for g in UPSTREAM_RUN_ROUTES}


def fields_of(bad: Any) -> set[str]:
    assert bad is not None, "no BadRequest"
    return {v.field for v in bad.field_violations}


async def test_create_run_refuses_bad_requests_and_writes_nothing(system: System) -> None:
    await ensure_points(system, "alice")
    labels_17 = {f"k{i}": "v" for i in range(17)}
    invalid: list[tuple[svc.CreateRunRequest, set[str]]] = [
        (create_request(user_id=""), {"user_id"}),
        (create_request(user_id="not a user!"), {"user_id"}),
        (create_request(user_id="x" * 129), {"user_id"}),
        (create_request(no_workflow=True), {"workflow"}),
        (create_request(workflow_name="   "), {"workflow"}),
        (create_request(workflow_id=""), {"workflow"}),
        (create_request(workflow_name="w" * 201), {"workflow_name"}),
        (create_request(environment=99), {"environment"}),  # type: ignore[arg-type]
        (create_request(environment=-1), {"environment"}),  # type: ignore[arg-type]
        (create_request(gpu=99), {"gpu"}),  # type: ignore[arg-type]
        (create_request(labels={"Bad Key": "v"}), {"labels.Bad Key"}),
        (create_request(labels={"": "v"}), {"labels."}),
        (create_request(labels={"k" * 64: "v"}), {"labels." + "k" * 63}),
        (create_request(labels={"ok": "v" * 257}), {"labels.ok"}),
        (create_request(labels=labels_17), {"labels"}),
        (create_request(request_id="has space"), {"request_id"}),
        (create_request(request_id="x" * 129), {"request_id"}),
        (create_request(user_id="", no_workflow=True, gpu=77), {"user_id", "workflow", "gpu"}),  # type: ignore[arg-type]
    ]

    def refuse(request: svc.CreateRunRequest, expected: set[str]) -> Callable[[], Awaitable[Any]]:
        async def call() -> None:
            _, bad = await expect_failure(system.runs.CreateRun(request, timeout=10), INVALID, "INVALID_REQUEST",
                                          COMFYUI)  # fmt: skip
            assert fields_of(bad) == expected, (request, bad)

        return call

    async def unknown_workflow() -> None:
        for request in (
            create_request(workflow_name="no-such-workflow", request_id="unknown-1"),
            create_request(workflow_id=str(uuid.uuid4())),
        ):
            info, _ = await expect_failure(system.runs.CreateRun(request, timeout=10), grpc.StatusCode.NOT_FOUND,
                                           "WORKFLOW_NOT_FOUND", WORKFLOWS)  # fmt: skip
            assert info.metadata, info  # relayed with the workflows service's metadata

    async def bad_inputs() -> None:
        request = create_request(inputs={"input_prompt": "a cat", "input_bogus": 1, "input_steps": "many"},
                                 request_id="inputs-1")  # fmt: skip
        _, bad = await expect_failure(system.runs.CreateRun(request, timeout=10), INVALID, "INVALID_INPUTS", WORKFLOWS)
        assert fields_of(bad) == {"inputs.input_bogus", "inputs.input_steps"}, bad

    await untouched(system, [refuse(r, f) for r, f in invalid] + [unknown_workflow, bad_inputs])
    # Only a successful CreateRun is remembered: the request_id of a refused one may be used again.
    run = (await system.runs.CreateRun(create_request(request_id="inputs-1"), timeout=10)).run
    assert run.status == R.RUN_STATUS_SUBMITTING
    await system.wait(run.run_id)


async def test_run_id_rpcs_refuse_bad_and_unknown_ids(system: System) -> None:
    unknown = str(uuid.uuid4())
    calls: list[Callable[[], Awaitable[Any]]] = []

    async def first_message(run_id: str) -> Any:
        call = system.runs.WatchRun(svc.WatchRunRequest(run_id=run_id), timeout=10)
        return await call.read()

    def refused(make: Callable[[str], Awaitable[Any]], run_id: str) -> Callable[[], Awaitable[Any]]:
        async def call() -> None:
            if run_id == unknown:
                info, _ = await expect_failure(make(run_id), grpc.StatusCode.NOT_FOUND, "RUN_NOT_FOUND", COMFYUI)
                assert info.metadata["run_id"] == unknown
            else:
                _, bad = await expect_failure(make(run_id), INVALID, "INVALID_REQUEST", COMFYUI)
                assert fields_of(bad) == {"run_id"}, (run_id, bad)

        return call

    makers: list[Callable[[str], Awaitable[Any]]] = [
        lambda run_id: system.runs.GetRun(svc.GetRunRequest(run_id=run_id), timeout=10),
        first_message,
        lambda run_id: system.runs.CancelRun(svc.CancelRunRequest(run_id=run_id), timeout=10),
        lambda run_id: system.runs.CancelRun(svc.CancelRunRequest(run_id=run_id, request_id="c-1"), timeout=10),
    ]
    for make in makers:
        for run_id in ("", "not-a-uuid", "../x", unknown + "0", unknown):
            calls.append(refused(make, run_id))

    async def bad_cancel_request_id() -> None:
        request = svc.CancelRunRequest(run_id=unknown, request_id="with space")
        _, bad = await expect_failure(system.runs.CancelRun(request, timeout=10), INVALID, "INVALID_REQUEST", COMFYUI)
        assert fields_of(bad) == {"request_id"}

    await untouched(system, [*calls, bad_cancel_request_id])
    # A refused CancelRun's request_id was not remembered.
    created = await system.create()
    await system.wait(created.run_id)
    reply = await system.runs.CancelRun(svc.CancelRunRequest(run_id=created.run_id, request_id="c-1"), timeout=10)
    assert reply.run.status == R.RUN_STATUS_SUCCESS


async def test_list_runs_refuses_bad_requests(system: System) -> None:
    created = await system.create()
    await system.wait(created.run_id)
    other = await system.create()
    await system.wait(other.run_id)
    first = await system.runs.ListRuns(svc.ListRunsRequest(user_id="alice", page_size=1), timeout=10)
    token = first.next_page_token
    assert token

    def refused(request: svc.ListRunsRequest, reason: str, fields: set[str]) -> Callable[[], Awaitable[Any]]:
        async def call() -> None:
            _, bad = await expect_failure(system.runs.ListRuns(request, timeout=10), INVALID, reason, COMFYUI)
            assert fields_of(bad) == fields, (request, bad)

        return call

    statuses = [R.RUN_STATUS_SUCCESS]
    await untouched(
        system,
        [
            refused(svc.ListRunsRequest(user_id=""), "INVALID_REQUEST", {"user_id"}),
            refused(svc.ListRunsRequest(user_id="alice", page_size=-1), "INVALID_REQUEST", {"page_size"}),
            refused(
                svc.ListRunsRequest(user_id="alice", statuses=[R.RUN_STATUS_UNSPECIFIED]),
                "INVALID_REQUEST",
                {"statuses"},
            ),
            refused(
                svc.ListRunsRequest(user_id="alice", statuses=[R.RUN_STATUS_SUCCESS, 99]),  # type: ignore[list-item]
                "INVALID_REQUEST",
                {"statuses"},
            ),
            refused(svc.ListRunsRequest(user_id="alice", page_token="garbage"), "INVALID_PAGE_TOKEN", {"page_token"}),
            refused(svc.ListRunsRequest(user_id="alice", page_token=token + "x"), "INVALID_PAGE_TOKEN", {"page_token"}),
            # A token of another list: another user, another filter.
            refused(svc.ListRunsRequest(user_id="bob", page_token=token), "INVALID_PAGE_TOKEN", {"page_token"}),
            refused(
                svc.ListRunsRequest(user_id="alice", statuses=statuses, page_token=token),
                "INVALID_PAGE_TOKEN",
                {"page_token"},
            ),
        ],
    )
    second = await system.runs.ListRuns(svc.ListRunsRequest(user_id="alice", page_size=1, page_token=token), timeout=10)
    assert [r.run_id for r in [*first.runs, *second.runs]] == [other.run_id, created.run_id]
    assert not second.next_page_token


async def test_no_points_refuses_create_run_and_leaves_no_run(
    redis_url: str, start_service: Any, emulator: Any
) -> None:
    # max_points = floor((tokens + offset) / divisor): a user without tokens has no free allowance.
    poor = {"POINTS_TOKEN_OFFSET": "1"}
    async with open_system(redis_url, start_service, emulator, points_env=poor) as system:
        before = await system.account()
        assert before.points_available == 0 and before.qoints_available == 0, before
        request = create_request(request_id="poor-1")
        info, _ = await expect_failure(
            system.runs.CreateRun(request, timeout=10),
            grpc.StatusCode.FAILED_PRECONDITION,
            "INSUFFICIENT_POINTS",
            POINTS,
        )
        assert int(info.metadata["required"]) > 0, info  # the amount needed, relayed unchanged
        listed = await system.runs.ListRuns(svc.ListRunsRequest(user_id="alice"), timeout=10)
        assert not listed.runs and not listed.next_page_token
        assert not [k async for k in system.redis.scan_iter("run:*")]
        assert await system.redis.zcard("runs:active") == 0
        assert (await system.emulator.stats())["groups"].get("queue") is None
        assert not [t for t in await system.transactions() if t.run_id]
        assert (await system.account()).points_held == 0
        # With qoints the same request_id goes through: the refusal was not remembered.
        await ensure_points(system, "alice")
        run = (await system.runs.CreateRun(request, timeout=10)).run
        assert run.status == R.RUN_STATUS_SUBMITTING and run.points_held == int(info.metadata["required"]), run


async def test_too_many_open_holds_refuses_a_fourth_run(system: System) -> None:
    await ensure_points(system, "alice")
    await system.emulator.set_faults(next_run_outcomes=["stuck"] * 3)
    runs = [await system.create() for _ in range(3)]
    info, _ = await expect_failure(system.create(request_id="fourth"), grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   "TOO_MANY_OPEN_HOLDS", POINTS)  # fmt: skip
    assert info.metadata["max_open_holds"] == "3", info
    listed = await system.runs.ListRuns(svc.ListRunsRequest(user_id="alice"), timeout=10)
    assert sorted(r.run_id for r in listed.runs) == sorted(r.run_id for r in runs)
    assert len(await system.emulator.runs()) == 3
    # Once one ends its hold is released and the same request_id goes through.
    await system.runs.CancelRun(svc.CancelRunRequest(run_id=runs[0].run_id), timeout=30)
    await system.wait(runs[0].run_id)
    fourth = await system.create(request_id="fourth")
    assert fourth.status == R.RUN_STATUS_SUBMITTING
