"""The async ComfyUI Deploy V2 client shared by the runs service and the workflow catalog.

One ``ComfyDeployClient`` per process and upstream: it owns one ``httpx.AsyncClient`` (one connection
pool), one circuit breaker, one retry budget and one rate limiter. Every method takes an optional
``deadline`` (an absolute ``time.monotonic()`` value, e.g. what is left of a gRPC caller's deadline):
no attempt's timeout reaches past it, no retry starts after it, and running out of it raises
``DeadlineExceeded`` (or ``OutcomeUnknown`` for a queue request that may already have been sent).

Retry policy (see the README of this package for the reasons):

* Every call retries errors that prove the request was never sent (connect refused or timed out, no
  pooled connection free in time).
* Calls that are safe to repeat (GETs, cancel, upload, create_deployment which is an upsert) also
  retry 429, 502, 503, 504, read/write timeouts and dropped connections.
* ``queue_run``, ``upload_workflow`` and ``create_workflow_version`` are not idempotent upstream (§7).
  Once their request may have reached the server, a timeout, a dropped connection, a 502/503/504 or a
  2xx without a readable body raises ``OutcomeUnknown`` and is never re-sent. A 429 is still retried:
  it is a refusal, the request was not processed.
* 500 is not retried: ComfyDeploy's 500s are deterministic application answers (§2.3, §2.5).
* Waits are full-jitter exponential backoff; Retry-After (429/503) is waited exactly, unless it is
  longer than ``retry_after_cap`` or the deadline, in which case the error is raised at once.
* A retry needs a token from the retry budget; the circuit breaker and rate limiter gate every attempt.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random as _random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from opentelemetry import metrics

from . import errors as e
from .metrics import ClientMetrics
from .models import (
    Deployment,
    DeploymentRun,
    Machine,
    QueuedRun,
    Run,
    UploadedFile,
    UploadedWorkflow,
    Workflow,
    WorkflowVersion,
)
from .resilience import (
    BreakerOpen,
    BreakerState,
    CircuitBreaker,
    Clock,
    Permit,
    Random,
    RateLimiter,
    RateLimitWaitTooLong,
    RetryBudget,
    Sleep,
    backoff_delay,
    parse_retry_after,
)

logger = logging.getLogger("comfydeploy")

T = TypeVar("T")

USER_AGENT = "stationthis-core comfydeploy-client/1"


@dataclass(frozen=True)
class Endpoint:
    """A route: its metric/log name (a template), whether re-sending it is harmless, and its quirks."""

    name: str
    idempotent: bool = True
    not_found_as_500: bool = False  # §2.3/§2.5: not-found comes back as 500 {"detail": ...}


QUEUE_RUN = Endpoint("POST /run/deployment/queue", idempotent=False)
GET_RUN = Endpoint("GET /run/{run_id}")
CANCEL_RUN = Endpoint("POST /run/{run_id}/cancel", not_found_as_500=True)
UPLOAD_FILE = Endpoint("POST /file/upload")  # a repeat only leaves an unreferenced object behind
LIST_DEPLOYMENTS = Endpoint("GET /deployments", not_found_as_500=True)
GET_DEPLOYMENT = Endpoint("GET /deployment/{deployment_id}", not_found_as_500=True)
CREATE_DEPLOYMENT = Endpoint("POST /deployment")  # upsert on deployment_id or (workflow_id, environment)
# Every failure, not-found and another tenant's deployment included, is a 500 (upstream code catches all).
LIST_DEPLOYMENT_RUNS = Endpoint("GET /deployment/{deployment_id}/runs", not_found_as_500=True)
LIST_MACHINES = Endpoint("GET /machines")
GET_MACHINE = Endpoint("GET /machine/{machine_id}")
LIST_WORKFLOWS = Endpoint("GET /workflows")
GET_WORKFLOW = Endpoint("GET /workflow/{workflow_id}")
LIST_WORKFLOW_VERSIONS = Endpoint("GET /workflow/{workflow_id}/versions")
GET_WORKFLOW_VERSION = Endpoint("GET /workflow-version/{version_id}")
UPLOAD_WORKFLOW = Endpoint("POST /workflow", idempotent=False)
# §2.5: every error is a 500 whose detail carries the real one, e.g. "404: Workflow not found".
CREATE_WORKFLOW_VERSION = Endpoint("POST /workflow/{workflow_id}/version", idempotent=False, not_found_as_500=True)

_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_RETRY_STATUSES = frozenset({429, 502, 503, 504})
_OUTCOMES: list[tuple[type[e.ComfyDeployError], str]] = [
    (e.OutcomeUnknown, "outcome_unknown"),
    (e.DeadlineExceeded, "deadline_exceeded"),
    (e.InsufficientCredits, "insufficient_credits"),
    (e.Unauthorized, "unauthorized"),
    (e.Forbidden, "forbidden"),
    (e.NotFound, "not_found"),
    (e.ValidationFailed, "invalid"),
    (e.RateLimited, "rate_limited"),
    (e.ServerError, "server_error"),
    (e.CircuitOpen, "circuit_open"),
    (e.UpstreamUnavailable, "unavailable"),
    (e.MalformedResponse, "malformed"),
]


def _outcome(error: BaseException | None) -> str:
    if error is None:
        return "ok"
    for cls, name in _OUTCOMES:
        if isinstance(error, cls):
            return name
    return "error" if isinstance(error, e.ComfyDeployError) else "exception"


def _segment(value: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string")
    return quote(value, safe="")


def _bool_param(value: bool) -> str:
    return "true" if value else "false"


def _present(**fields: Any) -> dict[str, Any]:
    """The optional body fields that are set (upstream reads an absent field as its default)."""
    return {name: value for name, value in fields.items() if value is not None}


def _page_params(limit: int | None, offset: int) -> dict[str, str]:
    if limit is not None and limit < 1:
        raise ValueError("limit must be >= 1")
    if offset < 0:
        raise ValueError("offset must be >= 0")
    params: dict[str, str] = {}
    if limit is not None:
        params["limit"] = str(limit)
    if offset or limit is not None:
        params["offset"] = str(offset)
    return params


def _newest_first(items: Iterable[T], stamp: Callable[[T], datetime | None]) -> list[T]:
    """``items`` by ``stamp`` descending; equal stamps keep their order, items without one go last."""
    floor = datetime.min.replace(tzinfo=UTC)
    return sorted(items, key=lambda item: stamp(item) or floor, reverse=True)


class _Attempt:
    """What one attempt produced: a parsed body, or an error with the breaker's verdict and a retry reason."""

    __slots__ = ("body", "error", "retry_after", "retry_reason", "verdict")

    def __init__(self) -> None:
        self.body: Any = None
        self.error: e.ComfyDeployError | None = None
        self.retry_reason: str | None = None  # None: not retryable for this endpoint
        self.retry_after: float | None = None
        self.verdict = "success"  # "success" | "failure" | "neutral"


class ComfyDeployClient:
    """Async client for ComfyUI Deploy V2 (``base_url`` like ``https://api.comfydeploy.com/api``)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 10.0,
        connect_timeout: float = 3.0,
        max_attempts: int = 4,
        backoff_base: float = 0.2,
        backoff_cap: float = 5.0,
        retry_after_cap: float = 30.0,
        rate_limit_per_second: float | None = 20.0,
        breaker_failure_threshold: int = 5,
        breaker_reset_seconds: float = 10.0,
        retry_budget_ratio: float = 0.2,
        max_connections: int = 100,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        random: Random = _random.random,
        now: Callable[[], datetime] | None = None,
        meter: metrics.Meter | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        api_key = api_key.strip()
        if any(not (32 < ord(ch) < 127) for ch in api_key):
            raise ValueError("api_key must be printable ASCII without spaces")  # never echo the key
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.retry_after_cap = retry_after_cap
        self._clock = clock
        self._sleep = sleep
        self._random = random
        self._now = now
        self._default_timeout = httpx.Timeout(timeout, connect=connect_timeout)
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.AsyncClient(
            base_url=self.base_url + "/",
            headers=headers,
            timeout=self._default_timeout,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
            follow_redirects=False,
            trust_env=False,
        )
        self.breaker = CircuitBreaker(
            breaker_failure_threshold, breaker_reset_seconds, clock=clock, on_change=self._breaker_changed
        )
        self.retry_budget = RetryBudget(retry_budget_ratio, clock=clock)
        self.rate_limiter = RateLimiter(rate_limit_per_second, clock=clock, sleep=sleep)
        self.metrics = ClientMetrics(
            self.base_url,
            lambda: int(self.breaker.state),
            meter=meter,
            extra=lambda: {"retry_budget": round(self.retry_budget.balance, 2)},
        )

    def __repr__(self) -> str:
        return f"ComfyDeployClient(base_url={self.base_url!r}, breaker={self.breaker.state.name})"

    __str__ = __repr__

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> ComfyDeployClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    @property
    def breaker_state(self) -> BreakerState:
        return self.breaker.state

    def snapshot(self) -> dict[str, Any]:
        """Calls, errors and retries per endpoint, the breaker state and the retry budget, as plain data."""
        return self.metrics.snapshot()

    # ------------------------------------------------------------------ runs

    async def queue_run(
        self,
        deployment_id: str,
        inputs: Mapping[str, Any] | None = None,
        *,
        webhook: str | None = None,
        webhook_intermediate_status: bool = False,
        gpu: str | None = None,
        deadline: float | None = None,
    ) -> QueuedRun:
        """``POST /run/deployment/queue``. Never re-sent once it may have reached the server: then
        ``OutcomeUnknown`` is raised and the caller must reconcile before submitting again."""
        body: dict[str, Any] = {"deployment_id": deployment_id, "inputs": dict(inputs or {})}
        if webhook is not None:
            body["webhook"] = webhook
        if webhook_intermediate_status:
            body["webhook_intermediate_status"] = True
        if gpu is not None:
            body["gpu"] = gpu
        data = await self._call(QUEUE_RUN, "POST", "run/deployment/queue", json=body, deadline=deadline)
        return self._parse(QUEUE_RUN, QueuedRun.from_json, data)

    async def get_run(self, run_id: str, *, queue_position: bool = False, deadline: float | None = None) -> Run:
        params = {"queue_position": "true"} if queue_position else None
        data = await self._call(GET_RUN, "GET", f"run/{_segment(run_id, 'run_id')}", params=params, deadline=deadline)
        return self._parse(GET_RUN, Run.from_json, data)

    async def cancel_run(self, run_id: str, *, deadline: float | None = None) -> dict[str, Any]:
        """``POST /run/{id}/cancel``; 200 even for a terminal run. Upstream reports every error as 500."""
        data = await self._call(CANCEL_RUN, "POST", f"run/{_segment(run_id, 'run_id')}/cancel", deadline=deadline)
        return dict(data) if isinstance(data, Mapping) else {}

    async def upload_file(
        self, filename: str, content: bytes, content_type: str, *, deadline: float | None = None
    ) -> UploadedFile:
        """``POST /file/upload`` (multipart field ``file``); pass ``file_url`` as an input value."""
        files = {"file": (filename, content, content_type)}
        data = await self._call(UPLOAD_FILE, "POST", "file/upload", files=files, deadline=deadline)
        return self._parse(UPLOAD_FILE, UploadedFile.from_json, data)

    # ------------------------------------------------------------------ deployments

    async def list_deployments(
        self, *, environment: str | None = None, is_fluid: bool = False, deadline: float | None = None
    ) -> list[Deployment]:
        """One of the two halves of the list (§2.5 quirk); see ``list_all_deployments``."""
        params = {"is_fluid": _bool_param(is_fluid)}
        if environment is not None:
            params["environment"] = environment
        data = await self._call(LIST_DEPLOYMENTS, "GET", "deployments", params=params, deadline=deadline)
        return self._parse_list(LIST_DEPLOYMENTS, Deployment.from_json, data)

    async def list_all_deployments(
        self, environment: str | None = None, *, deadline: float | None = None
    ) -> list[Deployment]:
        """Regular and fluid deployments together (two calls, made concurrently), newest first.

        A failure raises that call's own error (the first one), never an ExceptionGroup.
        """
        try:
            async with asyncio.TaskGroup() as group:
                regular = group.create_task(
                    self.list_deployments(environment=environment, is_fluid=False, deadline=deadline)
                )
                fluid = group.create_task(
                    self.list_deployments(environment=environment, is_fluid=True, deadline=deadline)
                )
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None
        merged: dict[str, Deployment] = {}
        for deployment in [*regular.result(), *fluid.result()]:
            merged.setdefault(deployment.id, deployment)
        return _newest_first(merged.values(), lambda d: d.updated_at)

    async def get_deployment(self, deployment_id: str, *, deadline: float | None = None) -> Deployment:
        """``GET /deployment/{id}``. Upstream answers not-found with 500 (kept as ``ServerError``)."""
        path = f"deployment/{_segment(deployment_id, 'deployment_id')}"
        data = await self._call(GET_DEPLOYMENT, "GET", path, deadline=deadline)
        return self._parse(GET_DEPLOYMENT, Deployment.from_json, data)

    async def list_deployment_runs(
        self, deployment_id: str, *, limit: int = 60, offset: int = 0, deadline: float | None = None
    ) -> list[DeploymentRun]:
        """``GET /deployment/{id}/runs``: one page (``limit`` rows from ``offset``) of the deployment's runs,
        newest first. Upstream reports every failure, an unknown deployment included, as a 500
        (``ServerError`` with ``maybe_not_found``). Rows without an ``id`` are skipped; a bare list
        instead of ``{"data": [...]}`` is accepted too."""
        runs, _rows = await self._deployment_runs(deployment_id, limit, offset, deadline)
        return runs

    async def iter_deployment_runs(
        self,
        deployment_id: str,
        *,
        created_after: datetime | None = None,
        page_size: int = 60,
        max_runs: int = 1000,
        deadline: float | None = None,
    ) -> AsyncIterator[DeploymentRun]:
        """The deployment's runs, newest first, page after page, each run once; stops at the first run
        created before ``created_after`` (allow for clock skew), after ``max_runs`` runs, or at the end.

        Pages are offsets, so a run created meanwhile shifts the rest down by one: that repeats a run
        across a page boundary (skipped here), it never hides one. Errors are those of
        ``list_deployment_runs``; ``deadline`` bounds every page."""
        seen: set[str] = set()
        offset = 0
        while True:
            page, rows = await self._deployment_runs(deployment_id, page_size, offset, deadline)
            for run in page:
                if run.id in seen:
                    continue
                if created_after is not None and run.created_at is not None and run.created_at < created_after:
                    return
                seen.add(run.id)
                yield run
                if len(seen) >= max_runs:
                    return
            if rows < page_size:  # upstream's row count: a skipped malformed row does not end the walk
                return
            offset += page_size

    async def _deployment_runs(
        self, deployment_id: str, limit: int, offset: int, deadline: float | None
    ) -> tuple[list[DeploymentRun], int]:
        """A page of runs, newest first, and how many rows upstream sent."""
        params = {**_page_params(limit, offset), "filter_user_runs": "false"}
        path = f"deployment/{_segment(deployment_id, 'deployment_id')}/runs"
        data = await self._call(LIST_DEPLOYMENT_RUNS, "GET", path, params=params, deadline=deadline)
        rows = data.get("data") if isinstance(data, Mapping) else data
        runs = self._parse_list(LIST_DEPLOYMENT_RUNS, DeploymentRun.from_json, rows)  # rows is a list past this
        return _newest_first(runs, lambda run: run.created_at), len(rows) if isinstance(rows, list) else len(runs)

    async def create_deployment(
        self,
        workflow_id: str,
        workflow_version_id: str,
        environment: str,
        *,
        machine_id: str | None = None,
        machine_version_id: str | None = None,
        description: str | None = None,
        deployment_id: str | None = None,
        deadline: float | None = None,
    ) -> Deployment:
        """``POST /deployment``: create, or update the one with ``deployment_id`` or (workflow, environment)."""
        body: dict[str, Any] = {
            "workflow_id": workflow_id,
            "workflow_version_id": workflow_version_id,
            "environment": environment,
        }
        body.update(
            _present(
                machine_id=machine_id,
                machine_version_id=machine_version_id,
                description=description,
                deployment_id=deployment_id,
            )
        )
        data = await self._call(CREATE_DEPLOYMENT, "POST", "deployment", json=body, deadline=deadline)
        if isinstance(data, Mapping) and "id" not in data and "deployment_id" in data:
            data = {"id": data["deployment_id"], **data}
        return self._parse(CREATE_DEPLOYMENT, Deployment.from_json, data)

    # ------------------------------------------------------------------ machines

    async def list_machines(
        self,
        *,
        include_deleted: bool = False,
        limit: int | None = None,
        offset: int = 0,
        deadline: float | None = None,
    ) -> list[Machine]:
        """``GET /machines``; deleted machines only when asked (upstream includes them by default).
        Upstream returns at most ``limit`` (default 100) from ``offset``."""
        params = _page_params(limit, offset)
        if not include_deleted:
            params["is_deleted"] = "false"
        data = await self._call(LIST_MACHINES, "GET", "machines", params=params or None, deadline=deadline)
        return self._parse_list(LIST_MACHINES, Machine.from_json, data)

    async def get_machine(self, machine_id: str, *, deadline: float | None = None) -> Machine:
        path = f"machine/{_segment(machine_id, 'machine_id')}"
        data = await self._call(GET_MACHINE, "GET", path, deadline=deadline)
        return self._parse(GET_MACHINE, Machine.from_json, data)

    # ------------------------------------------------------------------ workflows

    async def list_workflows(
        self, *, search: str | None = None, limit: int | None = None, deadline: float | None = None
    ) -> list[Workflow]:
        params: dict[str, str] = {}
        if search:
            params["search"] = search
        if limit is not None:
            params["limit"] = str(limit)
        data = await self._call(LIST_WORKFLOWS, "GET", "workflows", params=params or None, deadline=deadline)
        return self._parse_list(LIST_WORKFLOWS, Workflow.from_json, data)

    async def get_workflow(
        self, workflow_id: str, *, versions: int | None = None, deadline: float | None = None
    ) -> Workflow:
        """``GET /workflow/{id}``, with the latest ``versions`` version rows (upstream default 1)."""
        params = {"limit": str(versions)} if versions is not None else None
        path = f"workflow/{_segment(workflow_id, 'workflow_id')}"
        data = await self._call(GET_WORKFLOW, "GET", path, params=params, deadline=deadline)
        return self._parse(GET_WORKFLOW, Workflow.from_json, data)

    async def list_workflow_versions(
        self, workflow_id: str, *, limit: int | None = None, offset: int = 0, deadline: float | None = None
    ) -> list[WorkflowVersion]:
        """``GET /workflow/{id}/versions``: newest first, at most ``limit`` (upstream default 100) from ``offset``."""
        path = f"workflow/{_segment(workflow_id, 'workflow_id')}/versions"
        params = _page_params(limit, offset)
        data = await self._call(LIST_WORKFLOW_VERSIONS, "GET", path, params=params or None, deadline=deadline)
        return self._parse_list(LIST_WORKFLOW_VERSIONS, WorkflowVersion.from_json, data)

    async def get_workflow_version(self, version_id: str, *, deadline: float | None = None) -> WorkflowVersion:
        path = f"workflow-version/{_segment(version_id, 'version_id')}"
        data = await self._call(GET_WORKFLOW_VERSION, "GET", path, deadline=deadline)
        return self._parse(GET_WORKFLOW_VERSION, WorkflowVersion.from_json, data)

    async def upload_workflow(
        self,
        name: str,
        workflow: Mapping[str, Any],
        workflow_api: Mapping[str, Any],
        machine_id: str | None = None,
        *,
        deadline: float | None = None,
    ) -> UploadedWorkflow:
        """``POST /workflow``: the two documents go as JSON *text* (§2.5). Not idempotent: like
        ``queue_run`` it raises ``OutcomeUnknown`` rather than re-sending."""
        body: dict[str, Any] = {
            "name": name,
            "workflow_json": json.dumps(workflow),
            "workflow_api": json.dumps(workflow_api),
        }
        if machine_id is not None:
            body["machine_id"] = machine_id
        data = await self._call(UPLOAD_WORKFLOW, "POST", "workflow", json=body, deadline=deadline)
        return self._parse(UPLOAD_WORKFLOW, UploadedWorkflow.from_json, data)

    async def create_workflow_version(
        self,
        workflow_id: str,
        workflow: Mapping[str, Any],
        workflow_api: Mapping[str, Any],
        *,
        comment: str | None = None,
        machine_id: str | None = None,
        deadline: float | None = None,
    ) -> WorkflowVersion:
        """``POST /workflow/{id}/version``: the next version (max + 1), documents sent as JSON objects.
        Not idempotent: like ``upload_workflow`` it raises ``OutcomeUnknown`` rather than re-sending.
        Upstream reports every error as a 500 whose detail holds the real one (``"404: Workflow not
        found"``, ``"404: Machine not found"``): ``ServerError`` with ``maybe_not_found``."""
        body = {"workflow": dict(workflow), "workflow_api": dict(workflow_api)}
        body.update(_present(comment=comment, machine_id=machine_id))
        path = f"workflow/{_segment(workflow_id, 'workflow_id')}/version"
        data = await self._call(CREATE_WORKFLOW_VERSION, "POST", path, json=body, deadline=deadline)
        return self._parse(CREATE_WORKFLOW_VERSION, WorkflowVersion.from_json, data)

    # ------------------------------------------------------------------ machinery

    def _parse(self, endpoint: Endpoint, build: Callable[[Any], T], data: Any) -> T:
        try:
            return build(data)
        except ValueError as exc:
            cls = e.MalformedResponse if endpoint.idempotent else e.OutcomeUnknown
            raise cls(200, f"unexpected response body: {exc}", False, endpoint.name) from None

    def _parse_list(self, endpoint: Endpoint, build: Callable[[Any], T], data: Any) -> list[T]:
        if not isinstance(data, list):
            raise e.MalformedResponse(200, f"expected a JSON list, got {type(data).__name__}", False, endpoint.name)
        items: list[T] = []
        for raw in data:
            try:
                items.append(build(raw))
            except ValueError as exc:  # one bad row does not sink the list
                logger.warning("skipping malformed item from %s: %s", endpoint.name, exc)
        return items

    def _redact(self, text: str) -> str:
        auth = self._http.headers.get("authorization", "")
        key = auth[7:] if auth.startswith("Bearer ") else ""
        return text.replace(key, "[REDACTED]") if len(key) >= 4 else text

    def _breaker_changed(self, previous: BreakerState, state: BreakerState) -> None:
        level = logging.WARNING if state is BreakerState.OPEN else logging.INFO
        logger.log(level, "comfydeploy circuit breaker %s -> %s for %s", previous.name, state.name, self.base_url)

    async def _call(
        self,
        endpoint: Endpoint,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        files: Any = None,
        deadline: float | None = None,
    ) -> Any:
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            return await self._attempts(endpoint, method, path, params, json, files, deadline)
        except BaseException as exc:
            error = exc
            raise
        finally:
            if not isinstance(error, asyncio.CancelledError):
                self.metrics.call(endpoint.name, _outcome(error), time.perf_counter() - started)

    async def _attempts(
        self,
        endpoint: Endpoint,
        method: str,
        path: str,
        params: Mapping[str, str] | None,
        body: Any,
        files: Any,
        deadline: float | None,
    ) -> Any:
        self.retry_budget.deposit()
        attempt = 0
        while True:
            attempt += 1
            if deadline is not None and self._clock() >= deadline:
                raise e.DeadlineExceeded(None, "deadline passed before the request was sent", False, endpoint.name)
            try:
                await self.rate_limiter.acquire(deadline)
            except RateLimitWaitTooLong as exc:
                raise e.DeadlineExceeded(
                    None, f"client rate limit: next slot in {exc.wait:.3f}s, after the deadline", False, endpoint.name
                ) from None
            try:
                permit = self.breaker.acquire()
            except BreakerOpen as exc:
                raise e.CircuitOpen(
                    None,
                    f"circuit breaker open for {self.base_url}; next trial in {exc.retry_in:.1f}s",
                    True,
                    endpoint.name,
                    attempts=attempt,
                ) from None
            result = await self._attempt(endpoint, method, path, params, body, files, deadline, permit, attempt)
            if result.error is None:
                return result.body
            error = result.error
            error.attempts = attempt
            error.args = (error._message(),)
            delay = self._retry_delay(endpoint, result, attempt, deadline)
            if delay is None:
                raise error
            reason = result.retry_reason or "error"
            logger.warning(
                "comfydeploy retrying %s in %.3fs after %s (attempt %d of %d)",
                endpoint.name, delay, reason, attempt, self.max_attempts,
                extra={"endpoint": endpoint.name, "retry_reason": reason, "attempt": attempt},
            )  # fmt: skip
            self.metrics.retry(endpoint.name, reason)
            if delay > 0:
                await self._sleep(delay)

    def _retry_delay(self, endpoint: Endpoint, result: _Attempt, attempt: int, deadline: float | None) -> float | None:
        """Seconds to wait before the next attempt, or None to give up and raise."""
        if result.retry_reason is None or attempt >= self.max_attempts:
            return None
        if result.retry_after is not None:
            if result.retry_after > self.retry_after_cap:
                return None
            delay = result.retry_after
        else:
            delay = backoff_delay(attempt - 1, self.backoff_base, self.backoff_cap, self._random)
        if deadline is not None and self._clock() + delay >= deadline:
            return None
        if not self.retry_budget.try_withdraw():
            logger.warning("comfydeploy retry budget spent; not retrying %s", endpoint.name)
            return None
        return delay

    async def _attempt(
        self,
        endpoint: Endpoint,
        method: str,
        path: str,
        params: Mapping[str, str] | None,
        body: Any,
        files: Any,
        deadline: float | None,
        permit: Permit,
        attempt: int,
    ) -> _Attempt:
        result = _Attempt()
        timeout = self._default_timeout
        remaining: float | None = None
        if deadline is not None:
            remaining = deadline - self._clock()
            if remaining < self.timeout or remaining < self.connect_timeout:
                bounded = max(remaining, 0.001)
                timeout = httpx.Timeout(min(self.timeout, bounded), connect=min(self.connect_timeout, bounded))
        clamped = timeout is not self._default_timeout
        sent = endpoint.idempotent  # for idempotent calls it does not matter, so skip the tracing
        extensions: dict[str, Any] = {}
        if not endpoint.idempotent:

            async def trace(name: str, _info: Mapping[str, Any]) -> None:
                nonlocal sent
                if name.endswith("send_request_headers.started"):
                    sent = True

            extensions["trace"] = trace
        started = time.perf_counter()
        status: int | str = "-"
        try:
            request = self._http.build_request(
                method, path, params=params, json=body, files=files, timeout=timeout, extensions=extensions
            )
            if remaining is None:
                response = await self._http.send(request)
            else:
                async with asyncio.timeout(max(remaining, 0.0)):
                    response = await self._http.send(request)
        except (TimeoutError, httpx.TimeoutException) as exc:
            status = type(exc).__name__
            self._on_timeout(endpoint, exc, result, clamped, sent)
        except httpx.TransportError as exc:
            status = type(exc).__name__
            self._on_transport_error(endpoint, exc, result, sent)
        except BaseException:
            permit.release()
            raise
        else:
            status = response.status_code
            self._on_response(endpoint, response, result)
        finally:
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "comfydeploy %s attempt %d: %s in %.1fms",
                    endpoint.name, attempt, status, (time.perf_counter() - started) * 1000,
                    extra={"endpoint": endpoint.name, "attempt": attempt, "upstream_status": str(status)},
                )  # fmt: skip
        if result.verdict == "success":
            permit.success()
        elif result.verdict == "failure":
            permit.failure()
        else:
            permit.release()
        return result

    def _on_timeout(self, endpoint: Endpoint, exc: BaseException, result: _Attempt, clamped: bool, sent: bool) -> None:
        not_sent = isinstance(exc, _NOT_SENT) or not sent
        kind = type(exc).__name__
        if clamped or isinstance(exc, TimeoutError):
            # The caller's deadline cut the attempt short: no verdict on the upstream.
            result.verdict = "neutral"
            if not endpoint.idempotent and not not_sent:
                result.error = e.OutcomeUnknown(
                    None, f"deadline reached after the request was sent ({kind})", False, endpoint.name
                )
            else:
                result.error = e.DeadlineExceeded(None, f"deadline reached ({kind})", False, endpoint.name)
            return
        if isinstance(exc, httpx.PoolTimeout):
            result.verdict = "neutral"  # local congestion, not the upstream's fault
            result.error = e.UpstreamUnavailable(None, "no free connection in the pool in time", True, endpoint.name)
            result.retry_reason = "pool_timeout"
            return
        result.verdict = "failure"
        if isinstance(exc, httpx.ConnectTimeout):
            result.error = e.UpstreamUnavailable(None, "connect timeout", True, endpoint.name)
            result.retry_reason = "connect_timeout"
        elif endpoint.idempotent:
            result.error = e.UpstreamUnavailable(None, f"{kind}: no answer in time", True, endpoint.name)
            result.retry_reason = "read_timeout"
        else:
            result.error = e.OutcomeUnknown(None, f"{kind} after the request was sent", False, endpoint.name)

    def _on_transport_error(self, endpoint: Endpoint, exc: httpx.TransportError, result: _Attempt, sent: bool) -> None:
        text = self._redact(str(exc) or type(exc).__name__)
        result.verdict = "failure"
        if isinstance(exc, _NOT_SENT) or not sent:
            result.error = e.UpstreamUnavailable(None, f"connection failed: {text}", True, endpoint.name)
            result.retry_reason = "connect_error"
        elif endpoint.idempotent:
            result.error = e.UpstreamUnavailable(None, f"connection lost: {text}", True, endpoint.name)
            result.retry_reason = "connection_lost"
        else:
            result.error = e.OutcomeUnknown(None, f"connection lost after the request was sent: {text}", False,
                                            endpoint.name)  # fmt: skip

    def _on_response(self, endpoint: Endpoint, response: httpx.Response, result: _Attempt) -> None:
        status = response.status_code
        if 200 <= status < 300:
            try:
                result.body = json.loads(response.content) if response.content else None
            except ValueError:
                cls = e.MalformedResponse if endpoint.idempotent else e.OutcomeUnknown
                result.error = cls(status, "response body is not JSON", False, endpoint.name)
            return
        detail, errors, is_json = self._read_detail(response)
        name = endpoint.name
        if status >= 500:
            quirk = endpoint.not_found_as_500 and status == 500
            # A JSON 500 from an endpoint known to report ordinary errors as 500 is an answer, not an outage.
            result.verdict = "success" if quirk and is_json else "failure"
            retryable = status in _RETRY_STATUSES
            if not endpoint.idempotent and retryable:
                result.error = e.OutcomeUnknown(status, detail, False, name)
                return
            result.error = e.ServerError(status, detail, retryable, name, maybe_not_found=quirk)
            if retryable:
                result.retry_reason = f"status_{status}"
                if status == 503:
                    result.retry_after = parse_retry_after(response.headers.get("retry-after"), self._now)
            return
        if status == 429:
            retry_after = parse_retry_after(response.headers.get("retry-after"), self._now)
            result.error = e.RateLimited(status, detail, True, name, retry_after=retry_after)
            result.retry_reason = "rate_limited"
            result.retry_after = retry_after
        elif status == 401:
            result.error = e.Unauthorized(status, detail, False, name)
        elif status == 403:
            lowered = detail.lower()
            credits = "credit" in lowered or "insufficient" in lowered
            result.error = (e.InsufficientCredits if credits else e.Forbidden)(status, detail, False, name)
        elif status == 404:
            result.error = e.NotFound(status, detail, False, name)
        elif status in (400, 422):
            result.error = e.ValidationFailed(status, detail, False, name, errors=errors)
        else:
            result.error = e.ComfyDeployError(status, detail, False, name)

    def _read_detail(self, response: httpx.Response) -> tuple[str, list[Any], bool]:
        """(detail text, FastAPI error list, whether the body was JSON) from an error response."""
        text = response.text.strip() if response.content else ""
        errors: list[Any] = []
        try:
            body = json.loads(text) if text else None
        except ValueError:
            return self._redact(text[:500] or response.reason_phrase), errors, False
        detail: Any = body
        if isinstance(body, Mapping):
            detail = body.get("detail", body.get("error", body.get("message", body)))
        if isinstance(detail, list):
            errors = detail
            parts = []
            for item in detail:
                if isinstance(item, Mapping):
                    loc = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                    parts.append(f"{loc}: {item.get('msg', '')}" if loc else str(item.get("msg", "")))
                else:
                    parts.append(str(item))
            detail = "; ".join(parts)
        if not isinstance(detail, str):
            detail = json.dumps(detail) if detail is not None else response.reason_phrase
        return self._redact(detail), errors, body is not None
