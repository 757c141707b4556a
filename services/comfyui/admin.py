"""ComfyUIService's pass-through RPCs: machines, deployments, workflow versions and workflow upload.

Each handler validates its request at the edge (ids are UUIDs upstream, so a malformed one never
reaches ComfyUI Deploy), calls the shared client with what is left of the caller's deadline, maps
client errors onto the contract's reasons (``upstream_error``) and converts the answer to protobuf.

Lists. Upstream lists are short (an account's machines, deployments, a workflow's versions), so each
page is cut from the whole upstream list, ordered as the contract says. Page tokens are keysets (the
sort key of the last item sent, plus the request's filters): an item added or removed between two
pages neither repeats nor hides another, as it would with an offset.

Idempotency. CreateDeployment and UploadWorkflow remember their first answer per ``request_id``
(``RequestIds``, namespace ``cui``); only successes are remembered. A new workflow takes two upstream
calls (POST /workflow answers only its id; GET /workflow/{id} gives the version); the first one's
answer is remembered on its own, so a retry after the second failed does not upload the workflow
again. Neither upstream create is re-sent by the client once it may have arrived (``OutcomeUnknown``):
the caller then gets UPSTREAM_UNAVAILABLE with ``outcome: unknown``, and a retry may create a
duplicate upstream (ComfyUI Deploy has no idempotency key to reconcile with).
"""

from __future__ import annotations

import bisect
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc
import redis.exceptions
from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.protobuf.message import Message

from comfydeploy import errors as cd
from comfydeploy.client import ComfyDeployClient
from comfydeploy.models import Deployment, InputType, Machine, WorkflowVersion
from common.channels import DEFAULT_TIMEOUT_SECONDS, remaining
from common.errors import DomainError, FailedPrecondition, FieldViolation, InvalidArgument, NotFound, Unavailable
from common.gpu import gpu_type
from common.idempotency import RequestIds, fingerprint
from common.proto_time import duration_from_seconds
from common.validation import Violations, decode_page_token, encode_page_token
from stationthis.comfyui.v1 import comfyui_service_pb2, deployment_pb2, machine_pb2, workflow_version_pb2
from stationthis.workflows.v1 import workflows_service_pb2, workflows_service_pb2_grpc

log = logging.getLogger("stationthis.comfyui.admin")

SVC = comfyui_service_pb2
M = TypeVar("M", bound=Message)
T = TypeVar("T")

MAX_NAME = 200
MAX_DESCRIPTION = 1000
MAX_COMMENT = 1000
UPSTREAM_PAGE = 100  # upstream's default page of GET /machines and GET /workflow/{id}/versions
MAX_UPSTREAM_PAGES = 50
REFRESH_TIMEOUT_SECONDS = 10.0
UUID_TEXT = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_WRAPPED_404 = re.compile(r"\b404: (.*)", re.DOTALL)  # upstream's str(HTTPException(404, ...)) in a 500
_INT32_MAX = 2**31 - 1

# --------------------------------------------------------------------------- upstream errors

MACHINE_NOT_FOUND = "MACHINE_NOT_FOUND"
DEPLOYMENT_NOT_FOUND = "DEPLOYMENT_NOT_FOUND"
WORKFLOW_NOT_FOUND = "WORKFLOW_NOT_FOUND"
WORKFLOW_VERSION_NOT_FOUND = "WORKFLOW_VERSION_NOT_FOUND"
# The word upstream's not-found detail uses for each, most specific first ("Workflow version not found"
# names a workflow too).
_NOT_FOUND_WORDS = (
    (WORKFLOW_VERSION_NOT_FOUND, "version"),
    (MACHINE_NOT_FOUND, "machine"),
    (DEPLOYMENT_NOT_FOUND, "deployment"),
    (WORKFLOW_NOT_FOUND, "workflow"),
)


@dataclass(frozen=True)
class Named:
    """An upstream object a request names, which upstream may report missing: the reason for that,
    and the metadata key and id the error carries (``Named(MACHINE_NOT_FOUND, "machine_id", id)``)."""

    reason: str
    key: str
    value: str


class UpstreamUnauthorized(DomainError):
    """ComfyUI Deploy refused our API key (401/403): INTERNAL, a configuration problem of this server."""

    code = grpc.StatusCode.INTERNAL
    default_reason = "UPSTREAM_UNAUTHORIZED"


def not_found(named: Named) -> NotFound:
    what = named.reason.removesuffix("_NOT_FOUND").lower().replace("_", " ")
    return NotFound(f"no upstream {what} has {named.key} {named.value}", reason=named.reason,
                    metadata={named.key: named.value})  # fmt: skip


def _missing_detail(exc: cd.ComfyDeployError) -> str | None:
    """The not-found detail of a 404, or of a 500 wrapping one (``"...404: Workflow not found"``)."""
    if isinstance(exc, cd.NotFound):
        return exc.detail
    if isinstance(exc, cd.ServerError) and exc.status == 500:
        wrapped = _WRAPPED_404.search(exc.detail)
        return wrapped.group(1) if wrapped else None
    return None


def _which(detail: str, named: Sequence[Named]) -> Named | None:
    """Which of ``named`` the detail says is missing; the only one when the detail names none."""
    lowered = detail.lower()
    for reason, word in _NOT_FOUND_WORDS:
        for candidate in named:
            if candidate.reason == reason and word in lowered:
                return candidate
    return named[0] if len(named) == 1 else None


def upstream_error(exc: cd.ComfyDeployError, named: Sequence[Named] = ()) -> DomainError:
    """The contract's error (error_reason.proto) for a client error. ``named``: the objects the
    request names, so that upstream's not-found answers become their own reasons."""
    detail = _missing_detail(exc)
    if detail is not None:
        missing = _which(detail, named)
        if missing is not None:
            return not_found(missing)
    metadata = {} if exc.status is None else {"upstream_status": str(exc.status)}
    if isinstance(exc, cd.Unauthorized | cd.Forbidden):
        return UpstreamUnauthorized("ComfyUI Deploy refused this server's API key", metadata=metadata)
    if exc.status is not None and 400 <= exc.status < 500 and not isinstance(exc, cd.RateLimited):
        return FailedPrecondition(
            str(exc), reason="UPSTREAM_REJECTED", metadata={**metadata, "upstream_detail": exc.detail[:200]}
        )
    if isinstance(exc, cd.OutcomeUnknown):
        metadata["outcome"] = "unknown"  # it may have taken effect upstream
    return Unavailable(str(exc), reason="UPSTREAM_UNAVAILABLE", metadata=metadata)


STORE_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def store_unavailable() -> Unavailable:
    return Unavailable("the request store did not answer; retry with the same request_id", reason="STORE_UNAVAILABLE")


# --------------------------------------------------------------------------- conversion


def _upstream_names(enum: Any, prefix: str) -> dict[str, str]:
    """Upstream spelling -> enum value name: ``"public-share"`` is ``ENVIRONMENT_PUBLIC_SHARE``."""
    return {
        value.name.removeprefix(prefix).lower().replace("_", "-"): value.name
        for value in enum.DESCRIPTOR.values
        if value.number
    }


ENVIRONMENTS = _upstream_names(deployment_pb2.Environment, "ENVIRONMENT_")
ENVIRONMENT_NAMES = {deployment_pb2.Environment.Value(name): upstream for upstream, name in ENVIRONMENTS.items()}
MACHINE_TYPES = _upstream_names(machine_pb2.MachineType, "MACHINE_TYPE_")
MACHINE_STATUSES = _upstream_names(machine_pb2.MachineStatus, "MACHINE_STATUS_")


def _int32(value: int | None) -> int:
    return 0 if value is None else max(-_INT32_MAX - 1, min(_INT32_MAX, value))


def _stamp(moment: datetime | None) -> timestamp_pb2.Timestamp | None:
    if moment is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment.astimezone(UTC))
    return stamp


def _number(text: str) -> int | float:
    number = float(text)
    return int(number) if number.is_integer() and abs(number) < 2**53 else number


def plain(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as JSON data with whole numbers as ints: a Struct keeps every number as a double, and
    ComfyUI graphs index links and INT inputs with ints (``["12", 0]``, not ``["12", 0.0]``)."""
    data: dict[str, Any] = json.loads(json_format.MessageToJson(struct), parse_float=_number)
    return data


def _durations(message: Message, **seconds: float | None) -> None:
    """Set each Duration field that upstream reported (seconds); leave the others unset."""
    for name, value in seconds.items():
        if value is not None:
            getattr(message, name).CopyFrom(duration_from_seconds(value))


def machine_message(machine: Machine) -> machine_pb2.Machine:
    message = machine_pb2.Machine(
        machine_id=machine.id,
        name=machine.name or "",
        type=MACHINE_TYPES.get(machine.type or "", "MACHINE_TYPE_UNSPECIFIED"),
        status=MACHINE_STATUSES.get(machine.status or "", "MACHINE_STATUS_UNSPECIFIED"),
        gpu=gpu_type(machine.gpu),
        concurrency_limit=_int32(machine.concurrency_limit),
        keep_warm=_int32(machine.keep_warm),
        comfyui_version=machine.comfyui_version or "",
        machine_version=machine.machine_version or "",
        create_time=_stamp(machine.created_at),
        update_time=_stamp(machine.updated_at),
    )
    _durations(message, run_timeout=machine.run_timeout, idle_timeout=machine.idle_timeout)
    return message


def _input_message(spec: InputType) -> deployment_pb2.DeploymentInput:
    message = deployment_pb2.DeploymentInput(
        input_id=spec.input_id,
        class_type=spec.class_type or "",
        type=spec.type or "",
        enum_options=[str(option) for option in spec.enum_options or ()],
        display_name=spec.display_name,
        description=spec.description,
    )
    for name in ("min_value", "max_value", "step"):
        if getattr(spec, name) is not None:
            setattr(message, name, getattr(spec, name))
    if spec.default_value is not None:
        try:
            json_format.ParseDict(spec.default_value, message.default_value)
        except (json_format.ParseError, TypeError, ValueError):
            message.default_value.string_value = str(spec.default_value)
    return message


def deployment_message(deployment: Deployment) -> deployment_pb2.Deployment:
    message = deployment_pb2.Deployment(
        deployment_id=deployment.id,
        workflow_id=deployment.workflow_id or "",
        workflow_name=deployment.workflow_name or "",
        workflow_version_id=deployment.workflow_version_id or "",
        machine_id=deployment.machine_id or "",
        machine_name=deployment.machine_name or "",
        environment=ENVIRONMENTS.get(deployment.environment or "", "ENVIRONMENT_UNSPECIFIED"),
        gpu=gpu_type(deployment.gpu),
        is_fluid=deployment.is_fluid,
        concurrency_limit=_int32(deployment.concurrency_limit),
        description=deployment.description or "",
        create_time=_stamp(deployment.created_at),
        update_time=_stamp(deployment.updated_at),
        input_types=[_input_message(spec) for spec in deployment.input_types],
        output_types=[
            deployment_pb2.DeploymentOutput(class_type=str(out.get("class_type") or ""),
                                            output_id=str(out.get("output_id") or ""))
            for out in deployment.output_types
        ],
    )  # fmt: skip
    _durations(message, run_timeout=deployment.run_timeout)
    return message


def version_message(version: WorkflowVersion, *, graphs: bool) -> workflow_version_pb2.WorkflowVersion:
    message = workflow_version_pb2.WorkflowVersion(
        workflow_version_id=version.id,
        workflow_id=version.workflow_id or "",
        version=_int32(version.version),
        comment=version.comment or "",
        machine_id=version.machine_id or "",
        create_time=_stamp(version.created_at),
        update_time=_stamp(version.updated_at),
    )
    if graphs:
        message.workflow.SetInParent()
        message.workflow.update(version.workflow)
        if version.workflow_api is not None:
            message.workflow_api.SetInParent()
            message.workflow_api.update(version.workflow_api)
    return message


# --------------------------------------------------------------------------- validation and pages


def upstream_id(check: Violations, field: str, value: str, *, required: bool = True) -> str:
    """A UUID as upstream writes it (lower case); "" after recording a violation (or when optional)."""
    if not value:
        if required:
            check.add(field, "is required (a UUID)")
        return ""
    if not UUID_TEXT.fullmatch(value):
        check.add(field, "must be a UUID, e.g. 123e4567-e89b-42d3-a456-426614174000")
        return ""
    return value.lower()


def _optional_request_id(check: Violations, value: str) -> None:
    if value:
        check.request_id(value)


def _environment(check: Violations, value: int, *, required: bool) -> str | None:
    """The upstream spelling of an Environment value (None for UNSPECIFIED)."""
    if value == deployment_pb2.ENVIRONMENT_UNSPECIFIED:
        if required:
            check.add("environment", "is required")
        return None
    if value not in ENVIRONMENT_NAMES:
        check.add("environment", "is not a known environment")
        return None
    return ENVIRONMENT_NAMES[value]


def _bad_token() -> InvalidArgument:
    return InvalidArgument.for_fields(
        [FieldViolation("page_token", "is not a page token of this list")], reason="INVALID_PAGE_TOKEN"
    )


def paginate(
    items: Iterable[T], key: Callable[[T], tuple[Any, ...]], page_size: int, token: str, params: dict[str, Any]
) -> tuple[list[T], str]:
    """One page of ``items`` in ``key`` order after ``token`` (issued for the same ``params``), and the
    next page's token ("" on the last page)."""
    ordered = sorted(items, key=key)
    start = 0
    if token:
        after = decode_page_token(token, params).get("after")
        if not isinstance(after, list):
            raise _bad_token()
        try:
            start = bisect.bisect_right(ordered, tuple(after), key=key)
        except TypeError:  # a key of other types: not issued by this list
            raise _bad_token() from None
    page = ordered[start : start + page_size]
    more = start + page_size < len(ordered)
    return page, encode_page_token({**params, "after": list(key(page[-1]))}) if more else ""


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _micros(moment: datetime | None) -> int:
    return 0 if moment is None else (moment - _EPOCH) // timedelta(microseconds=1)


def machine_order(machine: Machine) -> tuple[str, str, str]:
    name = machine.name or ""
    return (name.casefold(), name, machine.id)


def deployment_order(deployment: Deployment) -> tuple[int, str]:
    return (-_micros(deployment.updated_at), deployment.id)  # most recently updated first


def version_order(version: WorkflowVersion) -> tuple[int, str]:
    return (-(version.version or 0), version.id)  # highest version first


async def every_page(fetch: Callable[[int, int], Awaitable[list[T]]], ident: Callable[[T], str]) -> list[T]:
    """Every item of an upstream list read ``UPSTREAM_PAGE`` at a time (``fetch(limit, offset)``),
    each once even if the list shifted between two pages."""
    found: dict[str, T] = {}
    for page_number in range(MAX_UPSTREAM_PAGES):
        page = await fetch(UPSTREAM_PAGE, page_number * UPSTREAM_PAGE)
        for item in page:
            found.setdefault(ident(item), item)
        if len(page) < UPSTREAM_PAGE:
            break
    return list(found.values())


# --------------------------------------------------------------------------- handlers


@dataclass(frozen=True)
class Upstream:
    """What the admin and upload handlers share: the ComfyUI Deploy client, the request-id store and
    the WorkflowsService (whose catalog is refreshed after a change upstream)."""

    client: ComfyDeployClient
    request_ids: RequestIds
    workflows: workflows_service_pb2_grpc.WorkflowsServiceStub
    max_upload_bytes: int


def deadline_of(context: grpc.aio.ServicerContext, cap: float = DEFAULT_TIMEOUT_SECONDS) -> float:
    """The absolute ``time.monotonic()`` deadline of upstream calls made for this RPC: what is left of
    the caller's deadline, at most ``cap`` seconds."""
    return time.monotonic() + remaining(context, cap)


async def remembered(upstream: Upstream, rpc: str, request: Message, response_type: type[M]) -> tuple[str, M | None]:
    """(fingerprint, the first answer to this request_id if any); ("", None) without a request_id."""
    request_id: str = getattr(request, "request_id", "")
    if not request_id:
        return "", None
    fp = fingerprint(request)
    try:
        return fp, await upstream.request_ids.replay(rpc, request_id, fp, response_type)
    except STORE_ERRORS as exc:
        raise store_unavailable() from exc


async def remember(upstream: Upstream, rpc: str, request_id: str, fp: str, response: M) -> M:
    """Remember ``response`` as the answer to ``request_id`` (the first writer's wins)."""
    if not request_id:
        return response
    try:
        return await upstream.request_ids.once(rpc, request_id, fp, response)
    except STORE_ERRORS as exc:
        raise store_unavailable() from exc


class AdminHandlers:
    """The pass-through RPCs, mixed into ComfyUIServicer (which sets ``upstream``)."""

    upstream: Upstream

    async def ListMachines(
        self, request: SVC.ListMachinesRequest, context: grpc.aio.ServicerContext
    ) -> SVC.ListMachinesResponse:
        check = Violations()
        page_size = check.page_size(request.page_size)
        check.check()
        client, deadline = self.upstream.client, deadline_of(context)

        async def fetch(limit: int, offset: int) -> list[Machine]:
            return await client.list_machines(limit=limit, offset=offset, deadline=deadline)

        try:
            machines = await every_page(fetch, lambda machine: machine.id)
        except cd.ComfyDeployError as exc:
            raise upstream_error(exc) from exc
        live = (machine for machine in machines if not machine.deleted)
        page, token = paginate(live, machine_order, page_size, request.page_token, {"list": "machines"})
        return SVC.ListMachinesResponse(machines=[machine_message(m) for m in page], next_page_token=token)

    async def GetMachine(
        self, request: SVC.GetMachineRequest, context: grpc.aio.ServicerContext
    ) -> SVC.GetMachineResponse:
        client = self.upstream.client
        machine, named = await self._one(
            Named(MACHINE_NOT_FOUND, "machine_id", request.machine_id),
            context,
            lambda machine_id, deadline: client.get_machine(machine_id, deadline=deadline),
        )
        if machine.deleted:  # the contract never shows deleted machines
            raise not_found(named)
        return SVC.GetMachineResponse(machine=machine_message(machine))

    async def _one(
        self, named: Named, context: grpc.aio.ServicerContext, get: Callable[[str, float], Awaitable[T]]
    ) -> tuple[T, Named]:
        """The upstream object a Get names (``named``, as the request gives its id): the id checked at
        the edge, then ``get(id, deadline)``, upstream's not-found reported with ``named``'s reason."""
        check = Violations()
        ident = upstream_id(check, named.key, named.value)
        check.check()
        named = Named(named.reason, named.key, ident)
        try:
            return await get(ident, deadline_of(context)), named
        except cd.ComfyDeployError as exc:
            raise upstream_error(exc, [named]) from exc

    async def ListDeployments(
        self, request: SVC.ListDeploymentsRequest, context: grpc.aio.ServicerContext
    ) -> SVC.ListDeploymentsResponse:
        check = Violations()
        page_size = check.page_size(request.page_size)
        environment = _environment(check, request.environment, required=False)
        check.check()
        client, deadline = self.upstream.client, deadline_of(context)
        try:
            if request.include_fluid:
                deployments = await client.list_all_deployments(environment, deadline=deadline)
            else:
                deployments = await client.list_deployments(environment=environment, deadline=deadline)
        except cd.ComfyDeployError as exc:
            raise upstream_error(exc) from exc
        params = {"list": "deployments", "environment": request.environment, "fluid": request.include_fluid}
        page, token = paginate(deployments, deployment_order, page_size, request.page_token, params)
        return SVC.ListDeploymentsResponse(deployments=[deployment_message(d) for d in page], next_page_token=token)

    async def GetDeployment(
        self, request: SVC.GetDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> SVC.GetDeploymentResponse:
        named = Named(DEPLOYMENT_NOT_FOUND, "deployment_id", request.deployment_id)
        deployment, _ = await self._one(named, context, self._deployment)
        return SVC.GetDeploymentResponse(deployment=deployment_message(deployment))

    async def _deployment(self, deployment_id: str, deadline: float) -> Deployment:
        try:
            return await self.upstream.client.get_deployment(deployment_id, deadline=deadline)
        except cd.ServerError as exc:
            # Upstream answers not-found with a 500 (§2.5): not found only if neither list has it.
            if exc.maybe_not_found and not await self._listed(deployment_id, deadline):
                raise not_found(Named(DEPLOYMENT_NOT_FOUND, "deployment_id", deployment_id)) from exc
            raise

    async def _listed(self, deployment_id: str, deadline: float) -> bool:
        """Whether upstream lists the deployment (regular or fluid); True when the lists fail too."""
        try:
            listed = await self.upstream.client.list_all_deployments(deadline=deadline)
        except cd.ComfyDeployError:
            return True  # cannot tell: report the original error, not a not-found
        return any(deployment.id == deployment_id for deployment in listed)

    async def CreateDeployment(
        self, request: SVC.CreateDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> SVC.CreateDeploymentResponse:
        check = Violations()
        _optional_request_id(check, request.request_id)
        workflow_id = upstream_id(check, "workflow_id", request.workflow_id)
        version_id = upstream_id(check, "workflow_version_id", request.workflow_version_id)
        machine_id = upstream_id(check, "machine_id", request.machine_id)
        environment = _environment(check, request.environment, required=True)
        check.text("description", request.description, MAX_DESCRIPTION)
        check.check()
        assert environment is not None  # checked above
        fp, answer = await remembered(self.upstream, "CreateDeployment", request, SVC.CreateDeploymentResponse)
        if answer is not None:
            return answer
        named = [
            Named(WORKFLOW_NOT_FOUND, "workflow_id", workflow_id),
            Named(WORKFLOW_VERSION_NOT_FOUND, "workflow_version_id", version_id),
            Named(MACHINE_NOT_FOUND, "machine_id", machine_id),
        ]
        try:
            deployment = await self.upstream.client.create_deployment(
                workflow_id,
                version_id,
                environment,
                machine_id=machine_id,
                description=request.description or None,
                deadline=deadline_of(context),
            )
        except cd.ComfyDeployError as exc:
            raise upstream_error(exc, named) from exc
        response = SVC.CreateDeploymentResponse(deployment=deployment_message(deployment))
        response = await remember(self.upstream, "CreateDeployment", request.request_id, fp, response)
        await self._refresh_catalog(context, "CreateDeployment")
        return response

    async def UploadWorkflow(
        self, request: SVC.UploadWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> SVC.UploadWorkflowResponse:
        check = Violations()
        _optional_request_id(check, request.request_id)
        workflow_id = upstream_id(check, "workflow_id", request.workflow_id, required=False)
        machine_id = upstream_id(check, "machine_id", request.machine_id, required=False)
        if not request.workflow_id:
            check.text("name", request.name.strip(), MAX_NAME, required=True)
        for field in ("workflow", "workflow_api"):
            if not request.HasField(field):
                check.add(field, "is required")
        check.text("comment", request.comment, MAX_COMMENT)
        check.check()
        fp, answer = await remembered(self.upstream, "UploadWorkflow", request, SVC.UploadWorkflowResponse)
        if answer is not None:
            return answer
        deadline = deadline_of(context)
        named = [Named(WORKFLOW_NOT_FOUND, "workflow_id", workflow_id)] if workflow_id else []
        named += [Named(MACHINE_NOT_FOUND, "machine_id", machine_id)] if machine_id else []
        try:
            if workflow_id:
                response = await self._add_version(request, workflow_id, machine_id, deadline)
            else:
                response = await self._new_workflow(request, fp, machine_id, deadline)
        except cd.ComfyDeployError as exc:
            raise upstream_error(exc, named) from exc
        response = await remember(self.upstream, "UploadWorkflow", request.request_id, fp, response)
        await self._refresh_catalog(context, "UploadWorkflow")
        return response

    async def _add_version(
        self, request: SVC.UploadWorkflowRequest, workflow_id: str, machine_id: str, deadline: float
    ) -> SVC.UploadWorkflowResponse:
        version = await self.upstream.client.create_workflow_version(
            workflow_id,
            plain(request.workflow),
            plain(request.workflow_api),
            comment=request.comment or None,
            machine_id=machine_id or None,
            deadline=deadline,
        )
        return SVC.UploadWorkflowResponse(
            workflow_id=version.workflow_id or workflow_id,
            workflow_version_id=version.id,
            version=_int32(version.version),
            machine_id=version.machine_id or machine_id,
        )

    async def _new_workflow(
        self, request: SVC.UploadWorkflowRequest, fp: str, machine_id: str, deadline: float
    ) -> SVC.UploadWorkflowResponse:
        """POST /workflow, then GET /workflow/{id} for version 1 (POST answers only the ids). The
        first answer is remembered under its own key so that a retry only repeats the GET."""
        client, step = self.upstream.client, "UploadWorkflow.created"
        _, created = await remembered(self.upstream, step, request, SVC.UploadWorkflowResponse)
        if created is None:
            uploaded = await client.upload_workflow(
                request.name.strip(),
                plain(request.workflow),
                plain(request.workflow_api),
                machine_id or None,
                deadline=deadline,
            )
            created = SVC.UploadWorkflowResponse(workflow_id=uploaded.workflow_id, machine_id=uploaded.machine_id or "")
            created = await remember(self.upstream, step, request.request_id, fp, created)
        workflow = await client.get_workflow(created.workflow_id, versions=1, deadline=deadline)
        if not workflow.versions:
            raise Unavailable(
                "ComfyUI Deploy created the workflow but listed no version of it; retry with the same request_id",
                reason="UPSTREAM_UNAVAILABLE",
                metadata={"workflow_id": created.workflow_id},
            )
        version = workflow.versions[0]
        return SVC.UploadWorkflowResponse(
            workflow_id=created.workflow_id,
            workflow_version_id=version.id,
            version=_int32(version.version or 1),
            machine_id=created.machine_id or version.machine_id or "",
        )

    async def _refresh_catalog(self, context: grpc.aio.ServicerContext, after: str) -> None:
        """Best effort: the WorkflowsService reloads its catalog so it shows what just changed."""
        try:
            await self.upstream.workflows.RefreshCatalog(
                workflows_service_pb2.RefreshCatalogRequest(), timeout=remaining(context, REFRESH_TIMEOUT_SECONDS)
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("catalog refresh after %s failed: %s", after, exc.code().name, extra={"rpc": after})

    async def GetWorkflowVersion(
        self, request: SVC.GetWorkflowVersionRequest, context: grpc.aio.ServicerContext
    ) -> SVC.GetWorkflowVersionResponse:
        client = self.upstream.client
        version, _ = await self._one(
            Named(WORKFLOW_VERSION_NOT_FOUND, "workflow_version_id", request.workflow_version_id),
            context,
            lambda version_id, deadline: client.get_workflow_version(version_id, deadline=deadline),
        )
        return SVC.GetWorkflowVersionResponse(workflow_version=version_message(version, graphs=True))

    async def ListWorkflowVersions(
        self, request: SVC.ListWorkflowVersionsRequest, context: grpc.aio.ServicerContext
    ) -> SVC.ListWorkflowVersionsResponse:
        check = Violations()
        workflow_id = upstream_id(check, "workflow_id", request.workflow_id)
        page_size = check.page_size(request.page_size)
        check.check()
        client, deadline = self.upstream.client, deadline_of(context)

        async def fetch(limit: int, offset: int) -> list[WorkflowVersion]:
            return await client.list_workflow_versions(workflow_id, limit=limit, offset=offset, deadline=deadline)

        try:
            versions = await every_page(fetch, lambda version: version.id)
        except cd.ComfyDeployError as exc:
            raise upstream_error(exc, [Named(WORKFLOW_NOT_FOUND, "workflow_id", workflow_id)]) from exc
        params = {"list": "versions", "workflow_id": workflow_id}
        page, token = paginate(versions, version_order, page_size, request.page_token, params)
        return SVC.ListWorkflowVersionsResponse(
            workflow_versions=[version_message(v, graphs=False) for v in page], next_page_token=token
        )
