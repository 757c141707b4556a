"""ListRuns (order, filters, pages while runs are being created) and WatchRun (gRPC on any replica, late
watchers, disconnects, Server-Sent Events through the gateway)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc

from stationthis.comfyui.v1 import comfyui_service_pb2 as svc
from stationthis.comfyui.v1 import run_pb2 as R
from tests.runs_helpers import TERMINAL, System, ensure_points, eventually, open_system

MANY_HOLDS = {"POINTS_MAX_OPEN_HOLDS": "200"}
E = svc


async def list_all(system: System, page_size: int, statuses: tuple[int, ...] = (), between: Any = None) -> list[R.Run]:
    """Every page of alice's runs; ``between()`` is awaited before each next page."""
    found: list[R.Run] = []
    token = ""
    for _ in range(500):
        request = svc.ListRunsRequest(user_id="alice", page_size=page_size, page_token=token, statuses=statuses)
        reply = await system.runs.ListRuns(request, timeout=10)
        assert len(reply.runs) <= (page_size or 50)
        found.extend(reply.runs)
        token = reply.next_page_token
        if not token:
            return found
        if between is not None:
            await between()
    raise AssertionError("ListRuns never ended")


def newest_first(runs: list[R.Run]) -> bool:
    keys = [(r.create_time.ToMilliseconds(), r.run_id) for r in runs]
    return keys == sorted(keys, reverse=True) and len(set(keys)) == len(keys)


async def test_list_runs_newest_first_with_status_filters(redis_url: str, start_service: Any, emulator: Any) -> None:
    async with open_system(redis_url, start_service, emulator, points_env=MANY_HOLDS) as system:
        await ensure_points(system, "alice")
        await system.emulator.set_faults(next_run_outcomes=["success", "failed", "success", "failed", "success"])
        created = [await system.create() for _ in range(5)]
        ended = [await system.wait(r.run_id) for r in created]
        assert [r.status for r in ended] == [R.RUN_STATUS_SUCCESS, R.RUN_STATUS_FAILED] * 2 + [R.RUN_STATUS_SUCCESS]
        everything = await list_all(system, 0)
        assert [r.run_id for r in everything] == [r.run_id for r in reversed(created)]
        assert newest_first(everything)
        failed = await list_all(system, 1, (R.RUN_STATUS_FAILED,))
        assert [r.run_id for r in failed] == [created[3].run_id, created[1].run_id]
        both = await list_all(system, 2, (R.RUN_STATUS_FAILED, R.RUN_STATUS_SUCCESS))
        assert [r.run_id for r in both] == [r.run_id for r in everything]
        assert await list_all(system, 3, (R.RUN_STATUS_RUNNING,)) == []
        bobs = await system.runs.ListRuns(svc.ListRunsRequest(user_id="bob"), timeout=10)
        assert not bobs.runs and not bobs.next_page_token


async def test_list_runs_pages_have_no_gaps_or_repeats_while_runs_are_created(
    redis_url: str, start_service: Any, emulator: Any
) -> None:
    async with open_system(redis_url, start_service, emulator, points_env=MANY_HOLDS) as system:
        await ensure_points(system, "alice")
        await system.emulator.set_faults(next_run_outcomes=["stuck"] * 40)  # they stay put: light on the emulator
        existing = [await system.create() for _ in range(13)]
        added: list[R.Run] = []

        async def create_two() -> None:
            added.extend(await asyncio.gather(system.create(), system.create()))

        paged = await list_all(system, 3, between=create_two)
        assert len(added) >= 8
        assert [r.run_id for r in paged] == [r.run_id for r in reversed(existing)]  # none missing, none twice
        assert newest_first(paged)
        everything = await list_all(system, 200)
        assert {r.run_id for r in everything} == {r.run_id for r in existing + added}
        assert newest_first(everything)


async def test_a_status_filter_never_ends_the_list_early(redis_url: str, start_service: Any, emulator: Any) -> None:
    """The one FAILED run is the oldest of many: a filtered page may be empty, but its token goes on."""
    async with open_system(redis_url, start_service, emulator, points_env=MANY_HOLDS) as system:
        await ensure_points(system, "alice")
        await system.emulator.set_faults(next_run_outcomes=["failed"] + ["stuck"] * 60)
        failed = await system.create()
        assert (await system.wait(failed.run_id)).status == R.RUN_STATUS_FAILED
        for _ in range(6):
            await asyncio.gather(*(system.create() for _ in range(8)))
        found = await list_all(system, 1, (R.RUN_STATUS_FAILED,))
        assert [r.run_id for r in found] == [failed.run_id]
        found = await list_all(system, 2, (R.RUN_STATUS_FAILED, R.RUN_STATUS_CANCELLED))
        assert [r.run_id for r in found] == [failed.run_id]


# --- WatchRun --------------------------------------------------------------------------------------


async def blocked_run(system: System) -> tuple[R.Run, list[R.Run]]:
    """A run that waits upstream (NOT_STARTED) behind two stuck runs filling its deployment (concurrency
    2); it starts, and succeeds, when the first of them is cancelled (``release``)."""
    await ensure_points(system, "alice")
    await system.emulator.set_faults(next_run_outcomes=["stuck", "stuck", "success"])
    blockers = []
    for _ in range(2):
        blocker = await system.create()
        blockers.append(await system.wait(blocker.run_id, (R.RUN_STATUS_RUNNING,), settled=False))
    run = await system.create()
    waiting = await system.wait(run.run_id, (R.RUN_STATUS_NOT_STARTED,), settled=False)
    return waiting, blockers


async def release(system: System, blockers: list[R.Run]) -> None:
    await system.runs.CancelRun(svc.CancelRunRequest(run_id=blockers[0].run_id), timeout=30)


def check_watch(messages: list[svc.WatchRunResponse], final: R.Run) -> None:
    """What every watcher may rely on: SNAPSHOT first; STATUS_CHANGED only for non-terminal statuses;
    statuses never go back; every output seen exactly once; FINISHED last, after settlement."""
    types = [m.event_type for m in messages]
    assert types[0] == E.RUN_EVENT_TYPE_SNAPSHOT and types[-1] == E.RUN_EVENT_TYPE_FINISHED, types
    assert E.RUN_EVENT_TYPE_SNAPSHOT not in types[1:] and E.RUN_EVENT_TYPE_FINISHED not in types[:-1], types
    assert E.RUN_EVENT_TYPE_UNSPECIFIED not in types
    for message in messages:
        if message.event_type == E.RUN_EVENT_TYPE_STATUS_CHANGED:
            assert message.run.status not in TERMINAL, message
        if message.event_type != E.RUN_EVENT_TYPE_FINISHED:
            assert not message.run.HasField("settle_time"), message
    ranks = [min(m.run.status, R.RUN_STATUS_SUCCESS) for m in messages]
    assert ranks == sorted(ranks), ranks
    outputs = list(messages[0].run.outputs)
    for message in messages[1:]:
        outputs.extend(message.new_outputs)
        assert list(message.run.outputs)[: len(outputs)] == outputs, message  # new_outputs are new, in order
    assert outputs == list(final.outputs)
    last = messages[-1].run
    assert last == final and last.HasField("settle_time"), last


async def read_all(call: Any) -> list[svc.WatchRunResponse]:
    """The rest of a WatchRun stream, up to its end."""
    messages = []
    while (message := await call.read()) != grpc.aio.EOF:
        messages.append(message)
    return messages


async def test_watch_run_follows_a_run_from_any_replica(redis_url: str, start_service: Any, emulator: Any) -> None:
    async with open_system(redis_url, start_service, emulator, replicas=2) as system:
        waiting, blockers = await blocked_run(system)
        # Webhooks reach replica 0 only (the gateway's backend); one watcher on each replica.
        watchers = [system.runs_on(i).WatchRun(svc.WatchRunRequest(run_id=waiting.run_id), timeout=30) for i in (0, 1)]
        firsts = [await call.read() for call in watchers]
        for first in firsts:
            assert first.event_type == E.RUN_EVENT_TYPE_SNAPSHOT and first.run.status == R.RUN_STATUS_NOT_STARTED
        readers = [asyncio.create_task(read_all(call)) for call in watchers]
        await release(system, blockers)
        final = await system.wait(waiting.run_id)
        assert final.status == R.RUN_STATUS_SUCCESS and final.outputs
        for first, reader in zip(firsts, readers, strict=True):
            messages = [first, *await asyncio.wait_for(reader, 15)]
            check_watch(messages, final)
            seen = {m.event_type for m in messages}
            assert {E.RUN_EVENT_TYPE_STATUS_CHANGED, E.RUN_EVENT_TYPE_PROGRESS} <= seen, seen
            # The outputs came as news (OUTPUT, or FINISHED when they came with the terminal status, as
            # ComfyUI Deploy sends them), not only inside a later run.
            assert not messages[0].run.outputs and any(m.new_outputs for m in messages[1:]), messages
            changed = [m.run.status for m in messages if m.event_type == E.RUN_EVENT_TYPE_STATUS_CHANGED]
            assert R.RUN_STATUS_RUNNING in changed, changed
        hub = system.comfyui[1].app.runs.hub
        await eventually(lambda: _empty(hub), "replica 1's hub forgot the finished watch")


async def _empty(hub: Any) -> bool:
    return not hub._watchers


async def test_a_late_watcher_gets_snapshot_then_finished(redis_url: str, start_service: Any, emulator: Any) -> None:
    async with open_system(redis_url, start_service, emulator, replicas=2) as system:
        created = await system.create()
        final = await system.wait(created.run_id)
        for replica in (0, 1):
            call = system.runs_on(replica).WatchRun(svc.WatchRunRequest(run_id=created.run_id), timeout=5)
            messages = await read_all(call)
            assert [m.event_type for m in messages] == [E.RUN_EVENT_TYPE_SNAPSHOT, E.RUN_EVENT_TYPE_FINISHED]
            assert all(m.run == final for m in messages)
            assert await call.code() == grpc.StatusCode.OK


async def test_a_watcher_that_leaves_leaves_nothing_behind(redis_url: str, start_service: Any, emulator: Any) -> None:
    async with open_system(redis_url, start_service, emulator, replicas=2) as system:
        waiting, blockers = await blocked_run(system)
        hub = system.comfyui[1].app.runs.hub
        channel = f"run:{{{waiting.run_id}}}:ch"
        calls = [system.runs_on(1).WatchRun(svc.WatchRunRequest(run_id=waiting.run_id), timeout=30) for _ in range(3)]
        for call in calls:
            assert (await call.read()).event_type == E.RUN_EVENT_TYPE_SNAPSHOT
        assert len(hub._watchers[channel]) == 3

        async def subscribers() -> int:
            [(_, count)] = await system.redis.pubsub_numsub(channel)
            return int(count)

        assert await subscribers() == 1  # one Pub/Sub subscription per replica, however many watchers
        calls[0].cancel()
        await eventually(lambda: _count(hub, channel, 2), "the first watcher's wake-up removed")
        for call in calls[1:]:
            call.cancel()
        await eventually(lambda: _empty(hub), "every watcher removed from the hub")
        await eventually(lambda: _zero(subscribers), "the run's channel unsubscribed")
        # The run goes on unwatched, and a new watcher still sees it to the end.
        watcher = system.runs_on(1).WatchRun(svc.WatchRunRequest(run_id=waiting.run_id), timeout=30)
        first = await watcher.read()
        reader = asyncio.create_task(read_all(watcher))
        await release(system, blockers)
        final = await system.wait(waiting.run_id)
        check_watch([first, *await asyncio.wait_for(reader, 15)], final)
        await eventually(lambda: _empty(hub), "the finished watch removed from the hub")


async def _count(hub: Any, channel: str, count: int) -> bool:
    return len(hub._watchers.get(channel, ())) == count


async def _zero(subscribers: Any) -> bool:
    return await subscribers() == 0


async def test_watch_run_over_http_is_server_sent_events(redis_url: str, start_service: Any, emulator: Any) -> None:
    async with open_system(redis_url, start_service, emulator) as system:
        gateway = system.gateway
        assert gateway is not None
        waiting, blockers = await blocked_run(system)
        events: list[tuple[str, dict[str, Any]]] = []

        async def watch() -> str:
            headers = {"X-API-Key": "k1-test-key", "Accept": "text/event-stream"}
            async with gateway.http.stream("GET", f"/v1/runs/{waiting.run_id}:watch", headers=headers) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                text = ""
                async for chunk in response.aiter_text():
                    text += chunk
                    while "\n\n" in text:
                        block, text = text.split("\n\n", 1)
                        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
                        events.append((fields["event"], json.loads(fields["data"])))
                return text

        reader = asyncio.create_task(watch())
        await eventually(lambda: _some(events), "the SSE snapshot")
        await release(system, blockers)
        final = await system.wait(waiting.run_id)
        assert (await asyncio.wait_for(reader, 15)).strip() == ""  # the stream closed after the last event
        assert {name for name, _ in events} == {"result"}, events
        results = [data["result"] for _, data in events]
        assert results[0]["event_type"] == "RUN_EVENT_TYPE_SNAPSHOT"
        assert results[-1]["event_type"] == "RUN_EVENT_TYPE_FINISHED"
        assert results[-1]["run"]["status"] == "RUN_STATUS_SUCCESS" and results[-1]["run"]["settle_time"]
        assert results[-1]["run"]["run_id"] == final.run_id
        assert "RUN_EVENT_TYPE_STATUS_CHANGED" in {r["event_type"] for r in results}
        # An unknown run: one error event, the usual error shape.
        response = await gateway.get("/v1/runs/00000000-0000-4000-8000-000000000000:watch")
        [(name, data)] = [(b.split("\n")[0], b) for b in response.text.strip().split("\n\n")]
        assert name == "event: error", response.text
        error = json.loads(data.split("data: ", 1)[1])["error"]
        assert (error["code"], error["status"]) == (404, "NOT_FOUND"), error
        [info] = [d for d in error["details"] if d["@type"].endswith("ErrorInfo")]
        assert info["reason"] == "RUN_NOT_FOUND", info


async def _some(events: list[Any]) -> bool:
    return bool(events)


async def test_a_watcher_resumes_after_the_last_event_it_got(redis_url: str, start_service: Any, emulator: Any) -> None:
    async with open_system(redis_url, start_service, emulator) as system:
        waiting, blockers = await blocked_run(system)
        call = system.runs.WatchRun(svc.WatchRunRequest(run_id=waiting.run_id), timeout=30)
        snapshot = await call.read()
        assert snapshot.event_type == E.RUN_EVENT_TYPE_SNAPSHOT and snapshot.event_id
        await release(system, blockers)
        await system.wait(waiting.run_id, (R.RUN_STATUS_RUNNING, *TERMINAL), settled=False)
        second = await call.read()  # then the stream breaks
        call.cancel()
        assert second.event_type != E.RUN_EVENT_TYPE_SNAPSHOT and second.event_id > snapshot.event_id
        final = await system.wait(waiting.run_id)
        everything = await read_all(system.runs.WatchRun(svc.WatchRunRequest(run_id=waiting.run_id), timeout=10))
        assert everything[0].event_id == everything[-1].event_id  # a late watcher: SNAPSHOT and FINISHED
        resumed = await read_all(
            system.runs.WatchRun(svc.WatchRunRequest(run_id=waiting.run_id, after_event_id=second.event_id), timeout=10)
        )
        # No SNAPSHOT, nothing received twice, and the watch ends as an unbroken one would.
        check_watch([snapshot, second, *resumed], final)
        ids = [m.event_id for m in (snapshot, second, *resumed)]
        assert ids == sorted(set(ids), key=lambda i: tuple(map(int, i.split("-")))), ids
        assert resumed[-1].run == final
        # After the last event: FINISHED again, at once. Events no longer kept, or never sent: a SNAPSHOT.
        last = await read_all(
            system.runs.WatchRun(svc.WatchRunRequest(run_id=waiting.run_id, after_event_id=ids[-1]), timeout=10)
        )
        assert [m.event_type for m in last] == [E.RUN_EVENT_TYPE_FINISHED]
        for gone in ("0-1", "99999999999999-0"):
            request = svc.WatchRunRequest(run_id=waiting.run_id, after_event_id=gone)
            messages = await read_all(system.runs.WatchRun(request, timeout=10))
            assert [m.event_type for m in messages] == [E.RUN_EVENT_TYPE_SNAPSHOT, E.RUN_EVENT_TYPE_FINISHED], gone
        bad = system.runs.WatchRun(svc.WatchRunRequest(run_id=waiting.run_id, after_event_id="latest"), timeout=10)
        try:
            await read_all(bad)
            raise AssertionError("a malformed after_event_id was accepted")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT and "after_event_id" in exc.details(), exc


async def test_an_event_source_resumes_with_last_event_id(redis_url: str, start_service: Any, emulator: Any) -> None:
    async with open_system(redis_url, start_service, emulator) as system:
        gateway = system.gateway
        assert gateway is not None
        created = await system.create()
        final = await system.wait(created.run_id)
        response = await gateway.get(f"/v1/runs/{created.run_id}:watch")
        blocks = [dict(line.split(": ", 1) for line in b.splitlines()) for b in response.text.strip().split("\n\n")]
        assert [b["event"] for b in blocks] == ["result", "result"] and all(b["id"] for b in blocks), blocks
        assert blocks[0]["id"] == json.loads(blocks[0]["data"])["result"]["event_id"]
        # The browser's EventSource reconnects with the last id it saw.
        again = await gateway.get(f"/v1/runs/{created.run_id}:watch", headers={"Last-Event-ID": blocks[0]["id"]})
        [resumed] = [json.loads(b.split("data: ", 1)[1])["result"] for b in again.text.strip().split("\n\n")]
        assert resumed["event_type"] == "RUN_EVENT_TYPE_FINISHED" and resumed["run"]["run_id"] == final.run_id
        refused = await gateway.get(f"/v1/runs/{created.run_id}:watch", headers={"Last-Event-ID": "x"})
        assert refused.status_code == 400 and "Last-Event-ID" in refused.text, refused.text
