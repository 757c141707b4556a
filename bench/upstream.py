"""The ComfyUI Deploy client's cost: get_run through ComfyDeployClient vs the same request with raw httpx.

The emulator runs as a separate process (`python -m emulator`). Both sides use the same
``httpx.AsyncClient`` settings (base URL, headers, timeouts, pool limits) and the same request
(``GET /run/{id}`` on an existing, finished run, JSON decoded); the client adds its rate limiter (set
far above the load), breaker, retry budget, metrics, logging checks and model parsing. Rounds
alternate so drift hits both alike.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from typing import Any

import httpx

from comfydeploy import ComfyDeployClient
from devtools.redis_server import free_port

from .common_load import ROOT, rate

CONCURRENCY = 64
ROUND_SECONDS = 1.2
ROUNDS = 10
API_KEY = "bench-emulator-key"
DEPLOYMENT = "d4000000-0000-4000-8000-000000000001"  # emulator fixture: text2img, production


def start_emulator() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "gen")]),
        EMULATOR_API_KEYS=API_KEY,
        EMULATOR_LISTEN_ADDR=f"127.0.0.1:{port}",
        EMULATOR_STEP_SECONDS="0.01",
        LOG_LEVEL="WARNING",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "emulator"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    root = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the emulator exited at start-up")
        try:
            if httpx.get(f"{root}/_emulator/health", timeout=0.5, trust_env=False).status_code == 200:
                return process, f"{root}/api"
        except httpx.HTTPError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("the emulator did not become healthy in 15 s")


async def measure(base_url: str) -> dict[str, float]:
    client = ComfyDeployClient(base_url, API_KEY, rate_limit_per_second=1e9, max_connections=CONCURRENCY)
    raw = httpx.AsyncClient(  # what ComfyDeployClient builds, minus everything around it
        base_url=base_url + "/",
        headers={"Accept": "application/json", "User-Agent": "bench", "Authorization": f"Bearer {API_KEY}"},
        timeout=httpx.Timeout(10.0, connect=3.0),
        limits=httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY),
        follow_redirects=False,
        trust_env=False,
    )
    try:
        run_id = (await client.queue_run(DEPLOYMENT, {"input_prompt": "bench"})).run_id
        for _ in range(600):  # let the run finish, so its answer has its final size
            if (await client.get_run(run_id)).is_terminal:
                break
            await asyncio.sleep(0.05)

        async def via_client() -> Any:
            return await client.get_run(run_id)

        async def via_raw() -> Any:
            response = await raw.get(f"run/{run_id}")
            response.raise_for_status()
            return response.json()

        calls = {"raw": via_raw, "client": via_client}
        for call in calls.values():  # warm up: connections, code paths
            await rate(call, CONCURRENCY, 0.5)
        rates: dict[str, list[float]] = {mode: [] for mode in calls}
        cpu: dict[str, list[float]] = {mode: [] for mode in calls}
        for _ in range(ROUNDS):
            for mode, call in calls.items():
                before = time.process_time()
                per_second = await rate(call, CONCURRENCY, ROUND_SECONDS)
                rates[mode].append(per_second)
                cpu[mode].append((time.process_time() - before) / max(1.0, per_second * ROUND_SECONDS))
        errors = sum(e["errors"] for e in client.snapshot()["endpoints"].values())
        if errors:
            raise RuntimeError(f"{errors} client calls failed during the benchmark")
        ratios = sorted(c / r for c, r in zip(rates["client"], rates["raw"], strict=True))
        return {
            "raw": sum(rates["raw"]) / ROUNDS,
            "client": sum(rates["client"]) / ROUNDS,
            "raw_cpu_ms": 1000 * sum(cpu["raw"]) / ROUNDS,
            "client_cpu_ms": 1000 * sum(cpu["client"]) / ROUNDS,
            "ratio_min": ratios[0],
            "ratio_max": ratios[-1],
        }
    finally:
        await client.aclose()
        await raw.aclose()


def main() -> None:
    process, base_url = start_emulator()
    try:
        result = asyncio.run(measure(base_url))
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
    print(f"upstream: GET /run/{{id}} against the emulator (subprocess), concurrency {CONCURRENCY}, ", end="")
    print(f"{ROUNDS} alternating rounds of {ROUND_SECONDS}s")
    print(f"  raw httpx (same AsyncClient settings): {result['raw']:9.0f} requests/s  ", end="")
    print(f"{result['raw_cpu_ms']:6.2f} ms CPU/request in this process")
    print(f"  ComfyDeployClient.get_run:             {result['client']:9.0f} requests/s  ", end="")
    print(f"{result['client_cpu_ms']:6.2f} ms CPU/request in this process")
    print(f"  ratio client/raw:                      {result['client'] / result['raw']:9.2f}  (goal >= 0.8; ", end="")
    print(f"per round {result['ratio_min']:.2f}..{result['ratio_max']:.2f})")


if __name__ == "__main__":
    main()
