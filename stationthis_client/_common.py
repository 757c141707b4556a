"""What the gRPC and the HTTP clients share: the methods themselves (built once, over a transport's
``_unary``/``_open_watch``/``_upload``), idempotency keys, backoff, and the resumable run watch.

A transport (``aio.AsyncClient``, ``http.HttpClient``) provides three things:

* ``_unary(service, method, request, response_type)``: one unary call with its deadline and its
  retries, raising ``StationThisError``;
* ``_open_watch(request)``: one WatchRun stream, raising ``StationThisError`` (``Unavailable`` when
  the stream was cut: the peer went away, the connection broke) or ``StreamIdle`` (nothing came for
  a while over a connection that may be dead: open it again);
* ``_upload(metadata, path)``: UploadFile, the whole file, with retries.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator, Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf.message import Message

from common.backoff import backoff_delay
from stationthis.comfyui.v1 import comfyui_service_pb2 as svc
from stationthis.comfyui.v1 import run_pb2
from stationthis.points.v1 import points_pb2
from stationthis.points.v1 import points_service_pb2 as pts
from stationthis.workflows.v1 import workflow_pb2
from stationthis.workflows.v1 import workflows_service_pb2 as wfs

from .errors import RateLimited, StationThisError, Unavailable

log = logging.getLogger("stationthis_client")

M = TypeVar("M", bound=Message)

DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRY_WINDOW = 10.0  # how long a unary call keeps trying a service that is not there
DEFAULT_RESUME_WINDOW = 60.0  # how long a watch keeps re-opening a stream that keeps failing
BACKOFF_BASE = 0.1
BACKOFF_CAP = 2.0
PAGE_SIZE = 200  # the services' largest page
CHUNK_BYTES = 256 * 1024  # UploadFile takes up to 1 MiB a message
UPLOAD_SECONDS_PER_MIB = 1.0  # an upload's deadline: the timeout, plus this per MiB of the file

POINTS = "points"
WORKFLOWS = "workflows"
COMFYUI = "comfyui"
SERVICE_NAMES = {
    POINTS: pts.DESCRIPTOR.services_by_name["PointsService"].full_name,
    WORKFLOWS: wfs.DESCRIPTOR.services_by_name["WorkflowsService"].full_name,
    COMFYUI: svc.DESCRIPTOR.services_by_name["ComfyUIService"].full_name,
}
TERMINAL = frozenset(
    {run_pb2.RUN_STATUS_SUCCESS, run_pb2.RUN_STATUS_FAILED, run_pb2.RUN_STATUS_TIMEOUT, run_pb2.RUN_STATUS_CANCELLED}
)


def new_request_id() -> str:
    """An idempotency key for one mutation (kept for all of that call's attempts)."""
    return str(uuid.uuid4())


def backoff(attempt: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """Capped exponential backoff with full jitter: attempt 0 waits up to ``base`` seconds."""
    return backoff_delay(attempt, base, cap)


def set_inputs(request: Message, inputs: Mapping[str, Any] | None, field: str = "inputs") -> None:
    """Copy ``inputs`` into the request's ``google.protobuf.Struct`` field, if it has one."""
    if inputs and field in request.DESCRIPTOR.fields_by_name:
        getattr(request, field).update(dict(inputs))


def output_key(output: run_pb2.RunOutput) -> tuple[str, int, str, str]:
    """What identifies an output (see RunOutput): (node_id, type, filename) or (node_id, text)."""
    return (output.node_id, int(output.type), output.filename, output.text)


class StreamIdle(Exception):
    """Nothing arrived on a watch stream for a while: open it again (the run may just be quiet)."""


class Surface(abc.ABC):
    """The client's methods, the same over every transport."""

    timeout: float
    resume_window: float

    # --- what a transport provides ---------------------------------------------------------------

    @abc.abstractmethod
    async def _unary(self, service: str, method: str, request: Message, response_type: type[M]) -> M: ...

    @abc.abstractmethod
    def _open_watch(self, request: svc.WatchRunRequest) -> AsyncGenerator[svc.WatchRunResponse, None]: ...

    @abc.abstractmethod
    async def _upload(self, metadata: svc.UploadFileMetadata, path: Path) -> svc.UploadFileResponse: ...

    # --- the catalog ------------------------------------------------------------------------------

    async def workflows(self) -> list[workflow_pb2.Workflow]:
        """Every workflow of the catalog (all pages), ordered by name."""
        found: list[workflow_pb2.Workflow] = []
        token = ""
        while True:
            request = wfs.ListWorkflowsRequest(page_size=PAGE_SIZE, page_token=token)
            reply = await self._unary(WORKFLOWS, "ListWorkflows", request, wfs.ListWorkflowsResponse)
            found.extend(reply.workflows)
            token = reply.next_page_token
            if not token:
                return found

    async def workflow(self, name: str) -> workflow_pb2.Workflow:
        """One workflow by id, name, display name or alias as a user types it (``"/make"``)."""
        request = wfs.ResolveWorkflowRequest(name=name)
        return (await self._unary(WORKFLOWS, "ResolveWorkflow", request, wfs.ResolveWorkflowResponse)).workflow

    # --- the ledger -------------------------------------------------------------------------------

    async def account(self, user: str) -> points_pb2.Account:
        request = pts.GetAccountRequest(user_id=user)
        return (await self._unary(POINTS, "GetAccount", request, pts.GetAccountResponse)).account

    async def credit(
        self,
        user: str,
        qoints: int,
        reference: str,
        *,
        memo: str = "",
        source: int = points_pb2.QOINTS_SOURCE_PURCHASE,
        request_id: str | None = None,
    ) -> pts.CreditQointsResponse:
        """Add paid qoints. ``reference`` (the payment's id) is credited at most once, ever; ``source``
        defaults to a purchase (``points_pb2.QOINTS_SOURCE_GRANT`` for an operator's gift)."""
        request = pts.CreditQointsRequest(
            request_id=request_id or new_request_id(),
            user_id=user,
            qoints=qoints,
            external_reference=reference,
            source=source,  # type: ignore[arg-type]
            memo=memo,
        )
        return await self._unary(POINTS, "CreditQoints", request, pts.CreditQointsResponse)

    async def history(self, user: str, limit: int = 20) -> list[points_pb2.Transaction]:
        """The user's latest ``limit`` ledger entries, newest first."""
        found: list[points_pb2.Transaction] = []
        token = ""
        while len(found) < limit:
            request = pts.ListTransactionsRequest(
                user_id=user, page_size=min(PAGE_SIZE, limit - len(found)), page_token=token
            )
            reply = await self._unary(POINTS, "ListTransactions", request, pts.ListTransactionsResponse)
            found.extend(reply.transactions)
            token = reply.next_page_token
            if not token:
                break
        return found[:limit]

    # --- runs -------------------------------------------------------------------------------------

    async def quote(self, user: str, workflow: str, inputs: Mapping[str, Any] | None = None) -> svc.QuoteRunResponse:
        """What a run would cost at most (what ``create`` holds), and whether the user can pay it."""
        request = svc.QuoteRunRequest(user_id=user, workflow_name=workflow)
        set_inputs(request, inputs)  # QuoteRun prices the workflow; inputs are passed if it takes them
        return await self._unary(COMFYUI, "QuoteRun", request, svc.QuoteRunResponse)

    async def create(
        self,
        user: str,
        workflow: str,
        inputs: Mapping[str, Any] | None = None,
        *,
        cancel_after: float | None = None,
        callback_url: str | None = None,
        request_id: str | None = None,
    ) -> run_pb2.Run:
        """Start a run of ``workflow`` (id, name or alias) for ``user``; returns it once points are held.

        ``request_id`` (default: a new UUID) makes the call idempotent: every retry of it, by this
        client or by the caller, starts at most one run."""
        request = svc.CreateRunRequest(
            request_id=request_id or new_request_id(),
            user_id=user,
            workflow_name=workflow,
            callback_url=callback_url or "",
        )
        set_inputs(request, inputs)
        if cancel_after is not None:
            request.cancel_after.FromTimedelta(timedelta(seconds=cancel_after))
        return (await self._unary(COMFYUI, "CreateRun", request, svc.CreateRunResponse)).run

    async def generate(
        self,
        user: str,
        workflow: str,
        inputs: Mapping[str, Any] | None = None,
        *,
        cancel_after: float | None = None,
        callback_url: str | None = None,
        request_id: str | None = None,
    ) -> Generation:
        """``create``, then a ``Generation``: iterate it for the run's events until FINISHED, or
        ``await generation.wait()`` for the final run."""
        run = await self.create(
            user, workflow, inputs, cancel_after=cancel_after, callback_url=callback_url, request_id=request_id
        )
        return Generation(run, self.watch(run.run_id))

    def watch(self, run_id: str, after_event_id: str | None = None) -> RunWatch:
        """The run's events (SNAPSHOT, STATUS_CHANGED, PROGRESS, OUTPUT ..., FINISHED), surviving a
        broken stream: it is re-opened after the last event received, and nothing is yielded twice."""
        return RunWatch(run_id, self._open_watch, after_event_id=after_event_id or "",
                        resume_window=self.resume_window)  # fmt: skip

    async def run(self, run_id: str) -> run_pb2.Run:
        request = svc.GetRunRequest(run_id=run_id)
        return (await self._unary(COMFYUI, "GetRun", request, svc.GetRunResponse)).run

    async def runs(self, user: str, limit: int = 20) -> list[run_pb2.Run]:
        """The user's latest ``limit`` runs, newest first."""
        found: list[run_pb2.Run] = []
        token = ""
        while len(found) < limit:
            request = svc.ListRunsRequest(user_id=user, page_size=min(PAGE_SIZE, limit - len(found)), page_token=token)
            reply = await self._unary(COMFYUI, "ListRuns", request, svc.ListRunsResponse)
            found.extend(reply.runs)
            token = reply.next_page_token
            if not token:
                break
        return found[:limit]

    async def cancel(self, run_id: str, *, request_id: str | None = None) -> run_pb2.Run:
        """Cancel a run (its hold is released); a terminal run is returned as it is."""
        request = svc.CancelRunRequest(request_id=request_id or new_request_id(), run_id=run_id)
        return (await self._unary(COMFYUI, "CancelRun", request, svc.CancelRunResponse)).run

    async def regenerate(
        self,
        run_id: str,
        *,
        same_seed: bool = False,
        overrides: Mapping[str, Any] | None = None,
        cancel_after: float | None = None,
        callback_url: str | None = None,
        request_id: str | None = None,
    ) -> run_pb2.Run:
        """A new run from another run's inputs (a new seed unless ``same_seed``), with ``overrides``."""
        request = svc.RegenerateRunRequest(
            request_id=request_id or new_request_id(),
            run_id=run_id,
            same_seed=same_seed,
            callback_url=callback_url or "",
        )
        set_inputs(request, overrides, "input_overrides")
        if cancel_after is not None:
            request.cancel_after.FromTimedelta(timedelta(seconds=cancel_after))
        return (await self._unary(COMFYUI, "RegenerateRun", request, svc.RegenerateRunResponse)).run

    async def upload(
        self,
        path: str | Path,
        *,
        user: str,
        content_type: str | None = None,
        filename: str | None = None,
        request_id: str | None = None,
    ) -> svc.UploadFileResponse:
        """Upload a file to ComfyUI Deploy storage; its ``url`` can be given as an input value.
        ``content_type`` defaults to the one its name suggests."""
        import mimetypes

        file = Path(path)
        size = (await asyncio.to_thread(file.stat)).st_size
        guessed = content_type or mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        metadata = svc.UploadFileMetadata(
            request_id=request_id or new_request_id(),
            user_id=user,
            filename=filename or file.name,
            content_type=guessed,
            size_bytes=size,
        )
        return await self._upload(metadata, file)

    def upload_timeout(self, size_bytes: int) -> float:
        return self.timeout + UPLOAD_SECONDS_PER_MIB * size_bytes / (1 << 20)


OpenWatch = Callable[[svc.WatchRunRequest], AsyncGenerator[svc.WatchRunResponse, None]]


class RunWatch:
    """The events of one run, as an async iterator that survives a broken stream.

    When the stream breaks (``Unavailable``: the service restarted, the connection reset) it is
    opened again with capped, jittered backoff, with ``after_event_id`` = the last event received, so
    the service sends only what came after it; if those events are gone it sends a fresh SNAPSHOT,
    which is skipped when the run is as last seen, and otherwise yielded with ``new_outputs`` set to
    the outputs not reported yet (so a reader that collects ``new_outputs`` misses none). An event
    already yielded (same ``event_id`` and type) is never yielded again. It gives up, raising the
    last error, after ``resume_window`` seconds of failing without receiving anything; any other
    error (NotFound...) is raised at once. Iteration ends after FINISHED.

    ``run`` is the run as last reported, ``last_event_id`` the id to resume from, ``resumes`` how
    many times the stream was re-opened.
    """

    def __init__(self, run_id: str, open_watch: OpenWatch, *, after_event_id: str = "",
                 resume_window: float = DEFAULT_RESUME_WINDOW) -> None:  # fmt: skip
        self.run_id = run_id
        self.last_event_id = after_event_id
        self.resume_window = resume_window
        self.run: run_pb2.Run | None = None
        self.resumes = 0
        self.finished = False
        self._open = open_watch
        self._events = self._iterate()

    def __aiter__(self) -> RunWatch:
        return self

    async def __anext__(self) -> svc.WatchRunResponse:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        """Stop watching (closes the stream); iterating afterwards ends at once."""
        await self._events.aclose()

    async def _iterate(self) -> AsyncGenerator[svc.WatchRunResponse, None]:
        seen: set[tuple[str, int]] = set()
        reported: set[tuple[str, int, str, str]] = set()
        yielded = bool(self.last_event_id)  # resuming from the caller's event: a SNAPSHOT is news only if changed
        loop = asyncio.get_running_loop()
        failing_since: float | None = None
        attempt = 0
        while True:
            resumed_after = self.last_event_id
            request = svc.WatchRunRequest(run_id=self.run_id, after_event_id=resumed_after)
            try:
                async with contextlib.aclosing(self._open(request)) as stream:
                    async for message in stream:
                        failing_since, attempt = None, 0
                        if message.event_id:
                            key = (message.event_id, int(message.event_type))
                            if key in seen:
                                continue
                            seen.add(key)
                            self.last_event_id = message.event_id
                        if message.event_type == svc.RUN_EVENT_TYPE_SNAPSHOT:
                            if yielded:
                                if self.run is not None and message.run == self.run:
                                    log.debug("watch of run %s resumed: nothing was missed", self.run_id)
                                    continue
                                log.debug("watch of run %s resumed from a fresh snapshot (the events after %s "
                                          "are no longer kept)", self.run_id, resumed_after or "-")  # fmt: skip
                                if self.run is not None:
                                    fresh = [o for o in message.run.outputs if output_key(o) not in reported]
                                    message = svc.WatchRunResponse(
                                        run=message.run, event_type=message.event_type,
                                        new_outputs=fresh, event_id=message.event_id,
                                    )  # fmt: skip
                            reported.update(output_key(o) for o in message.run.outputs)
                        reported.update(output_key(o) for o in message.new_outputs)
                        self.run = message.run
                        yielded = True
                        if message.event_type == svc.RUN_EVENT_TYPE_FINISHED:
                            self.finished = True
                        yield message
                        if self.finished:
                            return
                error: StationThisError = Unavailable(
                    "UNAVAILABLE", "the run's event stream ended before the run finished", "STREAM_ENDED"
                )
            except StreamIdle:
                failing_since, attempt = None, 0
                self.resumes += 1
                continue
            except (Unavailable, RateLimited) as exc:
                if isinstance(exc, RateLimited) and exc.retry_after is None:
                    raise  # a cap (too many open holds...), not a rate: retrying will not help
                error = exc
            now = loop.time()
            if failing_since is None:
                failing_since = now
            delay = backoff(attempt)
            if isinstance(error, RateLimited) and error.retry_after is not None:
                delay = max(delay, error.retry_after)
            if now + delay - failing_since > self.resume_window:
                raise error
            log.info("watch of run %s interrupted (%s); resuming after event %s", self.run_id, error.message,
                     self.last_event_id or "-")  # fmt: skip
            await asyncio.sleep(delay)
            attempt += 1
            self.resumes += 1


class Generation:
    """A run being generated: an async iterator of its ``WatchRunResponse`` events (queue place, ETA,
    progress, outputs) until FINISHED, resuming a broken stream as ``RunWatch`` does.

    ``run`` is the latest ``Run`` (the one ``create`` returned until the first event);
    ``await generation.wait()`` drains the events and returns the final run.
    """

    def __init__(self, run: run_pb2.Run, watch: RunWatch) -> None:
        self.run = run
        self.watch = watch

    @property
    def run_id(self) -> str:
        return self.run.run_id

    @property
    def resumes(self) -> int:
        return self.watch.resumes

    @property
    def finished(self) -> bool:
        return self.watch.finished

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> svc.WatchRunResponse:
        event = await self.watch.__anext__()
        self.run = event.run
        return event

    async def wait(self) -> run_pb2.Run:
        """The final run, once FINISHED (events not read yet are read and dropped)."""
        async for _ in self:
            pass
        return self.run

    async def aclose(self) -> None:
        await self.watch.aclose()
