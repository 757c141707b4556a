"""Closed-loop load at fixed concurrency, for side-by-side comparisons."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def traceparent() -> tuple[tuple[str, str], ...]:
    """gRPC metadata with a new sampled W3C trace context, as the gateway sends on every call.

    Benchmarks send it on the RPC they measure and on the no-op alike, so both take the same traced
    path; a bare health check (a probe) is not traced, which would flatter the no-op.
    """
    return (("traceparent", f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"),)


async def rate(call: Callable[[], Awaitable[object]], concurrency: int, seconds: float) -> float:
    """Calls per second completed by ``concurrency`` workers calling back to back for ``seconds``."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await call()
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - start)


def spawn(*args: str) -> tuple[subprocess.Popen[str], int]:
    """Start ``python -m <args>`` from the repo root; it must print ``PORT <n>`` first."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "gen")]))
    process = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline().split()
    if len(line) != 2 or line[0] != "PORT":
        process.kill()
        raise RuntimeError(f"{args} did not report its port")
    return process, int(line[1])
