"""The workflow catalog as pure data: built from ComfyUI Deploy deployments and machines, stored as
JSON (in Redis, shared by replicas), indexed for lookups by id, display name, name and alias.

No I/O here: ``build`` turns the client's models into a JSON-ready dict, ``CatalogIndex`` answers
lookups on one and picks the deployment to run (routing). Inputs and outputs: ``inputs``; protobuf
messages: ``convert``. Rules: workflows_service.proto and workflow.proto (name standardisation,
routing).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from comfydeploy.models import Deployment, Machine
from common.errors import FailedPrecondition, NotFound
from common.gpu import gpu_type
from stationthis.workflows.v1 import workflow_pb2
from stationthis.workflows.v1 import workflows_service_pb2 as SVC

from .inputs import extract_inputs, extract_outputs

# --- names ----------------------------------------------------------------------------------------

_OUTSIDE = re.compile(r"[^a-z0-9_]")
_UNDERSCORES = re.compile(r"_+")


def standardize(name: str) -> str:
    """ "/Flux Dev" -> "flux_dev": trim, drop leading "/", lower, spaces/hyphens to _, drop the rest."""
    text = name.strip().lstrip("/").lower().replace(" ", "_").replace("-", "_")
    return _UNDERSCORES.sub("_", _OUTSIDE.sub("", text)).strip("_")


ENVIRONMENTS: Mapping[str, int] = {
    "production": workflow_pb2.ENVIRONMENT_PRODUCTION,
    "staging": workflow_pb2.ENVIRONMENT_STAGING,
    "preview": workflow_pb2.ENVIRONMENT_PREVIEW,
    "public-share": workflow_pb2.ENVIRONMENT_PUBLIC_SHARE,
    "private-share": workflow_pb2.ENVIRONMENT_PRIVATE_SHARE,
    "community-share": workflow_pb2.ENVIRONMENT_COMMUNITY_SHARE,
}

# --- building -------------------------------------------------------------------------------------


def _first_note(graph: Any) -> str:
    """The text of the UI graph's first Note node (the legacy description source), else ""."""
    nodes = graph.get("nodes") if isinstance(graph, Mapping) else None
    for node in nodes if isinstance(nodes, list) else []:
        if isinstance(node, Mapping) and node.get("type") in ("Note", "MarkdownNote"):
            values = node.get("widgets_values")
            if isinstance(values, list) and values and isinstance(values[0], str):
                return values[0].strip()
    return ""


class MalformedListing(ValueError):
    """The upstream listing cannot be a catalog; the previous one is kept."""


def _ms(value: datetime | None) -> int:
    return int(value.timestamp() * 1000) if value else 0


def build(deployments: Sequence[Deployment], machines: Sequence[Machine], built_ms: int) -> dict[str, Any]:
    """A JSON-ready catalog; raises MalformedListing when the listing cannot describe workflows."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    names: dict[str, str] = {}
    machine_gpu = {m.id: gpu_type(m.gpu) for m in machines}
    for deployment in deployments:
        if not deployment.id or not deployment.workflow_id:
            raise MalformedListing(f"deployment {deployment.id or '?'} has no workflow id")
        version = deployment.version
        api = version.workflow_api if version and isinstance(version.workflow_api, Mapping) else {}
        grouped.setdefault(deployment.workflow_id, []).append(
            {
                "deployment_id": deployment.id,
                "environment": ENVIRONMENTS.get(deployment.environment or "", workflow_pb2.ENVIRONMENT_UNSPECIFIED),
                "machine_id": deployment.machine_id or "",
                "gpu": gpu_type(deployment.gpu) or machine_gpu.get(deployment.machine_id or "", 0),
                "workflow_version_id": deployment.workflow_version_id or (version.id if version else ""),
                "version": (version.version or 0) if version else 0,
                "version_created_ms": _ms(version.created_at) if version else 0,
                "is_fluid": bool(deployment.modal_image_id),
                "updated_ms": _ms(deployment.updated_at),
                "description": deployment.description or _first_note(version.workflow if version else None),
                "inputs": extract_inputs(api),
                "outputs": extract_outputs(api),
            }
        )
        if deployment.workflow_name and deployment.workflow_id not in names:
            names[deployment.workflow_id] = deployment.workflow_name
    workflows = []
    for workflow_id, items in grouped.items():
        items.sort(key=lambda d: d["updated_ms"], reverse=True)
        display = names.get(workflow_id, "")
        workflows.append(
            {
                "workflow_id": workflow_id,
                "name": standardize(display) or f"workflow_{workflow_id[:8]}",
                "display_name": display or workflow_id,
                "updated_ms": max(d["updated_ms"] for d in items),
                "deployments": items,
            }
        )
    return {
        "built_ms": built_ms,
        "workflows": workflows,
        "machines": [
            {"machine_id": m.id, "name": m.name or "", "status": m.status or "", "gpu": gpu_type(m.gpu)}
            for m in machines
            if not m.deleted
        ],
    }


# --- lookups --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Routing:
    rules: Mapping[str, str]  # standardised workflow name -> machine name
    default_machine: str


class CatalogIndex:
    """Lookups over one catalog dict. Name collisions: the most recently updated workflow keeps the
    name, the others are reachable by id only, and every collision is listed in ``collisions``."""

    def __init__(self, catalog: Mapping[str, Any], aliases: Mapping[str, str], routing: Routing) -> None:
        self.catalog = catalog
        self.built_ms = int(catalog["built_ms"])
        self.by_id: dict[str, dict[str, Any]] = {w["workflow_id"]: w for w in catalog["workflows"]}
        self.by_name: dict[str, dict[str, Any]] = {}
        self.by_display: dict[str, dict[str, Any]] = {}
        self.collisions: list[str] = []
        for workflow in sorted(catalog["workflows"], key=lambda w: (-w["updated_ms"], w["workflow_id"])):
            kept = self.by_name.setdefault(workflow["name"], workflow)
            if kept is not workflow:
                self.collisions.append(f"{workflow['name']}: {kept['workflow_id']} kept, {workflow['workflow_id']}")
            self.by_display.setdefault(workflow["display_name"].strip().lower(), workflow)
        self.aliases = {standardize(a): standardize(n) for a, n in aliases.items()}
        self.routing = routing
        self.machines: dict[str, dict[str, Any]] = {m["name"]: m for m in catalog["machines"]}
        self.machine_names: dict[str, str] = {m["machine_id"]: m["name"] for m in catalog["machines"]}
        self._routes: dict[str, dict[str, Any] | None] = {}

    def __len__(self) -> int:
        return len(self.by_id)

    # -- finding

    def get(self, workflow_id: str) -> dict[str, Any]:
        workflow = self.by_id.get(workflow_id.strip())
        if workflow is None:
            raise NotFound(
                f"no workflow {workflow_id!r}", reason="WORKFLOW_NOT_FOUND", metadata={"workflow_id": workflow_id}
            )
        return workflow

    def resolve(self, name: str) -> tuple[dict[str, Any], int, str]:
        """(workflow, MatchedBy, standardised name): id, display name, name, then alias."""
        typed = name.strip()
        std = standardize(typed)
        if typed in self.by_id:
            return self.by_id[typed], SVC.MATCHED_BY_ID, std
        if typed.lower() in self.by_display:
            return self.by_display[typed.lower()], SVC.MATCHED_BY_DISPLAY_NAME, std
        if std in self.by_name:
            return self.by_name[std], SVC.MATCHED_BY_NAME, std
        if self.aliases.get(std) in self.by_name:
            return self.by_name[self.aliases[std]], SVC.MATCHED_BY_ALIAS, std
        candidates = sorted({*self.by_name, *(a for a, n in self.aliases.items() if n in self.by_name)})
        suggestions = difflib.get_close_matches(std, candidates, n=5, cutoff=0.6)
        raise NotFound(
            f"no workflow is called {name!r}" + (f"; did you mean {', '.join(suggestions)}?" if suggestions else ""),
            reason="WORKFLOW_NOT_FOUND",
            metadata={"name": name, "standardized_name": std, "suggestions": ",".join(suggestions)},
        )

    def all(self) -> list[dict[str, Any]]:
        return sorted(self.by_id.values(), key=lambda w: (w["name"], w["workflow_id"]))

    def aliases_of(self, workflow_name: str) -> list[str]:
        """The standardised aliases that name ``workflow_name``, sorted."""
        return sorted(a for a, n in self.aliases.items() if n == workflow_name)

    # -- choosing the deployment

    def deployment_for(self, workflow: Mapping[str, Any], environment: int) -> dict[str, Any]:
        """The deployment to run: in ``environment`` (none given: production, else the most recent),
        preferring one on the machine routing picks, else the most recently updated."""
        deployments = workflow["deployments"]  # most recently updated first
        wanted = environment or workflow_pb2.ENVIRONMENT_PRODUCTION
        candidates = [d for d in deployments if d["environment"] == wanted]
        if not candidates and not environment and deployments:
            candidates = [d for d in deployments if d["environment"] == deployments[0]["environment"]]
        if not candidates:
            have = sorted({workflow_pb2.Environment.Name(d["environment"]) for d in deployments})
            raise FailedPrecondition(
                f"workflow {workflow['name']} has no {workflow_pb2.Environment.Name(wanted)} deployment",
                reason="NO_DEPLOYMENT_FOR_ENVIRONMENT",
                metadata={
                    "workflow_id": workflow["workflow_id"],
                    "environment": workflow_pb2.Environment.Name(wanted),
                    "environments": ",".join(have),
                },
            )
        machine = self.route(workflow["name"])
        on_machine = [d for d in candidates if machine is not None and d["machine_id"] == machine["machine_id"]]
        return dict((on_machine or candidates)[0])

    @staticmethod
    def listed_deployment(workflow: Mapping[str, Any], environment: int) -> dict[str, Any] | None:
        """For lists: the deployment in ``environment``; with none asked, production, else the latest."""
        wanted = environment or workflow_pb2.ENVIRONMENT_PRODUCTION
        for deployment in workflow["deployments"]:
            if deployment["environment"] == wanted:
                return dict(deployment)
        if environment or not workflow["deployments"]:
            return None
        latest: dict[str, Any] = workflow["deployments"][0]
        return dict(latest)

    def route(self, workflow_name: str) -> dict[str, Any] | None:
        """The machine a workflow prefers (its deployment there is chosen first): the rule's machine
        if ready, else the default machine if ready, else any ready machine."""
        if workflow_name not in self._routes:
            self._routes[workflow_name] = self._route(workflow_name)
        return self._routes[workflow_name]

    def _route(self, workflow_name: str) -> dict[str, Any] | None:
        ready: list[dict[str, Any]] = [m for m in self.catalog["machines"] if m["status"] == "ready"]
        for name in (self.routing.rules.get(workflow_name), self.routing.default_machine):
            machine = self.machines.get(name or "")
            if machine is not None and machine["status"] == "ready":
                return machine
        return ready[0] if ready else None
