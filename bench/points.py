"""Ledger mutations vs no-op RPCs on one points service process, and Redis round trips per mutation.

One ``python -m services.points`` process on a throw-away redis-server. Mutations are ReserveHold
and CaptureHold, alternating in each worker (each call counts as one mutation), over many users so
the 3-open-holds cap is never reached; the no-op is grpc.health.v1.Health/Check on the same server.
Rounds alternate (mutations, no-op, mutations, no-op, ...) so drift hits both alike. Redis round
trips per mutation come from INFO deltas taken around the mutation rounds only.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import redis
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.redis_server import RedisServer, free_port
from stationthis.points.v1 import points_pb2, points_service_pb2, points_service_pb2_grpc
from stationthis.type.v1 import gpu_pb2

from .common_load import ROOT

CONCURRENCY = 32
USERS_PER_WORKER = 8
ROUND_SECONDS = 3.0
ROUNDS = 3
ESTIMATE = 10  # points held and then charged by each reserve/capture pair
CREDIT = 10**9  # qoints given to every user first, far more than the bench spends


def start_service(redis_url: str, port: int, log_path: str) -> subprocess.Popen[bytes]:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "gen")]),
        REDIS_URL=redis_url,
        POINTS_LISTEN_ADDR=f"127.0.0.1:{port}",
    )
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "services.points"], cwd=ROOT, env=env, stdout=log, stderr=log)


async def wait_serving(channel: grpc.aio.Channel, process: subprocess.Popen[bytes], within: float = 20.0) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the points service exited with {process.returncode}")
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError(f"the points service was not SERVING within {within}s")


async def closed_loop(workers: list[Callable[[], Awaitable[object]]], seconds: float) -> float:
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


class Mutator:
    """One worker: ReserveHold, then CaptureHold of that hold, then the next user, and so on."""

    def __init__(self, stub: points_service_pb2_grpc.PointsServiceStub, users: list[str]) -> None:
        self.stub = stub
        self.users = users
        self.turn = 0
        self.open: tuple[str, str] | None = None  # (user, hold id) reserved, not yet captured
        self.count = 0

    async def __call__(self) -> None:
        if self.open is None:
            user = self.users[self.turn % len(self.users)]
            self.turn += 1
            reply = await self.stub.ReserveHold(
                points_service_pb2.ReserveHoldRequest(
                    request_id=uuid.uuid4().hex, user_id=user, estimate_points=ESTIMATE
                ),
                timeout=10,
            )
            self.open = (user, reply.hold.hold_id)
        else:
            user, hold_id = self.open
            await self.stub.CaptureHold(
                points_service_pb2.CaptureHoldRequest(
                    request_id=uuid.uuid4().hex, user_id=user, hold_id=hold_id, cost_points=ESTIMATE
                ),
                timeout=10,
            )
            self.open = None
        self.count += 1


def redis_counts(client: redis.Redis) -> dict[str, int]:
    """Counters so far: commands (all, and per command, including those scripts run inside Redis),
    client reads (one per request a client sends and waits for) and microseconds spent in EVALSHA."""
    stats: dict[str, Any] = client.info("stats")
    counts = {"total": int(stats["total_commands_processed"]), "reads": int(stats["total_reads_processed"])}
    for name, value in client.info("commandstats").items():
        counts[name.removeprefix("cmdstat_")] = int(value["calls"])
        if name == "cmdstat_evalsha":
            counts["evalsha_usec"] = int(value["usec"])
    return counts


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(redis_url: str, port: int, log_path: str) -> dict[str, Any]:
    process = start_service(redis_url, port, log_path)
    client = redis.Redis.from_url(redis_url)
    try:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        await wait_serving(channel, process)
        stub = points_service_pb2_grpc.PointsServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        users = [[f"bench-{w}-{u}" for u in range(USERS_PER_WORKER)] for w in range(CONCURRENCY)]
        for group in users:  # enough qoints for every hold, whatever regeneration does
            await asyncio.gather(
                *(
                    stub.CreditQoints(
                        points_service_pb2.CreditQointsRequest(
                            request_id=uuid.uuid4().hex, user_id=user, qoints=CREDIT,
                            external_reference=f"bench-{uuid.uuid4().hex}", source=points_pb2.QOINTS_SOURCE_GRANT,
                        ),
                        timeout=10,
                    )
                    for user in group
                )
            )  # fmt: skip
        mutators = [Mutator(stub, group) for group in users]
        noops = [lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10)] * CONCURRENCY
        # A traced RPC with no I/O: the same path as a mutation (tracing, logging, errors), minus Redis.
        quote = points_service_pb2.QuoteCostRequest(
            gpu=gpu_pb2.GPU_TYPE_A10G, gpu_time=duration_pb2.Duration(seconds=30)
        )
        quotes = [lambda: stub.QuoteCost(quote, timeout=10)] * CONCURRENCY

        await closed_loop(list(mutators), 0.5)  # warm up (and load the script)
        await closed_loop(noops, 0.5)
        await closed_loop(quotes, 0.5)
        totals = {"mutations": 0.0, "noop": 0.0, "quote": 0.0}
        commands: dict[str, int] = {}
        cpu = {"mutations": [0.0, 0.0], "noop": [0.0, 0.0]}  # [service, bench client] CPU seconds
        mutations = noop_calls = 0
        for _ in range(ROUNDS):
            before_count = sum(m.count for m in mutators)
            before = redis_counts(client)
            service_cpu, client_cpu = cpu_seconds(process.pid), time.process_time()
            totals["mutations"] += await closed_loop(list(mutators), ROUND_SECONDS)
            cpu["mutations"][0] += cpu_seconds(process.pid) - service_cpu
            cpu["mutations"][1] += time.process_time() - client_cpu
            after = redis_counts(client)
            mutations += sum(m.count for m in mutators) - before_count
            for name, calls in after.items():
                commands[name] = commands.get(name, 0) + calls - before.get(name, 0)
            # The INFO calls that read the counters: the second of "before" and the first of "after".
            commands["total"] -= 2
            commands["reads"] -= 2
            commands["info"] = commands.get("info", 0) - 2
            service_cpu, client_cpu = cpu_seconds(process.pid), time.process_time()
            rate = await closed_loop(noops, ROUND_SECONDS)
            cpu["noop"][0] += cpu_seconds(process.pid) - service_cpu
            cpu["noop"][1] += time.process_time() - client_cpu
            totals["noop"] += rate
            noop_calls += round(rate * ROUND_SECONDS)
            totals["quote"] += await closed_loop(quotes, ROUND_SECONDS)
        await channel.close()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        client.close()
    return {
        "mutations": totals["mutations"] / ROUNDS,
        "noop": totals["noop"] / ROUNDS,
        "quote": totals["quote"] / ROUNDS,
        "count": mutations,
        "noop_count": noop_calls,
        "cpu": cpu,
        "commands": {name: calls for name, calls in commands.items() if calls > 0},
    }


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-points-") as tmp:
        server = RedisServer(os.path.join(tmp, "redis")).start()
        try:
            result = asyncio.run(measure(server.url, free_port(), os.path.join(tmp, "points.log")))
        finally:
            server.stop()
    count, commands, cpu = result["count"], result["commands"], result["cpu"]
    scripts = commands.get("evalsha", 0) + commands.get("eval", 0)
    listed = ", ".join(
        f"{name} {calls}" for name, calls in sorted(commands.items()) if name not in ("total", "reads", "evalsha_usec")
    )
    print(f"points: one service process, concurrency {CONCURRENCY}, {ROUNDS} alternating rounds of {ROUND_SECONDS}s")
    print(f"  ledger mutations (ReserveHold/CaptureHold):        {result['mutations']:9.0f} calls/s")
    print(f"  no-op RPC (grpc.health.v1.Health/Check):           {result['noop']:9.0f} calls/s")
    print("    (same server and interceptors; but health is excluded from tracing)")
    print(f"  traced RPC without I/O (QuoteCost):                {result['quote']:9.0f} calls/s")
    print(f"  ratio mutations/no-op health (goal >= 0.7):        {result['mutations'] / result['noop']:9.2f}")
    print(f"  ratio mutations/traced RPC without I/O:            {result['mutations'] / result['quote']:9.2f}")
    print(f"  Redis EVALSHA+EVAL per mutation (goal 1):          {scripts / count:9.3f}")
    print(f"  Redis requests per mutation, total_reads_processed: {commands['reads'] / count:9.3f}")
    print(f"  Redis commands per mutation, total_commands_processed (incl. those run by the script): "
          f"{commands['total'] / count:.3f}")  # fmt: skip
    print(f"    ({count} mutations; commands during them: {listed})")
    print(f"  Redis time in EVALSHA per mutation:                {commands.get('evalsha_usec', 0) / count:9.0f} us")
    for kind, calls in (("mutation", count), ("no-op", result["noop_count"])):
        service, client = cpu["mutations" if kind == "mutation" else "noop"]
        print(f"  CPU per {kind:8} service / bench client:          {service / calls * 1e6:5.0f} / "
              f"{client / calls * 1e6:.0f} us")  # fmt: skip


if __name__ == "__main__":
    main()
