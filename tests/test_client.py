"""The typed client library (stationthis_client) over gRPC, against the whole running system: real
Redis, the real points/workflows/comfyui servers, the gateway (webhooks reach the runs through it)
and the ComfyUI Deploy emulator.

What it must do for the bots: generate and stream a run to its end; raise typed errors carrying the
services' details; survive a service restart (a unary call retried, a watch stream resumed after the
last event, no event twice); keep one request_id across its retries; and do the same blocking
(``Client``). Discovery of the local system is checked against the config classes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.comfyui.config import ComfyUIConfig
from services.comfyui.server import build as build_comfyui
from services.comfyui.store import events_key
from stationthis.comfyui.v1 import comfyui_service_pb2 as svc
from stationthis.comfyui.v1 import run_pb2 as R
from stationthis.points.v1 import points_pb2 as pt
from stationthis_client import (
    AlreadyExists,
    AsyncClient,
    Client,
    Endpoints,
    InsufficientPoints,
    Internal,
    InvalidInputs,
    NotFound,
    StationThisError,
    Unavailable,
)
from stationthis_client.errors import from_status
from tests.conftest import Running, StartService, wait_serving
from tests.runs_helpers import (
    FAST_RUNS,
    KEYS,
    System,
    ensure_points,
    eventually,
    open_system,
    start_system,
    stop_surely,
)

PROMPT = {"input_prompt": "a cat astronaut"}
WAITING = (R.RUN_STATUS_NOT_STARTED, R.RUN_STATUS_QUEUED)
ORDER = [
    R.RUN_STATUS_PENDING,
    R.RUN_STATUS_SUBMITTING,
    R.RUN_STATUS_NOT_STARTED,
    R.RUN_STATUS_QUEUED,
    R.RUN_STATUS_STARTED,
    R.RUN_STATUS_RUNNING,
    R.RUN_STATUS_UPLOADING,
]


def endpoints_of(system: System, comfyui: str | None = None) -> Endpoints:
    assert system.gateway is not None
    return Endpoints(
        points=system.points.address,
        workflows=system.workflows.address,
        comfyui=comfyui or system.comfyui[0].address,
        gateway_url=f"http://127.0.0.1:{system.gateway.port}",
        api_key=KEYS[0],
    )


@pytest.fixture
async def system(redis_url: str, start_service: StartService, emulator: Any) -> AsyncIterator[System]:
    async for running in start_system(redis_url, start_service, emulator):
        yield running


@pytest.fixture
async def client(system: System) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(endpoints_of(system), timeout=20) as made:
        yield made


# --- what the event streams must look like ---------------------------------------------------------


def check_stream(events: list[svc.WatchRunResponse]) -> list[R.RunOutput]:
    """A run's events as a reader sees them: a SNAPSHOT first, FINISHED last and only there, no event
    twice, statuses never going back, each output reported once. Returns the outputs reported."""
    types = [e.event_type for e in events]
    assert types[0] == svc.RUN_EVENT_TYPE_SNAPSHOT and types[-1] == svc.RUN_EVENT_TYPE_FINISHED, types
    assert types.count(svc.RUN_EVENT_TYPE_FINISHED) == 1, types
    keys = [(e.event_id, e.event_type) for e in events]
    assert all(e.event_id for e in events) and len(set(keys)) == len(keys), keys
    raw = [e.SerializeToString(deterministic=True) for e in events]
    assert len(set(raw)) == len(raw), "an event was yielded twice"
    live = [ORDER.index(e.run.status) for e in events if e.run.status in ORDER]
    assert live == sorted(live), [R.RunStatus.Name(e.run.status) for e in events]
    reported = list(events[0].run.outputs) + [o for e in events for o in e.new_outputs]
    identities = [(o.node_id, o.type, o.filename, o.text) for o in reported]
    assert len(set(identities)) == len(identities), reported
    return reported


def assert_succeeded(run: R.Run, reported: list[R.RunOutput]) -> None:
    assert run.status == R.RUN_STATUS_SUCCESS, run
    assert run.outputs and list(run.outputs) == reported, (run.outputs, reported)
    assert run.HasField("receipt") and run.receipt.rule == R.SETTLEMENT_RULE_SUCCESS_CHARGED, run.receipt
    assert run.receipt.points_charged > 0 and run.cost_points == run.receipt.points_charged, run


# --- the happy path ---------------------------------------------------------------------------------


async def test_generate_streams_queue_and_progress_to_success_with_outputs_and_receipt(
    system: System, client: AsyncClient
) -> None:
    await ensure_points(system, "alice")
    generation = await client.generate("alice", "/make", PROMPT)
    assert generation.run.status == R.RUN_STATUS_SUBMITTING and generation.run.run_id
    events = [event async for event in generation]
    reported = check_stream(events)
    statuses = {e.run.status for e in events}
    assert statuses & set(WAITING), [R.RunStatus.Name(s) for s in statuses]  # the queue
    progress = [e.run.progress for e in events if e.event_type == svc.RUN_EVENT_TYPE_PROGRESS]
    assert progress and 0 < max(progress), events  # progress reported as it ran
    assert generation.run == events[-1].run and generation.resumes == 0
    assert_succeeded(generation.run, reported)
    assert await generation.wait() == generation.run  # already drained: the final run at once
    # The charge is in the user's ledger, and the run in their list.
    entries = [t for t in await client.history("alice", limit=10) if t.run_id == generation.run_id]
    assert pt.TRANSACTION_KIND_HOLD_CAPTURED in {t.kind for t in entries}, entries
    assert [r.run_id for r in await client.runs("alice")] == [generation.run_id]
    assert await client.run(generation.run_id) == generation.run


async def test_catalog_ledger_quote_regenerate_and_upload(system: System, client: AsyncClient, tmp_path: Path) -> None:
    workflows = await client.workflows()
    names = [w.name for w in workflows]
    assert "text2img" in names and names == sorted(names), names
    assert (await client.workflow("/make")).name == "text2img"
    credited = await client.credit("bob", 500, "payment-1", memo="test purchase")
    assert credited.account.qoints == 500 and credited.transaction.kind == pt.TRANSACTION_KIND_QOINTS_CREDITED
    assert (await client.account("bob")).qoints == 500
    with pytest.raises(AlreadyExists) as again:  # a reference is credited once, whatever the request_id
        await client.credit("bob", 500, "payment-1")
    assert again.value.reason == "DUPLICATE_EXTERNAL_REFERENCE" and again.value.domain == "points.stationthis.dev"
    assert [t.kind for t in await client.history("bob")] == [pt.TRANSACTION_KIND_QOINTS_CREDITED]
    quote = await client.quote("bob", "text2img", PROMPT)
    assert quote.cost_points > 0 and quote.affordable and quote.workflow_name == "text2img", quote
    first = await (await client.generate("bob", "text2img", PROMPT)).wait()
    again_run = await client.regenerate(first.run_id, same_seed=True, overrides={"input_prompt": "a dog"})
    assert again_run.regenerated_from == first.run_id and again_run.run_id != first.run_id
    assert again_run.inputs["input_prompt"] == "a dog"
    assert (await client.watch(again_run.run_id).__anext__()).event_type == svc.RUN_EVENT_TYPE_SNAPSHOT
    # An upload in several chunks (the client streams it), usable as an input value.
    picture = tmp_path / "cat.png"
    picture.write_bytes(os.urandom(600_000))
    uploaded = await client.upload(picture, user="bob")
    assert uploaded.size_bytes == 600_000 and uploaded.content_type == "image/png", uploaded
    assert uploaded.url.startswith("http") and uploaded.filename.endswith(".png")


# --- typed errors -----------------------------------------------------------------------------------


async def test_no_points_is_insufficient_points_with_needed_and_available(
    redis_url: str, start_service: StartService, emulator: Any
) -> None:
    poor = {"POINTS_TOKEN_OFFSET": "1"}  # a user without tokens has no free allowance
    async with open_system(redis_url, start_service, emulator, points_env=poor) as system:
        async with AsyncClient(endpoints_of(system), timeout=20) as client:
            quote = await client.quote("alice", "/make")
            with pytest.raises(InsufficientPoints) as raised:
                await client.create("alice", "/make", PROMPT)
            error = raised.value
            assert (error.code, error.reason, error.domain) == (
                "FAILED_PRECONDITION", "INSUFFICIENT_POINTS", "points.stationthis.dev")  # fmt: skip
            assert error.needed == int(error.metadata["required"]) == quote.cost_points > 0, error.metadata
            assert error.available == 0 and not quote.affordable
            assert str(error) == f"not enough points: {error.needed} needed"  # the ledger's own words
            assert await client.runs("alice") == []  # a refused CreateRun leaves no run
            await client.credit("alice", error.needed, "top-up-1")
            assert (await client.create("alice", "/make", PROMPT)).status == R.RUN_STATUS_SUBMITTING


async def test_bad_inputs_and_unknown_names_are_typed_errors_naming_the_fields(
    system: System, client: AsyncClient
) -> None:
    await ensure_points(system, "alice")
    with pytest.raises(InvalidInputs) as raised:
        await client.create("alice", "/make", {"input_prompt": "a cat", "input_bogus": 1, "input_steps": "many"})
    error = raised.value
    assert (error.code, error.reason, error.domain) == (
        "INVALID_ARGUMENT",
        "INVALID_INPUTS",
        "workflows.stationthis.dev",
    )
    assert {v.field for v in error.violations} == {"inputs.input_bogus", "inputs.input_steps"}, error.violations
    assert all(v.description for v in error.violations)
    assert "Traceback" not in str(error) and "inputs.input_bogus" in str(error)
    with pytest.raises(InvalidInputs) as raised:  # checked by the comfyui service itself
        await client.create("not a user!", "/make", PROMPT)
    assert [v.field for v in raised.value.violations] == ["user_id"]
    with pytest.raises(NotFound) as missing:
        await client.workflow("no-such-workflow")
    assert missing.value.reason == "WORKFLOW_NOT_FOUND" and missing.value.metadata.get("suggestions") is not None
    assert await client.runs("alice") == []


async def test_an_unknown_run_is_not_found_on_every_call(client: AsyncClient) -> None:
    unknown = str(uuid.uuid4())
    for call in (client.run(unknown), client.cancel(unknown), client.regenerate(unknown)):
        with pytest.raises(NotFound) as raised:
            await call
        assert (raised.value.reason, raised.value.metadata["run_id"]) == ("RUN_NOT_FOUND", unknown)
        assert raised.value.domain == "comfyui.stationthis.dev"
    watch = client.watch(unknown)
    with pytest.raises(NotFound):  # raised at once: a missing run is not a broken stream
        await watch.__anext__()
    assert watch.resumes == 0


async def test_an_unreachable_service_is_unavailable_in_our_words() -> None:
    from devtools.redis_server import free_port

    nowhere = f"127.0.0.1:{free_port()}"
    endpoints = Endpoints(nowhere, nowhere, nowhere, "http://127.0.0.1:1", None)
    async with AsyncClient(endpoints, timeout=5, retry_window=0.3) as client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(Unavailable) as raised:
            await client.account("alice")
        assert loop.time() - started < 3  # retried for the retry window only, not the whole timeout
    assert str(raised.value) == f"the points service at {nowhere} is not available; retry"
    assert raised.value.code == "UNAVAILABLE" and not raised.value.reason


def test_a_status_with_its_details_decodes_into_the_class_and_fields() -> None:
    from google.protobuf import any_pb2
    from google.rpc import code_pb2, error_details_pb2, status_pb2

    info, bad = any_pb2.Any(), any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="INSUFFICIENT_POINTS", domain="points.stationthis.dev",
                                          metadata={"required": "120", "points_available": "7",
                                                    "qoints_available": "3"}))  # fmt: skip
    bad.Pack(error_details_pb2.BadRequest(field_violations=[{"field": "user_id", "description": "required"}]))
    status = status_pb2.Status(code=code_pb2.FAILED_PRECONDITION, message="not enough points", details=[info, bad])
    error = from_status(status)
    assert isinstance(error, InsufficientPoints) and (error.needed, error.available) == (120, 10)
    assert [(v.field, v.description) for v in error.violations] == [("user_id", "required")]
    other = from_status(status_pb2.Status(code=code_pb2.DATA_LOSS, message=""))
    assert isinstance(other, Internal) and str(other) == "internal error" and other.code == "DATA_LOSS"


# --- restarts ---------------------------------------------------------------------------------------


def comfyui_env(system: System, redis_url: str) -> dict[str, str]:
    """The comfyui replica's environment, as start_system builds it."""
    assert system.gateway is not None
    return {
        "REDIS_URL": redis_url,
        "COMFYDEPLOY_API_URL": system.emulator.base_url,
        "COMFYDEPLOY_API_KEY": system.emulator.api_key,
        **FAST_RUNS,
        "POINTS_SERVICE_ADDR": system.points.address,
        "WORKFLOWS_SERVICE_ADDR": system.workflows.address,
        "COMFYUI_PUBLIC_URL": f"http://127.0.0.1:{system.gateway.port}",
    }


@asynccontextmanager
async def replacing_comfyui(system: System, redis_url: str, start_service: StartService) -> AsyncIterator[Any]:
    """``await restart()`` stops comfyui replica 0 and starts a new one on the same address; ``stop()``
    and ``start()`` do each half. The new replica is stopped on exit."""
    started: list[Running] = []
    address = system.comfyui[0].address

    class Replica:
        async def stop(self) -> None:
            await stop_surely(system.comfyui[0])

        async def start(self) -> None:
            running = await start_service(build_comfyui, ComfyUIConfig, comfyui_env(system, redis_url), address=address)
            started.append(running)
            await wait_serving(running)
            system.comfyui[0] = running

        async def restart(self) -> None:
            await self.stop()
            await self.start()

    try:
        yield Replica()
    finally:
        for running in started:
            await stop_surely(running)


class RetryLog(logging.Handler):
    """The client's log lines: each retry and each resumption (INFO), how a resumption went (DEBUG)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    async def wait(self, containing: str = "", within: float = 10) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            found = [line for line in self.lines if containing in line]
            if found:
                return found[0]
            assert loop.time() < deadline, f"the client logged no line with {containing!r}: {self.lines}"
            await asyncio.sleep(0.01)


@pytest.fixture
def retry_log() -> Iterator[RetryLog]:
    handler = RetryLog()
    logger = logging.getLogger("stationthis_client")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(previous)


async def test_a_call_during_a_restart_is_retried_and_succeeds(
    system: System, client: AsyncClient, redis_url: str, start_service: StartService, retry_log: RetryLog
) -> None:
    await ensure_points(system, "alice")
    await client.runs("alice")  # the channel is connected
    async with replacing_comfyui(system, redis_url, start_service) as replica:
        await replica.stop()
        creating = asyncio.create_task(client.create("alice", "/make", PROMPT))
        await retry_log.wait("retrying")  # the service is down: the client got UNAVAILABLE and retries
        assert not creating.done()
        await replica.start()
        run = await creating
        assert run.status == R.RUN_STATUS_SUBMITTING and "CreateRun" in retry_log.lines[0], retry_log.lines
        assert [r.run_id for r in await client.runs("alice")] == [run.run_id]  # one run
        assert (await client.generate("alice", "/make", PROMPT)).run.run_id  # the new replica serves


async def test_a_stream_cut_mid_run_resumes_after_the_last_event_without_duplicates(
    redis_url: str, start_service: StartService, retry_log: RetryLog
) -> None:
    from emulator.testing import start_for_tests

    slow = await start_for_tests(step_seconds=0.1)  # a run of about a second: time to cut its stream
    try:
        async with open_system(redis_url, start_service, slow) as system:
            await ensure_points(system, "alice")
            async with (
                AsyncClient(endpoints_of(system), timeout=20) as client,
                replacing_comfyui(system, redis_url, start_service) as replica,
            ):
                generation = await client.generate("alice", "/make", PROMPT)
                events: list[svc.WatchRunResponse] = []
                cut_at = None
                async for event in generation:
                    events.append(event)
                    if cut_at is None and event.run.status == R.RUN_STATUS_RUNNING:
                        cut_at = len(events)
                        await replica.restart()  # the stream is cut while the run goes on upstream
                        await system.wait(event.run.run_id)  # events happen that the stream missed
                assert cut_at is not None and cut_at < len(events), "the run ended before its stream was cut"
                assert generation.resumes >= 1 and retry_log.lines, "the stream was not resumed"
                reported = check_stream(events)
                # Resumed after the last event: no second SNAPSHOT, and the run's later steps came.
                assert [e.event_type for e in events].count(svc.RUN_EVENT_TYPE_SNAPSHOT) == 1
                assert_succeeded(generation.run, reported)
                assert generation.run == await client.run(generation.run_id)
    finally:
        await slow.close()


async def test_a_stream_resumed_after_its_events_expired_gets_a_fresh_snapshot_with_the_missed_outputs(
    redis_url: str, start_service: StartService, retry_log: RetryLog
) -> None:
    from emulator.testing import start_for_tests

    slow = await start_for_tests(step_seconds=0.1)
    try:
        async with open_system(redis_url, start_service, slow) as system:
            await ensure_points(system, "alice")
            async with (
                AsyncClient(endpoints_of(system), timeout=20) as client,
                replacing_comfyui(system, redis_url, start_service) as replica,
            ):
                generation = await client.generate("alice", "/make", PROMPT)
                events: list[svc.WatchRunResponse] = []
                async for event in generation:
                    events.append(event)
                    if len(events) == 1:
                        assert not event.run.outputs
                        await replica.restart()
                        await system.wait(event.run.run_id)  # it ends, with outputs, while unwatched
                        await system.redis.delete(events_key(event.run.run_id))  # its events expired
                assert generation.resumes >= 1
                assert "fresh snapshot" in await retry_log.wait("resumed"), retry_log.lines
                types = [e.event_type for e in events]
                assert types[-2:] == [svc.RUN_EVENT_TYPE_SNAPSHOT, svc.RUN_EVENT_TYPE_FINISHED], types
                resumed = events[-2]
                # The outputs the stream missed are reported with the fresh SNAPSHOT, each once.
                assert list(resumed.new_outputs) == list(resumed.run.outputs) and resumed.new_outputs
                assert_succeeded(generation.run, check_stream(events))
    finally:
        await slow.close()


async def test_a_stream_resumed_when_nothing_happened_skips_the_repeated_snapshot(
    system: System, client: AsyncClient, redis_url: str, start_service: StartService, retry_log: RetryLog
) -> None:
    await ensure_points(system, "alice")
    await system.emulator.set_faults(next_run_outcomes=["stuck"])  # RUNNING until cancelled
    generation = await client.generate("alice", "/make", PROMPT)
    events: list[svc.WatchRunResponse] = []
    async with replacing_comfyui(system, redis_url, start_service) as replica:
        async for event in generation:
            events.append(event)
            if event.run.status == R.RUN_STATUS_RUNNING:
                break
        await system.emulator.set_faults(webhook_drop=1.0)  # no more news: the run stays as it is

        async def delivered() -> bool:  # ... once the news already sent has been applied
            sent = await system.emulator.webhooks(generation.run.upstream_run_id)
            return bool(sent) and all(d["state"] != "pending" for d in sent)

        await eventually(delivered, "the run's webhooks delivered")
        while generation.run != await system.get(generation.run_id):  # read up to the run's last change
            events.append(await generation.__anext__())
        await replica.stop()
        await system.redis.delete(events_key(generation.run_id))  # no replay possible: a fresh SNAPSHOT
        reading = asyncio.create_task(generation.__anext__())
        await retry_log.wait("interrupted")
        await replica.start()
        assert "nothing was missed" in await retry_log.wait("resumed")  # the same run: not yielded again
        await system.emulator.set_faults()
        await client.cancel(generation.run_id)
        events.append(await reading)
        events.extend([e async for e in generation])
    check_stream(events)
    assert [e.event_type for e in events].count(svc.RUN_EVENT_TYPE_SNAPSHOT) == 1
    assert generation.run.status == R.RUN_STATUS_CANCELLED


async def test_a_watch_resumed_by_the_caller_gets_only_what_came_after(system: System, client: AsyncClient) -> None:
    await ensure_points(system, "alice")
    generation = await client.generate("alice", "/make", PROMPT)
    events = [e async for e in generation]
    assert len(events) >= 4, events
    middle = events[len(events) // 2]
    assert middle.event_type not in (svc.RUN_EVENT_TYPE_SNAPSHOT, svc.RUN_EVENT_TYPE_FINISHED)
    watch = client.watch(generation.run_id, after_event_id=middle.event_id)
    later = [e async for e in watch]
    after = events[events.index(middle) + 1 :]
    assert later and all(e in after for e in later), (later, after)  # nothing from before, no SNAPSHOT
    # Everything but intermediate PROGRESS (which a replay may merge) came again, in order, to FINISHED.
    assert [e for e in later if e.event_type != svc.RUN_EVENT_TYPE_PROGRESS] == [
        e for e in after if e.event_type != svc.RUN_EVENT_TYPE_PROGRESS]  # fmt: skip
    assert later[-1] == events[-1] and watch.finished and watch.last_event_id == events[-1].event_id


# --- idempotency across retries ---------------------------------------------------------------------


class LosingProxy:
    """A gRPC hop in front of the comfyui service that forwards every call, but answers the first
    CreateRun with UNAVAILABLE *after* the service ran it: a response lost on the way back."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.create_requests: list[svc.CreateRunRequest] = []
        self.first_reply: svc.CreateRunResponse | None = None
        self.server = grpc.aio.server()
        self.channel = grpc.aio.insecure_channel(target)
        self.address = ""

    async def start(self) -> None:
        channel = self.channel

        def forward(method: str) -> Any:
            async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                try:
                    reply: bytes = await channel.unary_unary(method)(request, timeout=context.time_remaining())
                except grpc.aio.AioRpcError as exc:
                    await context.abort(exc.code(), exc.details() or "", exc.trailing_metadata())  # type: ignore[arg-type]
                if method.endswith("/CreateRun"):
                    self.create_requests.append(svc.CreateRunRequest.FromString(request))
                    if self.first_reply is None:
                        self.first_reply = svc.CreateRunResponse.FromString(reply)
                        # Headers first: gRPC's own transparent retry no longer applies (the call is
                        # committed), so what retries is the client library, as after a real reset.
                        await context.send_initial_metadata(())
                        await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
                return reply

            return grpc.unary_unary_rpc_method_handler(handle)

        names = ("CreateRun", "GetRun", "ListRuns")
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "stationthis.comfyui.v1.ComfyUIService",
            {name: forward(f"/stationthis.comfyui.v1.ComfyUIService/{name}") for name in names}),))  # fmt: skip
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop(0)
        await self.channel.close()


async def test_a_create_run_whose_answer_was_lost_is_retried_with_its_request_id_and_makes_one_run(
    system: System,
) -> None:
    await ensure_points(system, "alice")
    proxy = LosingProxy(system.comfyui[0].address)
    await proxy.start()
    try:
        async with AsyncClient(endpoints_of(system, comfyui=proxy.address), timeout=20) as client:
            run = await client.create("alice", "/make", PROMPT)
            ids = [r.request_id for r in proxy.create_requests]
            assert len(ids) == 2 and ids[0] == ids[1] and uuid.UUID(ids[0]), ids  # retried, same request_id
            assert proxy.first_reply is not None and run.run_id == proxy.first_reply.run.run_id
            assert [r.run_id for r in await client.runs("alice")] == [run.run_id]  # one run, not two
            # Another call is another request_id: another run.
            assert (await client.create("alice", "/make", PROMPT)).run_id != run.run_id
    finally:
        await proxy.stop()


# --- cancellation -----------------------------------------------------------------------------------


async def test_cancel_ends_the_generation_cancelled_and_refunded(system: System, client: AsyncClient) -> None:
    await ensure_points(system, "alice")
    before = await client.account("alice")
    await system.emulator.set_faults(next_run_outcomes=["stuck"])  # runs until cancelled
    generation = await client.generate("alice", "/make", PROMPT)
    seen: list[svc.WatchRunResponse] = []
    async for event in generation:
        seen.append(event)
        if event.run.status == R.RUN_STATUS_RUNNING:
            break
    assert seen[-1].run.status == R.RUN_STATUS_RUNNING
    cancelled = await client.cancel(generation.run_id)
    assert cancelled.run_id == generation.run_id
    final = await generation.wait()  # the same generation goes on to its end
    assert final.status == R.RUN_STATUS_CANCELLED and final.error.reason == "RUN_CANCELLED", final
    assert final.receipt.points_charged == 0 and final.receipt.points_refunded == final.points_held > 0
    assert generation.finished
    after = await client.account("alice")
    assert (after.points_held, after.qoints) == (0, before.qoints)
    assert (await client.cancel(generation.run_id)).status == R.RUN_STATUS_CANCELLED  # terminal: unchanged
    # A watch closed early stops its stream; iterating it again ends at once.
    watch = client.watch(generation.run_id)
    assert (await watch.__anext__()).event_type == svc.RUN_EVENT_TYPE_SNAPSHOT
    await watch.aclose()
    assert [e async for e in watch] == []


# --- the blocking client ----------------------------------------------------------------------------


async def test_the_sync_client_does_the_same_blocking(system: System) -> None:
    await ensure_points(system, "carol")
    endpoints = endpoints_of(system)

    def bot() -> tuple[list[svc.WatchRunResponse], R.Run, R.Run, StationThisError, int]:
        with Client(endpoints, timeout=20) as client:
            assert client.workflow("/make").name == "text2img"
            generation = client.generate("carol", "/make", PROMPT)
            events = list(generation)
            final = generation.wait()
            error = StationThisError("OK", "not raised")
            try:
                client.create("carol", "/make", {"input_bogus": 1})
            except StationThisError as exc:
                error = exc
            runs = len(client.runs("carol"))
            abandoned = client.watch(generation.run_id)  # read once, never closed: close() still ends it
            assert next(abandoned).event_type == svc.RUN_EVENT_TYPE_SNAPSHOT
            return events, final, client.run(generation.run_id), error, runs

    events, final, fetched, error, runs = await asyncio.to_thread(bot)
    assert_succeeded(final, check_stream(events))
    assert fetched == final and runs == 1
    assert isinstance(error, InvalidInputs) and "inputs.input_bogus" in {v.field for v in error.violations}
    assert not [t for t in threading.enumerate() if t.name == "stationthis-client"]  # its loop stopped


# --- discovery --------------------------------------------------------------------------------------


def test_discover_defaults_come_from_the_config_classes(tmp_path: Path) -> None:
    from common.config import variables
    from gateway.config import GatewayConfig
    from services.points.config import PointsConfig
    from services.workflows.config import WorkflowsConfig

    def default(config: type[Any], name: str) -> str:
        return next(d for variable, d, *_ in variables(config) if variable == name)

    found = Endpoints.discover({"STATIONTHIS_DATA_DIR": str(tmp_path)})
    assert found.points == default(PointsConfig, "POINTS_LISTEN_ADDR")
    assert found.workflows == default(WorkflowsConfig, "WORKFLOWS_LISTEN_ADDR")
    assert found.comfyui == default(ComfyUIConfig, "COMFYUI_LISTEN_ADDR")
    assert found.gateway_url == "http://" + default(GatewayConfig, "GATEWAY_LISTEN_ADDR")
    (tmp_path / "gateway-api-key").write_text("from-the-file\n")
    assert Endpoints.discover({"STATIONTHIS_DATA_DIR": str(tmp_path)}).api_key == "from-the-file"
    assert Endpoints.discover({"STATIONTHIS_DATA_DIR": str(tmp_path), "GATEWAY_API_KEY": "k"}).api_key == "k"
    assert Endpoints.discover({"STATIONTHIS_DATA_DIR": str(tmp_path),
                               "GATEWAY_API_KEYS": "telegram=t1,discord=d1"}).api_key == "t1"  # fmt: skip
    given = Endpoints.discover({
        "POINTS_SERVICE_ADDR": "points:1", "WORKFLOWS_LISTEN_ADDR": "0.0.0.0:2", "COMFYUI_SERVICE_ADDR": "c:3",
        "GATEWAY_URL": "https://gw.example/", "STATIONTHIS_DATA_DIR": str(tmp_path / "none"),
    })  # fmt: skip
    assert (given.points, given.workflows, given.comfyui, given.gateway_url) == (
        "points:1", "127.0.0.1:2", "c:3", "https://gw.example")  # fmt: skip
