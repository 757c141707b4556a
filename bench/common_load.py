"""Closed-loop load at fixed concurrency, for side-by-side comparisons."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


def traceparent() -> tuple[tuple[str, str], ...]:
    """gRPC metadata with a new sampled W3C trace context, as the gateway sends on every call.

    Benchmarks send it on the RPC they measure and on the no-op alike, so both take the same traced
    path; a bare health check (a probe) is not traced, which would flatter the no-op.
    """
    return (("traceparent", f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"),)


async def closed_loop(workers: Sequence[Callable[[], Awaitable[object]]], seconds: float) -> float:
    """Calls per second completed by the workers (one coroutine each) calling back to back."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def loop(call: Callable[[], Awaitable[object]]) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await call()
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(loop(call) for call in workers))
    return done / (time.perf_counter() - start)


async def rate(call: Callable[[], Awaitable[object]], concurrency: int, seconds: float) -> float:
    """Calls per second completed by ``concurrency`` workers calling back to back for ``seconds``."""
    return await closed_loop([call] * concurrency, seconds)


async def wait_serving(channel: grpc.aio.Channel, process: subprocess.Popen[bytes], within: float = 20.0) -> None:
    """Until the service behind ``channel`` reports SERVING; fails if ``process`` exits first."""
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the service exited with {process.returncode} at start-up")
        try:
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError(f"the service was not SERVING within {within}s")


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


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
