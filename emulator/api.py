"""The V2 routes under /api (§2), with the upstream's error bodies and quirks, and the file server."""

from __future__ import annotations

import itertools
import json
import mimetypes
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import views
from .faults import Faults
from .gate import TENANT_KEY, Stats
from .lifecycle import Engine
from .settings import EmulatorSettings
from .state import Row, Run, Store, Tenant, iso, new_file_id, now
from .validation import (
    ENVIRONMENTS,
    EXECUTION_MODES,
    GPUS,
    Field,
    ValidationFailed,
    error,
    json_body,
    parse_uuid,
    query_bool,
    query_int,
    to_any,
    to_bool,
    to_dict,
    to_enum,
    to_inputs,
    to_int,
    to_str,
    to_str_list,
    to_uuid,
    validate_body,
)
from .webhooks import WebhookSender

mimetypes.add_type("image/webp", ".webp")
SHARE_ENVIRONMENTS = ("public-share", "community-share")
CANCEL_ERROR = "Error cancel function 404: Run not found or has no modal function call ID"
WORKFLOW_NOT_FOUND = "Workflow not found or you don't have access to it"
VERSION_NOT_FOUND = "Workflow version not found or you don't have access to it"
SPEAKEASY_AGENT = "speakeasy-sdk/"


class ApiError(Exception):
    """An error answer: ``status`` with a JSON ``body`` (usually ``{"detail": ...}``)."""

    def __init__(self, status: int, detail: Any = None, *, body: Any = None) -> None:
        super().__init__(f"{status}: {detail if body is None else body}")
        self.status = status
        self.body = body if body is not None else {"detail": detail}


@dataclass
class Emulator:
    """Everything a handler needs, kept on ``app.state.emulator``."""

    settings: EmulatorSettings
    store: Store
    faults: Faults
    webhooks: WebhookSender
    engine: Engine
    stats: Stats


def _emu(request: Request) -> Emulator:
    emulator: Emulator = request.app.state.emulator
    return emulator


def _tenant(request: Request) -> Tenant:
    tenant: Tenant = request.scope[TENANT_KEY]
    return tenant


# --- runs ---------------------------------------------------------------------------------------------

RUN_FIELDS = {
    "inputs": Field(to_inputs, default=None),
    "webhook": Field(to_str),
    "webhook_intermediate_status": Field(to_bool, default=False),
    "gpu": Field(to_enum(GPUS)),
    "flags": Field(to_str_list),
    "execution_mode": Field(to_enum(EXECUTION_MODES), default="async"),
    "origin": Field(to_str, default="api"),
    "batch_number": Field(to_int),
    "batch_input_params": Field(to_dict),
    "is_native_run": Field(to_bool, default=False),
    "gpu_event_id": Field(to_str),
}
DEPLOYMENT_RUN_FIELDS = {"deployment_id": Field(to_uuid, required=True), **RUN_FIELDS}
VERSION_RUN_FIELDS = {"workflow_version_id": Field(to_uuid, required=True), "machine_id": Field(to_uuid), **RUN_FIELDS}
WORKFLOW_RUN_FIELDS = {
    "workflow_id": Field(to_uuid, required=True),
    "workflow_api_json": Field(to_dict, required=True),
    "workflow": Field(to_dict),
    "machine_id": Field(to_uuid),
    **RUN_FIELDS,
}


def _batches(body: dict[str, Any], inputs: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The input sets of a batch (``batch_number`` x the cartesian product of ``batch_input_params``)."""
    number = body.get("batch_number") or 1
    params = body.get("batch_input_params") or {}
    if number <= 1 and not params:
        return None
    if body.get("execution_mode") == "sync_first_result":
        raise ApiError(400, "Batch number is not supported for sync_first_result execution mode")
    keys = list(params)
    values = [v if isinstance(v, list) else [v] for v in params.values()]
    combos = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)] if keys else [{}]
    return [{**inputs, **combo} for combo in combos for _ in range(number)]


def _start(
    emu: Emulator,
    tenant: Tenant,
    body: dict[str, Any],
    *,
    version: Row,
    machine: Row,
    deployment: Row | None,
    workflow_api: dict[str, Any] | None = None,
) -> dict[str, Any]:
    inputs = emu.engine.upload_data_urls(body.get("inputs") or {})
    common: dict[str, Any] = {
        "tenant": tenant,
        "version": version,
        "machine": machine,
        "deployment": deployment,
        "webhook": body.get("webhook"),
        "webhook_intermediate_status": bool(body.get("webhook_intermediate_status")),
        "gpu": body.get("gpu"),
        "origin": body.get("origin") or "api",
        "workflow_api": workflow_api,
    }
    batches = _batches(body, inputs)
    if batches is not None:
        batch_id = emu.store.new_id()
        for batch_inputs in batches:
            emu.engine.create_run(inputs=batch_inputs, batch_id=batch_id, **common)
        return {"status": "success", "batch_id": batch_id}
    run = emu.engine.create_run(inputs=inputs, **common)
    return {"run_id": run.id}


def _queue_deployment(emu: Emulator, tenant: Tenant, body: dict[str, Any]) -> dict[str, Any]:
    store = emu.store
    deployment = store.deployments.get(body["deployment_id"])
    # Looked up without an ownership check; only share environments may be run by anyone.
    if deployment is None or (deployment["environment"] not in SHARE_ENVIRONMENTS and not tenant.owns(deployment)):
        raise ApiError(404, "Deployment not found")
    version = store.versions.get(deployment.get("workflow_version_id") or "")
    if version is None:
        raise ApiError(404, "Workflow version not found for this deployment")
    if store.live_workflow(deployment.get("workflow_id")) is None:
        raise ApiError(404, "Workflow not found")
    machine = store.machines.get(deployment.get("machine_id") or "")
    if machine is None:
        raise ApiError(404, "Machine not found for this deployment")
    if not version.get("workflow_api"):
        raise ApiError(404, "Workflow API not found")
    return _start(emu, tenant, body, version=version, machine=machine, deployment=deployment)


async def queue_run(request: Request) -> Response:
    body = validate_body(await json_body(request), DEPLOYMENT_RUN_FIELDS)
    return JSONResponse(_queue_deployment(_emu(request), _tenant(request), body))


async def legacy_create_run(request: Request) -> Response:
    """Hidden ``POST /run``: a deployment run, a workflow-version run or a workflow (graph) run."""
    emu, tenant = _emu(request), _tenant(request)
    raw = await json_body(request)
    if isinstance(raw, dict) and "deployment_id" in raw:
        return JSONResponse(_queue_deployment(emu, tenant, validate_body(raw, DEPLOYMENT_RUN_FIELDS)))
    store = emu.store
    if isinstance(raw, dict) and "workflow_version_id" in raw:
        body = validate_body(raw, VERSION_RUN_FIELDS)
        version = store.versions.get(body["workflow_version_id"])
        workflow = store.live_workflow(version["workflow_id"]) if version else None
        if version is None or workflow is None or not tenant.owns(workflow):
            raise ApiError(404, "Workflow version not found")
        machine = store.machines.get(body.get("machine_id") or version.get("machine_id") or "")
        if machine is None or not tenant.owns(machine):
            raise ApiError(404, "Machine not found")
        return JSONResponse(_start(emu, tenant, body, version=version, machine=machine, deployment=None))
    body = validate_body(raw, WORKFLOW_RUN_FIELDS)
    workflow = store.live_workflow(body["workflow_id"])
    if workflow is None or not tenant.owns(workflow):
        raise ApiError(404, "Workflow not found")
    machine = store.machines.get(body.get("machine_id") or "")
    if machine is None or not tenant.owns(machine):
        raise ApiError(404, "Machine not found")
    version = {"id": None, "workflow_id": workflow["id"]}
    return JSONResponse(
        _start(
            emu, tenant, body, version=version, machine=machine, deployment=None, workflow_api=body["workflow_api_json"]
        )
    )


def _readable_run(emu: Emulator, tenant: Tenant, run_id: str) -> Run:
    run = emu.store.runs.get(run_id)
    if run is None:
        raise ApiError(404, "Run not found")
    if run.user_id == tenant.user_id and run.org_id == tenant.org_id:
        return run
    workflow = emu.store.workflows.get(run.workflow_id)
    if run.deployment_id and workflow is not None and tenant.owns(workflow):
        return run  # the owner of the deployment's workflow may read it too
    raise ApiError(403, "You are not authorized to access this resource")


def speakeasy_sdk(request: Request) -> bool:
    """Whether the caller is a Speakeasy-generated SDK (the official ``comfydeploy`` Python/TS SDKs),
    known by the user agent they always send."""
    agents = (request.headers.get("user-agent", ""), request.headers.get("x-speakeasy-user-agent", ""))
    return any(SPEAKEASY_AGENT in agent for agent in agents)


def _run_response(request: Request, run_id: str) -> Response:
    emu = _emu(request)
    run = _readable_run(emu, _tenant(request), run_id)
    position = None
    if query_bool(request, "queue_position", False) and run.status in ("not-started", "queued"):
        position = emu.engine.queue_position(run)
    body = views.run(run, position)
    if speakeasy_sdk(request):
        # Tolerance, not upstream: V2 no longer returns `workflow_api` (§2.2), but the official SDK's
        # WorkflowRunModel (comfydeploy 0.7.0, from an older spec) declares it required-nullable and fails
        # to parse the run without it. The SDK alone gets it, null: the graph itself is still not returned.
        body["workflow_api"] = None
    return JSONResponse(body)


async def get_run(request: Request) -> Response:
    return _run_response(request, parse_uuid(request.path_params["run_id"], ("path", "run_id")))


async def legacy_get_run(request: Request) -> Response:
    raw = request.query_params.get("run_id")
    if raw is None:
        raise ValidationFailed([error("missing", ("query", "run_id"), "Field required", None)])
    return _run_response(request, parse_uuid(raw, ("query", "run_id")))


async def cancel_run(request: Request) -> Response:
    emu, tenant = _emu(request), _tenant(request)
    run_id = parse_uuid(request.path_params["run_id"], ("path", "run_id"))
    run = emu.store.runs.get(run_id)
    # Found with a tenant filter and a Modal call id; every failure is answered 500 (§2.3).
    if run is None or run.user_id != tenant.user_id or run.org_id != tenant.org_id or not run.modal_function_call_id:
        raise ApiError(500, CANCEL_ERROR)
    emu.engine.cancel(run)  # a terminal run stays as it is, and the answer is the same
    return JSONResponse({"status": "success", "message": "Function cancelled"})


# --- deployments --------------------------------------------------------------------------------------


def _query_enum(request: Request, name: str, choices: tuple[str, ...]) -> str | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    errors: list[dict[str, Any]] = []
    value = to_enum(choices)(raw, ("query", name), errors)
    if errors:
        raise ValidationFailed(errors)
    return str(value)


async def list_deployments(request: Request) -> Response:
    emu, tenant = _emu(request), _tenant(request)
    environment = _query_enum(request, "environment", ENVIRONMENTS)
    is_fluid = bool(query_bool(request, "is_fluid", False))
    page_size = query_int(request, "page_size", None)
    offset = query_int(request, "offset", 0) or 0
    rows = [
        row
        for row in emu.store.deployments.values()
        if tenant.owns(row)
        and (environment is None or row["environment"] == environment)
        and bool(row.get("modal_image_id")) == is_fluid  # is_fluid=false (default) hides fluid deployments
        and emu.store.live_workflow(row.get("workflow_id")) is not None
    ]
    rows.sort(key=lambda row: str(row.get("updated_at")), reverse=True)
    rows = rows[offset : offset + page_size] if page_size else rows[offset:]
    return JSONResponse([views.deployment(emu.store, row) for row in rows])


async def get_deployment(request: Request) -> Response:
    emu, tenant = _emu(request), _tenant(request)
    row = emu.store.deployments.get(request.path_params["deployment_id"])
    if row is None or not tenant.owns(row):
        raise ApiError(500, "Internal server error")  # upstream swallows its 404 into a 500
    return JSONResponse(views.deployment(emu.store, row))


RUNS_ERROR = "Internal server error: "


async def list_deployment_runs(request: Request) -> Response:
    """``GET /deployment/{id}/runs`` (§2.5), newest first. Upstream (comfy-deploy/api deployments.py
    ``get_deployment_runs``) wraps every failure in a 500: an unknown id dereferences None, another
    tenant's deployment raises a 401 that its own ``except`` turns into a 500."""
    emu, tenant = _emu(request), _tenant(request)
    limit = query_int(request, "limit", 60) or 0
    offset = query_int(request, "offset", 0) or 0
    only_mine = query_bool(request, "filter_user_runs", False)
    row = emu.store.deployments.get(request.path_params["deployment_id"])
    if row is None:
        raise ApiError(500, RUNS_ERROR + "'NoneType' object has no attribute 'environment'")
    if row["environment"] not in SHARE_ENVIRONMENTS and not tenant.owns(row):
        raise ApiError(500, RUNS_ERROR + "401: Unauthorized access to deployment")

    def visible(run: Run) -> bool:  # filter_user_runs: the caller's own runs; else the tenant rule (§1)
        if only_mine:
            return run.user_id == tenant.user_id
        return tenant.owns({"user_id": run.user_id, "org_id": run.org_id})

    runs = [run for run in emu.store.runs.values() if run.deployment_id == row["id"] and visible(run)]
    runs.sort(key=lambda run: run.created_at, reverse=True)
    return JSONResponse(
        {
            "data": [views.deployment_run(run) for run in runs[offset : offset + limit]],
            "meta": {"totalRowCount": 0, "filterRowCount": 0, "chartData": []},
        }
    )


DEPLOYMENT_FIELDS = {
    "workflow_version_id": Field(to_uuid, required=True),
    "workflow_id": Field(to_uuid, required=True),
    "machine_id": Field(to_uuid),
    "machine_version_id": Field(to_uuid),
    "environment": Field(to_enum(ENVIRONMENTS), required=True),
    "description": Field(to_str),
    "deployment_id": Field(to_uuid),
}
DEPLOYMENT_PATCH_FIELDS = {
    "workflow_version_id": Field(to_uuid),
    "machine_id": Field(to_uuid),
    "machine_version_id": Field(to_uuid),
    "concurrency_limit": Field(to_int),
    "gpu": Field(to_enum(GPUS)),
    "run_timeout": Field(to_int),
    "idle_timeout": Field(to_int),
    "keep_warm": Field(to_int),
}


def _owned_machine(emu: Emulator, tenant: Tenant, machine_id: str | None, machine_version_id: str | None) -> Row | None:
    for row in emu.store.machines.values():
        if not tenant.owns(row) or row.get("deleted"):
            continue
        if (machine_id and row["id"] == machine_id) or (
            not machine_id and machine_version_id and row.get("machine_version_id") == machine_version_id
        ):
            return row
    return None


def upsert_deployment(
    emu: Emulator,
    tenant: Tenant,
    *,
    workflow_id: str,
    version: Row,
    machine: Row,
    environment: str,
    description: str | None = None,
    deployment_id: str | None = None,
) -> Row:
    """Create or update the deployment keyed by ``deployment_id``, else by ``(workflow_id, environment)``."""
    store = emu.store
    existing = store.deployments.get(deployment_id or "")
    if existing is not None and not tenant.owns(existing):
        raise ApiError(404, "Deployment not found")
    if existing is None and deployment_id is None:
        existing = next(
            (
                row
                for row in store.deployments.values()
                if tenant.owns(row) and row["workflow_id"] == workflow_id and row["environment"] == environment
            ),
            None,
        )
    stamp = iso(now())
    changes = {
        "workflow_version_id": version["id"],
        "workflow_id": workflow_id,
        "machine_id": machine["id"],
        "machine_version_id": machine.get("machine_version_id"),
        "environment": environment,
        "updated_at": stamp,
    }
    if description is not None:
        changes["description"] = description
    if existing is not None:
        existing.update(changes)
        return existing
    row: Row = {
        "id": deployment_id or store.new_id(),
        "user_id": tenant.user_id,
        "org_id": tenant.org_id,
        "share_slug": None,
        "description": None,
        "share_options": None,
        "showcase_media": None,
        "created_at": stamp,
        "dub_link": None,
        "gpu": None,
        "modal_image_id": None,
        "concurrency_limit": None,
        "run_timeout": None,
        "idle_timeout": None,
        "keep_warm": None,
        "activated_at": None,
        "modal_app_id": None,
        **changes,
    }
    store.deployments[row["id"]] = row
    return row


async def create_deployment(request: Request) -> Response:
    emu, tenant = _emu(request), _tenant(request)
    body = validate_body(await json_body(request), DEPLOYMENT_FIELDS)
    if not body["machine_id"] and not body["machine_version_id"]:
        raise ApiError(400, "Either machine_id or machine_version_id is required")
    workflow = emu.store.live_workflow(body["workflow_id"])
    if workflow is None or not tenant.owns(workflow):
        raise ApiError(404, "Workflow not found")
    version = emu.store.versions.get(body["workflow_version_id"])
    if version is None or version["workflow_id"] != workflow["id"]:
        raise ApiError(404, "Workflow version not found")
    machine = _owned_machine(emu, tenant, body["machine_id"], body["machine_version_id"])
    if machine is None:
        raise ApiError(404, "Machine not found")
    row = upsert_deployment(
        emu,
        tenant,
        workflow_id=workflow["id"],
        version=version,
        machine=machine,
        environment=body["environment"],
        description=body["description"],
        deployment_id=body["deployment_id"],
    )
    return JSONResponse(views.deployment(emu.store, row))


async def update_deployment(request: Request) -> Response:
    emu, tenant = _emu(request), _tenant(request)
    row = emu.store.deployments.get(request.path_params["deployment_id"])
    if row is None or not tenant.owns(row):
        raise ApiError(404, "Deployment not found")
    body = validate_body(await json_body(request), DEPLOYMENT_PATCH_FIELDS)
    if body["workflow_version_id"]:
        version = emu.store.versions.get(body["workflow_version_id"])
        if version is None or version["workflow_id"] != row["workflow_id"]:
            raise ApiError(404, "Workflow version not found")
    if body["machine_id"] or body["machine_version_id"]:
        machine = _owned_machine(emu, tenant, body["machine_id"], body["machine_version_id"])
        if machine is None:
            raise ApiError(404, "Machine not found")
        body["machine_id"], body["machine_version_id"] = machine["id"], machine.get("machine_version_id")
    row.update({key: value for key, value in body.items() if value is not None})
    row["updated_at"] = iso(now())
    return JSONResponse(views.deployment(emu.store, row))


# --- machines -----------------------------------------------------------------------------------------


async def list_machines(request: Request) -> Response:
    emu, tenant = _emu(request), _tenant(request)
    search = (request.query_params.get("search") or "").lower()
    limit = query_int(request, "limit", 100) or 100
    offset = query_int(request, "offset", 0) or 0
    is_deleted = query_bool(request, "is_deleted", None)  # unset: deleted machines are listed too
    include_has_workflows = query_bool(request, "include_has_workflows", False)
    include_steps = query_bool(request, "include_docker_command_steps", False)
    is_self_hosted = query_bool(request, "is_self_hosted", False)
    rows = [
        row
        for row in emu.store.machines.values()
        if tenant.owns(row)
        and search in str(row.get("name", "")).lower()
        and (is_deleted is None or bool(row.get("deleted")) == is_deleted)
        and (not is_self_hosted or row.get("type") == "classic")
    ]
    rows.sort(key=lambda row: str(row.get("updated_at")), reverse=True)

    def has_workflows(machine_id: str) -> bool:
        return any(
            w.get("selected_machine_id") == machine_id and not w.get("deleted") for w in emu.store.workflows.values()
        ) or any(d.get("machine_id") == machine_id for d in emu.store.deployments.values())

    return JSONResponse(
        [
            views.machine_summary(
                row,
                docker_steps=bool(include_steps),
                has_workflows=has_workflows(row["id"]) if include_has_workflows else None,
            )
            for row in rows[offset : offset + limit]
        ]
    )


async def get_machine(request: Request) -> Response:
    emu, tenant = _emu(request), _tenant(request)
    machine_id = parse_uuid(request.path_params["machine_id"], ("path", "machine_id"))
    row = emu.store.machines.get(machine_id)
    if row is None or not tenant.owns(row):
        raise ApiError(404, "Machine not found")
    return JSONResponse(row)


# --- workflows ----------------------------------------------------------------------------------------


def _owned_workflow(emu: Emulator, tenant: Tenant, workflow_id: str) -> Row | None:
    row = emu.store.live_workflow(workflow_id)
    return row if row is not None and tenant.owns(row) else None


async def list_workflows(request: Request) -> Response:
    emu, tenant = _emu(request), _tenant(request)
    search = (request.query_params.get("search") or "").lower()
    limit = query_int(request, "limit", 100) or 100
    offset = query_int(request, "offset", 0) or 0
    user_ids = {u for u in (request.query_params.get("user_ids") or "").split(",") if u}
    machine_id = request.query_params.get("machine_id")
    rows = [
        row
        for row in emu.store.workflows.values()
        if tenant.owns(row)
        and not row.get("deleted")
        and search in str(row.get("name", "")).lower()
        and (not user_ids or row.get("user_id") in user_ids)
        and (not machine_id or row.get("selected_machine_id") == machine_id)
    ]
    rows.sort(key=lambda row: str(row.get("updated_at")), reverse=True)
    rows.sort(key=lambda row: not row.get("pinned"))
    return JSONResponse([views.workflow_summary(emu.store, row) for row in rows[offset : offset + limit]])


async def get_workflow(request: Request) -> Response:
    emu, tenant = _emu(request), _tenant(request)
    row = _owned_workflow(emu, tenant, request.path_params["workflow_id"])
    if row is None:
        raise ApiError(404, WORKFLOW_NOT_FOUND)
    limit = query_int(request, "limit", 1)
    versions = emu.store.versions_of(row["id"])
    return JSONResponse({**row, "versions": versions[: limit if limit is not None else 1]})


async def list_workflow_versions(request: Request) -> Response:
    emu, tenant = _emu(request), _tenant(request)
    row = _owned_workflow(emu, tenant, request.path_params["workflow_id"])
    if row is None:
        raise ApiError(404, WORKFLOW_NOT_FOUND)
    search = (request.query_params.get("search") or "").lower()
    limit = query_int(request, "limit", 100) or 100
    offset = query_int(request, "offset", 0) or 0
    versions = [v for v in emu.store.versions_of(row["id"]) if search in str(v.get("comment") or "").lower()]
    icon = tenant.user_icon
    return JSONResponse([{**v, "user_icon": icon} for v in versions[offset : offset + limit]])


async def get_workflow_version_number(request: Request) -> Response:
    emu, tenant = _emu(request), _tenant(request)
    row = _owned_workflow(emu, tenant, request.path_params["workflow_id"])
    number = request.path_params["version"]
    for version in emu.store.versions_of(row["id"]) if row else []:
        if int(version["version"]) == number:
            return JSONResponse(version)
    raise ApiError(404, VERSION_NOT_FOUND)


async def get_workflow_version(request: Request) -> Response:
    emu, tenant = _emu(request), _tenant(request)
    version_id = parse_uuid(request.path_params["version_id"], ("path", "version_id"))
    version = emu.store.versions.get(version_id)
    if version is None or _owned_workflow(emu, tenant, version["workflow_id"]) is None:
        raise ApiError(404, VERSION_NOT_FOUND)
    return JSONResponse(version)


CREATE_WORKFLOW_FIELDS = {
    "name": Field(to_str, required=True),
    "workflow_json": Field(to_str, required=True),
    "workflow_api": Field(to_str),
    "machine_id": Field(to_uuid),
    "machine_version_id": Field(to_uuid),
    "comfyui_snapshot": Field(to_dict),
}
CREATE_VERSION_FIELDS = {
    "workflow": Field(to_dict, required=True),
    "workflow_api": Field(to_dict, required=True),
    "comment": Field(to_str),
    "machine_id": Field(to_uuid),
    "machine_version_id": Field(to_uuid),
    "comfyui_snapshot": Field(to_any),
}


def _add_version(
    emu: Emulator,
    tenant: Tenant,
    workflow: Row,
    *,
    ui: Any,
    api: Any,
    comment: str | None,
    machine: Row | None,
    snapshot: Any,
) -> Row:
    existing = emu.store.versions_of(workflow["id"])
    stamp = iso(now())
    version: Row = {
        "id": emu.store.new_id(),
        "workflow_id": workflow["id"],
        "workflow": ui,
        "workflow_api": api,
        "user_id": tenant.user_id,
        "comment": comment,
        "version": (int(existing[0]["version"]) + 1) if existing else 1,
        "snapshot": snapshot,
        "dependencies": None,
        "created_at": stamp,
        "updated_at": stamp,
        "machine_id": machine["id"] if machine else None,
        "machine_version_id": machine.get("machine_version_id") if machine else None,
        "comfyui_snapshot": snapshot,
    }
    emu.store.versions[version["id"]] = version
    workflow["updated_at"] = stamp
    if machine is not None:  # a version made with a machine refreshes the workflow's preview deployment
        upsert_deployment(
            emu, tenant, workflow_id=workflow["id"], version=version, machine=machine, environment="preview"
        )
    return version


async def create_workflow(request: Request) -> Response:
    emu, tenant = _emu(request), _tenant(request)
    body = validate_body(await json_body(request), CREATE_WORKFLOW_FIELDS)
    try:
        ui = json.loads(body["workflow_json"])
        api = json.loads(body["workflow_api"]) if body["workflow_api"] else None
    except json.JSONDecodeError:
        return JSONResponse({"error": "Invalid JSON format"}, status_code=400)
    machine = None
    if body["machine_id"] or body["machine_version_id"]:
        machine = _owned_machine(emu, tenant, body["machine_id"], body["machine_version_id"])
        if machine is None:
            return JSONResponse({"error": "Machine not found"}, status_code=404)
    stamp = iso(now())
    workflow: Row = {
        "id": emu.store.new_id(),
        "user_id": tenant.user_id,
        "org_id": tenant.org_id,
        "name": body["name"],
        "created_at": stamp,
        "updated_at": stamp,
        "pinned": False,
        "cover_image": None,
        "deleted": False,
        "description": None,
        "selected_machine_id": machine["id"] if machine else None,
    }
    emu.store.workflows[workflow["id"]] = workflow
    _add_version(
        emu,
        tenant,
        workflow,
        ui=ui,
        api=api,
        comment="initial version",
        machine=machine,
        snapshot=body["comfyui_snapshot"],
    )
    return JSONResponse({"workflow_id": workflow["id"], "machine_id": machine["id"] if machine else None})


async def create_workflow_version(request: Request) -> Response:
    emu, tenant = _emu(request), _tenant(request)
    body = validate_body(await json_body(request), CREATE_VERSION_FIELDS)
    workflow = _owned_workflow(emu, tenant, request.path_params["workflow_id"])
    if workflow is None:
        raise ApiError(500, "404: Workflow not found")  # upstream wraps every error in a 500
    machine = None
    if body["machine_id"] or body["machine_version_id"]:
        machine = _owned_machine(emu, tenant, body["machine_id"], body["machine_version_id"])
        if machine is None:
            raise ApiError(500, "404: Machine not found")
    version = _add_version(
        emu,
        tenant,
        workflow,
        ui=body["workflow"],
        api=body["workflow_api"],
        comment=body["comment"],
        machine=machine,
        snapshot=body["comfyui_snapshot"],
    )
    return JSONResponse(version)


# --- files --------------------------------------------------------------------------------------------

UPLOAD_PREFIXES = (("image/", "img_"), ("video/", "vid_"), ("audio/", "audio_"))
ZIP_TYPES = ("application/zip", "application/x-zip-compressed")


async def upload_file(request: Request) -> Response:
    emu = _emu(request)
    async with request.form(max_files=1, max_fields=16) as form:  # closes the spooled upload afterwards
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ValidationFailed([error("missing", ("body", "file"), "Field required", None)])
        filename = upload.filename or ""
        content_type = mimetypes.guess_type(filename)[0]
        if not content_type or not content_type.startswith(("image/", "video/", "application/", "audio/")):
            raise ApiError(400, "Unsupported file type")
        limit = emu.settings.max_upload_bytes
        if upload.size is not None and upload.size > limit:
            raise ApiError(400, "File size exceeds 250MB limit")
        data = await upload.read()
    if len(data) > limit:
        raise ApiError(400, "File size exceeds 250MB limit")
    prefix = next((p for kind, p in UPLOAD_PREFIXES if content_type.startswith(kind)), None)
    prefix = prefix or ("zip_" if content_type in ZIP_TYPES else "file_")
    file_id = new_file_id(prefix)
    url = emu.store.put_file(f"inputs/{file_id}{PurePosixPath(filename).suffix}", content_type, data)
    return JSONResponse(
        {"message": "File uploaded successfully", "file_id": file_id, "file_name": filename, "file_url": url}
    )


async def serve_file(request: Request) -> Response:
    stored = _emu(request).store.files.get(request.path_params["path"])
    if stored is None:
        return JSONResponse({"detail": "Not Found"}, status_code=404)
    return Response(stored.data, media_type=stored.content_type)


ROUTES = [
    Route("/api/run/deployment/queue", queue_run, methods=["POST"], name="queue"),
    Route("/api/run/{run_id}/cancel", cancel_run, methods=["POST"], name="cancel"),
    Route("/api/run/{run_id}", get_run, methods=["GET"], name="get_run"),
    Route("/api/run", legacy_create_run, methods=["POST"], name="legacy_create_run"),
    Route("/api/run", legacy_get_run, methods=["GET"], name="legacy_get_run"),
    Route("/api/deployments", list_deployments, methods=["GET"], name="list_deployments"),
    Route("/api/deployment", create_deployment, methods=["POST"], name="create_deployment"),
    Route("/api/deployment/{deployment_id}", get_deployment, methods=["GET"], name="get_deployment"),
    Route("/api/deployment/{deployment_id}", update_deployment, methods=["PATCH"], name="update_deployment"),
    Route("/api/deployment/{deployment_id}/runs", list_deployment_runs, methods=["GET"], name="list_deployment_runs"),
    Route("/api/machines", list_machines, methods=["GET"], name="list_machines"),
    Route("/api/machine/{machine_id}", get_machine, methods=["GET"], name="get_machine"),
    Route("/api/workflows", list_workflows, methods=["GET"], name="list_workflows"),
    Route("/api/workflow", create_workflow, methods=["POST"], name="create_workflow"),
    Route("/api/workflow/{workflow_id}", get_workflow, methods=["GET"], name="get_workflow"),
    Route("/api/workflow/{workflow_id}/versions", list_workflow_versions, methods=["GET"], name="list_versions"),
    Route("/api/workflow/{workflow_id}/version", create_workflow_version, methods=["POST"], name="create_version"),
    Route(
        "/api/workflow/{workflow_id}/version/{version:int}",
        get_workflow_version_number,
        methods=["GET"],
        name="get_version_number",
    ),
    Route("/api/workflow-version/{version_id}", get_workflow_version, methods=["GET"], name="get_version"),
    Route("/api/file/upload", upload_file, methods=["POST"], name="upload"),
    Route("/files/{path:path}", serve_file, methods=["GET"], name="files"),
]
GROUPS = {
    "queue": "queue",
    "legacy_create_run": "queue",
    "get_run": "run",
    "legacy_get_run": "run",
    "cancel": "cancel",
    "list_deployments": "deployments",
    "create_deployment": "deployments",
    "get_deployment": "deployments",
    "update_deployment": "deployments",
    "list_deployment_runs": "deployments",
    "list_machines": "machines",
    "get_machine": "machines",
    "list_workflows": "workflows",
    "create_workflow": "workflows",
    "get_workflow": "workflows",
    "list_versions": "workflows",
    "create_version": "workflows",
    "get_version_number": "workflows",
    "get_version": "workflows",
    "upload": "upload",
    "files": "files",
}
