"""The gateway's cost: the same RPC over HTTP JSON through the gateway vs direct gRPC, side by side.

One points service and one gateway run as processes (Redis too); the RPC is QuoteCost (no I/O in the
service), so the figure is what the HTTP hop, JSON transcoding, auth and the extra trace span cost.
Rounds alternate so drift hits both alike.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time

import grpc
import httpx
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devtools.redis_server import RedisServer, free_port
from stationthis.points.v1 import points_service_pb2, points_service_pb2_grpc
from stationthis.type.v1 import gpu_pb2

from .common_load import ROOT, rate

CONCURRENCY = 32
ROUND_SECONDS = 2.0
ROUNDS = 3


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
        if status != b"200":
            raise RuntimeError(f"gateway answered {status.decode()}")
        length = next(
            int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
        )
        await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


def _start(module: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    full = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "gen")]), LOG_LEVEL="WARNING", **env)
    return subprocess.Popen(
        [sys.executable, "-m", module], cwd=ROOT, env=full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


async def _wait(check: object, what: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if await check():  # type: ignore[operator]
                return
        except (grpc.aio.AioRpcError, httpx.HTTPError):
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{what} did not start")


async def measure(redis_url: str) -> dict[str, float]:
    key = secrets.token_urlsafe(16)
    points_addr, gateway_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    processes = [
        _start("services.points", {"REDIS_URL": redis_url, "POINTS_LISTEN_ADDR": points_addr}),
        _start(
            "gateway",
            {"GATEWAY_API_KEYS": key, "GATEWAY_LISTEN_ADDR": gateway_addr, "POINTS_SERVICE_ADDR": points_addr},
        ),
    ]
    try:
        channel = grpc.aio.insecure_channel(points_addr)
        health = health_pb2_grpc.HealthStub(channel)

        async def points_up() -> bool:
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

        await _wait(points_up, "points")
        limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
        async with httpx.AsyncClient(
            base_url=f"http://{gateway_addr}",
            headers={"Authorization": f"Bearer {key}"},
            limits=limits,
            trust_env=False,
        ) as http:

            async def gateway_up() -> bool:
                return (await http.get("/readyz")).status_code in (200, 503)

            await _wait(gateway_up, "gateway")
            stub = points_service_pb2_grpc.PointsServiceStub(channel)
            request = points_service_pb2.QuoteCostRequest(
                gpu=gpu_pb2.GPU_TYPE_A10G, gpu_time=duration_pb2.Duration(seconds=30)
            )

            async def direct() -> None:
                await stub.QuoteCost(request, timeout=10)

            path = "/v1/costs:quote?gpu=GPU_TYPE_A10G&gpu_time=30s"
            connections = [await KeepAlive.open(gateway_addr, path, key) for _ in range(CONCURRENCY)]
            free: asyncio.Queue[KeepAlive] = asyncio.Queue()
            for connection in connections:
                free.put_nowait(connection)

            async def through_gateway() -> None:
                connection = await free.get()
                try:
                    await connection.get()
                finally:
                    free.put_nowait(connection)

            await rate(direct, CONCURRENCY, 0.5)
            await rate(through_gateway, CONCURRENCY, 0.5)
            totals = {"direct": 0.0, "gateway": 0.0}
            for _ in range(ROUNDS):
                totals["direct"] += await rate(direct, CONCURRENCY, ROUND_SECONDS)
                totals["gateway"] += await rate(through_gateway, CONCURRENCY, ROUND_SECONDS)
            for connection in connections:
                connection.close()
        await channel.close()
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
    return {name: total / ROUNDS for name, total in totals.items()}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        redis = RedisServer(os.path.join(tmp, "redis")).start()
        try:
            result = asyncio.run(measure(redis.url))
        finally:
            redis.stop()
    print(f"gateway: QuoteCost, concurrency {CONCURRENCY}, {ROUNDS} alternating rounds of {ROUND_SECONDS}s")
    print(f"  direct gRPC:                          {result['direct']:9.0f} calls/s")
    print(f"  HTTP JSON through the gateway:        {result['gateway']:9.0f} calls/s")
    print(f"  ratio gateway/direct:                 {result['gateway'] / result['direct']:9.2f}")


if __name__ == "__main__":
    main()
