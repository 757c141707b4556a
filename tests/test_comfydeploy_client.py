"""The ComfyUI Deploy client against the emulator over real HTTP, plus its parsers and error mapping.

Faults come from the emulator's /_emulator/faults (deterministic ``next_errors`` where counts matter)
and attempts are counted by the emulator's /_emulator/stats, so what is asserted is what went over
the wire.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from comfydeploy import (
    BreakerState,
    ComfyDeployClient,
    DeadlineExceeded,
    Deployment,
    InsufficientCredits,
    NotFound,
    OutcomeUnknown,
    RateLimited,
    Run,
    ServerError,
    Unauthorized,
    UpstreamUnavailable,
    ValidationFailed,
    to_domain_error,
)
from comfydeploy import errors as cd_errors
from comfydeploy.models import DeploymentRun, parse_datetime
from common import errors as domain
from devtools.redis_server import free_port
from emulator.testing import DEPLOYMENTS, MACHINES, WORKFLOWS, RunningEmulator

RUN_ROUTE = "GET /api/run/{run_id}"
QUEUE_ROUTE = "POST /api/run/deployment/queue"
MISSING_RUN = "00000000-0000-4000-8000-00000000dead"


class RecordingSleep:
    """Real asyncio sleeps, recorded, so tests can check the backoff the client chose."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await asyncio.sleep(seconds)


@pytest.fixture
async def make_client(emulator: RunningEmulator) -> AsyncIterator[Any]:
    made: list[ComfyDeployClient] = []

    def make(**kwargs: Any) -> ComfyDeployClient:
        kwargs.setdefault("base_url", emulator.base_url)
        kwargs.setdefault("api_key", emulator.api_key)
        kwargs.setdefault("backoff_base", 0.01)
        kwargs.setdefault("backoff_cap", 0.05)
        client = ComfyDeployClient(**kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()


@pytest.fixture
async def client(make_client: Any) -> ComfyDeployClient:
    result: ComfyDeployClient = make_client()
    return result


async def route_count(emulator: RunningEmulator, route: str) -> int:
    return int((await emulator.stats())["routes"].get(route, 0))


async def existing_run(client: ComfyDeployClient) -> str:
    """A run that exists upstream (whatever its status)."""
    return (await client.queue_run(DEPLOYMENTS["text2img"], {"input_prompt": "a cat"})).run_id


# --------------------------------------------------------------------------- every method, happy path


async def test_queue_run_then_poll_to_success_with_media(emulator: RunningEmulator, client: ComfyDeployClient) -> None:
    queued = await client.queue_run(
        DEPLOYMENTS["text2img"], {"input_prompt": "a cat", "unknown_key": 1}, webhook=None, gpu="T4"
    )
    run = await client.get_run(queued.run_id, queue_position=True)
    assert run.id == queued.run_id and run.status in ("not-started", "queued", "started", "running", "success")
    async with asyncio.timeout(10):
        while not run.is_terminal:
            await asyncio.sleep(0.02)
            run = await client.get_run(queued.run_id)
    assert run.is_success and run.status == "success"
    assert run.workflow_inputs["input_prompt"] == "a cat"
    assert run.created_at is not None and run.created_at.tzinfo is not None
    assert run.ended_at is not None and run.ended_at >= run.created_at
    media = run.media()
    assert media and media[0].kind == "image" and media[0].url and media[0].url.endswith(".png")
    assert "modal_function_call_id" in run.extra  # unknown fields are kept, not dropped


async def test_cancel_run_cancels_a_running_run(emulator: RunningEmulator, client: ComfyDeployClient) -> None:
    await emulator.set_faults(next_run_outcomes=["stuck"])
    queued = await client.queue_run(DEPLOYMENTS["text2img"], {})
    await emulator.wait_run(queued.run_id, ("running",))
    assert await client.cancel_run(queued.run_id) == {"status": "success", "message": "Function cancelled"}
    assert (await client.get_run(queued.run_id)).status == "cancelled"
    assert (await client.cancel_run(queued.run_id))["status"] == "success"  # terminal: still 200


async def test_cancel_errors_are_500s_kept_as_server_errors_without_tripping_the_breaker(
    emulator: RunningEmulator, make_client: Any
) -> None:
    client = make_client(breaker_failure_threshold=2)
    for _ in range(3):
        with pytest.raises(ServerError) as raised:
            await client.cancel_run(MISSING_RUN)
        assert raised.value.status == 500 and raised.value.maybe_not_found
        assert "Run not found" in raised.value.detail
    assert await route_count(emulator, "POST /api/run/{run_id}/cancel") == 3  # 500 is not retried
    assert client.breaker_state is BreakerState.CLOSED  # a JSON 500 here is an answer, not an outage


async def test_upload_file(emulator: RunningEmulator, client: ComfyDeployClient) -> None:
    uploaded = await client.upload_file("cat.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "image/png")
    assert uploaded.file_id.startswith("img_") and uploaded.file_name == "cat.png"
    assert uploaded.file_url and uploaded.file_url.endswith(".png")
    with pytest.raises(ValidationFailed) as raised:
        await client.upload_file("notes.txt", b"hello", "text/plain")
    assert raised.value.status == 400


async def test_list_deployments_and_the_fluid_quirk(client: ComfyDeployClient) -> None:
    regular = {d.id for d in await client.list_deployments()}
    fluid = {d.id for d in await client.list_deployments(is_fluid=True)}
    merged = await client.list_all_deployments()
    assert DEPLOYMENTS["img2vid"] in fluid and DEPLOYMENTS["img2vid"] not in regular
    assert DEPLOYMENTS["text2img"] in regular and DEPLOYMENTS["other-tenant"] not in regular
    assert {d.id for d in merged} == regular | fluid and len(merged) == len(regular | fluid)
    stamps = [d.updated_at for d in merged if d.updated_at]
    assert stamps == sorted(stamps, reverse=True)
    staging = await client.list_all_deployments("staging")
    assert staging and all(d.environment == "staging" for d in staging)
    assert all(d.is_fluid for d in merged if d.id in fluid)


async def test_get_deployment_and_its_not_found_as_500(emulator: RunningEmulator, client: ComfyDeployClient) -> None:
    deployment = await client.get_deployment(DEPLOYMENTS["text2img"])
    assert deployment.id == DEPLOYMENTS["text2img"] and deployment.environment == "production"
    assert deployment.input_types and deployment.input_types[0].input_id
    assert deployment.workflow_id == WORKFLOWS["text2img"]
    with pytest.raises(ServerError) as raised:
        await client.get_deployment(MISSING_RUN)
    assert raised.value.status == 500 and raised.value.maybe_not_found
    assert "not-found as 500" in str(raised.value)
    assert isinstance(to_domain_error(raised.value), domain.Unavailable)  # not translated to NOT_FOUND


async def test_create_deployment_is_an_upsert(client: ComfyDeployClient) -> None:
    versions = await client.list_workflow_versions(WORKFLOWS["text2img"])
    first = await client.create_deployment(
        WORKFLOWS["text2img"], versions[-1].id, "private-share", machine_id=MACHINES["StationthisHun"]
    )
    again = await client.create_deployment(
        WORKFLOWS["text2img"], versions[0].id, "private-share", machine_id=MACHINES["StationthisHun"], description="x"
    )
    assert isinstance(first, Deployment) and first.environment == "private-share"
    assert again.id == first.id and again.workflow_version_id == versions[0].id and again.description == "x"
    with pytest.raises(ValidationFailed):
        await client.create_deployment(WORKFLOWS["text2img"], versions[0].id, "private-share")  # no machine: 400


async def test_machines(client: ComfyDeployClient) -> None:
    live = {m.id for m in await client.list_machines()}
    everything = {m.id for m in await client.list_machines(include_deleted=True)}
    assert MACHINES["deleted"] not in live and MACHINES["deleted"] in everything
    machine = await client.get_machine(MACHINES["StationthisHun"])
    assert machine.id == MACHINES["StationthisHun"] and machine.name and machine.type
    with pytest.raises(NotFound):
        await client.get_machine(MISSING_RUN)


async def test_workflows_and_versions(client: ComfyDeployClient) -> None:
    workflows = await client.list_workflows()
    assert WORKFLOWS["text2img"] in {w.id for w in workflows}
    workflow = await client.get_workflow(WORKFLOWS["text2img"])
    assert workflow.name and len(workflow.versions) == 1 and workflow.versions[0].workflow_api
    versions = await client.list_workflow_versions(WORKFLOWS["text2img"])
    assert [v.version for v in versions] == sorted((v.version for v in versions), reverse=True)
    version = await client.get_workflow_version(versions[0].id)
    assert version.id == versions[0].id and version.workflow_id == WORKFLOWS["text2img"]
    assert isinstance(version.workflow_api, dict) and version.workflow_api
    with pytest.raises(NotFound):
        await client.get_workflow(MISSING_RUN)


async def test_upload_workflow_sends_json_text(client: ComfyDeployClient) -> None:
    source = await client.get_workflow_version((await client.list_workflow_versions(WORKFLOWS["text2img"]))[0].id)
    assert source.workflow_api is not None
    uploaded = await client.upload_workflow("uploaded by test", source.workflow, source.workflow_api)
    workflow = await client.get_workflow(uploaded.workflow_id)
    assert workflow.name == "uploaded by test"
    assert workflow.versions[0].workflow_api == source.workflow_api


# --------------------------------------------------------------------------- upstream errors


async def test_upstream_errors_map_to_typed_errors(emulator: RunningEmulator, make_client: Any) -> None:
    client = make_client()
    with pytest.raises(NotFound) as not_found:
        await client.get_run(MISSING_RUN)
    assert isinstance(to_domain_error(not_found.value), domain.NotFound)
    with pytest.raises(ValidationFailed) as invalid:
        await client.get_run("not-a-uuid")
    assert invalid.value.status == 422 and invalid.value.errors and "run_id" in str(invalid.value)
    assert isinstance(to_domain_error(invalid.value), domain.InvalidArgument)
    with pytest.raises(NotFound):
        await client.queue_run(DEPLOYMENTS["other-tenant"], {})  # another tenant's deployment
    with pytest.raises(Unauthorized) as unauthorized:
        await make_client(api_key="wrong-key").get_run(MISSING_RUN)
    assert isinstance(to_domain_error(unauthorized.value), domain.PermissionDenied)
    with pytest.raises(ValueError):
        await client.get_run("")
    assert client.breaker_state is BreakerState.CLOSED


# --------------------------------------------------------------------------- retries


async def test_429_is_retried_after_retry_after(emulator: RunningEmulator, client: ComfyDeployClient) -> None:
    run_id = await existing_run(client)
    sleep = RecordingSleep()
    retrying = ComfyDeployClient(emulator.base_url, emulator.api_key, sleep=sleep, backoff_cap=0.05)
    try:
        await emulator.reset_stats()
        await emulator.set_faults(next_errors=[{"route": "run", "status": 429, "retry_after": 1}])
        started = time.monotonic()
        assert (await retrying.get_run(run_id)).id == run_id
        assert time.monotonic() - started >= 1.0
        assert sleep.waits == [1.0]  # the Retry-After, not a 0-50 ms jittered backoff
        assert await route_count(emulator, RUN_ROUTE) == 2
        assert retrying.snapshot()["endpoints"]["GET /run/{run_id}"] == {"calls": 1, "errors": 0, "retries": 1}
    finally:
        await retrying.aclose()


async def test_retry_after_longer_than_the_deadline_is_not_waited(
    emulator: RunningEmulator, client: ComfyDeployClient
) -> None:
    run_id = await existing_run(client)
    await emulator.set_faults(next_errors=[{"route": "run", "status": 429, "retry_after": 5}])
    started = time.monotonic()
    with pytest.raises(RateLimited) as raised:
        await client.get_run(run_id, deadline=time.monotonic() + 2)
    assert time.monotonic() - started < 1.0
    assert raised.value.retry_after == 5.0
    mapped = to_domain_error(raised.value)
    assert isinstance(mapped, domain.Unavailable) and mapped.metadata["retry_after_seconds"] == "5"


async def test_503_is_retried_with_full_jitter_backoff(emulator: RunningEmulator, client: ComfyDeployClient) -> None:
    run_id = await existing_run(client)
    sleep = RecordingSleep()
    retrying = ComfyDeployClient(emulator.base_url, emulator.api_key, sleep=sleep, backoff_base=0.02, backoff_cap=0.05)
    try:
        await emulator.reset_stats()
        await emulator.set_faults(next_errors=[{"route": "run", "status": 503}] * 3)
        assert (await retrying.get_run(run_id)).id == run_id
        assert await route_count(emulator, RUN_ROUTE) == 4
        assert len(sleep.waits) == 3
        for retry, wait in enumerate(sleep.waits):
            assert 0.0 <= wait <= min(0.05, 0.02 * 2**retry)

        fresh = ComfyDeployClient(emulator.base_url, emulator.api_key, backoff_base=0.01)  # a full retry budget
        await emulator.reset_stats()
        await emulator.set_faults(next_errors=[{"route": "run", "status": 503}] * 4)
        with pytest.raises(ServerError) as raised:
            await fresh.get_run(run_id)
        await fresh.aclose()
        assert raised.value.status == 503 and raised.value.attempts == 4 and raised.value.retryable
        assert "after 4 attempts" in str(raised.value)
        assert await route_count(emulator, RUN_ROUTE) == 4  # max_attempts, no more
    finally:
        await retrying.aclose()


async def test_502_504_and_dropped_connections_are_retried_for_safe_calls(
    emulator: RunningEmulator, client: ComfyDeployClient
) -> None:
    run_id = await existing_run(client)
    await emulator.reset_stats()
    await emulator.set_faults(
        next_errors=[
            {"route": "run", "status": 502},
            {"route": "run", "action": "drop"},
            {"route": "run", "status": 504},
        ]
    )
    assert (await client.get_run(run_id)).id == run_id
    assert await route_count(emulator, RUN_ROUTE) == 4
    retries = client.snapshot()["endpoints"]["GET /run/{run_id}"]["retries"]
    assert retries == 3


async def test_500_is_not_retried(emulator: RunningEmulator, client: ComfyDeployClient) -> None:
    run_id = await existing_run(client)
    await emulator.reset_stats()
    await emulator.set_faults(next_errors=[{"route": "run", "status": 500}])
    with pytest.raises(ServerError) as raised:
        await client.get_run(run_id)
    assert raised.value.status == 500 and not raised.value.retryable and "Internal Server Error" in raised.value.detail
    assert await route_count(emulator, RUN_ROUTE) == 1


async def test_retry_budget_stops_a_retry_storm(emulator: RunningEmulator, make_client: Any) -> None:
    client = make_client(breaker_failure_threshold=1000, rate_limit_per_second=None)
    await emulator.set_faults(error_rates={"run": {"503": 1.0}})
    results = await asyncio.gather(*(client.get_run(MISSING_RUN) for _ in range(40)), return_exceptions=True)
    assert all(isinstance(r, ServerError) and r.status == 503 for r in results)
    retries = client.snapshot()["endpoints"]["GET /run/{run_id}"]["retries"]
    assert retries <= 5 + 40 * 0.2 + 2  # without the budget: 40 x 3 = 120
    assert await route_count(emulator, RUN_ROUTE) == 40 + retries


# --------------------------------------------------------------------------- circuit breaker


async def test_breaker_opens_after_repeated_500s_and_closes_after_reset(
    emulator: RunningEmulator, make_client: Any
) -> None:
    client = make_client(breaker_failure_threshold=3, breaker_reset_seconds=0.3)
    run_id = await existing_run(client)
    await emulator.reset_stats()
    await emulator.set_faults(next_errors=[{"route": "run", "status": 500}] * 3)
    for _ in range(3):
        with pytest.raises(ServerError):
            await client.get_run(run_id)
    assert client.breaker_state is BreakerState.OPEN
    with pytest.raises(UpstreamUnavailable) as raised:
        await client.get_run(run_id)  # fails fast: no request sent
    assert "circuit breaker open" in raised.value.detail
    assert isinstance(to_domain_error(raised.value), domain.Unavailable)
    assert await route_count(emulator, RUN_ROUTE) == 3
    assert client.snapshot()["breaker_state"] == "open"

    await asyncio.sleep(0.3)
    assert client.breaker_state is BreakerState.HALF_OPEN
    await emulator.set_faults(next_errors=[{"route": "run", "status": 500}])
    with pytest.raises(ServerError):
        await client.get_run(run_id)  # the trial fails: open again
    assert client.breaker_state is BreakerState.OPEN

    await asyncio.sleep(0.3)
    assert (await client.get_run(run_id)).id == run_id  # the trial succeeds: closed
    assert client.breaker_state is BreakerState.CLOSED
    assert await route_count(emulator, RUN_ROUTE) == 5


async def test_4xx_do_not_open_the_breaker(make_client: Any) -> None:
    client = make_client(breaker_failure_threshold=2)
    for _ in range(4):
        with pytest.raises(NotFound):
            await client.get_run(MISSING_RUN)
    assert client.breaker_state is BreakerState.CLOSED


# --------------------------------------------------------------------------- queue_run: outcome unknown


async def test_lost_queue_response_raises_outcome_unknown_and_the_run_exists(
    emulator: RunningEmulator, client: ComfyDeployClient
) -> None:
    await emulator.set_faults(lose_queue_response=1.0)
    with pytest.raises(OutcomeUnknown) as raised:
        await client.queue_run(DEPLOYMENTS["text2img"], {"input_prompt": "lost answer"})
    assert not raised.value.retryable
    mapped = to_domain_error(raised.value)
    assert isinstance(mapped, domain.Unavailable) and mapped.reason == "SUBMIT_OUTCOME_UNKNOWN"
    assert await route_count(emulator, QUEUE_ROUTE) == 1  # never re-sent
    runs = [r for r in await emulator.runs() if r["deployment_id"] == DEPLOYMENTS["text2img"]]
    assert len(runs) == 1 and runs[0]["workflow_inputs"]["input_prompt"] == "lost answer"  # reconcile finds it

    await emulator.set_faults(lose_queue_response=1.0, lose_queue_response_status=502)
    with pytest.raises(OutcomeUnknown) as raised:
        await client.queue_run(DEPLOYMENTS["text2img"], {})
    assert raised.value.status == 502
    assert await route_count(emulator, QUEUE_ROUTE) == 2


async def test_queue_run_is_not_retried_on_503(emulator: RunningEmulator, client: ComfyDeployClient) -> None:
    await emulator.set_faults(next_errors=[{"route": "queue", "status": 503}])
    with pytest.raises(OutcomeUnknown) as raised:
        await client.queue_run(DEPLOYMENTS["text2img"], {})
    assert raised.value.status == 503
    assert await route_count(emulator, QUEUE_ROUTE) == 1


async def test_queue_run_is_retried_on_429(emulator: RunningEmulator, client: ComfyDeployClient) -> None:
    await emulator.set_faults(next_errors=[{"route": "queue", "status": 429, "retry_after": 0}])
    queued = await client.queue_run(DEPLOYMENTS["text2img"], {})
    assert await route_count(emulator, QUEUE_ROUTE) == 2
    assert [r["id"] for r in await emulator.runs()] == [queued.run_id]  # exactly one run


async def test_upload_workflow_is_not_re_sent_after_a_dropped_connection(
    emulator: RunningEmulator, client: ComfyDeployClient
) -> None:
    await emulator.set_faults(next_errors=[{"route": "workflows", "action": "drop"}])
    with pytest.raises(OutcomeUnknown):
        await client.upload_workflow("dropped", {"nodes": []}, {"1": {"class_type": "X", "inputs": {}}})
    assert await route_count(emulator, "POST /api/workflow") == 1


def closed_port() -> int:
    return free_port()  # free now, and nothing will listen there


async def test_refused_connection_is_retried_even_for_queue_run_then_unavailable() -> None:
    sleep = RecordingSleep()
    client = ComfyDeployClient(
        f"http://127.0.0.1:{closed_port()}/api", "key-for-a-closed-port", sleep=sleep, backoff_base=0.01
    )
    try:
        with pytest.raises(UpstreamUnavailable) as raised:
            await client.queue_run(DEPLOYMENTS["text2img"], {})
        assert raised.value.attempts == 4 and raised.value.retryable and raised.value.status is None
        assert len(sleep.waits) == 3
        assert client.snapshot()["endpoints"]["POST /run/deployment/queue"]["retries"] == 3
        assert isinstance(to_domain_error(raised.value), domain.Unavailable)
        assert client.breaker.consecutive_failures == 4  # connection errors count against the breaker
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- deadlines


async def test_deadline_bounds_a_slow_call(emulator: RunningEmulator, client: ComfyDeployClient) -> None:
    run_id = await existing_run(client)
    await emulator.set_faults(latency_ms=1500)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded) as raised:
        await client.get_run(run_id, deadline=time.monotonic() + 0.2)
    assert 0.15 <= time.monotonic() - started < 1.2  # not the 1.5 s the upstream takes
    assert isinstance(to_domain_error(raised.value), domain.DeadlineExceeded)
    assert client.breaker.consecutive_failures == 0  # our deadline is not the upstream's failure


async def test_deadline_on_a_sent_queue_run_is_outcome_unknown(
    emulator: RunningEmulator, client: ComfyDeployClient
) -> None:
    await emulator.set_faults(latency_ms=500)
    with pytest.raises(OutcomeUnknown):
        await client.queue_run(DEPLOYMENTS["text2img"], {}, deadline=time.monotonic() + 0.2)


async def test_passed_deadline_sends_nothing(emulator: RunningEmulator, client: ComfyDeployClient) -> None:
    await emulator.reset_stats()
    with pytest.raises(DeadlineExceeded):
        await client.queue_run(DEPLOYMENTS["text2img"], {}, deadline=time.monotonic() - 1)
    assert (await emulator.stats())["total"] == 0


async def test_no_retry_starts_after_the_deadline(emulator: RunningEmulator, make_client: Any) -> None:
    client = make_client(backoff_base=2.0, backoff_cap=2.0, random=lambda: 0.9)
    run_id = await existing_run(client)
    await emulator.reset_stats()
    await emulator.set_faults(next_errors=[{"route": "run", "status": 503}] * 4)
    started = time.monotonic()
    with pytest.raises(ServerError):
        await client.get_run(run_id, deadline=time.monotonic() + 1.0)  # the 1.8 s backoff would pass it
    assert time.monotonic() - started < 0.9
    assert await route_count(emulator, RUN_ROUTE) == 1


async def test_rate_limiter_paces_calls_and_respects_the_deadline(make_client: Any) -> None:
    client = make_client(rate_limit_per_second=10.0)
    started = time.monotonic()
    results = await asyncio.gather(*(client.get_run(MISSING_RUN) for _ in range(15)), return_exceptions=True)
    assert all(isinstance(r, NotFound) for r in results)
    assert time.monotonic() - started >= 0.45  # burst of 10, then 5 more at 10/s
    for _ in range(10):
        client.rate_limiter.reserve()
    with pytest.raises(DeadlineExceeded) as raised:
        await client.get_run(MISSING_RUN, deadline=time.monotonic() + 0.1)
    assert "rate limit" in raised.value.detail


# --------------------------------------------------------------------------- secrets, metrics


async def test_the_api_key_never_reaches_logs_or_errors(
    emulator: RunningEmulator, make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = make_client()
    run_id = await existing_run(client)
    texts = [repr(client), str(client)]
    await emulator.set_faults(
        next_errors=[
            {"route": "run", "status": 429, "retry_after": 0},
            {"route": "run", "status": 503},
            {"route": "run", "action": "drop"},
        ]
    )
    await client.get_run(run_id)
    await emulator.set_faults(next_errors=[{"route": "queue", "status": 503}])
    calls = [
        client.get_run(MISSING_RUN),
        client.get_run("bad id"),
        client.get_deployment(MISSING_RUN),
        client.queue_run(DEPLOYMENTS["text2img"], {}),
        make_client(api_key="another-secret-key-123").get_run(run_id),
        make_client(base_url=f"http://127.0.0.1:{closed_port()}/api").get_run(run_id),
    ]
    for call in calls:
        try:
            await call
        except Exception as exc:
            texts += [str(exc), repr(exc), str(getattr(exc, "__cause__", ""))]
            if isinstance(exc, cd_errors.ComfyDeployError):
                texts.append(to_domain_error(exc).message)
    texts += [caplog.text] + [record.getMessage() for record in caplog.records]
    assert any("retrying GET /run/{run_id}" in record.getMessage() for record in caplog.records)
    assert any(record.levelno == logging.DEBUG and "attempt" in record.getMessage() for record in caplog.records)
    for secret in (emulator.api_key, "another-secret-key-123"):
        assert not [text for text in texts if secret in text]


async def test_metrics_are_recorded(emulator: RunningEmulator, make_client: Any) -> None:
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    client = make_client(meter=meter)
    run_id = await existing_run(client)
    await emulator.set_faults(next_errors=[{"route": "run", "status": 503}])
    await client.get_run(run_id)
    with pytest.raises(NotFound):
        await client.get_run(MISSING_RUN)
    data = reader.get_metrics_data()
    assert data is not None
    points: dict[str, list[Any]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points[metric.name] = list(metric.data.data_points)
    calls = {(p.attributes["endpoint"], p.attributes["outcome"]): p.value for p in points["comfydeploy.client.calls"]}
    assert calls[("GET /run/{run_id}", "ok")] == 1 and calls[("GET /run/{run_id}", "not_found")] == 1
    assert calls[("POST /run/deployment/queue", "ok")] == 1
    retries = {
        (p.attributes["endpoint"], p.attributes["reason"]): p.value for p in points["comfydeploy.client.retries"]
    }
    assert retries == {("GET /run/{run_id}", "status_503"): 1}
    assert any(p.attributes["endpoint"] == "GET /run/{run_id}" for p in points["comfydeploy.client.duration"])
    gauge = [p for p in points["comfydeploy.client.breaker_state"] if p.attributes["upstream"] == client.base_url]
    assert gauge and gauge[0].value == 0


# --------------------------------------------------------------------------- parsers and mapping (no HTTP)


def test_datetimes_are_parsed_leniently() -> None:
    utc = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert parse_datetime("2025-01-02T03:04:05Z") == utc
    assert parse_datetime("2025-01-02T03:04:05.000000Z") == utc
    assert parse_datetime("2025-01-02T03:04:05") == utc  # naive = UTC
    assert parse_datetime("2025-01-02 03:04:05") == utc
    assert parse_datetime("2025-01-02T05:04:05+02:00") == utc
    assert parse_datetime("2025-01-02T05:04:05+02:00").tzinfo == timezone(timedelta(hours=2))  # type: ignore[union-attr]
    assert parse_datetime(utc.timestamp()) == utc
    for junk in (None, "", "yesterday", True, [], {}):
        assert parse_datetime(junk) is None


def test_run_parser_is_lenient() -> None:
    run = Run.from_json(
        {
            "id": "r1",
            "status": "some-future-status",
            "progress": "0.5",
            "created_at": "not a date",
            "outputs": [
                None,
                "junk",
                {
                    "data": {
                        "images": [{"url": "https://x/a.png", "filename": "a.png", "type": "output"}, True],
                        "gifs": [{"url": "https://x/v.mp4", "filename": "v.mp4", "format": "video/h264-mp4"}],
                        "files": [{"url": "https://x/s.wav", "filename": "s.wav"}, {"url": "https://x/m.bin"}],
                        "audio": [{"url": "https://x/t.flac", "filename": "t.flac"}],
                        "text": ["hello"],
                        "gifs_legacy": "https://x/anim.gif",
                    },
                    "node_meta": {"node_id": "9", "node_class": "SaveImage"},
                    "brand_new": 1,
                },
            ],
            "queue_position": 3.0,
            "whatever": {"nested": True},
        }
    )
    assert run.status == "some-future-status" and not run.is_terminal
    assert run.progress == 0.5 and run.created_at is None and run.queue_position == 3
    assert run.extra == {"whatever": {"nested": True}}
    assert len(run.outputs) == 1 and run.outputs[0].extra == {"brand_new": 1} and run.outputs[0].node_id == "9"
    kinds = [(m.kind, m.url or m.text) for m in run.media()]
    assert kinds == [
        ("image", "https://x/a.png"),
        ("video", "https://x/v.mp4"),
        ("audio", "https://x/s.wav"),
        ("file", "https://x/m.bin"),
        ("audio", "https://x/t.flac"),
        ("text", "hello"),
        ("gif", "https://x/anim.gif"),
    ]
    assert Run.from_json({"id": "r2", "status": "cancelled"}).is_terminal
    with pytest.raises(ValueError):
        Run.from_json({"status": "success"})
    with pytest.raises(ValueError):
        Run.from_json(["not", "an", "object"])


def test_deployment_parser_keeps_unknown_fields_and_reads_nested_ones() -> None:
    deployment = Deployment.from_json(
        {
            "id": "d1",
            "workflow": {"id": "w", "name": "text2img"},
            "machine": {"id": "m", "name": "gpu box"},
            "input_types": [{"input_id": "a", "enum_options": '["x", "y"]'}, {"no_id": 1}, "junk"],
            "version": {"id": "v", "version": 3, "workflow_api": '{"1": {"class_type": "X"}}'},
            "modal_image_id": "im-1",
            "surprise": [1, 2],
        }
    )
    assert deployment.workflow_name == "text2img" and deployment.machine_name == "gpu box"
    assert [i.input_id for i in deployment.input_types] == ["a"]
    assert deployment.input_types[0].enum_options == ("x", "y")
    assert deployment.version is not None and deployment.version.workflow_api == {"1": {"class_type": "X"}}
    assert deployment.is_fluid and deployment.extra == {"surprise": [1, 2]}


@pytest.mark.parametrize(
    ("error", "expected", "reason"),
    [
        (cd_errors.NotFound(404, "Run not found", False, "GET /run/{run_id}"), domain.NotFound, "UPSTREAM_NOT_FOUND"),
        (
            InsufficientCredits(403, "Insufficient GPU credits", False, "POST /run/deployment/queue"),
            domain.FailedPrecondition,
            "UPSTREAM_INSUFFICIENT_CREDITS",
        ),
        (cd_errors.Forbidden(403, "suspended", False, "e"), domain.PermissionDenied, "UPSTREAM_FORBIDDEN"),
        (cd_errors.Unauthorized(401, "Revoked token", False, "e"), domain.PermissionDenied, "UPSTREAM_UNAUTHORIZED"),
        (cd_errors.ValidationFailed(422, "bad", False, "e"), domain.InvalidArgument, "UPSTREAM_INVALID_ARGUMENT"),
        (cd_errors.RateLimited(429, "slow down", True, "e"), domain.Unavailable, "UPSTREAM_RATE_LIMITED"),
        (cd_errors.ServerError(503, "down", True, "e"), domain.Unavailable, "UPSTREAM_ERROR"),
        (cd_errors.UpstreamUnavailable(None, "refused", True, "e"), domain.Unavailable, "UPSTREAM_UNAVAILABLE"),
        (cd_errors.OutcomeUnknown(None, "lost", False, "e"), domain.Unavailable, "SUBMIT_OUTCOME_UNKNOWN"),
        (cd_errors.DeadlineExceeded(None, "late", False, "e"), domain.DeadlineExceeded, "UPSTREAM_DEADLINE_EXCEEDED"),
    ],
)
def test_to_domain_error(error: cd_errors.ComfyDeployError, expected: type, reason: str) -> None:
    mapped = to_domain_error(error)
    assert type(mapped) is expected and mapped.reason == reason
    assert mapped.metadata["endpoint"] == error.endpoint


def test_client_rejects_a_key_that_would_break_the_header_without_echoing_it() -> None:
    with pytest.raises(ValueError) as raised:
        ComfyDeployClient("http://127.0.0.1:1/api", "secret with spaces")
    assert "secret" not in str(raised.value)


# --------------------------------------------------------------------------- deployment runs, versions


async def test_list_deployment_runs_newest_first_by_offset(client: ComfyDeployClient) -> None:
    deployment = DEPLOYMENTS["text2img-preview"]
    ids = [(await client.queue_run(deployment, {})).run_id for _ in range(5)]
    newest_first = ids[::-1]
    runs = await client.list_deployment_runs(deployment)
    assert [run.id for run in runs] == newest_first
    assert all(isinstance(run, DeploymentRun) and run.deployment_id == deployment for run in runs)
    assert runs[0].created_at is not None and runs[0].created_at.tzinfo is not None  # naive upstream text = UTC
    assert runs[0].workflow_id == WORKFLOWS["text2img"] and runs[0].machine_id == MACHINES["StationthisHun"]
    assert [r.id for r in await client.list_deployment_runs(deployment, limit=2, offset=2)] == newest_first[2:4]
    with pytest.raises(ValueError):
        await client.list_deployment_runs(deployment, limit=0)

    walked = [run.id async for run in client.iter_deployment_runs(deployment, page_size=2)]
    assert walked == newest_first
    cut = runs[2].created_at
    assert [run.id async for run in client.iter_deployment_runs(deployment, created_after=cut)] == newest_first[:3]
    assert [run.id async for run in client.iter_deployment_runs(deployment, max_runs=2)] == newest_first[:2]

    # A run created between two pages shifts the rest down: repeated rows are skipped, none is missed.
    pages = client.iter_deployment_runs(deployment, page_size=2)
    seen = [(await anext(pages)).id, (await anext(pages)).id]
    newer = (await client.queue_run(deployment, {})).run_id
    seen += [run.id async for run in pages]
    assert seen == newest_first and newer not in seen


async def test_list_deployment_runs_reports_the_500_quirk(emulator: RunningEmulator, client: ComfyDeployClient) -> None:
    for deployment_id in (MISSING_RUN, DEPLOYMENTS["other-tenant"]):
        with pytest.raises(ServerError) as raised:
            await client.list_deployment_runs(deployment_id)
        assert raised.value.status == 500 and raised.value.maybe_not_found
    assert client.breaker_state is BreakerState.CLOSED


def test_deployment_run_parser_is_lenient() -> None:
    run = DeploymentRun.from_json(
        {"id": "r1", "created_at": "2025-10-12T12:00:00.5", "duration": "12.5", "gpu": None, "novel": 1}
    )
    assert run.created_at == datetime(2025, 10, 12, 12, 0, 0, 500000, tzinfo=UTC)
    assert (run.duration, run.gpu, run.status, run.extra) == (12.5, None, "unknown", {"novel": 1})
    assert not run.is_terminal and DeploymentRun.from_json({"id": "r2", "status": "failed"}).is_terminal
    with pytest.raises(ValueError):
        DeploymentRun.from_json({"status": "success"})


async def test_create_workflow_version(emulator: RunningEmulator, client: ComfyDeployClient) -> None:
    versions = await client.list_workflow_versions(WORKFLOWS["text2img"])
    source = await client.get_workflow_version(versions[0].id)
    assert source.workflow_api is not None
    created = await client.create_workflow_version(
        WORKFLOWS["text2img"], source.workflow, source.workflow_api, comment="tweak", machine_id=MACHINES["TRIPO"]
    )
    assert (created.version, created.comment, created.workflow_id) == (3, "tweak", WORKFLOWS["text2img"])
    assert created.machine_id == MACHINES["TRIPO"]
    assert (await client.get_workflow_version(created.id)).workflow_api == source.workflow_api
    assert [v.version for v in await client.list_workflow_versions(WORKFLOWS["text2img"], limit=1, offset=1)] == [2]

    with pytest.raises(ServerError) as raised:  # every error is a 500 carrying the real one
        await client.create_workflow_version(MISSING_RUN, {}, {})
    assert (raised.value.status, raised.value.detail, raised.value.maybe_not_found) == (
        500,
        "404: Workflow not found",
        True,
    )
    assert await route_count(emulator, "POST /api/workflow/{workflow_id}/version") == 2  # a 500 is not retried


async def test_create_workflow_version_is_never_re_sent(emulator: RunningEmulator, client: ComfyDeployClient) -> None:
    graph = {"1": {"class_type": "X", "inputs": {}}}
    await emulator.set_faults(next_errors=[{"route": "workflows", "action": "drop"}])
    with pytest.raises(OutcomeUnknown):
        await client.create_workflow_version(WORKFLOWS["toon"], {}, graph)
    await emulator.set_faults(next_errors=[{"route": "workflows", "status": 503}])
    with pytest.raises(OutcomeUnknown) as raised:
        await client.create_workflow_version(WORKFLOWS["toon"], {}, graph)
    assert raised.value.status == 503
    assert await route_count(emulator, "POST /api/workflow/{workflow_id}/version") == 2


async def test_list_machines_by_page(client: ComfyDeployClient) -> None:
    everything = await client.list_machines(include_deleted=True)
    page = await client.list_machines(include_deleted=True, limit=2, offset=1)
    assert [m.id for m in page] == [m.id for m in everything[1:3]]
    machine = await client.get_machine(MACHINES["fluxdev"])
    assert (machine.run_timeout, machine.idle_timeout, machine.keep_warm) == (300, 60, 0)
    assert machine.comfyui_version and machine.machine_version
