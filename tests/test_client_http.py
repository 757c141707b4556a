"""The typed client library over the HTTP gateway (stationthis_client.HttpClient), against the whole
running system: the real gateway (uvicorn) in front of the real services, Redis and the emulator.

The same main cases as over gRPC (tests/test_client.py): a generation streamed as Server-Sent Events
to its end, typed errors decoded from the gateway's error JSON, a call retried through a service
restart, a cut event stream resumed after its last event, one request_id across retries, and a
429 retried after its Retry-After.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from stationthis.comfyui.v1 import comfyui_service_pb2 as svc
from stationthis.comfyui.v1 import run_pb2 as R
from stationthis.points.v1 import points_pb2 as pt
from stationthis_client import (
    AlreadyExists,
    Endpoints,
    HttpClient,
    InsufficientPoints,
    InvalidInputs,
    NotFound,
    RateLimited,
    Unauthenticated,
)
from tests.conftest import StartService
from tests.runs_helpers import KEYS, System, ensure_points, open_system, start_system
from tests.test_client import (
    PROMPT,
    WAITING,
    RetryLog,
    assert_succeeded,
    check_stream,
    endpoints_of,
    replacing_comfyui,
)
from tests.test_client import retry_log as retry_log  # the fixture
from tests.test_gateway import gateway_env, serve_gateway


def http_client(endpoints: Endpoints, **options: Any) -> HttpClient:
    return HttpClient(endpoints, timeout=20, trust_env=False, **options)


@pytest.fixture
async def system(redis_url: str, start_service: StartService, emulator: Any) -> AsyncIterator[System]:
    async for running in start_system(redis_url, start_service, emulator):
        yield running


@pytest.fixture
async def client(system: System) -> AsyncIterator[HttpClient]:
    async with http_client(endpoints_of(system)) as made:
        yield made


async def test_generate_over_server_sent_events_to_success_with_outputs_and_receipt(
    system: System, client: HttpClient
) -> None:
    await ensure_points(system, "alice")
    generation = await client.generate("alice", "/make", PROMPT)
    assert generation.run.status == R.RUN_STATUS_SUBMITTING
    events = [event async for event in generation]
    reported = check_stream(events)
    assert {e.run.status for e in events} & set(WAITING)
    assert [e for e in events if e.event_type == svc.RUN_EVENT_TYPE_PROGRESS and e.run.progress > 0]
    assert_succeeded(generation.run, reported)
    assert generation.resumes == 0 and await generation.wait() == generation.run
    # The same run as the services have it (the JSON parsed into the same messages).
    assert await client.run(generation.run_id) == generation.run == await system.get(generation.run_id)
    assert [r.run_id for r in await client.runs("alice")] == [generation.run_id]
    entries = [t for t in await client.history("alice") if t.run_id == generation.run_id]
    assert pt.TRANSACTION_KIND_HOLD_CAPTURED in {t.kind for t in entries}


async def test_the_other_methods_over_http(system: System, client: HttpClient, tmp_path: Path) -> None:
    names = [w.name for w in await client.workflows()]
    assert "text2img" in names and names == sorted(names)
    assert (await client.workflow("/make")).name == "text2img"
    credited = await client.credit("bob", 500, "payment-http-1")
    assert credited.account.qoints == 500 and (await client.account("bob")).qoints == 500
    with pytest.raises(AlreadyExists) as again:
        await client.credit("bob", 500, "payment-http-1")
    assert again.value.reason == "DUPLICATE_EXTERNAL_REFERENCE"
    quote = await client.quote("bob", "text2img")
    assert quote.cost_points > 0 and quote.affordable
    first = await (await client.generate("bob", "text2img", PROMPT)).wait()
    regenerated = await client.regenerate(first.run_id, overrides={"input_prompt": "a dog"})
    assert regenerated.regenerated_from == first.run_id and regenerated.inputs["input_prompt"] == "a dog"
    cancelled = await client.cancel(regenerated.run_id)
    assert cancelled.run_id == regenerated.run_id
    picture = tmp_path / "cat.png"
    picture.write_bytes(os.urandom(700_000))  # POST /v1/uploads, streamed
    uploaded = await client.upload(picture, user="bob")
    assert uploaded.size_bytes == 700_000 and uploaded.content_type == "image/png" and uploaded.url


async def test_no_points_is_insufficient_points_over_http(
    redis_url: str, start_service: StartService, emulator: Any
) -> None:
    async with open_system(redis_url, start_service, emulator, points_env={"POINTS_TOKEN_OFFSET": "1"}) as system:
        async with http_client(endpoints_of(system)) as client:
            with pytest.raises(InsufficientPoints) as raised:
                await client.create("alice", "/make", PROMPT)
            error = raised.value
            assert (error.code, error.domain) == ("FAILED_PRECONDITION", "points.stationthis.dev")
            assert error.needed == (await client.quote("alice", "/make")).cost_points > 0 and error.available == 0
            assert str(error) == f"not enough points: {error.needed} needed"
            assert await client.runs("alice") == []


async def test_errors_over_http_are_the_same_typed_errors(system: System, client: HttpClient) -> None:
    await ensure_points(system, "alice")
    with pytest.raises(InvalidInputs) as raised:
        await client.create("alice", "/make", {"input_prompt": "a cat", "input_bogus": 1, "input_steps": "many"})
    assert raised.value.reason == "INVALID_INPUTS" and raised.value.domain == "workflows.stationthis.dev"
    assert {v.field for v in raised.value.violations} == {"inputs.input_bogus", "inputs.input_steps"}
    unknown = str(uuid.uuid4())
    with pytest.raises(NotFound) as missing:
        await client.run(unknown)
    assert (missing.value.reason, missing.value.metadata["run_id"]) == ("RUN_NOT_FOUND", unknown)
    watch = client.watch(unknown)
    with pytest.raises(NotFound):  # the SSE stream's error event, not a cut to resume
        await watch.__anext__()
    assert watch.resumes == 0
    wrong = dataclasses.replace(endpoints_of(system), api_key="not-a-key")
    async with http_client(wrong) as stranger:
        with pytest.raises(Unauthenticated) as refused:
            await stranger.account("alice")
    assert refused.value.reason == "API_KEY_INVALID" and str(refused.value) == "missing or invalid API key"


async def test_a_call_during_a_restart_is_retried_through_the_gateway(
    system: System, client: HttpClient, redis_url: str, start_service: StartService, retry_log: RetryLog
) -> None:
    await ensure_points(system, "alice")
    async with replacing_comfyui(system, redis_url, start_service) as replica:
        await replica.stop()
        creating = asyncio.create_task(client.create("alice", "/make", PROMPT))
        line = await retry_log.wait("retrying")  # the gateway answered 503
        assert line.startswith("POST /v1/runs: the comfyui service is not available; retry"), line  # not gRPC's text
        await replica.start()
        run = await creating
        assert run.status == R.RUN_STATUS_SUBMITTING
        assert [r.run_id for r in await client.runs("alice")] == [run.run_id]


async def test_an_event_stream_cut_mid_run_resumes_after_the_last_event(
    redis_url: str, start_service: StartService, retry_log: RetryLog
) -> None:
    from emulator.testing import start_for_tests

    slow = await start_for_tests(step_seconds=0.1)
    try:
        async with open_system(redis_url, start_service, slow) as system:
            await ensure_points(system, "alice")
            async with (
                http_client(endpoints_of(system)) as client,
                replacing_comfyui(system, redis_url, start_service) as replica,
            ):
                generation = await client.generate("alice", "/make", PROMPT)
                events: list[svc.WatchRunResponse] = []
                cut_at = None
                async for event in generation:
                    events.append(event)
                    if cut_at is None and event.run.status == R.RUN_STATUS_RUNNING:
                        cut_at = len(events)
                        await replica.restart()  # the gateway's gRPC stream breaks: an SSE error event
                        await system.wait(event.run.run_id)  # the stream misses the rest of the run
                assert cut_at is not None and cut_at < len(events)
                assert generation.resumes >= 1 and await retry_log.wait("interrupted")
                reported = check_stream(events)
                assert [e.event_type for e in events].count(svc.RUN_EVENT_TYPE_SNAPSHOT) == 1  # after_event_id
                assert_succeeded(generation.run, reported)
    finally:
        await slow.close()


class LosingTransport(httpx.AsyncBaseTransport):
    """The real HTTP transport, except that the first ``POST /v1/runs`` loses its answer: the request
    reaches the gateway and the run is created, then the connection breaks before the reply is read."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.bodies: list[dict[str, Any]] = []
        self.authorization: list[str] = []
        self.lost: dict[str, Any] | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.authorization.append(request.headers.get("authorization", ""))
        if request.method != "POST" or request.url.path != "/v1/runs":
            return await self.inner.handle_async_request(request)
        self.bodies.append(json.loads(await request.aread()))
        response = await self.inner.handle_async_request(request)
        if self.lost is None:
            self.lost = json.loads(await response.aread())
            await response.aclose()
            raise httpx.ReadError("connection reset by peer", request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_create_whose_answer_was_lost_is_retried_with_the_same_request_id(system: System) -> None:
    await ensure_points(system, "alice")
    transport = LosingTransport()
    async with http_client(endpoints_of(system), transport=transport) as client:
        run = await client.create("alice", "/make", PROMPT)
        ids = [body["request_id"] for body in transport.bodies]
        assert len(ids) == 2 and ids[0] == ids[1] and uuid.UUID(ids[0]), ids
        assert transport.bodies[0] == transport.bodies[1]  # the same body on the retry
        assert transport.lost is not None and run.run_id == transport.lost["run"]["run_id"]
        assert [r.run_id for r in await client.runs("alice")] == [run.run_id]  # one run
    assert set(transport.authorization) == {f"Bearer {KEYS[0]}"}


async def test_a_rate_limited_call_waits_for_retry_after(system: System, retry_log: RetryLog) -> None:
    backends = {"points": system.points, "workflows": system.workflows, "comfyui": system.comfyui[0]}
    tight = gateway_env(backends, GATEWAY_MUTATION_RATE_LIMIT="1", GATEWAY_MUTATION_RATE_BURST="1")
    async with serve_gateway(tight) as gateway:
        endpoints = dataclasses.replace(endpoints_of(system), gateway_url=f"http://127.0.0.1:{gateway.port}")
        async with http_client(endpoints) as client, http_client(endpoints, retry_window=0) as impatient:
            await client.credit("dave", 10, "rate-1")
            await client.credit("dave", 10, "rate-2")  # over the budget: 429, Retry-After: 1, then through
            assert "rate limit" in await retry_log.wait("retrying")
            assert (await client.account("dave")).qoints == 20
            with pytest.raises(RateLimited) as raised:
                await impatient.credit("dave", 10, "rate-3")
            assert raised.value.reason == "RATE_LIMITED" and raised.value.retry_after == 1.0
            assert (await client.account("dave")).qoints == 20
