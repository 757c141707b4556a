"""Catalog entries (the JSON-ready dicts of ``catalog.build``) to protobuf messages."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format

from common.proto_time import duration_from_seconds, timestamp_from_ms
from stationthis.workflows.v1 import workflow_pb2

from .catalog import CatalogIndex


def workflow(
    index: CatalogIndex, entry: Mapping[str, Any], deployment: Mapping[str, Any] | None
) -> workflow_pb2.Workflow:
    """``entry`` viewed through ``deployment`` (None: a workflow with no deployment in the view). The
    machine and GPU are the deployment's: a deployment run cannot choose its machine."""
    message = workflow_pb2.Workflow(
        workflow_id=entry["workflow_id"],
        name=entry["name"],
        display_name=entry["display_name"],
        aliases=index.aliases_of(entry["name"]),
        deployments=[deployment_message(d) for d in entry["deployments"]],
    )
    if entry["updated_ms"]:
        message.update_time.CopyFrom(timestamp_from_ms(entry["updated_ms"]))
    if deployment is None:
        return message
    message.environment = deployment["environment"]
    message.description = deployment["description"]
    message.machine_id = deployment["machine_id"]
    message.machine_name = index.machine_names.get(deployment["machine_id"], "")
    message.gpu = deployment["gpu"]
    message.inputs.extend(workflow_input(spec) for spec in deployment["inputs"])
    for out in deployment["outputs"]:
        message.outputs.add(output_id=out["output_id"], class_type=out["class_type"], type=out["type"])
    message.version.workflow_version_id = deployment["workflow_version_id"]
    message.version.version = deployment["version"]
    if deployment["version_created_ms"]:
        message.version.create_time.CopyFrom(timestamp_from_ms(deployment["version_created_ms"]))
    return message


def workflow_input(spec: Mapping[str, Any]) -> workflow_pb2.WorkflowInput:
    """An input spec (``inputs.extract_inputs``) names WorkflowInput's fields, ``default`` aside."""
    fields = {("default_value" if key == "default" else key): value for key, value in spec.items()}
    return json_format.ParseDict(fields, workflow_pb2.WorkflowInput(), ignore_unknown_fields=True)


def deployment_message(d: Mapping[str, Any]) -> workflow_pb2.WorkflowDeployment:
    message = workflow_pb2.WorkflowDeployment(
        deployment_id=d["deployment_id"],
        environment=d["environment"],
        machine_id=d["machine_id"],
        gpu=d["gpu"],
        workflow_version_id=d["workflow_version_id"],
        is_fluid=d["is_fluid"],
    )
    if d["updated_ms"]:
        message.update_time.CopyFrom(timestamp_from_ms(d["updated_ms"]))
    return message


def catalog_stats(
    index: CatalogIndex | None,
    shared: Mapping[str, str],
    *,
    hits: int,
    misses: int,
    upstream_errors: int,
    upstream_healthy: bool,
    ttl_seconds: float,
    now_seconds: float,
) -> workflow_pb2.CatalogStats:
    """CatalogStats from this replica's catalog (None: none loaded), the replicas' shared statistics
    (``CatalogCache.shared_stats``) and this replica's counters."""
    stats = workflow_pb2.CatalogStats(
        workflow_count=len(index) if index else 0,
        hits=hits,
        misses=misses,
        refreshes=int(shared.get("refreshes", 0)),
        refresh_failures=int(shared.get("refresh_failures", 0)),
        upstream_errors=upstream_errors,
        upstream_healthy=upstream_healthy and not shared.get("last_error"),
        last_error=shared.get("last_error", ""),
        ttl=duration_from_seconds(ttl_seconds),
        name_collisions=index.collisions if index else [],
    )
    if shared.get("last_refresh_ms"):
        stats.last_refresh_time.CopyFrom(timestamp_from_ms(int(shared["last_refresh_ms"])))
        stats.last_refresh_duration.CopyFrom(duration_from_seconds(int(shared.get("last_duration_ms", 0)) / 1000))
    if index is not None:
        age = max(0.0, now_seconds - index.built_ms / 1000)
        stats.catalog_age.CopyFrom(duration_from_seconds(age))
        stats.stale = age > ttl_seconds
    else:
        stats.stale = True
    return stats
