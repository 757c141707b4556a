"""The README's "What your users see" transcript is what a run against the emulator produces.

A bot adapter's view of one generation, built from the real RPCs: the quote, the place in the queue
and the ETA, progress, the result and the receipt. The README shows one such transcript; this test
produces a fresh one and checks the README's lines have the same shape (numbers, ids and URLs aside).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from stationthis.comfyui.v1 import comfyui_service_pb2 as svc
from stationthis.comfyui.v1 import run_pb2 as R
from tests.conftest import ROOT
from tests.runs_helpers import System, ensure_points, open_system

BEGIN, END = "<!-- transcript:begin -->", "<!-- transcript:end -->"


async def transcript(system: System) -> list[str]:
    """One generation on the staging deployment (one run at a time), behind a run already there."""
    staging = 2
    lines = ["user > /make a cat astronaut"]
    quote = await system.runs.QuoteRun(
        svc.QuoteRunRequest(user_id="alice", workflow_name="/make", environment=staging), timeout=10
    )
    lines.append(
        f"bot  < That costs at most {quote.cost_points} points ({quote.basis}: "
        f"{quote.gpu_time.ToNanoseconds() / 1e9:.1f} s of GPU time); you have {quote.available_points}."
    )
    run = await system.create(workflow="/make", environment=staging)
    queued = progressed = False
    async for event in system.runs.WatchRun(svc.WatchRunRequest(run_id=run.run_id)):
        current = event.run
        waiting = current.status in (R.RUN_STATUS_NOT_STARTED, R.RUN_STATUS_QUEUED)
        if waiting and current.HasField("queue_position") and current.HasField("estimated_end_time") and not queued:
            queued = True
            left = (current.estimated_end_time.ToMilliseconds() - current.update_time.ToMilliseconds()) / 1000
            lines.append(f"bot  < Queued: {current.queue_position} ahead of you, ready in about {left:.1f} s.")
            for blocker in BLOCKERS:  # the line moves
                await system.runs.CancelRun(svc.CancelRunRequest(run_id=blocker), timeout=30)
        if current.status == R.RUN_STATUS_RUNNING and current.progress >= 0.5 and not progressed:
            progressed = True
            lines.append(f"bot  < Running: {current.progress:.0%} ({current.live_status})")
        if event.event_type == svc.RUN_EVENT_TYPE_FINISHED:
            run = current
    for output in run.outputs:
        lines.append(f"bot  < Done in {run.run_duration.ToNanoseconds() / 1e9:.1f} s: {output.url}")
    receipt = run.receipt
    lines.append(
        f"bot  < Charged {receipt.points_charged} of the {receipt.points_held} points held, "
        f"{receipt.points_refunded} back ({receipt.explanation})."
    )
    return lines


BLOCKERS: list[str] = []


def shape(line: str) -> str:
    """A line with what changes from run to run masked: URLs, numbers, the node executing."""
    line = re.sub(r"https?://\S+", "URL", line)
    line = re.sub(r"\(Executing [^)]*\)", "(Executing NODE)", line)
    return re.sub(r"\d+(\.\d+)?", "N", line)


async def until_known(system: System, within: float = 10) -> None:
    """The history run's duration is recorded just after its settlement shows: wait for the quote to see it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    request = svc.QuoteRunRequest(user_id="alice", workflow_name="/make", environment=2)
    while (await system.runs.QuoteRun(request, timeout=10)).basis != "history":
        assert loop.time() < deadline, "the history run's duration was never recorded"
        await asyncio.sleep(0.05)


async def test_the_readme_transcript_is_what_a_run_produces(redis_url: str, start_service: Any, emulator: Any) -> None:
    async with open_system(redis_url, start_service, emulator, COMFYUI_POLL_AFTER_SECONDS="0.2") as system:
        await ensure_points(system, "alice")
        history = await system.create(environment=2)  # history, so the ETA and the quote have a basis
        await system.wait(history.run_id)
        await until_known(system)
        await system.emulator.set_faults(next_run_outcomes=["stuck", "stuck", "success"])
        running = await system.create(environment=2)  # others' runs: one on the machine, one waiting
        await system.wait(running.run_id, (R.RUN_STATUS_RUNNING,), settled=False)
        waiting = await system.create(environment=2)
        await system.wait(waiting.run_id, (R.RUN_STATUS_NOT_STARTED, R.RUN_STATUS_QUEUED), settled=False)
        BLOCKERS[:] = [running.run_id, waiting.run_id]
        produced = await transcript(system)
    print("\n".join(produced))
    readme = (ROOT / "README.md").read_text()
    assert BEGIN in readme and END in readme, "the README has no transcript block"
    block = readme.split(BEGIN, 1)[1].split(END, 1)[0]
    shown = [line for line in block.splitlines() if line.startswith(("user >", "bot  <"))]
    produced_shapes = [shape(line) for line in produced]
    for line in shown:
        assert shape(line) in produced_shapes, f"README line not produced by a run: {line}\nproduced:\n" + "\n".join(
            produced
        )
    assert shown and produced[0] == shown[0] and shape(produced[-1]) == shape(shown[-1])
