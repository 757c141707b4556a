"""The workflow catalog: lookup cost on a warm cache, and the cache's behaviour under a steady mixed load.

Everything runs as separate processes: a Redis server, the ComfyUI Deploy emulator (`python -m emulator`)
and the service (`python -m services.workflows`).

1. ResolveWorkflow on a warm cache next to grpc.health.v1.Health/Check (a no-op RPC through the same
   server, interceptors included) on the same server; rounds alternate so drift hits both alike. Both
   carry a trace context, as calls through the gateway do, so both are traced: the ratio says how
   much of a lookup's cost is the lookup itself (goal >= 0.8). A bare probe (health check without a
   trace context, so untraced) is measured too, for reference.
2. A steady mix of ResolveWorkflow, GetWorkflow, ListWorkflows and ValidateInputs with a short TTL
   (refreshes keep happening): the hit ratio from GetCatalogStats (hits / (hits + misses)) and the
   upstream calls per minute from the emulator's request statistics.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import grpc
import httpx
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devtools.redis_server import RedisServer, free_port
from stationthis.workflows.v1 import workflows_service_pb2 as rpc
from stationthis.workflows.v1 import workflows_service_pb2_grpc

from .common_load import ROOT, rate, stop, traceparent, wait_serving
from .upstream import API_KEY, start_emulator

CONCURRENCY = 32
ROUND_SECONDS = 2.0
ROUNDS = 4
MIXED_TTL_SECONDS = 2.0
MIXED_SECONDS = 15.0
TEXT2IMG = "b2000000-0000-4000-8000-000000000001"  # emulator fixture workflows
WORKFLOW_IDS = [TEXT2IMG, *(f"b2000000-0000-4000-8000-00000000000{n}" for n in range(2, 9))]
NAMES = ["/make", "text2img", "Video", "train", "inpaint", "Upscale", "/tooncraft", "controlnet"]


def start_service(redis_url: str, api_url: str, **extra: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "gen")]),
        REDIS_URL=redis_url,
        COMFYDEPLOY_API_URL=api_url,
        COMFYDEPLOY_API_KEY=API_KEY,
        WORKFLOWS_LISTEN_ADDR=f"127.0.0.1:{port}",
        LOG_LEVEL="WARNING",
        **extra,
    )
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "services.workflows"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return process, f"127.0.0.1:{port}"


async def upstream_calls(http: httpx.AsyncClient) -> int:
    """Listing requests (deployments and machines) the emulator has received."""
    routes: dict[str, int] = (await http.get("/_emulator/stats")).json()["routes"]
    return routes.get("GET /api/deployments", 0) + routes.get("GET /api/machines", 0)


async def warm_lookup(redis_url: str, api_url: str) -> dict[str, float]:
    process, address = start_service(redis_url, api_url)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            await wait_serving(channel, process)
            health = health_pb2_grpc.HealthStub(channel)
            stub = workflows_service_pb2_grpc.WorkflowsServiceStub(channel)
            request = rpc.ResolveWorkflowRequest(name="/make")
            probe = health_pb2.HealthCheckRequest()
            calls = {
                "health": lambda: health.Check(probe, timeout=5, metadata=traceparent()),
                "resolve": lambda: stub.ResolveWorkflow(request, timeout=5, metadata=traceparent()),
                "probe": lambda: health.Check(probe, timeout=5),
            }
            for call in calls.values():  # warm up: the catalog load, connections, code paths
                await rate(call, CONCURRENCY, 0.5)
            rates: dict[str, list[float]] = {mode: [] for mode in calls}
            for _ in range(ROUNDS):
                for mode, call in calls.items():
                    rates[mode].append(await rate(call, CONCURRENCY, ROUND_SECONDS))
            stats = (await stub.GetCatalogStats(rpc.GetCatalogStatsRequest(), timeout=5)).stats
            if stats.misses > CONCURRENCY or stats.refreshes != 1:  # only the warm-up's first wave waited
                raise RuntimeError(f"the cache was not warm throughout: {stats}")
    finally:
        stop(process)
    ratios = sorted(r / h for r, h in zip(rates["resolve"], rates["health"], strict=True))
    return {
        "health": sum(rates["health"]) / ROUNDS,
        "resolve": sum(rates["resolve"]) / ROUNDS,
        "probe": sum(rates["probe"]) / ROUNDS,
        "ratio_min": ratios[0],
        "ratio_max": ratios[-1],
    }


async def mixed_load(redis_url: str, api_url: str) -> dict[str, float]:
    process, address = start_service(
        redis_url, api_url, WORKFLOWS_CACHE_TTL_SECONDS=str(MIXED_TTL_SECONDS), WORKFLOWS_LOCAL_CACHE_SECONDS="0.5"
    )
    try:
        async with (
            grpc.aio.insecure_channel(address) as channel,
            httpx.AsyncClient(base_url=api_url.removesuffix("/api"), timeout=10, trust_env=False) as http,
        ):
            await wait_serving(channel, process)
            stub = workflows_service_pb2_grpc.WorkflowsServiceStub(channel)
            counter = itertools.count()
            validate = rpc.ValidateInputsRequest(workflow_id=TEXT2IMG)
            validate.inputs.update({"input_prompt": "a lighthouse at dawn", "input_steps": 30})

            def call() -> Any:
                i = next(counter)
                kind = i % 4
                if kind == 0:
                    return stub.ResolveWorkflow(rpc.ResolveWorkflowRequest(name=NAMES[i // 4 % len(NAMES)]), timeout=10)
                if kind == 1:
                    workflow_id = WORKFLOW_IDS[i // 4 % len(WORKFLOW_IDS)]
                    return stub.GetWorkflow(rpc.GetWorkflowRequest(workflow_id=workflow_id), timeout=10)
                if kind == 2:
                    return stub.ListWorkflows(rpc.ListWorkflowsRequest(), timeout=10)
                return stub.ValidateInputs(validate, timeout=10)

            await rate(call, CONCURRENCY, 0.5)  # warm up (the cold load is a miss, outside the window)
            before = (await stub.GetCatalogStats(rpc.GetCatalogStatsRequest(), timeout=5)).stats
            calls_before = await upstream_calls(http)
            started = time.perf_counter()
            per_second = await rate(call, CONCURRENCY, MIXED_SECONDS)
            elapsed = time.perf_counter() - started
            calls_after = await upstream_calls(http)
            after = (await stub.GetCatalogStats(rpc.GetCatalogStatsRequest(), timeout=5)).stats
    finally:
        stop(process)
    hits, misses = after.hits - before.hits, after.misses - before.misses
    return {
        "per_second": per_second,
        "hits": hits,
        "misses": misses,
        "hit_ratio": hits / max(1, hits + misses),
        "refreshes_per_minute": (after.refreshes - before.refreshes) / elapsed * 60,
        "upstream_per_minute": (calls_after - calls_before) / elapsed * 60,
        "failures": after.refresh_failures - before.refresh_failures,
        "elapsed": elapsed,
    }


def main() -> None:
    emulator, api_url = start_emulator()
    server = RedisServer(tempfile.mkdtemp(prefix="bench-catalog-")).start()
    try:
        warm = asyncio.run(warm_lookup(server.url, api_url))
        client = redis.Redis.from_url(server.url)
        client.flushall()  # the mixed load starts from a cold catalog
        client.close()
        mixed = asyncio.run(mixed_load(server.url, api_url))
    finally:
        server.stop()
        emulator.terminate()
        try:
            emulator.wait(10)
        except subprocess.TimeoutExpired:
            emulator.kill()
    print(f"catalog: workflows service, Redis and emulator as subprocesses, concurrency {CONCURRENCY}")
    print(f"  warm cache, {ROUNDS} alternating rounds of {ROUND_SECONDS}s:")
    print(f"    no-op RPC (grpc.health.v1.Health/Check): {warm['health']:9.0f} calls/s  (with a trace context)")
    print(f"    ResolveWorkflow (/make):                 {warm['resolve']:9.0f} calls/s  (with a trace context)")
    ratio = warm["resolve"] / warm["health"]
    print(f"    ratio resolve/no-op:                     {ratio:9.2f}  (goal >= 0.8; ", end="")
    print(f"per round {warm['ratio_min']:.2f}..{warm['ratio_max']:.2f})")
    print(f"    bare probe (Health/Check, untraced):     {warm['probe']:9.0f} calls/s")
    bare = warm["resolve"] / warm["probe"]
    print(f"    ratio resolve/bare probe:                {bare:9.2f}  (the span's cost included)")
    print(f"  mixed Resolve/Get/List/Validate for {mixed['elapsed']:.0f}s, TTL {MIXED_TTL_SECONDS:g}s:")
    print(f"    throughput:                              {mixed['per_second']:9.0f} calls/s")
    print(f"    hit ratio hits/(hits+misses):            {mixed['hit_ratio']:9.4f}  ", end="")
    print(f"({mixed['hits']:.0f} hits, {mixed['misses']:.0f} misses)")
    print(f"    refreshes per minute:                    {mixed['refreshes_per_minute']:9.1f}  ", end="")
    print(f"({mixed['failures']:.0f} failed)")
    print(f"    upstream calls per minute:               {mixed['upstream_per_minute']:9.1f}  ", end="")
    print("(GET /deployments x2 + GET /machines per refresh)")


if __name__ == "__main__":
    main()
