"""Response shapes: WorkflowRunModel (§2.2), WorkflowRunOutputModel (§4.4), DeploymentModel (§2.5) and the rest."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from . import graph
from .state import Output, Row, Run, Store, iso

MEDIA_KEYS = ("images", "files", "gifs", "audio", "text_file", "model_file", "result", "mesh")
MACHINE_SUMMARY = (
    "id",
    "user_id",
    "name",
    "created_at",
    "updated_at",
    "type",
    "org_id",
    "status",
    "gpu",
    "machine_version",
    "machine_builder_version",
    "comfyui_version",
    "import_failed_logs",
    "machine_version_id",
    "is_workspace",
)
WORKFLOW_SUMMARY = ("id", "name", "created_at", "updated_at", "pinned", "cover_image", "user_id", "selected_machine_id")


def _seconds(later: datetime | None, earlier: datetime | None) -> float | None:
    if later is None or earlier is None:
        return None
    return (later - earlier) / timedelta(seconds=1)


def _is_media(item: Any) -> bool:
    return (
        isinstance(item, dict)
        and isinstance(item.get("url"), str)
        and isinstance(item.get("type"), str)
        and isinstance(item.get("filename"), str)
    )


def valid_output_data(data: Any) -> bool:
    """``dict[str, list[MediaItem | str | bool]]`` and not empty: anything else is dropped from responses."""
    if not isinstance(data, dict) or not data:
        return False
    for value in data.values():
        if not isinstance(value, list):
            return False
        for item in value:
            if not (isinstance(item, (str, bool)) or _is_media(item)):
                return False
    return True


def guess_output_id(data: dict[str, Any]) -> str | None:
    for key in ("images", "files", "gifs", "mesh"):
        for item in data.get(key) or []:
            if isinstance(item, dict) and item.get("output_id"):
                return str(item["output_id"])
    return None


def output(record: Output) -> dict[str, Any]:
    return {
        "id": record.id,
        "output_id": guess_output_id(record.data),
        "run_id": record.run_id,
        "data": record.data,
        "node_meta": record.node_meta,
        "created_at": iso(record.created_at),
        "updated_at": iso(record.updated_at),
        "type": None,
        "node_id": None,
    }


def outputs(run: Run) -> list[dict[str, Any]]:
    return [output(record) for record in run.outputs if valid_output_data(record.data)]


def run(record: Run, queue_position: int | None = None) -> dict[str, Any]:
    return {
        "id": record.id,
        "workflow_version_id": record.workflow_version_id,
        "workflow_id": record.workflow_id,
        "workflow_inputs": record.workflow_inputs,
        "machine_id": record.machine_id,
        "origin": record.origin,
        "status": record.status,
        "created_at": iso(record.created_at),
        "updated_at": iso(record.updated_at),
        "queued_at": iso(record.queued_at),
        "started_at": iso(record.started_at),
        "ended_at": iso(record.ended_at),
        "gpu_event_id": record.gpu_event_id,
        "gpu": record.gpu,
        "machine_version": record.machine_version,
        "machine_type": record.machine_type,
        "modal_function_call_id": record.modal_function_call_id,
        "user_id": record.user_id,
        "org_id": record.org_id,
        "live_status": record.live_status,
        "progress": record.progress,
        "is_realtime": False,
        "webhook": record.webhook,
        "webhook_status": None,
        "webhook_intermediate_status": record.webhook_intermediate_status,
        "outputs": outputs(record),
        "number": 0,
        "duration": _seconds(record.ended_at, record.created_at),
        "cold_start_duration": _seconds(record.started_at, record.queued_at),
        "cold_start_duration_total": _seconds(record.started_at, record.created_at),
        "run_duration": _seconds(record.ended_at, record.started_at),
        "queue_position": queue_position,
    }


def _naive_iso(moment: datetime | None) -> str | None:
    """``datetime.isoformat()`` of upstream's naive UTC column: no ``Z``, unlike the pydantic models."""
    return None if moment is None else moment.astimezone(UTC).replace(tzinfo=None).isoformat()


def deployment_run(record: Run) -> dict[str, Any]:
    """One ``GET /deployment/{id}/runs`` row (§2.5). As upstream builds it by hand: timestamps from
    ``isoformat()`` and ``duration`` (``ended_at - started_at``) as text, null when unknown or zero."""
    duration = _seconds(record.ended_at, record.started_at)
    return {
        "id": record.id,
        "status": record.status,
        "created_at": _naive_iso(record.created_at),
        "started_at": _naive_iso(record.started_at),
        "ended_at": _naive_iso(record.ended_at),
        "workflow_id": record.workflow_id,
        "workflow_version_id": record.workflow_version_id,
        "machine_id": record.machine_id,
        "gpu": record.gpu,
        "origin": record.origin,
        "user_id": record.user_id,
        "deployment_id": record.deployment_id,
        "duration": str(duration) if duration else None,
    }


def deployment(store: Store, row: Row) -> dict[str, Any]:
    version = store.versions.get(row.get("workflow_version_id") or "")
    workflow = store.workflows.get(row.get("workflow_id") or "")
    machine = store.machines.get(row.get("machine_id") or "")
    return {
        **row,
        "workflow": {"id": workflow["id"], "name": workflow["name"], "cover_url": workflow.get("cover_image")}
        if workflow
        else None,
        "version": version,
        "machine": {"id": machine["id"], "name": machine["name"]} if machine else None,
        "input_types": graph.input_types(version.get("workflow_api")) if version else None,
        "output_types": graph.output_types(version.get("workflow")) if version else None,
    }


def machine_summary(row: Row, *, docker_steps: bool = False, has_workflows: bool | None = None) -> dict[str, Any]:
    out = {key: row.get(key) for key in MACHINE_SUMMARY}
    if docker_steps:
        out["docker_command_steps"] = row.get("docker_command_steps")
    if has_workflows is not None:
        out["has_workflows"] = has_workflows
    return out


def workflow_summary(store: Store, row: Row) -> dict[str, Any]:
    out = {key: row.get(key) for key in WORKFLOW_SUMMARY}
    owner = store.tenant_of_user(row.get("user_id"))
    out["user_name"] = owner.user_name if owner else None
    out["user_icon"] = owner.user_icon if owner else None
    return out
