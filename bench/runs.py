"""Runs at scale: upstream calls per run with webhooks against the SDKs' 1-second polling, the latency
from a webhook to a watcher, and the memory a run in flight costs.

Everything runs as `make run` runs it, each in its own process: Redis, the ComfyUI Deploy emulator
(its text2img runs take about RUN_SECONDS), points, workflows, comfyui and the gateway (which
receives the emulator's webhooks). In one window:

* RUNS runs through CreateRun (at most 3 per user, the open-holds cap), tracked by webhooks with
  polling as the fallback. Upstream calls per run are read from the comfyui service's own metrics
  (``comfydeploy_client_calls_total``).
* BASELINE_RUNS runs queued on the emulator directly and polled with GET /run/{id} every second until
  they end, as the ComfyUI Deploy SDKs do by default: its calls per run are the baseline.
* WATCHERS of our runs are followed with WatchRun; each event's latency is the time from the change
  being applied (the run's update_time, set when the webhook was handled) to the watcher reading it.
* The comfyui service's resident memory and Redis's used memory are sampled before and at the peak of
  runs in flight.

Environment: BENCH_RUNS, BENCH_RUN_SECONDS, BENCH_WATCHERS, BENCH_BASELINE_RUNS override the sizes.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devtools.redis_server import RedisServer, free_port
from stationthis.comfyui.v1 import comfyui_service_pb2 as svc
from stationthis.comfyui.v1 import comfyui_service_pb2_grpc
from stationthis.comfyui.v1 import run_pb2 as R

from .common_load import ROOT

RUNS = int(os.environ.get("BENCH_RUNS", "1000"))
RUN_SECONDS = float(os.environ.get("BENCH_RUN_SECONDS", "30"))
WATCHERS = int(os.environ.get("BENCH_WATCHERS", "100"))
BASELINE_RUNS = int(os.environ.get("BENCH_BASELINE_RUNS", "100"))
TEXT2IMG_DEPLOYMENT = "d4000000-0000-4000-8000-000000000001"
STEPS_PER_RUN = 26  # text2img in the emulator: queued, started, running, 22 nodes, success
API_KEY = "bench-runs-key"
GATEWAY_KEY = "bench-runs-gateway-key"
TERMINAL = {R.RUN_STATUS_SUCCESS, R.RUN_STATUS_FAILED, R.RUN_STATUS_TIMEOUT, R.RUN_STATUS_CANCELLED}


@dataclass
class Processes:
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, module: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        full = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "gen")]), LOG_LEVEL="ERROR", **env)
        full.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
        process = subprocess.Popen(
            [sys.executable, "-m", module], cwd=ROOT, env=full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.children.append(process)
        return process

    def stop(self) -> None:
        for process in reversed(self.children):
            process.terminate()
        for process in reversed(self.children):
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def rss_bytes(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(found.group(1)) * 1024 if found else 0


async def wait_grpc(address: str, within: float = 60) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{address} was not SERVING in {within}s")


async def wait_http(url: str, within: float = 60) -> None:
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(trust_env=False) as http:
        while time.monotonic() < deadline:
            try:
                if (await http.get(url, timeout=1)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not answer in {within}s")


def metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def baseline(api_url: str, runs: int) -> tuple[int, float]:
    """Runs queued directly and polled every second, as the SDKs do: (calls, mean seconds per run)."""
    calls = 0
    durations: list[float] = []
    async with httpx.AsyncClient(
        base_url=api_url, headers={"Authorization": f"Bearer {API_KEY}"}, trust_env=False, timeout=30
    ) as http:

        async def one() -> None:
            nonlocal calls
            started = time.monotonic()
            body = {"deployment_id": TEXT2IMG_DEPLOYMENT, "inputs": {"input_prompt": "baseline"}}
            queued = await http.post("run/deployment/queue", json=body)
            calls += 1
            run_id = queued.json()["run_id"]
            while True:
                await asyncio.sleep(1.0)
                status = (await http.get(f"run/{run_id}")).json()["status"]
                calls += 1
                if status in ("success", "failed", "timeout", "cancelled"):
                    durations.append(time.monotonic() - started)
                    return

        await asyncio.gather(*(one() for _ in range(runs)))
    return calls, sum(durations) / max(1, len(durations))


async def measure() -> dict[str, Any]:
    processes = Processes()
    server = RedisServer(tempfile.mkdtemp(prefix="bench-runs-")).start()
    ports = {name: free_port() for name in ("emulator", "points", "workflows", "comfyui", "gateway", "metrics")}
    api_url = f"http://127.0.0.1:{ports['emulator']}/api"
    try:
        processes.start("emulator", {
            "EMULATOR_API_KEYS": API_KEY, "EMULATOR_LISTEN_ADDR": f"127.0.0.1:{ports['emulator']}",
            "EMULATOR_STEP_SECONDS": f"{RUN_SECONDS / STEPS_PER_RUN:.4f}",
        })  # fmt: skip
        await wait_http(f"http://127.0.0.1:{ports['emulator']}/_emulator/health")
        async with httpx.AsyncClient(base_url=api_url, headers={"Authorization": f"Bearer {API_KEY}"},
                                     trust_env=False) as http:  # fmt: skip
            # One deployment with room for every run at once (the fixture's machine allows 2).
            patched = await http.patch(f"deployment/{TEXT2IMG_DEPLOYMENT}", json={"concurrency_limit": 10_000})
            patched.raise_for_status()
        common = {
            "REDIS_URL": server.url, "COMFYDEPLOY_API_URL": api_url, "COMFYDEPLOY_API_KEY": API_KEY,
            "COMFYDEPLOY_RATE_LIMIT": "2000",
            "POINTS_LISTEN_ADDR": f"127.0.0.1:{ports['points']}", "POINTS_SERVICE_ADDR": f"127.0.0.1:{ports['points']}",
            "WORKFLOWS_LISTEN_ADDR": f"127.0.0.1:{ports['workflows']}",
            "WORKFLOWS_SERVICE_ADDR": f"127.0.0.1:{ports['workflows']}",
            "COMFYUI_LISTEN_ADDR": f"127.0.0.1:{ports['comfyui']}",
            "COMFYUI_SERVICE_ADDR": f"127.0.0.1:{ports['comfyui']}",
            "COMFYUI_METRICS_ADDR": f"127.0.0.1:{ports['metrics']}",
            "COMFYUI_PUBLIC_URL": f"http://127.0.0.1:{ports['gateway']}",
            "GATEWAY_LISTEN_ADDR": f"127.0.0.1:{ports['gateway']}", "GATEWAY_API_KEYS": GATEWAY_KEY,
            "POINTS_METRICS_ADDR": "127.0.0.1:0", "WORKFLOWS_METRICS_ADDR": "127.0.0.1:0",
            "GATEWAY_METRICS_ADDR": "127.0.0.1:0",
        }  # fmt: skip
        processes.start("services.points", common)
        processes.start("services.workflows", common)
        await wait_grpc(common["POINTS_LISTEN_ADDR"])
        await wait_grpc(common["WORKFLOWS_LISTEN_ADDR"])
        comfyui = processes.start("services.comfyui", common)
        await wait_grpc(common["COMFYUI_LISTEN_ADDR"])
        processes.start("gateway", common)
        await wait_http(f"http://127.0.0.1:{ports['gateway']}/healthz")
        return await drive(common, comfyui.pid, server.url, api_url, ports["metrics"])
    finally:
        processes.stop()
        server.stop()


async def drive(common: dict[str, str], comfyui_pid: int, redis_url: str, api_url: str, metrics_port: int
                ) -> dict[str, Any]:  # fmt: skip
    redis = aioredis.Redis.from_url(redis_url)
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    channel = grpc.aio.insecure_channel(common["COMFYUI_LISTEN_ADDR"])
    stub = comfyui_service_pb2_grpc.ComfyUIServiceStub(channel)
    async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
        # Warm the catalog and the connections with one run, then take the baselines.
        warm = await create(stub, "bench-warm", 0)
        await watch(stub, warm, [])
        await asyncio.sleep(1.0)
        calls_before = metric_sum((await http.get(metrics_url)).text, "comfydeploy_client_calls_total")
        rss_idle = rss_bytes(comfyui_pid)
        redis_idle = int((await redis.info("memory"))["used_memory"])

        latencies: list[float] = []
        limit = asyncio.Semaphore(64)

        async def start(index: int) -> str:
            async with limit:
                return await create(stub, f"bench-user-{index // 3}", index)

        baseline_task = asyncio.create_task(baseline(api_url, BASELINE_RUNS))
        started = time.monotonic()
        run_ids = await asyncio.gather(*(start(i) for i in range(RUNS)))
        created_in = time.monotonic() - started
        watched = random.sample(run_ids, min(WATCHERS, len(run_ids)))
        watchers = [asyncio.create_task(watch(stub, run_id, latencies)) for run_id in watched]
        peak_rss, peak_redis, peak_inflight = rss_idle, redis_idle, 0
        while True:
            async with redis.pipeline(transaction=False) as pipe:
                for run_id in run_ids:
                    pipe.hget(f"run:{{{run_id}}}", "settled")
                inflight = sum(flag != b"1" for flag in await pipe.execute())
            if inflight >= peak_inflight:
                peak_inflight = inflight
                peak_rss = max(peak_rss, rss_bytes(comfyui_pid))
                peak_redis = max(peak_redis, int((await redis.info("memory"))["used_memory"]))
            if inflight == 0:
                break
            if time.monotonic() - started > RUN_SECONDS * 6 + 120:
                raise RuntimeError(f"{inflight} runs still in flight")
            await asyncio.sleep(0.5)
        elapsed = time.monotonic() - started
        await asyncio.gather(*watchers)
        baseline_calls, baseline_seconds = await baseline_task
        calls = metric_sum((await http.get(metrics_url)).text, "comfydeploy_client_calls_total") - calls_before
        statuses: dict[str, int] = {}
        durations = []
        for batch in range(0, len(run_ids), 200):
            for run_id in run_ids[batch : batch + 200]:
                run = (await stub.GetRun(svc.GetRunRequest(run_id=run_id), timeout=10)).run
                statuses[R.RunStatus.Name(run.status)] = statuses.get(R.RunStatus.Name(run.status), 0) + 1
                durations.append((run.end_time.ToMilliseconds() - run.submit_time.ToMilliseconds()) / 1000)
    await channel.close()
    await redis.aclose()
    latencies.sort()
    return {
        "runs": RUNS, "statuses": statuses, "created_in": created_in, "elapsed": elapsed,
        "run_seconds": sum(durations) / len(durations),
        "calls_per_run": calls / RUNS,
        "baseline_calls_per_run": baseline_calls / BASELINE_RUNS, "baseline_seconds": baseline_seconds,
        "latency_p50": latencies[len(latencies) // 2] if latencies else float("nan"),
        "latency_p99": latencies[int(len(latencies) * 0.99)] if latencies else float("nan"),
        "events": len(latencies), "peak_inflight": peak_inflight,
        "rss_per_run": (peak_rss - rss_idle) / max(1, peak_inflight),
        "redis_per_run": (peak_redis - redis_idle) / max(1, peak_inflight),
        "rss_idle": rss_idle, "rss_peak": peak_rss,
    }  # fmt: skip


async def create(stub: comfyui_service_pb2_grpc.ComfyUIServiceStub, user: str, index: int) -> str:
    request = svc.CreateRunRequest(request_id=secrets.token_hex(8), user_id=user, workflow_name="text2img")
    request.inputs.update({"input_prompt": f"bench run {index}"})
    return str((await stub.CreateRun(request, timeout=60)).run.run_id)


async def watch(stub: comfyui_service_pb2_grpc.ComfyUIServiceStub, run_id: str, latencies: list[float]) -> None:
    async for message in stub.WatchRun(svc.WatchRunRequest(run_id=run_id)):
        if message.event_type not in (svc.RUN_EVENT_TYPE_SNAPSHOT, svc.RUN_EVENT_TYPE_FINISHED):
            latencies.append(time.time() - message.run.update_time.ToMilliseconds() / 1000)
        if message.event_type == svc.RUN_EVENT_TYPE_FINISHED:
            return


def main() -> None:
    result = asyncio.run(measure())
    print(f"runs: {result['runs']} runs through CreateRun at once ({result['peak_inflight']} in flight at the peak),")
    print(f"  created in {result['created_in']:.1f}s, all settled after {result['elapsed']:.1f}s; "
          f"{result['statuses']}")  # fmt: skip
    print(f"  mean run from submit to end:              {result['run_seconds']:8.1f} s")
    ours, base = result["calls_per_run"], result["baseline_calls_per_run"]
    print(f"  upstream calls per run, webhooks:         {ours:8.2f}  (goal <= 2)")
    print(f"  upstream calls per run, 1 s polling:      {base:8.2f}  ({BASELINE_RUNS} runs of "
          f"{result['baseline_seconds']:.1f}s; goal >= 30 for a 30-second run)")  # fmt: skip
    print(f"  ratio webhooks/polling:                   {ours / base:8.3f}")
    print(f"  webhook to watcher latency p50 / p99:     {result['latency_p50'] * 1000:8.1f} / "
          f"{result['latency_p99'] * 1000:.1f} ms  ({result['events']} events, {WATCHERS} watchers)")  # fmt: skip
    print(f"  comfyui memory per run in flight:         {result['rss_per_run'] / 1024:8.1f} KiB  "
          f"(RSS {result['rss_idle'] / 2**20:.0f} -> {result['rss_peak'] / 2**20:.0f} MiB)")  # fmt: skip
    print(f"  Redis memory per run in flight:           {result['redis_per_run'] / 1024:8.1f} KiB")


if __name__ == "__main__":
    main()
