"""The generation: from CreateRun to settled points, exactly once (comfyui_service.proto, A GENERATION).

``Runs`` holds no state of its own: every run lives in the ``RunStore`` (Redis), so any replica can
serve any run and a restart loses nothing. What happens to a run:

1. CreateRun stores it PENDING (bound to its request_id), resolves the workflow and validates the
   inputs (WorkflowsService), holds points (PointsService, request_id ``hold:<run_id>``), and
   answers SUBMITTING. Any refusal on the way deletes the run: a failed CreateRun leaves nothing.
2. A task queues it on ComfyUI Deploy, with a webhook URL carrying the run's secret token. The
   queue call is marked ``sent`` before it goes out and is never repeated once it may have reached
   upstream: a lost answer makes the submission ``unknown``, resolved by the webhook that carries
   the token or by finding the run among the deployment's recent runs, else FAILED after a window.
3. Webhooks move the run (HandleWebhook); the reconciler polls a run it heard nothing about for a
   while, times out runs past their limit, and finishes whatever a crash left half done.
4. A terminal run is settled once: CaptureHold of its GPU time on SUCCESS, ReleaseHold otherwise
   (request_id ``settle:<run_id>``: the ledger makes a repeat a replay). The run records that it is
   settled only after the ledger answered; the reconciler retries until it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import grpc
from google.protobuf import duration_pb2, struct_pb2
from opentelemetry import metrics

from comfydeploy import errors as upstream_errors
from comfydeploy.client import ComfyDeployClient
from common.channels import peer_error, remaining
from common.errors import DomainError, FailedPrecondition, NotFound, Unauthenticated, Unavailable
from common.gpu import GPU_NAMES
from common.idempotency import RequestIds, fingerprint
from common.proto_time import timestamp_from_ms
from common.validation import Violations, decode_page_token, encode_page_token
from stationthis.comfyui.v1 import comfyui_service_pb2 as svc
from stationthis.comfyui.v1 import deployment_pb2, run_pb2, webhook_pb2
from stationthis.points.v1 import points_pb2, points_service_pb2, points_service_pb2_grpc
from stationthis.type.v1 import gpu_pb2
from stationthis.workflows.v1 import workflow_pb2 as workflows_pb2
from stationthis.workflows.v1 import workflows_service_pb2, workflows_service_pb2_grpc

from . import receipts, state
from .callbacks import Adapters, Dispatcher
from .history import Durations, History
from .hub import EventHub
from .quotes import Quotes
from .store import Conflict, Record, RedisRunStore, Write

log = logging.getLogger("stationthis.comfyui.runs")
S = run_pb2
E = svc
POINTS = "stationthis.points.v1.PointsService"
WORKFLOWS = "stationthis.workflows.v1.WorkflowsService"
UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
LABEL_KEY = re.compile(r"[a-z0-9_.-]{1,63}")
_EVENT_ID = re.compile(r"\d{1,20}-\d{1,20}")  # a Redis stream id
MAX_LABELS, MAX_LABEL_VALUE = 16, 256
MAX_NAME = 200
MIN_CANCEL_AFTER, MAX_CANCEL_AFTER = 1.0, 86_400.0
ADAPTER_METADATA = "x-stationthis-adapter"  # the gateway's name for the caller's API key

_meter = metrics.get_meter("stationthis.comfyui")
_reconciled = _meter.create_counter("runs.reconciled", description="Runs the reconciler looked at, by outcome")
_settled = _meter.create_counter("runs.settled", description="Runs settled with the ledger, by final status")


@dataclass(frozen=True)
class RunSettings:
    public_url: str = "http://127.0.0.1:8080"  # the gateway, as ComfyUI Deploy reaches it
    poll_after_seconds: float = 20.0  # a run with no news for this long is polled
    poll_max_seconds: float = 120.0  # the longest wait between polls of a run waiting in the queue
    run_timeout_seconds: float = 3600.0  # after submit_time: cancelled upstream, TIMEOUT
    submit_unknown_seconds: float = 600.0  # a submission whose outcome stays unknown this long: FAILED
    submit_grace_seconds: float = 30.0  # a queue request in flight this long is treated as unknown
    pending_grace_seconds: float = 120.0  # a run PENDING this long was interrupted (CreateRun died)
    retention_seconds: int = 7 * 86_400
    reconcile_interval_seconds: float = 1.0
    reconcile_batch: int = 200
    reconcile_concurrency: int = 16
    upstream_timeout_seconds: float = 30.0
    cancel_attempts: int = 4
    cancel_charge_share: Decimal = Decimal(0)  # of the GPU time used, charged when a user cancels after the start

    @property
    def hold_ttl_seconds(self) -> int:
        """A hold outlives the run's time limit, so a slow run is settled before its hold expires."""
        return int(min(86_400, max(60, self.run_timeout_seconds + 600)))


_RELEASE_REASONS = {
    S.RUN_STATUS_FAILED: points_pb2.RELEASE_REASON_RUN_FAILED,
    S.RUN_STATUS_TIMEOUT: points_pb2.RELEASE_REASON_RUN_TIMED_OUT,
    S.RUN_STATUS_CANCELLED: points_pb2.RELEASE_REASON_RUN_CANCELLED,
}
_SUBMIT_REASONS = frozenset({"SUBMIT_FAILED", "SUBMIT_OUTCOME_UNKNOWN"})
_RESUBMIT_MS = 5_000  # a run not sent yet (or provably not received) is sent (again) this much later
# Client errors that prove the queue request never reached upstream: it may be sent again later.
_NOT_SENT = (upstream_errors.UpstreamUnavailable, upstream_errors.RateLimited, upstream_errors.DeadlineExceeded)


@dataclass(frozen=True)
class Target:
    """Where a new run goes: the workflow, the deployment and the complete, validated inputs."""

    workflow: workflows_pb2.Workflow
    deployment: workflows_pb2.WorkflowDeployment
    inputs: struct_pb2.Struct
    workflow_version_id: str


@dataclass
class _Attempt:
    """How far one CreateRun (or RegenerateRun) got. Once the run's hold is taken, a failure leaves
    the run (the reconciler submits it, or ends it and gives the hold back) and keeps its request_id
    bound to it: a retry then returns that run instead of making a second one, held and charged again."""

    held: bool = False


@dataclass(frozen=True)
class NewRun:
    """What a new run is asked to be besides its target."""

    user_id: str
    labels: dict[str, str]
    gpu_override: int
    cancel_after: duration_pb2.Duration | None
    callback_url: str
    adapter: str
    regenerated_from: str = ""


@dataclass
class Extras:
    """The parts of the runs that issue 12's features bring: history, quotes, callbacks."""

    history: History
    quotes: Quotes
    adapters: Adapters = field(default_factory=lambda: Adapters({}, {}))
    callbacks: Dispatcher | None = None


class Runs:
    def __init__(
        self,
        store: RedisRunStore,
        ids: RequestIds,
        hub: EventHub,
        workflows: Any,
        points: Any,
        upstream: ComfyDeployClient,
        extras: Extras,
        settings: RunSettings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.ids = ids
        self.hub = hub
        self.workflows = workflows_service_pb2_grpc.WorkflowsServiceStub(workflows)
        self.points = points_service_pb2_grpc.PointsServiceStub(points)
        self.upstream = upstream
        self.history = extras.history
        self.quotes = extras.quotes
        self.adapters = extras.adapters
        self.callbacks = extras.callbacks
        self.settings = settings or RunSettings()
        self.clock = clock
        self._medians: dict[tuple[str, int], tuple[float, float | None]] = {}  # (at, median) per workflow/GPU
        self.owner = uuid.uuid4().hex  # this replica, for the reconciler's lease
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- plumbing ---------------------------------------------------------------------------------

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _deadline(self, seconds: float | None = None) -> float:
        return time.monotonic() + (seconds or self.settings.upstream_timeout_seconds)

    def spawn(self, work: Awaitable[Any], name: str) -> None:
        """Background work of a request; what a crash interrupts, the reconciler finishes."""

        async def run() -> None:
            try:
                await work
            except DomainError as exc:
                log.warning("%s deferred to the reconciler: %s", name, exc.message)
            except Exception:
                log.exception("%s failed; the reconciler will finish it", name)

        task = asyncio.create_task(run(), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _notify(self, record: Record) -> None:
        """A status change of a run with a callback URL: its callbacks are due."""
        if self.callbacks is not None and record.run.callback_url:
            await self.callbacks.mark_due(record.run.run_id)

    async def _median(self, run: S.Run) -> float | None:
        """The median of the workflow's recent durations on the run's GPU, cached for a second (it is
        asked on every webhook); a duration recorded here drops the entry, so the first ETA after a
        workflow's first success shows at once."""
        key = (run.workflow_id, int(run.gpu or gpu_pb2.GPU_TYPE_CPU))
        cached = self._medians.get(key)
        now = time.monotonic()
        if cached is not None and now - cached[0] < 1.0:
            return cached[1]
        median = _median(await self.history.durations(*key))
        if len(self._medians) > 1000:
            self._medians.clear()
        self._medians[key] = (now, median)
        return median

    def webhook_url(self, record: Record) -> str:
        return f"{self.settings.public_url}/v1/webhooks/comfydeploy?token={record.run.run_id}.{record.token}"

    # --- CreateRun --------------------------------------------------------------------------------

    async def create(self, request: svc.CreateRunRequest, context: grpc.aio.ServicerContext | None) -> S.Run:
        check = Violations()
        name = _check_target(check, request)
        if request.request_id:
            check.request_id(request.request_id)
        _labels(check, request.labels)
        spec = self._spec(check, request.user_id, request.labels, request.gpu, request, request.callback_url, context)
        check.check()

        async def target() -> Target:
            return await self._resolve(request.environment, name, request.inputs, context)

        return await self._claimed("CreateRun", request.request_id, request, spec, target, context)

    def _spec(
        self,
        check: Violations,
        user_id: str,
        labels: Any,
        gpu: int,
        request: Any,
        callback_url: str,
        context: grpc.aio.ServicerContext | None,
        regenerated_from: str = "",
    ) -> NewRun:
        """What a new run is asked to be besides its workflow: checked, violations into ``check``."""
        cancel_after = None
        if request.HasField("cancel_after"):
            cancel_after = request.cancel_after
            seconds = cancel_after.ToNanoseconds() / 1e9
            if not MIN_CANCEL_AFTER <= seconds <= MAX_CANCEL_AFTER:
                check.add("cancel_after", f"must be from {MIN_CANCEL_AFTER:g} s to {MAX_CANCEL_AFTER // 3600:g} h")
        adapter = _adapter(context)
        if callback_url:
            violation = self.adapters.check(adapter, callback_url)
            if violation is not None:
                check.add(violation.field, violation.description)
        return NewRun(user_id, dict(labels), gpu, cancel_after, callback_url, adapter, regenerated_from)

    async def _claimed(
        self,
        rpc: str,
        request_id: str,
        request: Any,
        spec: NewRun,
        target: Callable[[], Awaitable[Target]],
        context: grpc.aio.ServicerContext | None,
    ) -> S.Run:
        """A new run bound to ``request_id`` (a repeat returns the first run as it is now)."""
        run_id = str(uuid.uuid4())
        claim_key = f"{spec.user_id}:{request_id}"
        if request_id:
            prior = await self.ids.claim(rpc, claim_key, fingerprint(request), run_id.encode())
            if prior is not None:
                found = await self.store.get(prior.decode())
                if found is not None:
                    return found.run  # a repeat: the same run, as it is now
                run_id = prior.decode()  # the first attempt died before storing its run: carry it on
        attempt = _Attempt()
        try:
            return await self._create(spec, run_id, target, context, attempt)
        except Conflict:
            # A concurrent call with the same request_id stored the run first (its claim's run_id, which
            # this call took for a died attempt's): that call goes on with it; this one returns it as it
            # is now and keeps the claim.
            found = await self.store.get(run_id)
            if found is None:
                raise Unavailable("the run is being created; retry", reason="STORE_UNAVAILABLE") from None
            return found.run
        except BaseException:
            if request_id and not attempt.held:
                with contextlib.suppress(DomainError):
                    await self.ids.release(rpc, claim_key)
            raise

    async def _create(
        self,
        spec: NewRun,
        run_id: str,
        target: Callable[[], Awaitable[Target]],
        context: grpc.aio.ServicerContext | None,
        attempt: _Attempt,
    ) -> S.Run:
        now = self.now_ms()
        run = S.Run(run_id=run_id, user_id=spec.user_id, status=S.RUN_STATUS_PENDING, labels=spec.labels,
                    callback_url=spec.callback_url, regenerated_from=spec.regenerated_from)  # fmt: skip
        if spec.cancel_after is not None:
            run.cancel_after.CopyFrom(spec.cancel_after)
        run.create_time.CopyFrom(timestamp_from_ms(now))
        run.update_time.CopyFrom(timestamp_from_ms(now))
        record = await self.store.create(
            Record(run, token=secrets.token_urlsafe(24), gpu_override=spec.gpu_override, adapter=spec.adapter),
            now + int(self.settings.pending_grace_seconds * 1000),
        )
        try:
            found = await target()
            workflow, deployment = found.workflow, found.deployment
            gpu = deployment.gpu or spec.gpu_override or workflow.gpu
            quote = await self.quotes.quote(workflow.workflow_id, gpu, remaining(context))
            # The quote is stored before the hold is taken with it: a crash in between leaves what
            # the reconciler needs to find that hold again (the same request id, the same estimate).
            record.run.quoted_points = quote.cost_points
            record = await self.store.write(Write(record))
            hold = await self._hold(record.run, context)
            attempt.held = True
        except BaseException:
            with contextlib.suppress(DomainError):
                await self.store.delete(record)
            raise
        run = record.run
        run.workflow_id = workflow.workflow_id
        run.workflow_name = workflow.name
        run.deployment_id = deployment.deployment_id
        run.machine_id = deployment.machine_id or workflow.machine_id
        run.workflow_version_id = found.workflow_version_id
        run.gpu = gpu  # type: ignore[assignment]
        run.environment = deployment.environment  # type: ignore[assignment]
        run.inputs.CopyFrom(found.inputs)
        run.hold_id = hold.hold_id
        run.points_held = hold.points_held + hold.qoints_held
        run.status = S.RUN_STATUS_SUBMITTING
        now = self.now_ms()
        state.estimate(run, _median(quote.durations), now)
        run.update_time.CopyFrom(timestamp_from_ms(now))
        record = await self.store.write(Write(record, state.event(run, E.RUN_EVENT_TYPE_STATUS_CHANGED)))
        # The reconciler sends it if the task below cannot (Redis failing before the run is marked
        # sent, a crash); marked sent, the run gets its grace instead (submit). Not written, the run
        # keeps the look-again time it was created with.
        with contextlib.suppress(DomainError):
            await self.store.schedule(run_id, self._due(run, now + _RESUBMIT_MS))
        await self._notify(record)
        self.spawn(self.submit(run_id), f"submit {run_id}")
        return record.run

    async def _resolve(
        self, environment: int, name: str, inputs: struct_pb2.Struct, context: grpc.aio.ServicerContext | None,
        keep_seeds: bool = False,
    ) -> Target:  # fmt: skip
        """The workflow ``name`` resolves to, and ``inputs`` validated and completed for it. A seed
        left to chance (-1) is drawn now, so the run's snapshot holds the seed actually used."""
        try:
            resolved: workflows_service_pb2.ResolveWorkflowResponse = await self.workflows.ResolveWorkflow(
                workflows_service_pb2.ResolveWorkflowRequest(name=name, environment=environment),  # type: ignore[arg-type]
                timeout=remaining(context),
            )
            validated: workflows_service_pb2.ValidateInputsResponse = await self.workflows.ValidateInputs(
                workflows_service_pb2.ValidateInputsRequest(
                    workflow_id=resolved.workflow.workflow_id,
                    environment=resolved.deployment.environment,
                    inputs=inputs,
                ),
                timeout=remaining(context),
            )
        except grpc.aio.AioRpcError as exc:
            raise peer_error(exc, WORKFLOWS) from None
        complete = validated.inputs
        if not keep_seeds:
            complete = state.draw_seeds(complete, resolved.workflow.inputs)
        return Target(resolved.workflow, resolved.deployment, complete, validated.workflow_version_id)

    async def _hold(self, run: S.Run, context: grpc.aio.ServicerContext | None) -> points_pb2.Hold:
        """Hold the run's quote (request id ``hold:<run_id>``: a repeat is a replay)."""
        request = points_service_pb2.ReserveHoldRequest(
            request_id=f"hold:{run.run_id}", user_id=run.user_id, run_id=run.run_id,
            estimate_points=run.quoted_points,
        )  # fmt: skip
        request.ttl.FromSeconds(self.settings.hold_ttl_seconds)
        try:
            reply: points_service_pb2.ReserveHoldResponse = await self.points.ReserveHold(
                request, timeout=remaining(context)
            )
        except grpc.aio.AioRpcError as exc:
            raise peer_error(exc, POINTS) from None
        return reply.hold

    # --- QuoteRun and RegenerateRun ---------------------------------------------------------------

    async def quote_run(self, request: svc.QuoteRunRequest, context: grpc.aio.ServicerContext | None
                        ) -> svc.QuoteRunResponse:  # fmt: skip
        check = Violations()
        name = _check_target(check, request)
        check.check()
        try:
            resolved: workflows_service_pb2.ResolveWorkflowResponse = await self.workflows.ResolveWorkflow(
                workflows_service_pb2.ResolveWorkflowRequest(name=name, environment=request.environment),  # type: ignore[arg-type]
                timeout=remaining(context),
            )
        except grpc.aio.AioRpcError as exc:
            raise peer_error(exc, WORKFLOWS) from None
        workflow, deployment = resolved.workflow, resolved.deployment
        quote = await self.quotes.quote(
            workflow.workflow_id, deployment.gpu or request.gpu or workflow.gpu, remaining(context)
        )
        try:
            account: points_service_pb2.GetAccountResponse = await self.points.GetAccount(
                points_service_pb2.GetAccountRequest(user_id=request.user_id), timeout=remaining(context)
            )
        except grpc.aio.AioRpcError as exc:
            raise peer_error(exc, POINTS) from None
        available = account.account.points_available + account.account.qoints_available
        response = svc.QuoteRunResponse(
            cost_points=quote.cost_points, gpu=quote.gpu, gpu_time=quote.gpu_time, basis=quote.basis,
            history_runs=len(quote.durations.seconds), affordable=available >= quote.cost_points,
            available_points=available, shortfall_points=max(0, quote.cost_points - available),
            workflow_id=workflow.workflow_id, workflow_name=workflow.name,
        )  # fmt: skip
        if quote.durations.known:
            response.typical_gpu_time.FromNanoseconds(int(quote.durations.median * 1e9))
        return response

    async def regenerate(self, request: svc.RegenerateRunRequest, context: grpc.aio.ServicerContext | None) -> S.Run:
        """A new run from another's snapshot: same workflow, deployment and inputs (the seeds actually
        used), a new seed unless ``same_seed``, ``input_overrides`` on top; validated like any run."""
        check = Violations()
        if request.request_id:
            check.request_id(request.request_id)
        _run_id(check, request.run_id)
        check.check()
        original = (await self.store.require(request.run_id)).run
        check = Violations()
        spec = self._spec(check, original.user_id, original.labels, original.gpu, request,
                          request.callback_url or original.callback_url, context, original.run_id)  # fmt: skip
        check.check()

        async def target() -> Target:
            # Only the overrides are validated (today's defaults fill the rest of that answer, and are
            # dropped): every other value is the snapshot's, as it was sent.
            found = await self._resolve(
                original.environment, original.workflow_id, request.input_overrides, context, keep_seeds=True
            )
            inputs = struct_pb2.Struct()
            inputs.CopyFrom(original.inputs)
            if not request.same_seed:
                inputs = state.new_seeds(inputs, found.workflow.inputs)
            for key in request.input_overrides.fields:
                inputs.fields[key].CopyFrom(found.inputs.fields[key])
            inputs = state.draw_seeds(inputs, found.workflow.inputs)  # an override of -1: a new seed
            found = Target(found.workflow, found.deployment, inputs, found.workflow_version_id)
            # The snapshot's deployment, not whichever the catalog would pick today.
            deployment = workflows_pb2.WorkflowDeployment()
            deployment.CopyFrom(found.deployment)
            deployment.deployment_id = original.deployment_id
            deployment.machine_id = original.machine_id
            deployment.gpu = original.gpu
            # The version the deployment runs today when the catalog knows it (a deployment moved to a
            # new version runs that graph, with the snapshot's inputs); else the snapshot's.
            same = found.deployment.deployment_id == original.deployment_id and found.workflow_version_id
            version = found.workflow_version_id if same else original.workflow_version_id
            return Target(found.workflow, deployment, found.inputs, version or found.workflow_version_id)

        return await self._claimed("RegenerateRun", request.request_id, request, spec, target, context)

    # --- submission -------------------------------------------------------------------------------

    async def submit(self, run_id: str) -> None:
        """Queue the run upstream, once: never again once the request may have gone out."""
        now = self.now_ms()

        def start(record: Record) -> Write | None:
            if record.run.status != S.RUN_STATUS_SUBMITTING or record.submit != "none":
                return None
            record.submit, record.submit_ms = "sent", now
            return Write(record)

        record, started = await self.store.update(run_id, start)
        if not started:
            return
        # Marked sent, it must now go out: a run marked sent and never sent can only end
        # SUBMIT_OUTCOME_UNKNOWN. If Redis does not take this look-again time, the run keeps the one
        # it has (CreateRun's or the reconciler's), and the reconciler gives a sent run its grace.
        with contextlib.suppress(DomainError):
            await self.store.schedule(run_id, now + int(self.settings.submit_grace_seconds * 1000))
        run = record.run
        gpu = GPU_NAMES.get(record.gpu_override) if record.gpu_override else None
        try:
            queued = await self.upstream.queue_run(
                run.deployment_id,
                state.struct_values(run.inputs),
                webhook=self.webhook_url(record),
                webhook_intermediate_status=True,
                gpu=gpu,
                deadline=self._deadline(),
            )
        except upstream_errors.OutcomeUnknown:
            await self._submission_unknown(run_id)
            return
        except _NOT_SENT as exc:
            await self._not_sent(run_id, exc)
            return
        except upstream_errors.ComfyDeployError as exc:
            await self.fail(run_id, "SUBMIT_FAILED", f"ComfyUI Deploy refused the run: {exc.detail}",
                            _upstream_metadata(exc))  # fmt: skip
            return
        await self.adopt(run_id, queued.run_id)

    async def _submission_unknown(self, run_id: str) -> None:
        def mark(record: Record) -> Write | None:
            if record.submit != "sent":
                return None
            record.submit = "unknown"
            return Write(record)

        await self.store.update(run_id, mark)
        await self.store.schedule(run_id, self.now_ms() + 2_000)  # look for it upstream soon

    async def _not_sent(self, run_id: str, error: upstream_errors.ComfyDeployError) -> None:
        """The request never reached upstream: submit again later, until the unknown-window closes."""
        record = await self.store.require(run_id)
        if self.now_ms() - record.run.create_time.ToMilliseconds() > self.settings.submit_unknown_seconds * 1000:
            await self.fail(run_id, "SUBMIT_FAILED", f"ComfyUI Deploy could not be reached: {error.detail}",
                            _upstream_metadata(error))  # fmt: skip
            return

        def unsend(current: Record) -> Write | None:
            if current.submit != "sent":
                return None
            current.submit = "none"
            return Write(current)

        await self.store.update(run_id, unsend)
        await self.store.schedule(run_id, self.now_ms() + _RESUBMIT_MS)

    async def adopt(self, run_id: str, upstream_run_id: str) -> Record:
        """The upstream run ``upstream_run_id`` is ours: record it (once) and move the run on."""
        owner = await self.store.adopt(upstream_run_id, run_id, self.settings.retention_seconds)
        if owner != run_id:
            log.error("upstream run %s is claimed by run %s, not %s", upstream_run_id, owner, run_id)
            return await self.store.require(run_id)
        now = self.now_ms()
        median = await self._median((await self.store.require(run_id)).run)

        def change(record: Record) -> Write | None:
            run = record.run
            if run.upstream_run_id and record.submit == "done":
                return None
            run.upstream_run_id = upstream_run_id
            record.submit = "done"
            record.news_ms = now
            if not run.HasField("submit_time"):
                run.submit_time.CopyFrom(timestamp_from_ms(now))
            if run.status in (S.RUN_STATUS_PENDING, S.RUN_STATUS_SUBMITTING):
                run.status = S.RUN_STATUS_NOT_STARTED
                run.update_time.CopyFrom(timestamp_from_ms(now))
                state.estimate(run, median, now)
                return Write(record, state.event(run, E.RUN_EVENT_TYPE_STATUS_CHANGED))
            return Write(record)

        record, changed = await self.store.update(run_id, change)
        if changed:
            await self._notify(record)
        if state.is_terminal(record.run.status) and changed:
            # Ended here (cancelled, failed, lost) while upstream took it: stop it there too.
            self.spawn(self._cancel_upstream(upstream_run_id), f"cancel orphan {upstream_run_id}")
        elif changed:
            await self.store.schedule(run_id, self._due(record.run, now + int(self.settings.poll_after_seconds * 1000)))
        return record

    async def find_submission(self, record: Record) -> str | None:
        """The upstream run a lost queue response created: among the deployment's runs created since
        the request went out, not claimed by another of our runs, the one whose webhook carries this
        run's token."""
        since = record.submit_ms - 60_000  # upstream's clock may be behind ours
        offset, page = 0, 60
        for _ in range(10):
            rows = await self.upstream.list_deployment_runs(
                record.run.deployment_id, limit=page, offset=offset, deadline=self._deadline()
            )
            for row in rows:
                created = row.created_at.timestamp() * 1000 if row.created_at else since
                if created < since or await self.store.adopted(row.id):
                    continue
                candidate = await self.upstream.get_run(row.id, deadline=self._deadline())
                if candidate.webhook and record.token in candidate.webhook:
                    return candidate.id
            oldest = min((r.created_at.timestamp() * 1000 for r in rows if r.created_at), default=0)
            if len(rows) < page or oldest < since:
                return None
            offset += page
        return None

    # --- webhooks and polls -----------------------------------------------------------------------

    async def webhook(self, request: svc.HandleWebhookRequest) -> svc.HandleWebhookResponse:
        run_id, _, secret = request.token.partition(".")
        record = await self.store.get(run_id) if UUID.fullmatch(run_id) and secret else None
        # Compared in constant time whether or not the run exists.
        expected = record.token if record is not None else secrets.token_urlsafe(24)
        if not hmac.compare_digest(secret.encode(), expected.encode()) or record is None:
            raise Unauthenticated("the webhook token is missing or invalid", reason="WEBHOOK_TOKEN_INVALID")
        payload = request.payload
        check = Violations()
        if not UUID.fullmatch(payload.run_id):
            check.add("payload.run_id", "must be the upstream run id (a UUID)")
        if payload.status not in state.STATUS_BY_UPSTREAM:
            check.add("payload.status", f"must be one of {', '.join(state.STATUS_BY_UPSTREAM)}")
        check.check()
        if record.run.upstream_run_id and record.run.upstream_run_id != payload.run_id:
            return svc.HandleWebhookResponse(accepted=False, run_id=run_id)
        if not record.run.upstream_run_id:
            record = await self.adopt(run_id, payload.run_id)  # the token proves the upstream run is ours
            if record.run.upstream_run_id != payload.run_id:
                return svc.HandleWebhookResponse(accepted=False, run_id=run_id)
        changed = await self.apply(run_id, state.report_from_webhook(payload))
        return svc.HandleWebhookResponse(accepted=True, run_id=run_id, duplicate=not changed)

    async def apply(self, run_id: str, report: state.Report, news: bool = False) -> bool:
        """Merge a report into the run; True if it changed. ``news``: record the time even if not."""
        now = self.now_ms()
        changed = status_changed = False
        current = await self.store.require(run_id)
        median = None if state.is_terminal(current.run.status) else await self._median(current.run)

        def change(record: Record) -> Write | None:
            nonlocal changed, status_changed
            merged = state.merge(record.run, report, now)
            changed = merged is not None
            if merged is None:
                if not news:
                    return None
                record.news_ms = now
                return Write(record)
            state.estimate(merged.run, median, now)
            if merged.run.status == S.RUN_STATUS_CANCELLED and merged.status_changed and record.stop:
                state.stopped_by_us(merged.run, record.stop)
            record.run = merged.run
            record.news_ms = now
            record.upstream_duration = record.upstream_duration or merged.upstream_duration
            status_changed = merged.status_changed
            return Write(record, state.event(merged.run, merged.event_type, merged.new_outputs))

        record, _ = await self.store.update(run_id, change)
        if status_changed:
            await self._notify(record)
        if state.is_terminal(record.run.status) and not record.settled:
            self.spawn(self.settle(run_id), f"settle {run_id}")
        return changed

    async def poll(self, record: Record) -> None:
        run = record.run
        found = await self.upstream.get_run(
            run.upstream_run_id, queue_position=run.status in state.WAITING, deadline=self._deadline()
        )
        await self.apply(run.run_id, state.report_from_run(found), news=True)

    # --- our own endings --------------------------------------------------------------------------

    async def fail(self, run_id: str, reason: str, message: str, metadata: dict[str, str] | None = None) -> None:
        status = S.RUN_STATUS_TIMEOUT if reason == "RUN_TIMED_OUT" else S.RUN_STATUS_FAILED
        await self.end(run_id, status, state.run_error(reason, message, metadata))

    async def end(self, run_id: str, status: S.RunStatus, error: S.RunError) -> Record:
        now = self.now_ms()

        def change(record: Record) -> Write | None:
            ended = state.finish(record.run, status, error, now)
            if ended is None:
                return None
            ended.ClearField("estimated_end_time")
            record.run = ended
            return Write(record, state.event(ended, E.RUN_EVENT_TYPE_STATUS_CHANGED))

        ended, changed = await self.store.update(run_id, change)
        if changed:
            await self._notify(ended)
        with contextlib.suppress(DomainError):  # the ledger is down: the reconciler settles later
            await self.settle(run_id)
        return await self.store.require(run_id)

    # --- settlement -------------------------------------------------------------------------------

    async def settle(self, run_id: str) -> None:
        record = await self.store.require(run_id)
        run = record.run
        if not state.is_terminal(run.status) or record.settled:
            return
        if run.status == S.RUN_STATUS_SUCCESS and not record.upstream_duration and run.upstream_run_id:
            record = await self._billed_duration(record)
            run = record.run
        share = self.settings.cancel_charge_share
        charge = receipts.charge(run, share)
        try:
            hold, transaction_id = await self._settle_hold(run, charge)
            priced = await self._price(charge.gpu if charge else (run.gpu or gpu_pb2.GPU_TYPE_CPU))
        except DomainError as exc:
            await self._finished_unsettled(run_id, exc)
            raise
        receipt = receipts.receipt(run, hold, transaction_id, charge, priced.usd_per_second, priced.multiplier, share)
        now = self.now_ms()

        def done(current: Record) -> Write | None:
            if current.settled:
                return None
            current.settled = True
            current.run.settle_time.CopyFrom(timestamp_from_ms(now))
            current.run.update_time.CopyFrom(timestamp_from_ms(now))
            current.run.cost_points = receipt.points_charged
            current.run.receipt.CopyFrom(receipt)
            current.run.ClearField("estimated_end_time")
            event = b"" if current.finished else state.event(current.run, E.RUN_EVENT_TYPE_FINISHED)
            current.finished = True
            return Write(current, event, ttl_seconds=self.settings.retention_seconds)

        settled, written = await self.store.update(run_id, done)
        if written:
            _settled.add(1, {"status": S.RunStatus.Name(run.status)})
            if run.status == S.RUN_STATUS_SUCCESS and run.HasField("run_duration"):
                gpu = run.gpu or gpu_pb2.GPU_TYPE_CPU
                with contextlib.suppress(DomainError):
                    await self.history.record(run.workflow_id, gpu, run.run_duration.ToNanoseconds() / 1e9)
                    self._medians.pop((run.workflow_id, int(gpu)), None)
        await self._notify(settled)
        if _lost_upstream(settled):
            await self.store.schedule(run_id, self.now_ms() + 2_000)  # find the upstream run, to cancel it
        else:
            await self.store.unschedule(run_id)

    async def _billed_duration(self, record: Record) -> Record:
        """Upstream's own run_duration for billing (a webhook does not carry it); our observation
        if upstream cannot say within the poll window."""
        run = record.run
        try:
            found = await self.upstream.get_run(run.upstream_run_id, deadline=self._deadline())
        except upstream_errors.ComfyDeployError:
            if self.now_ms() - run.end_time.ToMilliseconds() < self.settings.poll_max_seconds * 1000:
                raise Unavailable(
                    "ComfyUI Deploy did not say how long the run took", reason="UPSTREAM_UNAVAILABLE"
                ) from None
            return record
        report = state.report_from_run(found)
        now = self.now_ms()

        def change(current: Record) -> Write | None:
            merged = state.merge(current.run, report, now, final=True)
            current.upstream_duration = True
            if merged is None:
                return Write(current)
            current.run = merged.run
            kind = E.RUN_EVENT_TYPE_OUTPUT if merged.new_outputs else E.RUN_EVENT_TYPE_PROGRESS
            return Write(current, state.event(merged.run, kind, merged.new_outputs))

        updated, _ = await self.store.update(run.run_id, change)
        return updated

    async def _price(self, gpu: int) -> points_service_pb2.QuoteCostResponse:
        """The economy's price of a GPU and its multiplier, for a receipt."""
        request = points_service_pb2.QuoteCostRequest(gpu=gpu)  # type: ignore[arg-type]
        request.gpu_time.FromSeconds(1)
        try:
            priced: points_service_pb2.QuoteCostResponse = await self.points.QuoteCost(request, timeout=10)
        except grpc.aio.AioRpcError as exc:
            raise peer_error(exc, POINTS) from None
        return priced

    async def _settle_hold(self, run: S.Run, charge: receipts.Charge | None) -> tuple[points_pb2.Hold | None, str]:
        """Capture ``charge`` or release the hold in full; the hold as settled and the transaction id."""
        if not run.hold_id:
            return None, ""
        request_id = f"settle:{run.run_id}"
        try:
            if charge is not None:
                usage = points_pb2.Usage(gpu=charge.gpu, gpu_time=charge.gpu_time)
                capture = points_service_pb2.CaptureHoldRequest(
                    request_id=request_id, user_id=run.user_id, hold_id=run.hold_id, usage=usage
                )
                captured: points_service_pb2.CaptureHoldResponse = await self.points.CaptureHold(capture, timeout=10)
                return captured.hold, captured.transaction.transaction_id
            reason = _RELEASE_REASONS.get(run.status, points_pb2.RELEASE_REASON_OTHER)
            if run.error.reason in _SUBMIT_REASONS:
                reason = points_pb2.RELEASE_REASON_SUBMIT_FAILED
            elif run.error.reason == "INTERRUPTED":
                reason = points_pb2.RELEASE_REASON_OTHER
            release = points_service_pb2.ReleaseHoldRequest(
                request_id=request_id, user_id=run.user_id, hold_id=run.hold_id, reason=reason,
                memo=run.error.reason.lower() or "run ended",
            )  # fmt: skip
            released: points_service_pb2.ReleaseHoldResponse = await self.points.ReleaseHold(release, timeout=10)
            return released.hold, released.transaction.transaction_id
        except grpc.aio.AioRpcError as exc:
            error = peer_error(exc, POINTS)
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                # The hold is gone or already settled (expired, for a release): nothing is left to do.
                log.warning("settling run %s: %s", run.run_id, exc.details(), extra={"run_id": run.run_id})
                return None, ""
            raise error from None

    async def _finished_unsettled(self, run_id: str, error: DomainError) -> None:
        """Settlement failed for now: watchers still get FINISHED; the reconciler retries settling."""

        def mark(current: Record) -> Write | None:
            if current.finished:
                return None
            current.finished = True
            return Write(current, state.event(current.run, E.RUN_EVENT_TYPE_FINISHED))

        with contextlib.suppress(DomainError):
            await self.store.update(run_id, mark)
            await self.store.schedule(run_id, self.now_ms() + 5_000)
        log.warning("run %s not settled yet: %s", run_id, error.message, extra={"run_id": run_id})

    # --- CancelRun --------------------------------------------------------------------------------

    async def cancel(self, request: svc.CancelRunRequest) -> S.Run:
        check = Violations()
        if request.request_id:
            check.request_id(request.request_id)
        _run_id(check, request.run_id)
        check.check()
        record = await self.store.require(request.run_id)
        if state.is_terminal(record.run.status):
            return record.run
        cancelled = state.run_error("RUN_CANCELLED", "cancelled by CancelRun", {"source": "cancel_run"})
        if not record.run.upstream_run_id:
            # Not upstream (yet): it ends here; a queue request still in flight is cancelled upstream
            # when its answer arrives (adopt).
            return (await self.end(request.run_id, S.RUN_STATUS_CANCELLED, cancelled)).run
        await self._stopping(request.run_id, "cancel_run")
        refused = await self._cancel_upstream(record.run.upstream_run_id)
        for attempt in range(self.settings.cancel_attempts):
            current = await self.store.require(request.run_id)
            if state.is_terminal(current.run.status):
                return current.run
            try:
                found = await self.upstream.get_run(current.run.upstream_run_id, deadline=self._deadline(10))
            except upstream_errors.ComfyDeployError:
                found = None
            if found is not None:
                await self.apply(request.run_id, state.report_from_run(found), news=True)
                if found.is_terminal:
                    return (await self.store.require(request.run_id)).run
            await asyncio.sleep(0.2 * 2**attempt)
        if refused is not None:
            raise FailedPrecondition(
                "ComfyUI Deploy cannot cancel this run", reason="RUN_NOT_CANCELLABLE",
                metadata={"run_id": request.run_id, "upstream_detail": refused[:200]},
            )  # fmt: skip
        raise Unavailable("ComfyUI Deploy did not confirm the cancel; retry", reason="UPSTREAM_UNAVAILABLE")

    async def _stopping(self, run_id: str, why: str) -> None:
        """Record why we are about to cancel the run upstream: the "cancelled" that upstream reports
        back (by webhook or poll) is then our cancel, a deadline or a time limit, not upstream's."""

        def mark(record: Record) -> Write | None:
            if record.stop or state.is_terminal(record.run.status):
                return None
            record.stop = why
            return Write(record)

        await self.store.update(run_id, mark)

    async def _cancel_upstream(self, upstream_run_id: str) -> str | None:
        """POST cancel with retries: upstream answers 500 for many reasons, often after applying it,
        and a repeat is harmless. Returns upstream's last refusal, or None once it said yes."""
        refusal: str | None = None
        for attempt in range(self.settings.cancel_attempts):
            try:
                await self.upstream.cancel_run(upstream_run_id, deadline=self._deadline(10))
                return None
            except upstream_errors.ComfyDeployError as exc:
                refusal = exc.detail
            await asyncio.sleep(0.1 * 2**attempt)
        return refusal

    # --- reads ------------------------------------------------------------------------------------

    async def get(self, run_id: str) -> S.Run:
        check = Violations()
        _run_id(check, run_id)
        check.check()
        return (await self.store.require(run_id)).run

    async def list(self, request: svc.ListRunsRequest) -> svc.ListRunsResponse:
        check = Violations()
        check.user_id("user_id", request.user_id)
        page_size = check.page_size(request.page_size)
        known = set(S.RunStatus.values()) - {S.RUN_STATUS_UNSPECIFIED}
        if any(s not in known for s in request.statuses):
            check.add("statuses", "must hold known statuses, not RUN_STATUS_UNSPECIFIED")
        check.check()
        statuses = sorted(set(request.statuses))
        before: tuple[int, str] | None = None
        if request.page_token:
            token = decode_page_token(request.page_token, {"u": request.user_id, "s": statuses})
            at, after = token.get("t"), token.get("r")
            if type(at) is not int or not isinstance(after, str):
                decode_page_token("", {"u": request.user_id})  # raises INVALID_PAGE_TOKEN
            before = (int(at), str(after))  # type: ignore[arg-type]
        runs: list[S.Run] = []
        more = False
        for _ in range(20):  # a filter may skip many runs: look at a bounded number of batches
            rows = await self.store.list_user(request.user_id, before, page_size + 1)
            records = await self.store.get_many([run_id for _, run_id in rows])
            for (at, run_id), record in zip(rows, records, strict=True):
                if len(runs) == page_size:
                    more = True
                    break
                before = (at, run_id)
                if record is not None and (not statuses or record.run.status in statuses):
                    runs.append(record.run)
            if more or len(rows) <= page_size:
                break
        else:
            more = True  # runs not looked at yet: a short (even empty) page, and the token goes on from here
        next_token = ""
        if more and before is not None:
            next_token = encode_page_token({"u": request.user_id, "s": statuses, "t": before[0], "r": before[1]})
        return svc.ListRunsResponse(runs=runs, next_page_token=next_token)

    async def watch(self, run_id: str, after_event_id: str = "") -> AsyncIterator[svc.WatchRunResponse]:
        """SNAPSHOT, then every change from the run's event stream, until FINISHED; or, resuming after
        an event still kept, what came after it."""
        check = Violations()
        _run_id(check, run_id)
        if after_event_id and not _EVENT_ID.fullmatch(after_event_id):
            check.add("after_event_id", "must be the event_id of a message of this run's WatchRun")
        check.check()
        async with self.hub.subscribe(run_id) as wake:
            record = await self.store.require(run_id)
            if after_event_id and await self.store.kept_after(run_id, after_event_id, record.event_id):
                last = after_event_id
            else:
                yield svc.WatchRunResponse(
                    run=record.run, event_type=E.RUN_EVENT_TYPE_SNAPSHOT, event_id=record.event_id
                )
                if record.finished:
                    yield svc.WatchRunResponse(
                        run=record.run, event_type=E.RUN_EVENT_TYPE_FINISHED, event_id=record.event_id
                    )
                    return
                last = record.event_id
            carried: list[S.RunOutput] = []  # outputs that came with the terminal status, for FINISHED
            first = True
            while True:
                if not first:
                    await wake.wait(5.0)  # a lost notification costs at most this long
                first = False
                events = await self.store.events_after(run_id, last, 200)
                if not events:
                    current = await self.store.get(run_id)
                    if current is None:
                        raise NotFound(f"run {run_id} expired", reason="RUN_NOT_FOUND", metadata={"run_id": run_id})
                    if current.finished and current.event_id == last:  # resumed after its last event
                        yield svc.WatchRunResponse(
                            run=current.run, event_type=E.RUN_EVENT_TYPE_FINISHED, event_id=current.event_id
                        )
                        return
                messages = []
                for event_id, data in events:
                    message = svc.WatchRunResponse.FromString(data)
                    message.event_id = event_id
                    messages.append(message)
                if events:
                    last = events[-1][0]
                for index, message in enumerate(messages):
                    later = messages[index + 1] if index + 1 < len(messages) else None
                    if message.event_type == E.RUN_EVENT_TYPE_SNAPSHOT:
                        continue
                    if message.event_type == E.RUN_EVENT_TYPE_STATUS_CHANGED and state.is_terminal(message.run.status):
                        # STATUS_CHANGED is for non-terminal statuses: FINISHED reports the end, after
                        # settlement, with the outputs that came with the terminal status.
                        carried.extend(message.new_outputs)
                        continue
                    if message.event_type == E.RUN_EVENT_TYPE_PROGRESS and later is not None:
                        continue  # a slow reader gets the latest progress, not every step
                    if message.event_type == E.RUN_EVENT_TYPE_FINISHED and carried:
                        outputs = [*carried, *message.new_outputs]
                        message = svc.WatchRunResponse(
                            run=message.run, event_type=message.event_type, new_outputs=outputs,
                            event_id=message.event_id,
                        )  # fmt: skip
                    yield message
                    if message.event_type == E.RUN_EVENT_TYPE_FINISHED:
                        return

    # --- the reconciler ---------------------------------------------------------------------------

    async def reconcile_forever(self) -> None:
        task = asyncio.current_task()
        while True:
            try:
                await self.reconcile_pass()
            except DomainError as exc:
                log.warning("reconciler pass deferred: %s", exc.message)
            if task is not None and task.cancelling():
                # Python 3.11's asyncio.wait_for (redis-py sends with it when socket_timeout is set)
                # returns its result, swallowing a cancel that lands as the write completes: stop
                # anyway, or the server's shutdown waits for this task forever.
                raise asyncio.CancelledError
            await asyncio.sleep(self.settings.reconcile_interval_seconds)

    async def reconcile_pass(self) -> int:
        """One pass over the runs that are due, on the replica holding the lease; how many it saw."""
        interval_ms = int(self.settings.reconcile_interval_seconds * 1000)
        if not await self.store.lease(self.owner, max(5_000, interval_ms * 5)):
            return 0
        due = await self.store.due(self.now_ms(), self.settings.reconcile_batch)
        limit = asyncio.Semaphore(self.settings.reconcile_concurrency)

        async def one(run_id: str) -> None:
            async with limit:
                try:
                    outcome = await self.reconcile(run_id)
                except (DomainError, upstream_errors.ComfyDeployError) as exc:
                    outcome = "deferred"
                    log.warning("reconciling run %s deferred: %s", run_id, exc, extra={"run_id": run_id})
                    with contextlib.suppress(DomainError):
                        await self.store.schedule(run_id, self.now_ms() + 5_000)
                except Conflict:
                    outcome = "conflict"
                _reconciled.add(1, {"outcome": outcome})

        await asyncio.gather(*(one(run_id) for run_id in due))
        return len(due)

    async def reconcile(self, run_id: str) -> str:
        """Move one run on, whatever state a crash or a silent upstream left it in; the outcome."""
        record = await self.store.get(run_id)
        if record is None:
            await self.store.unschedule(run_id)
            return "gone"
        run, now, settings = record.run, self.now_ms(), self.settings
        if state.is_terminal(run.status):
            if not record.settled:
                await self.settle(run_id)
                return "settled"
            if _lost_upstream(record):
                return await self._find_orphan(record)
            await self.store.unschedule(run_id)
            return "done"
        if run.status == S.RUN_STATUS_PENDING:
            age = now - run.create_time.ToMilliseconds()
            if age < settings.pending_grace_seconds * 1000:
                await self.store.schedule(run_id, run.create_time.ToMilliseconds() + int(
                    settings.pending_grace_seconds * 1000))  # fmt: skip
                return "pending"
            await self._interrupted(record)
            return "interrupted"
        if run.HasField("cancel_after") and now >= run.create_time.ToMilliseconds() + run.cancel_after.ToMilliseconds():
            if run.upstream_run_id:
                await self._stopping(run_id, "cancel_after")
                await self._cancel_upstream(run.upstream_run_id)
            passed = state.run_error("RUN_CANCELLED", "its cancel_after deadline passed", {"source": "cancel_after"})
            await self.end(run_id, S.RUN_STATUS_CANCELLED, passed)
            return "deadline"
        if run.HasField("submit_time") and now > run.submit_time.ToMilliseconds() + settings.run_timeout_seconds * 1000:
            await self._stopping(run_id, "deadline")
            await self._cancel_upstream(run.upstream_run_id)
            await self.fail(run_id, "RUN_TIMED_OUT", "the run did not finish within its time limit",
                            {"source": "deadline"})  # fmt: skip
            return "timed_out"
        if run.status == S.RUN_STATUS_SUBMITTING:
            return await self._reconcile_submission(record)
        quiet = now - max(record.news_ms, run.submit_time.ToMilliseconds())
        wait = self._poll_interval_ms(record, now)
        if quiet < wait:
            await self.store.schedule(run_id, self._due(run, now + wait - quiet))
            return "quiet"
        await self.poll(record)
        polled = await self.store.require(run_id)
        await self.store.schedule(run_id, self._due(run, now + self._poll_interval_ms(polled, now)))
        return "polled"

    def _due(self, run: S.Run, at_ms: int) -> int:
        """``at_ms``, or just past one of the run's deadlines if that comes first (its time limit, its
        cancel_after): a run is ended on time, however long its next poll is away."""
        if run.HasField("cancel_after"):
            at_ms = min(at_ms, run.create_time.ToMilliseconds() + run.cancel_after.ToMilliseconds() + 1)
        if not run.HasField("submit_time"):
            return at_ms
        return min(at_ms, run.submit_time.ToMilliseconds() + int(self.settings.run_timeout_seconds * 1000) + 1)

    def _poll_interval_ms(self, record: Record, now: int) -> int:
        """Every poll_after seconds while running; while waiting in the queue, half the time it has
        waited, between poll_after and poll_max (a queue that is long now is long a while yet)."""
        base = self.settings.poll_after_seconds * 1000
        if record.run.status in state.WAITING:
            waited = now - record.run.submit_time.ToMilliseconds()
            return int(min(self.settings.poll_max_seconds * 1000, max(base, waited / 2)))
        return int(base)

    async def _reconcile_submission(self, record: Record) -> str:
        run, now, settings = record.run, self.now_ms(), self.settings
        if record.submit == "none":
            await self.submit(run.run_id)
            return "submitted"
        if record.submit == "sent" and now - record.submit_ms < settings.submit_grace_seconds * 1000:
            await self.store.schedule(run.run_id, record.submit_ms + int(settings.submit_grace_seconds * 1000))
            return "submitting"
        found = await self.find_submission(record)
        if found is not None:
            await self.adopt(run.run_id, found)
            return "found"
        if now - record.submit_ms > settings.submit_unknown_seconds * 1000:
            lost = "ComfyUI Deploy's answer to the queue request was lost and the run was not found upstream"
            await self.fail(run.run_id, "SUBMIT_OUTCOME_UNKNOWN", lost)
            return "lost"
        await self.store.schedule(run.run_id, now + 10_000)
        return "searching"

    async def _find_orphan(self, record: Record) -> str:
        """A run that ended here while its queue request's outcome was unknown: the upstream run that
        request may have created is looked for (as for a live run) and, once found, cancelled (adopt)."""
        run, now, settings = record.run, self.now_ms(), self.settings
        if record.submit == "sent" and now - record.submit_ms < settings.submit_grace_seconds * 1000:
            # Still in flight: its answer adopts (and cancels) it; else it becomes unknown.
            await self.store.schedule(run.run_id, record.submit_ms + int(settings.submit_grace_seconds * 1000))
            return "submitting"
        if now - record.submit_ms > settings.submit_unknown_seconds * 1000:
            await self.store.unschedule(run.run_id)
            return "done"
        found = await self.find_submission(record)
        if found is not None:
            await self.adopt(run.run_id, found)  # the run is terminal: adopt cancels it upstream
            return "orphan"
        await self.store.schedule(run.run_id, now + 10_000)
        return "searching"

    async def _interrupted(self, record: Record) -> None:
        """CreateRun died while the run was PENDING: end it and give back a hold it may have taken.
        Reserving with the run's own request_id returns that hold if it was taken (a replay) and
        takes one otherwise; either way it is released at once."""
        run = record.run
        try:
            hold = await self._hold(run, None)
            run_with_hold = record.copy()
            run_with_hold.run.hold_id = hold.hold_id
            run_with_hold.run.points_held = hold.points_held + hold.qoints_held
            with contextlib.suppress(Conflict):
                await self.store.write(Write(run_with_hold))
        except DomainError:
            pass  # no points, too many holds: no hold was taken by this run
        await self.fail(run.run_id, "INTERRUPTED", "the service stopped while the run was being created")


def _labels(check: Violations, labels: Any) -> None:
    if len(labels) > MAX_LABELS:
        check.add("labels", f"at most {MAX_LABELS} labels")
    for key, value in labels.items():
        if not LABEL_KEY.fullmatch(key):
            check.add(f"labels.{key[:63]}", "keys are 1 to 63 characters of a-z 0-9 _ . -")
        elif len(value) > MAX_LABEL_VALUE:
            check.add(f"labels.{key}", f"values are at most {MAX_LABEL_VALUE} characters")


def _lost_upstream(record: Record) -> bool:
    """The run may have an upstream run it does not know of: its queue request is in flight or its
    answer was lost."""
    return not record.run.upstream_run_id and record.submit in ("sent", "unknown")


def _median(durations: Durations) -> float | None:
    return durations.median if durations.known else None


def _adapter(context: grpc.aio.ServicerContext | None) -> str:
    """The caller's adapter, as the gateway names it (gRPC callers may send it themselves)."""
    for key, value in (context.invocation_metadata() or ()) if context is not None else ():
        if key == ADAPTER_METADATA and isinstance(value, str):
            return value[:64]
    return ""


def _check_target(check: Violations, request: svc.CreateRunRequest | svc.QuoteRunRequest) -> str:
    """The user, workflow (by id or name), environment and GPU a run or a quote names; the name."""
    check.user_id("user_id", request.user_id)
    which = request.WhichOneof("workflow")
    name = (request.workflow_id if which == "workflow_id" else request.workflow_name).strip()
    if not name:
        check.add("workflow", "one of workflow_id or workflow_name is required")
    elif len(name) > MAX_NAME:
        check.add(which or "workflow", f"must be at most {MAX_NAME} characters")
    if request.environment not in deployment_pb2.Environment.values():
        check.add("environment", "is not a known environment")
    if request.gpu not in gpu_pb2.GpuType.values():
        check.add("gpu", "is not a known GPU type")
    return name


def _run_id(check: Violations, run_id: str) -> None:
    if not UUID.fullmatch(run_id):
        check.add("run_id", "is not a run id (a UUID)")


def _upstream_metadata(error: upstream_errors.ComfyDeployError) -> dict[str, str]:
    metadata = {"upstream_detail": error.detail[:200]}
    if error.status is not None:
        metadata["upstream_status"] = str(error.status)
    return metadata


__all__ = ["RunSettings", "Runs", "webhook_pb2"]
