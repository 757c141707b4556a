"""The gateway's cost: GetAccount over HTTP JSON through the gateway vs the same RPC over gRPC, side by side.

Redis, one points service and one gateway run as processes pinned to core 0 (``taskset``); this load
generator is pinned to core 1, so the gateway cannot borrow the generator's core (unpinned, it did,
and the ratio read higher than the gateway deserves). Printed, in one run:

- at concurrency 32: calls per second direct and through the gateway, their ratio, and the gateway
  process's CPU microseconds per request (from /proc, over the gateway rounds only);
- at concurrency 1: mean latency direct and through the gateway, and what the gateway adds;
- all of it with tracing on (every span sampled, batch export by OTLP to a sink that discards) and
  off (``OTEL_SDK_DISABLED``), and the gateway's throughput on over off;
- the floor: a gateway that does nothing but parse HTTP (uvicorn, uvloop, httptools), make the
  grpc.aio call and write the reply's bytes (no auth, no JSON mapping, no tracing, no logging): what
  any Python gateway on the maintained gRPC client pays before doing its own work.

Rounds alternate (direct, gateway, floor) so drift hits each alike. ``python -m bench.gateway``.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devtools.redis_server import RedisServer, free_port
from stationthis.points.v1 import points_service_pb2, points_service_pb2_grpc

from .common_load import ROOT, traceparent

CONCURRENCY = 32
ROUND_SECONDS = 2.0
ROUNDS = 3
LATENCY_ROUNDS = 2
USER = "bench-user"
PATH = f"/v1/accounts/{USER}"
SERVICE_CORE = 0
LOAD_CORE = 1
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
GOAL_RATIO, GOAL_CPU_US, GOAL_ADDED_MS, GOAL_TRACING = 0.65, 200.0, 0.25, 0.7


# --- the load generator's HTTP client -------------------------------------------------------------


class KeepAlive:
    """A minimal HTTP/1.1 keep-alive client on one connection: a load generator whose own cost is
    small next to the gateway's (httpx spends milliseconds of CPU per request at this concurrency,
    which would measure the client rather than the gateway)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
        self.reader, self.writer, self.request = reader, writer, request

    @classmethod
    async def open(cls, address: str, path: str, key: str) -> KeepAlive:
        host, _, port = address.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        request = f"GET {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {key}\r\n\r\n".encode()
        return cls(reader, writer, request)

    async def get(self) -> None:
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = head.split(b" ", 2)[1]
        length = next(
            int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
        )
        body = await self.reader.readexactly(length)
        if status != b"200":
            raise RuntimeError(f"gateway answered {status.decode()}: {body[:300]!r}")

    def close(self) -> None:
        self.writer.close()


class Pool:
    """``size`` keep-alive connections; ``get()`` takes a free one for one request."""

    def __init__(self, connections: list[KeepAlive]) -> None:
        self.connections = connections
        self.free: asyncio.Queue[KeepAlive] = asyncio.Queue()
        for connection in connections:
            self.free.put_nowait(connection)

    @classmethod
    async def open(cls, address: str, key: str, size: int) -> Pool:
        return cls([await KeepAlive.open(address, PATH, key) for _ in range(size)])

    async def get(self) -> None:
        connection = await self.free.get()
        try:
            await connection.get()
        finally:
            self.free.put_nowait(connection)

    def close(self) -> None:
        for connection in self.connections:
            connection.close()


# --- processes ------------------------------------------------------------------------------------


def _pinned(args: list[str]) -> list[str]:
    taskset = shutil.which("taskset")
    return [taskset, "-c", str(SERVICE_CORE), *args] if taskset and _two_cores() else args


def _two_cores() -> bool:
    return len(os.sched_getaffinity(0)) >= 2 or (os.cpu_count() or 1) >= 2


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    full = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "gen")]), "LOG_LEVEL": "WARNING", **env}
    return subprocess.Popen(_pinned(args), cwd=ROOT, env=full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _module(name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return _start([sys.executable, "-m", name], env)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14 and 15)


async def _wait(check: Callable[[], Awaitable[bool]], what: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if await check():
                return
        except (grpc.aio.AioRpcError, OSError, RuntimeError, asyncio.IncompleteReadError):
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{what} did not start")


# --- measuring ------------------------------------------------------------------------------------


async def closed_loop(call: Callable[[], Awaitable[object]], concurrency: int, seconds: float) -> tuple[int, float]:
    """(calls done, seconds taken) by ``concurrency`` workers calling back to back for ``seconds``."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await call()
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return done, time.perf_counter() - start


@dataclass
class Side:
    """One side of the comparison: its calls, and the process whose CPU is charged to it (if any)."""

    call: Callable[[], Awaitable[object]]
    pid: int | None = None
    calls: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    latency_calls: int = 0
    latency_seconds: float = 0.0

    async def round(self, concurrency: int, seconds: float) -> None:
        before = cpu_seconds(self.pid) if self.pid else 0.0
        done, took = await closed_loop(self.call, concurrency, seconds)
        if concurrency == 1:
            self.latency_calls += done
            self.latency_seconds += took
            return
        self.calls += done
        self.seconds += took
        if self.pid:
            self.cpu += cpu_seconds(self.pid) - before

    @property
    def rate(self) -> float:
        return self.calls / self.seconds

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.calls * 1e6

    @property
    def latency_ms(self) -> float:
        return self.latency_seconds / self.latency_calls * 1000


@dataclass
class Result:
    tracing: bool
    sides: dict[str, Side] = field(default_factory=dict)


async def measure(redis_url: str, tracing: bool, sink: str) -> Result:
    key = secrets.token_urlsafe(16)
    points_addr = f"127.0.0.1:{free_port()}"
    gateway_addr, floor_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    telemetry = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{sink}", "OTEL_EXPORTER_OTLP_INSECURE": "true"}
    if not tracing:
        telemetry = {"OTEL_SDK_DISABLED": "true"}
    metrics = {"POINTS_METRICS_ADDR": "127.0.0.1:0", "GATEWAY_METRICS_ADDR": "127.0.0.1:0"}
    gateway_env = {
        "GATEWAY_API_KEYS": f"bench={key}",
        "GATEWAY_LISTEN_ADDR": gateway_addr,
        "POINTS_SERVICE_ADDR": points_addr,
        "REDIS_URL": redis_url,
        "GATEWAY_RATE_LIMIT": "1000000",
        "GATEWAY_RATE_BURST": "1000000",
        **metrics,
        **telemetry,
    }
    processes = [
        _module("services.points", {"REDIS_URL": redis_url, "POINTS_LISTEN_ADDR": points_addr, **metrics, **telemetry}),
        _module("gateway", gateway_env),
        _start([sys.executable, "-m", "bench.gateway", "floor", floor_addr, points_addr], {}),
    ]
    result = Result(tracing)
    try:
        channel = grpc.aio.insecure_channel(points_addr)
        health = health_pb2_grpc.HealthStub(channel)

        async def points_up() -> bool:
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

        await _wait(points_up, "points")
        await _wait(lambda: _http_ok(gateway_addr, key), "gateway")
        await _wait(lambda: _http_ok(floor_addr, key), "floor gateway")
        stub = points_service_pb2_grpc.PointsServiceStub(channel)
        request = points_service_pb2.GetAccountRequest(user_id=USER)

        async def direct() -> None:
            await stub.GetAccount(request, timeout=10, metadata=traceparent() if tracing else None)

        gateway, floor = await Pool.open(gateway_addr, key, CONCURRENCY), await Pool.open(floor_addr, key, CONCURRENCY)
        result.sides = {
            "direct": Side(direct),
            "gateway": Side(gateway.get, processes[1].pid),
            "floor": Side(floor.get, processes[2].pid),
        }
        for side in result.sides.values():  # warm up
            await closed_loop(side.call, CONCURRENCY, 0.5)
        for _ in range(ROUNDS):
            for side in result.sides.values():
                await side.round(CONCURRENCY, ROUND_SECONDS)
        for _ in range(LATENCY_ROUNDS):
            for side in result.sides.values():
                await side.round(1, ROUND_SECONDS)
        gateway.close()
        floor.close()
        await channel.close()
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
    return result


async def _http_ok(address: str, key: str) -> bool:
    connection = await KeepAlive.open(address, PATH, key)
    try:
        await connection.get()
    finally:
        connection.close()
    return True


# --- helper processes -----------------------------------------------------------------------------


def floor_gateway(listen: str, points_addr: str) -> None:
    """The floor: HTTP in, one grpc.aio call, the reply's bytes out. Nothing else."""
    import uvicorn

    channel: Any = None
    call: Any = None
    request = points_service_pb2.GetAccountRequest(user_id=USER).SerializeToString()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal channel, call
        if scope["type"] == "lifespan":
            message = await receive()
            channel = grpc.aio.insecure_channel(points_addr)
            call = channel.unary_unary("/stationthis.points.v1.PointsService/GetAccount")
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})
            del message
            return
        reply = await call(request, timeout=10)
        headers = [(b"content-type", b"application/octet-stream"), (b"content-length", str(len(reply)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": reply})

    host, _, port = listen.rpartition(":")
    uvicorn.run(app, host=host, port=int(port), loop="uvloop", http="httptools", log_config=None, access_log=False,
                lifespan="on")  # fmt: skip


def sink(listen: str) -> None:
    """An OTLP/gRPC trace endpoint that accepts every export and keeps nothing."""
    from concurrent import futures

    empty = b""  # an empty ExportTraceServiceResponse

    def export(request: bytes, context: grpc.ServicerContext) -> bytes:
        return empty

    handler = grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.trace.v1.TraceService",
        {"Export": grpc.unary_unary_rpc_method_handler(export)},
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(listen)
    server.start()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop(0)


# --- report ---------------------------------------------------------------------------------------


def _load() -> str:
    with open("/proc/loadavg") as loadavg:
        return " ".join(loadavg.read().split()[:3])


def report(results: list[Result]) -> None:
    pinned = shutil.which("taskset") is not None and _two_cores()
    where = (
        f"services, Redis and gateways on core {SERVICE_CORE}, load generator on core {LOAD_CORE}"
        if pinned
        else "UNPINNED (taskset or a second core missing)"
    )
    print(f"gateway: GetAccount, {ROUNDS} alternating rounds of {ROUND_SECONDS}s at c={CONCURRENCY}, "
          f"{LATENCY_ROUNDS} at c=1; {where}; load average {_load()}")  # fmt: skip
    by_tracing = {r.tracing: r for r in results}
    for result in results:
        s = result.sides
        direct, gateway, floor = s["direct"], s["gateway"], s["floor"]
        print(f"  tracing {'on (all sampled, batch OTLP export)' if result.tracing else 'off (OTEL_SDK_DISABLED)'}:")
        print(f"    c={CONCURRENCY}  direct gRPC           {direct.rate:8.0f} calls/s")
        ratio = gateway.rate / direct.rate
        print(f"    c={CONCURRENCY}  through the gateway   {gateway.rate:8.0f} calls/s   ratio {ratio:5.2f} (goal "
              f"{GOAL_RATIO})   gateway CPU {gateway.cpu_us:5.0f} us/request (goal {GOAL_CPU_US:.0f})")  # fmt: skip
        print(f"    c={CONCURRENCY}  floor (HTTP + grpc.aio call only) {floor.rate:8.0f} calls/s   ratio "
              f"{floor.rate / direct.rate:5.2f}   CPU {floor.cpu_us:5.0f} us/request")  # fmt: skip
        print(f"    c=1   direct {direct.latency_ms:6.3f} ms   gateway {gateway.latency_ms:6.3f} ms   added "
              f"{gateway.latency_ms - direct.latency_ms:+6.3f} ms (goal +{GOAL_ADDED_MS})   floor added "
              f"{floor.latency_ms - direct.latency_ms:+6.3f} ms")  # fmt: skip
    if True in by_tracing and False in by_tracing:
        on, off = by_tracing[True].sides["gateway"], by_tracing[False].sides["gateway"]
        print(f"  gateway throughput, tracing on / off: {on.rate / off.rate:5.2f} (goal {GOAL_TRACING})")


def main() -> None:
    everywhere = os.sched_getaffinity(0)
    if _two_cores():
        os.sched_setaffinity(0, {LOAD_CORE})
    try:
        results = _run_all()
    finally:
        os.sched_setaffinity(0, everywhere)  # `make bench` runs other benchmarks after this one
    report(results)


def _run_all() -> list[Result]:
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        redis = RedisServer(os.path.join(tmp, "redis")).start()
        if redis.process is not None and _two_cores():  # Redis serves the services: it belongs on their core
            os.sched_setaffinity(redis.process.pid, {SERVICE_CORE})
        sink_addr = f"127.0.0.1:{free_port()}"
        sink_process = _start([sys.executable, "-m", "bench.gateway", "sink", sink_addr], {})
        if _two_cores():
            os.sched_setaffinity(sink_process.pid, {LOAD_CORE})  # the collector is not the gateway's work
        try:
            return [asyncio.run(measure(redis.url, tracing, sink_addr)) for tracing in (True, False)]
        finally:
            sink_process.send_signal(signal.SIGTERM)
            sink_process.wait(10)
            redis.stop()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "floor":
        floor_gateway(sys.argv[2], sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "sink":
        sink(sys.argv[2])
    else:
        main()
