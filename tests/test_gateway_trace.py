"""One trace, every hop: a CreateRun through HTTP is one trace across the gateway, the comfyui service,
the workflows and points services, Redis and the ComfyUI Deploy call, with the right parents; its id
comes back in a response header and is in the log lines of every process that worked on it.

The whole system runs in-process (tests.runs_helpers.start_system, with the emulator); spans go to
an in-memory exporter.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from common.logs import JsonFormatter, Redactor
from tests.conftest import StartService
from tests.runs_helpers import System, open_system
from tests.test_gateway import KEYS
from tests.test_gateway import exported_spans as exported_spans  # the fixture

COMFYUI = "/stationthis.comfyui.v1.ComfyUIService"
WORKFLOWS = "/stationthis.workflows.v1.WorkflowsService"
POINTS = "/stationthis.points.v1.PointsService"


@pytest.fixture
async def system(redis_url: str, start_service: StartService, emulator: Any) -> AsyncIterator[System]:
    async with open_system(redis_url, start_service, emulator) as running:
        yield running


@pytest.fixture
def json_lines() -> Any:
    """Every log line of every in-process service, formatted as the processes write them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("test", Redactor(KEYS)))
    root = logging.getLogger()
    root.addHandler(handler)
    levels = {name: logging.getLogger(name).level for name in ("stationthis.rpc", "stationthis.gateway")}
    logging.getLogger("stationthis.rpc").setLevel(logging.DEBUG)  # OK calls are logged at DEBUG
    logging.getLogger("stationthis.gateway").setLevel(logging.INFO)
    old = root.level
    root.setLevel(logging.DEBUG)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
    root.removeHandler(handler)
    root.setLevel(old)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


async def test_create_run_over_http_is_one_trace_through_every_hop(
    system: System,
    exported_spans: InMemorySpanExporter,
    json_lines: Any,
) -> None:
    assert system.gateway is not None
    body = {"user_id": "alice", "workflow_name": "text2img", "inputs": {"input_prompt": "a cat astronaut"}}
    response = await system.gateway.post("/v1/runs", json.dumps(body), headers={"Idempotency-Key": "trace-run-1"})
    assert response.status_code == 200, response.text
    trace_id = response.headers["x-trace-id"]
    assert len(trace_id) == 32 and response.headers["traceresponse"].split("-")[1] == trace_id
    run_id = response.json()["run"]["run_id"]

    def ours() -> dict[int, ReadableSpan]:
        return {
            s.context.span_id: s
            for s in exported_spans.get_finished_spans()
            if format(s.context.trace_id, "032x") == trace_id
        }

    def named(spans: dict[int, ReadableSpan], name: str, kind: SpanKind) -> list[ReadableSpan]:
        return [s for s in spans.values() if s.name == name and s.kind == kind]

    def queued(spans: dict[int, ReadableSpan]) -> list[ReadableSpan]:
        return [
            s
            for s in spans.values()
            if s.kind == SpanKind.CLIENT
            and s.attributes
            and "run/deployment/queue" in str(s.attributes.get("url.full") or s.attributes.get("http.url"))
        ]

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while not (named(ours(), "POST /v1/runs", SpanKind.SERVER) and queued(ours())):
        assert loop.time() < deadline, sorted(s.name for s in ours().values())
        await asyncio.sleep(0.05)
    spans = ours()

    def parent(span: ReadableSpan) -> ReadableSpan:
        assert span.parent is not None, span.name
        return spans[span.parent.span_id]

    [http] = named(spans, "POST /v1/runs", SpanKind.SERVER)
    # The test's own HTTP client is instrumented (telemetry.setup): the gateway continues its trace.
    assert http.parent is None or http.parent.is_remote
    assert http.attributes is not None and http.attributes["stationthis.adapter"] == "default"
    [create] = named(spans, f"{COMFYUI}/CreateRun", SpanKind.SERVER)
    assert parent(create) is http
    # comfyui -> workflows: a client span in comfyui, the server span in workflows below it.
    for method in (f"{WORKFLOWS}/ResolveWorkflow", f"{WORKFLOWS}/ValidateInputs", f"{POINTS}/ReserveHold"):
        [client] = named(spans, method, SpanKind.CLIENT)
        [server] = named(spans, method, SpanKind.SERVER)
        assert parent(client) is create, method
        assert parent(server) is client, method
    # points -> Redis: the ledger's one span per script call, below ReserveHold's server span.
    [reserve] = named(spans, f"{POINTS}/ReserveHold", SpanKind.SERVER)
    ledger = [s for s in spans.values() if s.parent and s.parent.span_id == reserve.context.span_id]
    assert ledger and all(s.attributes and s.attributes.get("db.system") == "redis" for s in ledger), ledger
    # The ComfyUI Deploy call (httpx), in the same trace, below CreateRun.
    [queue] = queued(spans)
    ancestor = queue
    while ancestor is not create and ancestor.parent is not None and ancestor.parent.span_id in spans:
        ancestor = parent(ancestor)
    assert ancestor is create, [s.name for s in spans.values()]

    # The trace id is in every log line written for the request, in every process.
    lines = [line for line in json_lines() if line.get("trace_id") == trace_id]
    loggers = {line["logger"] for line in lines}
    assert "stationthis.gateway" in loggers and "stationthis.rpc" in loggers, loggers
    rpcs = {line.get("rpc") for line in lines}
    assert {f"{COMFYUI}/CreateRun", f"{WORKFLOWS}/ResolveWorkflow", f"{POINTS}/ReserveHold"} <= rpcs, rpcs
    for line in json_lines():
        if line.get("rpc") in (f"{COMFYUI}/CreateRun",) or line.get("request_id") == response.headers["x-request-id"]:
            assert line.get("trace_id") == trace_id, line
    assert run_id
