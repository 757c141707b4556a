"""Every process serves its metrics at /metrics in Prometheus text format, and the counters move.

The services run as real processes, scraped over real HTTP; the ComfyUI Deploy emulator stands in
for upstream.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import httpx
import pytest

from devtools.redis_server import free_port
from stationthis.points.v1 import points_service_pb2, points_service_pb2_grpc
from stationthis.workflows.v1 import workflows_service_pb2, workflows_service_pb2_grpc
from tests.conftest import PYTHON, ROOT, python_env

SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})? ([-+0-9.eEnaInf]+)$")


def samples(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        found = SAMPLE.match(line)
        if not found or found.group(1) != name:
            continue
        given = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', found.group(2) or ""))
        if all(given.get(k) == v for k, v in labels.items()):
            total += float(found.group(3))
    return total


@pytest.fixture
async def process() -> AsyncIterator[Callable[..., Any]]:
    started: list[subprocess.Popen[str]] = []

    async def start(module: str, listen_variable: str, metrics_variable: str, **env: str) -> tuple[int, str]:
        metrics = f"127.0.0.1:{free_port()}"
        environ = python_env(**{listen_variable: "127.0.0.1:0", metrics_variable: metrics, **env})
        child = subprocess.Popen([PYTHON, "-m", module], cwd=ROOT, env=environ, stderr=subprocess.PIPE, text=True)
        started.append(child)
        assert child.stderr is not None
        for line in child.stderr:
            entry = json.loads(line)
            if "port" in entry:
                return int(entry["port"]), f"http://{metrics}/metrics"
        raise AssertionError(f"{module} never said where it listens")

    yield start
    for child in started:
        child.terminate()
        child.wait(30)
        if child.stderr:
            child.stderr.close()


async def scrape(url: str) -> str:
    async with httpx.AsyncClient() as http:
        response = await http.get(url, timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


async def until_serving(channel: grpc.aio.Channel) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for _ in range(300):
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("not SERVING")


async def test_points_metrics_count_rpcs_by_method_and_code(redis_url: str, process) -> None:  # type: ignore[no-untyped-def]
    port, url = await process("services.points", "POINTS_LISTEN_ADDR", "POINTS_METRICS_ADDR", REDIS_URL=redis_url)
    method = "/stationthis.points.v1.PointsService/GetAccount"
    name = "rpc_server_call_duration_seconds_count"
    before = await scrape(url)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await until_serving(channel)
        stub = points_service_pb2_grpc.PointsServiceStub(channel)
        for _ in range(3):
            await stub.GetAccount(points_service_pb2.GetAccountRequest(user_id="metrics"), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GetAccount(points_service_pb2.GetAccountRequest(user_id="no spaces allowed"), timeout=10)
    after = await scrape(url)
    assert samples(before, name, rpc_method=method) == 0
    assert samples(after, name, rpc_method=method, rpc_grpc_status_code="OK") == 3
    assert samples(after, name, rpc_method=method, rpc_grpc_status_code="INVALID_ARGUMENT") == 1
    assert samples(after, "rpc_server_call_duration_seconds_bucket", rpc_method=method, le="+Inf") == 4


async def test_workflows_metrics_show_catalog_and_upstream_calls(redis_url: str, emulator, process) -> None:  # type: ignore[no-untyped-def]
    port, url = await process(
        "services.workflows",
        "WORKFLOWS_LISTEN_ADDR",
        "WORKFLOWS_METRICS_ADDR",
        REDIS_URL=redis_url,
        COMFYDEPLOY_API_URL=emulator.base_url,
        COMFYDEPLOY_API_KEY=emulator.api_key,
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = workflows_service_pb2_grpc.WorkflowsServiceStub(channel)
        for _ in range(200):  # until the warm-up has loaded the catalog
            try:
                await stub.ResolveWorkflow(workflows_service_pb2.ResolveWorkflowRequest(name="make"), timeout=10)
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.1)
        for _ in range(5):
            await stub.ListWorkflows(workflows_service_pb2.ListWorkflowsRequest(), timeout=10)
    text = await scrape(url)
    assert samples(text, "catalog_lookups_total", result="hit") >= 5
    assert samples(text, "catalog_refreshes_total", outcome="success") >= 1
    assert samples(text, "catalog_refresh_duration_seconds_count") >= 1
    assert samples(text, "comfydeploy_client_calls_total", endpoint="GET /deployments", outcome="ok") >= 2
    assert samples(text, "comfydeploy_client_duration_seconds_count", endpoint="GET /machines") >= 1
    assert "comfydeploy_client_breaker_state" in text
    method = "/stationthis.workflows.v1.WorkflowsService/ListWorkflows"
    assert samples(text, "rpc_server_call_duration_seconds_count", rpc_method=method, rpc_grpc_status_code="OK") == 5
