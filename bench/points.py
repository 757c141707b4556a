"""Ledger mutations vs a no-op RPC and vs the ledger cut down, side by side, and what Redis does per mutation.

Service processes on one throw-away redis-server, all running at once: the points service
(``python -m services.points``) and its cut-down variants (``bench/points_variant.py``: replies
from memory; one EVALSHA of a script that only GETs the reply; and, when valkey-glide is installed,
the real ledger with its script call made through valkey-glide). Mutations are ReserveHold and
CaptureHold, alternating in each worker (each call counts as one mutation), over many users so the
3-open-holds cap is never reached; the no-op is grpc.health.v1.Health/Check on the points service.
Every call carries a trace context, as calls through the gateway do, so the mutations and the no-op
take the same traced path; a bare probe (untraced) is measured for reference.

Rounds alternate (ledger mutations, no-op, probe, then each variant's mutations, and again), so
drift and the other load on the machine hit all alike, and each ratio is also given per round
(the figures of one round against those of the same round). Redis figures come from INFO deltas
taken around the ledger's rounds only: round trips per mutation (total_reads_processed, one per
request a client sends and waits for), commands, and the time Redis spent in EVALSHA
(commandstats usec, also around the do-nothing script's rounds). CPU per call from /proc. The cost
of the ledger's span per script call is measured in a process of its own
(``python -m bench.points_variant span``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
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
REDIS_GOAL_US = 60
NOOP_GOAL = 0.6
ECHO_GOAL = 0.9

# The cut-down services (bench/points_variant.py): mode, what it is, whether it can run here.
VARIANTS = (
    ("echo", "one EVALSHA of a script that only GETs the reply", True),
    ("canned", "without the ledger: replies from memory, no Redis", True),
    ("glide", "the real ledger, its script called through valkey-glide", importlib.util.find_spec("glide") is not None),
)


def start_service(redis_url: str, port: int, log_path: str, module: str = "services.points") -> subprocess.Popen[bytes]:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "gen")]),
        REDIS_URL=redis_url,
        POINTS_LISTEN_ADDR=f"127.0.0.1:{port}",
        POINTS_METRICS_ADDR="127.0.0.1:0",  # several services at once
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


@dataclass
class Mode:
    """One kind of call, served by one service process, measured in every round."""

    process: subprocess.Popen[bytes]
    workers: list[Callable[[], Awaitable[object]]]
    mutators: list[Mutator] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    calls: int = 0
    cpu: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # service, bench client, Redis
    redis: dict[str, int] = field(default_factory=dict)  # INFO deltas (ledger and echo rounds)

    def cpu_us(self) -> list[float]:
        return [seconds / max(1, self.calls) * 1e6 for seconds in self.cpu]


async def credit_users(stub: points_service_pb2_grpc.PointsServiceStub, users: list[list[str]]) -> None:
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


async def measure(redis_url: str, tmp: str, redis_pid: int, variants: list[str]) -> dict[str, Mode]:
    """Every mode, ROUNDS times, in turn: ledger mutations, no-op, bare probe, then each variant."""
    services = {"ledger": "services.points", **{name: f"bench.points_variant {name}" for name in variants}}
    ports = {name: free_port() for name in services}
    processes = {
        name: start_service(redis_url, ports[name], os.path.join(tmp, f"{name}.log"), module)
        for name, module in services.items()
    }
    client = redis.Redis.from_url(redis_url)
    channels = {name: grpc.aio.insecure_channel(f"127.0.0.1:{port}") for name, port in ports.items()}
    try:
        for name, channel in channels.items():
            await wait_serving(channel, processes[name])
        health = health_pb2_grpc.HealthStub(channels["ledger"])
        probe = health_pb2.HealthCheckRequest()
        modes: dict[str, Mode] = {}
        for name in services:
            stub = points_service_pb2_grpc.PointsServiceStub(channels[name])
            users = [[f"bench-{name}-{w}-{u}" for u in range(USERS_PER_WORKER)] for w in range(CONCURRENCY)]
            await credit_users(stub, users)
            mutators = [Mutator(stub, group) for group in users]
            modes[name] = Mode(processes[name], list(mutators), mutators)
            if name == "ledger":
                modes["noop"] = Mode(
                    processes[name], [lambda: health.Check(probe, timeout=10, metadata=traceparent())] * CONCURRENCY
                )
                modes["probe"] = Mode(processes[name], [lambda: health.Check(probe, timeout=10)] * CONCURRENCY)
        for mode in modes.values():  # warm up (and load the scripts)
            await closed_loop(mode.workers, 0.5)
        for _ in range(ROUNDS):
            for name, mode in modes.items():
                count_before = sum(m.count for m in mode.mutators)
                before = redis_counts(client) if name in ("ledger", "echo") else {}
                started = (cpu_seconds(mode.process.pid), time.process_time(), cpu_seconds(redis_pid))
                rate = await closed_loop(mode.workers, ROUND_SECONDS)
                ended = (cpu_seconds(mode.process.pid), time.process_time(), cpu_seconds(redis_pid))
                mode.rates.append(rate)
                for i in range(3):
                    mode.cpu[i] += ended[i] - started[i]
                if not mode.mutators:
                    mode.calls += round(rate * ROUND_SECONDS)
                    continue
                mode.calls += sum(m.count for m in mode.mutators) - count_before
                if before:
                    after = redis_counts(client)
                    for key, count in after.items():
                        mode.redis[key] = mode.redis.get(key, 0) + count - before.get(key, 0)
                    # The INFO calls that read the counters: the second of "before" and the first of "after".
                    for key in ("total", "reads", "info"):
                        mode.redis[key] = mode.redis.get(key, 0) - 2
        return modes
    finally:
        for channel in channels.values():
            await channel.close()
        for process in processes.values():
            stop(process)
        client.close()


def span_cost() -> dict[str, Any]:
    """The ledger's span per script call, measured in a process of its own (bench/points_variant.py)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "gen")]))
    done = subprocess.run(
        [sys.executable, "-m", "bench.points_variant", "span"], cwd=ROOT, env=env, capture_output=True, check=True
    )
    result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return result


def ratio(a: Mode, b: Mode) -> tuple[float, float, float]:
    """a's rate over b's, overall and the lowest and highest of the rounds (each round against the same round)."""
    per_round = sorted(x / y for x, y in zip(a.rates, b.rates, strict=True))
    return sum(a.rates) / sum(b.rates), per_round[0], per_round[-1]


def main() -> None:
    variants = [name for name, _, available in VARIANTS if available]
    with tempfile.TemporaryDirectory(prefix="bench-points-") as tmp:
        server = RedisServer(os.path.join(tmp, "redis")).start()
        assert server.process is not None
        try:
            modes = asyncio.run(measure(server.url, tmp, server.process.pid, variants))
        finally:
            server.stop()
    span = span_cost()
    ledger, noop, probe, echo = modes["ledger"], modes["noop"], modes["probe"], modes["echo"]
    count = ledger.calls
    commands = ledger.redis
    scripts = commands.get("evalsha", 0) + commands.get("eval", 0)
    listed = ", ".join(
        f"{name} {calls}"
        for name, calls in sorted(commands.items())
        if calls > 0 and name not in ("total", "reads", "evalsha_usec")
    )
    redis_us = commands.get("evalsha_usec", 0) / count
    echo_us = echo.redis.get("evalsha_usec", 0) / max(1, echo.redis.get("evalsha", 0))

    def rate(mode: Mode) -> float:
        return sum(mode.rates) / len(mode.rates)

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    on_noop, on_echo, on_probe = ratio(ledger, noop), ratio(ledger, echo), ratio(ledger, probe)
    print(f"points: service processes side by side, concurrency {CONCURRENCY}, {ROUNDS} rounds of {ROUND_SECONDS}s "
          "of each mode in turn")  # fmt: skip
    print("  every call carries a trace context, as calls through the gateway do, so all of them are traced")
    print(f"  {'ledger mutations (ReserveHold/CaptureHold):':64} {rate(ledger):6.0f} calls/s")
    print(f"  {'no-op RPC (grpc.health.v1.Health/Check):':64} {rate(noop):6.0f} calls/s")
    print(f"  {'bare probe (Health/Check, untraced):':64} {rate(probe):6.0f} calls/s")
    for name, what, _ in VARIANTS:
        if name in modes:
            print(f"  {name + ': ' + what + ':':64} {rate(modes[name]):6.0f} calls/s")
    print(f"  {f'ratio mutations/no-op (goal >= {NOOP_GOAL}):':64} {on_noop[0]:6.2f}  "
          f"(per round {on_noop[1]:.2f}..{on_noop[2]:.2f}) {met(on_noop[0] >= NOOP_GOAL)}")  # fmt: skip
    print(f"  {f'ratio mutations/do-nothing script (goal >= {ECHO_GOAL}):':64} {on_echo[0]:6.2f}  "
          f"(per round {on_echo[1]:.2f}..{on_echo[2]:.2f}) {met(on_echo[0] >= ECHO_GOAL)}")  # fmt: skip
    print(f"  {'ratio mutations/bare probe (the span included):':64} {on_probe[0]:6.2f}")
    for name, _, _ in VARIANTS:
        if name in modes:
            low_high = ratio(modes[name], noop)
            print(f"  {f'ratio {name}/no-op:':64} {low_high[0]:6.2f}  (per round {low_high[1]:.2f}..{low_high[2]:.2f})")
    print(f"  {f'Redis time per mutation, EVALSHA usec_per_call (goal <= {REDIS_GOAL_US} us):':64} {redis_us:6.0f} us  "
          f"{met(redis_us <= REDIS_GOAL_US)}  (the do-nothing script: {echo_us:.0f} us)")  # fmt: skip
    print(f"  {'Redis round trips per mutation, total_reads_processed (goal 1):':64} {commands['reads'] / count:6.3f}  "
          f"(EVALSHA+EVAL: {scripts / count:.3f})")  # fmt: skip
    print(f"  {'service CPU per mutation:':64} {ledger.cpu_us()[0]:6.0f} us  "
          f"(no-op {noop.cpu_us()[0]:.0f} us, do-nothing script {echo.cpu_us()[0]:.0f} us)")  # fmt: skip
    print(f"  Redis commands per mutation, total_commands_processed (incl. those run by the script): "
          f"{commands['total'] / count:.3f}")  # fmt: skip
    print(f"    ({count} mutations; commands during them: {listed})")
    print("  CPU per call, service / bench client / Redis server (2 cores shared by all three):")
    labels = {"ledger": "mutation", "noop": "no-op", "probe": "bare probe"}
    for name, mode in modes.items():
        service, bench_client, redis_server = mode.cpu_us()
        print(f"    {labels.get(name, name):10}  {service:5.0f} / {bench_client:4.0f} / {redis_server:4.0f} us")
    print(f"  the ledger's span per script call: {span['span_us']:.1f} us of CPU "
          f"(a call with no span: {span['bare_us']:.1f} us; {span['calls']} calls in one process, "
          "under a sampled parent, as the service sets tracing up)")  # fmt: skip


if __name__ == "__main__":
    main()
