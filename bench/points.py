"""Ledger mutations vs no-op RPCs on one points service process, and Redis round trips per mutation.

One ``python -m services.points`` process on a throw-away redis-server. Mutations are ReserveHold
and CaptureHold, alternating in each worker (each call counts as one mutation), over many users so
the 3-open-holds cap is never reached; the no-op is grpc.health.v1.Health/Check on the same server.
Every call carries a trace context, as calls through the gateway do, so the mutations and the no-op
take the same traced path; a bare probe (untraced) is measured for reference. Rounds alternate
(mutations, no-op, probe, mutations, ...) so drift hits all alike. Redis round trips per mutation
come from INFO deltas taken around the mutation rounds only; CPU per call from /proc.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devtools.redis_server import RedisServer, free_port
from stationthis.points.v1 import points_pb2, points_service_pb2, points_service_pb2_grpc

from .common_load import ROOT, closed_loop, stop, traceparent, wait_serving

CONCURRENCY = 32
USERS_PER_WORKER = 8
ROUND_SECONDS = 3.0
ROUNDS = 3
ESTIMATE = 10  # points held and then charged by each reserve/capture pair
CREDIT = 10**9  # qoints given to every user first, far more than the bench spends


def start_service(redis_url: str, port: int, log_path: str, module: str = "services.points") -> subprocess.Popen[bytes]:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "gen")]),
        REDIS_URL=redis_url,
        POINTS_LISTEN_ADDR=f"127.0.0.1:{port}",
    )
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", *module.split()], cwd=ROOT, env=env, stdout=log, stderr=log)


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
                metadata=traceparent(),
            )
            self.open = (user, reply.hold.hold_id)
        else:
            user, hold_id = self.open
            await self.stub.CaptureHold(
                points_service_pb2.CaptureHoldRequest(
                    request_id=uuid.uuid4().hex, user_id=user, hold_id=hold_id, cost_points=ESTIMATE
                ),
                timeout=10,
                metadata=traceparent(),
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


async def measure(
    redis_url: str, port: int, log_path: str, redis_pid: int, module: str = "services.points", bare: bool = True
) -> dict[str, Any]:
    process = start_service(redis_url, port, log_path, module)
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
        probe = health_pb2.HealthCheckRequest()
        modes: dict[str, list[Callable[[], Awaitable[object]]]] = {
            "mutations": list(mutators),
            "noop": [lambda: health.Check(probe, timeout=10, metadata=traceparent())] * CONCURRENCY,
        }
        if bare:
            modes["probe"] = [lambda: health.Check(probe, timeout=10)] * CONCURRENCY
        for workers in modes.values():  # warm up (and load the script)
            await closed_loop(workers, 0.5)
        rates: dict[str, list[float]] = {mode: [] for mode in modes}
        calls = dict.fromkeys(modes, 0)
        cpu = {mode: [0.0, 0.0, 0.0] for mode in modes}  # service, bench client, Redis: CPU seconds
        commands: dict[str, int] = {}
        for _ in range(ROUNDS):
            for mode, workers in modes.items():
                before_count = sum(m.count for m in mutators)
                before = redis_counts(client) if mode == "mutations" else {}
                started = (cpu_seconds(process.pid), time.process_time(), cpu_seconds(redis_pid))
                rate = await closed_loop(workers, ROUND_SECONDS)
                ended = (cpu_seconds(process.pid), time.process_time(), cpu_seconds(redis_pid))
                rates[mode].append(rate)
                for i in range(3):
                    cpu[mode][i] += ended[i] - started[i]
                if mode != "mutations":
                    calls[mode] += round(rate * ROUND_SECONDS)
                    continue
                after = redis_counts(client)
                calls[mode] += sum(m.count for m in mutators) - before_count
                for name, count in after.items():
                    commands[name] = commands.get(name, 0) + count - before.get(name, 0)
                # The INFO calls that read the counters: the second of "before" and the first of "after".
                commands["total"] -= 2
                commands["reads"] -= 2
                commands["info"] = commands.get("info", 0) - 2
        await channel.close()
    finally:
        stop(process)
        client.close()
    ratios = sorted(m / n for m, n in zip(rates["mutations"], rates["noop"], strict=True))
    return {
        "rates": {mode: sum(values) / ROUNDS for mode, values in rates.items()},
        "ratio_range": (ratios[0], ratios[-1]),
        "calls": calls,
        "cpu_us": {mode: [seconds / max(1, calls[mode]) * 1e6 for seconds in cpu[mode]] for mode in modes},
        "commands": {name: count for name, count in commands.items() if count > 0},
    }


VARIANTS = (
    ("canned", "without the ledger: replies from memory, no Redis"),
    ("echo", "one EVALSHA of a script that only GETs the reply"),
)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-points-") as tmp:
        server = RedisServer(os.path.join(tmp, "redis")).start()
        assert server.process is not None
        try:
            log = os.path.join(tmp, "points.log")
            result = asyncio.run(measure(server.url, free_port(), log, server.process.pid))
            variants = {
                mode: asyncio.run(
                    measure(server.url, free_port(), log, server.process.pid, f"bench.points_variant {mode}", False)
                )
                for mode, _ in VARIANTS
            }
        finally:
            server.stop()
    rates, commands, cpu_us = result["rates"], result["commands"], result["cpu_us"]
    count = result["calls"]["mutations"]
    scripts = commands.get("evalsha", 0) + commands.get("eval", 0)
    listed = ", ".join(
        f"{name} {calls}" for name, calls in sorted(commands.items()) if name not in ("total", "reads", "evalsha_usec")
    )
    low, high = result["ratio_range"]
    print(f"points: one service process, concurrency {CONCURRENCY}, {ROUNDS} alternating rounds of {ROUND_SECONDS}s")
    print("  every call carries a trace context, as calls through the gateway do, so all of them are traced")
    print(f"  ledger mutations (ReserveHold/CaptureHold):        {rates['mutations']:9.0f} calls/s")
    print(f"  no-op RPC (grpc.health.v1.Health/Check):           {rates['noop']:9.0f} calls/s")
    print(f"  ratio mutations/no-op (goal >= 0.7):               {rates['mutations'] / rates['noop']:9.2f}  "
          f"(per round {low:.2f}..{high:.2f})")  # fmt: skip
    print(f"  bare probe (Health/Check, untraced):               {rates['probe']:9.0f} calls/s")
    print(f"  ratio mutations/bare probe:                        {rates['mutations'] / rates['probe']:9.2f}  "
          "(the span's cost included)")  # fmt: skip
    print(f"  Redis EVALSHA+EVAL per mutation (goal 1):          {scripts / count:9.3f}")
    print(f"  Redis requests per mutation, total_reads_processed: {commands['reads'] / count:9.3f}")
    print(f"  Redis commands per mutation, total_commands_processed (incl. those run by the script): "
          f"{commands['total'] / count:.3f}")  # fmt: skip
    print(f"    ({count} mutations; commands during them: {listed})")
    print(f"  Redis time in EVALSHA per mutation:                {commands.get('evalsha_usec', 0) / count:9.0f} us")
    print("  CPU per call, service / bench client / Redis server (2 cores shared by all three):")
    for mode, label in (("mutations", "mutation"), ("noop", "no-op"), ("probe", "bare probe")):
        service, bench_client, redis_server = cpu_us[mode]
        print(f"    {label:10}  {service:5.0f} / {bench_client:4.0f} / {redis_server:4.0f} us")
    print("  the same mutations with the ledger cut down (bench/points_variant.py), ratio to the no-op:")
    for mode, what in VARIANTS:
        variant = variants[mode]
        service, bench_client, redis_server = variant["cpu_us"]["mutations"]
        ratio = variant["rates"]["mutations"] / variant["rates"]["noop"]
        cpu = f"{service:5.0f} / {bench_client:4.0f} / {redis_server:4.0f} us"
        print(f"    {mode:7} {ratio:5.2f}  CPU per mutation {cpu}  ({what})")


if __name__ == "__main__":
    main()
