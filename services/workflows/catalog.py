"""The workflow catalog as pure data: built from ComfyUI Deploy deployments and machines, stored as
JSON (in Redis, shared by replicas), indexed for lookups by id, display name, name and alias.

No I/O here: ``build`` turns the client's models into a JSON-ready dict, ``CatalogIndex`` answers
lookups on one. Rules: workflows_service.proto and workflow.proto (name standardisation, input
types, routing).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from google.protobuf import json_format, struct_pb2

from comfydeploy.models import Deployment, Machine
from common.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from common.proto_time import timestamp_from_ms
from stationthis.type.v1 import gpu_pb2
from stationthis.workflows.v1 import workflow_pb2
from stationthis.workflows.v1 import workflows_service_pb2 as SVC

# --- names ----------------------------------------------------------------------------------------

_OUTSIDE = re.compile(r"[^a-z0-9_]")
_UNDERSCORES = re.compile(r"_+")


def standardize(name: str) -> str:
    """ "/Flux Dev" -> "flux_dev": trim, drop leading "/", lower, spaces/hyphens to _, drop the rest."""
    text = name.strip().lstrip("/").lower().replace(" ", "_").replace("-", "_")
    return _UNDERSCORES.sub("_", _OUTSIDE.sub("", text)).strip("_")


DEFAULT_ALIASES: Mapping[str, str] = {
    "make": "text2img",
    "makeimage": "text2img",
    "train": "lora_train",
    "tooncraft": "toon",
    "video": "img2vid",
}

ENVIRONMENTS: Mapping[str, int] = {
    "production": workflow_pb2.ENVIRONMENT_PRODUCTION,
    "staging": workflow_pb2.ENVIRONMENT_STAGING,
    "preview": workflow_pb2.ENVIRONMENT_PREVIEW,
    "public-share": workflow_pb2.ENVIRONMENT_PUBLIC_SHARE,
    "private-share": workflow_pb2.ENVIRONMENT_PRIVATE_SHARE,
    "community-share": workflow_pb2.ENVIRONMENT_COMMUNITY_SHARE,
}

GPUS: Mapping[str, int] = {
    value.name.removeprefix("GPU_TYPE_").replace("_80GB", "-80GB"): value.number
    for value in gpu_pb2.GpuType.DESCRIPTOR.values
    if value.number
}

# --- inputs ---------------------------------------------------------------------------------------

T = workflow_pb2
# class_type -> (InputType, node field holding the default)
INPUT_CLASSES: Mapping[str, tuple[int, str]] = {
    "ComfyUIDeployExternalText": (T.INPUT_TYPE_TEXT, "default_value"),
    "ComfyUIDeployExternalTextAny": (T.INPUT_TYPE_TEXT, "default_value"),
    "ComfyUIDeployExternalTextSingleLine": (T.INPUT_TYPE_TEXT, "default_value"),
    "ComfyUIDeployExternalNumber": (T.INPUT_TYPE_NUMBER, "default_value"),
    "ComfyUIDeployExternalNumberSlider": (T.INPUT_TYPE_NUMBER, "default_value"),
    "ComfyUIDeployExternalNumberInt": (T.INPUT_TYPE_INTEGER, "default_value"),
    "ComfyUIDeployExternalNumberSliderInt": (T.INPUT_TYPE_INTEGER, "default_value"),
    "ComfyUIDeployExternalBoolean": (T.INPUT_TYPE_BOOLEAN, "default_value"),
    "ComfyUIDeployExternalEnum": (T.INPUT_TYPE_ENUM, "default_value"),
    "ComfyUIDeployExternalImage": (T.INPUT_TYPE_IMAGE, "default_value_url"),
    "ComfyUIDeployExternalImageAlpha": (T.INPUT_TYPE_IMAGE, "default_value_url"),
    "ComfyUIDeployExternalImageBatch": (T.INPUT_TYPE_IMAGE_BATCH, "images"),
    "ComfyUIDeployExternalSeed": (T.INPUT_TYPE_SEED, "default_value"),
    "ComfyUIDeployExternalLora": (T.INPUT_TYPE_LORA, "lora_url"),
    "ComfyUIDeployExternalCheckpoint": (T.INPUT_TYPE_CHECKPOINT, "default_value"),
    "ComfyUIDeployExternalVideo": (T.INPUT_TYPE_VIDEO, "default_value_url"),
    "ComfyUIDeployExternalVid": (T.INPUT_TYPE_VIDEO, "default_value_url"),
    "ComfyUIDeployExternalAudio": (T.INPUT_TYPE_AUDIO, "audio_file"),
    "ComfyUIDeployExternalEXR": (T.INPUT_TYPE_EXR, "exr_file"),
    "ComfyUIDeployExternalFile": (T.INPUT_TYPE_FILE, "file_url"),
    "ComfyUIDeployExternalFaceModel": (T.INPUT_TYPE_FACE_MODEL, "face_model_url"),
    "ComfyUIDeployExternalColor": (T.INPUT_TYPE_COLOR, "default_value"),
}
INT_LIMIT = 2_147_483_647


def _node_order(node_id: str) -> tuple[int, int | str]:
    return (0, int(node_id)) if node_id.isdigit() else (1, node_id)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _default(kind: int, field: str, node_inputs: Mapping[str, Any]) -> tuple[bool, Any]:
    """(has_default, value) from the node field that holds it."""
    value = node_inputs.get(field)
    if field == "default_value_url" and value in (None, ""):
        value = node_inputs.get("default_value")
    if kind == T.INPUT_TYPE_LORA and value in (None, "") and node_inputs.get("default_lora_name"):
        return True, ""  # no LoRA URL: the node falls back to its default_lora_name
    if value is None or (isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)):
        return False, None  # missing, null or a link to another node
    if kind == T.INPUT_TYPE_IMAGE_BATCH and isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return False, None
        if not value:
            return False, None
    if kind != T.INPUT_TYPE_TEXT and value == "":
        return False, None
    return True, value


def extract_inputs(workflow_api: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The external inputs of a workflow_api graph (reference §5.1), in node-id order, first node wins."""
    found: dict[str, dict[str, Any]] = {}
    for node_id in sorted((str(k) for k in workflow_api), key=_node_order):
        node = workflow_api.get(node_id)
        if not isinstance(node, Mapping):
            continue
        class_type = node.get("class_type")
        node_inputs: Mapping[str, Any] = node["inputs"] if isinstance(node.get("inputs"), Mapping) else {}
        if not isinstance(class_type, str) or not class_type.startswith("ComfyUIDeployExternal"):
            continue
        input_id = node_inputs.get("input_id")
        if not isinstance(input_id, str) or not input_id or input_id in found:
            continue  # wired to another node (a link, not a name), or already declared
        kind, field = INPUT_CLASSES.get(class_type, (T.INPUT_TYPE_UNSPECIFIED, "default_value"))
        has_default, default = _default(kind, field, node_inputs)
        options: list[str] = []
        if kind == T.INPUT_TYPE_ENUM:
            raw = node_inputs.get("options")
            try:
                parsed = json.loads(raw) if isinstance(raw, str) else raw
            except ValueError:
                parsed = []
            options = [str(o) for o in parsed] if isinstance(parsed, list) else []
        spec: dict[str, Any] = {
            "input_id": input_id,
            "type": kind,
            "class_type": class_type,
            "required": not has_default,
            "enum_options": options,
            "display_name": str(node_inputs.get("display_name") or input_id),
            "description": str(node_inputs.get("description") or ""),
        }
        if has_default:
            spec["default"] = default
        for key in ("min_value", "max_value", "step"):
            number = _number(node_inputs.get(key))
            if number is not None and kind in (T.INPUT_TYPE_NUMBER, T.INPUT_TYPE_INTEGER, T.INPUT_TYPE_SEED):
                spec[key] = number
        found[input_id] = spec
    return list(found.values())


OUTPUT_CLASSES: Mapping[str, int] = {
    "SaveImage": T.OUTPUT_TYPE_IMAGE,
    "ComfyDeployOutputImage": T.OUTPUT_TYPE_IMAGE,
    "ComfyDeployStdOutputImage": T.OUTPUT_TYPE_IMAGE,
    "SaveVideo": T.OUTPUT_TYPE_VIDEO,
    "SaveAnimatedWEBP": T.OUTPUT_TYPE_GIF,
    "SaveGIF": T.OUTPUT_TYPE_GIF,
    "SaveAudio": T.OUTPUT_TYPE_AUDIO,
    "ComfyDeployOutputText": T.OUTPUT_TYPE_TEXT,
    "ShowText|pysssss": T.OUTPUT_TYPE_TEXT,
    "ComfyDeployOutputFile": T.OUTPUT_TYPE_FILE,
    "ComfyDeployStdOutputAny": T.OUTPUT_TYPE_FILE,
}


def extract_outputs(workflow_api: Mapping[str, Any]) -> list[dict[str, Any]]:
    outputs = []
    for node_id in sorted((str(k) for k in workflow_api), key=_node_order):
        node = workflow_api.get(node_id)
        if not isinstance(node, Mapping) or not isinstance(node.get("class_type"), str):
            continue
        class_type = node["class_type"]
        node_inputs: Mapping[str, Any] = node["inputs"] if isinstance(node.get("inputs"), Mapping) else {}
        if class_type == "VHS_VideoCombine":
            fmt = str(node_inputs.get("format", ""))
            kind: int = T.OUTPUT_TYPE_GIF if fmt.startswith("image/") else T.OUTPUT_TYPE_VIDEO
        elif class_type in OUTPUT_CLASSES:
            kind = OUTPUT_CLASSES[class_type]
        else:
            continue
        output_id = node_inputs.get("output_id")
        outputs.append(
            {"output_id": output_id if isinstance(output_id, str) and output_id else f"node_{node_id}",
             "class_type": class_type, "type": kind}
        )  # fmt: skip
    return outputs


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
    machine_gpu = {m.id: GPUS.get(m.gpu or "", 0) for m in machines}
    for deployment in deployments:
        if not deployment.id or not deployment.workflow_id:
            raise MalformedListing(f"deployment {deployment.id or '?'} has no workflow id")
        version = deployment.version
        api = version.workflow_api if version and isinstance(version.workflow_api, Mapping) else {}
        grouped.setdefault(deployment.workflow_id, []).append(
            {
                "deployment_id": deployment.id,
                "environment": ENVIRONMENTS.get(deployment.environment or "", T.ENVIRONMENT_UNSPECIFIED),
                "machine_id": deployment.machine_id or "",
                "gpu": GPUS.get(deployment.gpu or "", 0) or machine_gpu.get(deployment.machine_id or "", 0),
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
            {"machine_id": m.id, "name": m.name or "", "status": m.status or "", "gpu": GPUS.get(m.gpu or "", 0)}
            for m in machines
            if not m.deleted
        ],
    }


# --- lookups --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Routing:
    rules: Mapping[str, str]  # standardised workflow name -> machine name
    default_machine: str


@dataclass(frozen=True)
class Resolved:
    workflow: workflow_pb2.Workflow
    deployment: dict[str, Any]
    matched_by: int


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
        self.machines_by_id = {m["machine_id"]: m for m in catalog["machines"]}
        # The catalog never changes once built: each rendered view is built once. Callers copy it
        # into their responses (protobuf constructors copy), never mutate it.
        self._rendered: dict[tuple[str, str], workflow_pb2.Workflow] = {}
        self._routes: dict[str, dict[str, Any] | None] = {}
        # Responses built from this catalog, for callers that answer the same question repeatedly
        # (the servicer's ResolveWorkflow). Never mutated once stored.
        self.answers: dict[Any, Any] = {}

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

    # -- rendering

    def deployment_for(self, workflow: Mapping[str, Any], environment: int) -> dict[str, Any]:
        """The deployment to run: in ``environment`` (none given: production, else the most recent),
        preferring one on the machine routing picks, else the most recently updated."""
        deployments = workflow["deployments"]  # most recently updated first
        wanted = environment or T.ENVIRONMENT_PRODUCTION
        candidates = [d for d in deployments if d["environment"] == wanted]
        if not candidates and not environment and deployments:
            candidates = [d for d in deployments if d["environment"] == deployments[0]["environment"]]
        if not candidates:
            have = sorted({T.Environment.Name(d["environment"]) for d in deployments})
            raise FailedPrecondition(
                f"workflow {workflow['name']} has no {T.Environment.Name(wanted)} deployment",
                reason="NO_DEPLOYMENT_FOR_ENVIRONMENT",
                metadata={
                    "workflow_id": workflow["workflow_id"],
                    "environment": T.Environment.Name(wanted),
                    "environments": ",".join(have),
                },
            )
        machine = self.route(workflow["name"])
        on_machine = [d for d in candidates if machine is not None and d["machine_id"] == machine["machine_id"]]
        return dict((on_machine or candidates)[0])

    @staticmethod
    def listed_deployment(workflow: Mapping[str, Any], environment: int) -> dict[str, Any] | None:
        """For lists: the deployment in ``environment``; with none asked, production, else the latest."""
        wanted = environment or T.ENVIRONMENT_PRODUCTION
        for deployment in workflow["deployments"]:
            if deployment["environment"] == wanted:
                return dict(deployment)
        if environment or not workflow["deployments"]:
            return None
        latest: dict[str, Any] = workflow["deployments"][0]
        return dict(latest)

    def route(self, workflow_name: str) -> dict[str, Any] | None:
        """The rule's machine if ready, else the default machine if ready, else any ready machine."""
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

    def render(self, workflow: Mapping[str, Any], deployment: Mapping[str, Any] | None) -> workflow_pb2.Workflow:
        key = (workflow["workflow_id"], deployment["deployment_id"] if deployment else "")
        rendered = self._rendered.get(key)
        if rendered is None:
            rendered = self._rendered[key] = self._render(workflow, deployment)
        return rendered

    def _render(self, workflow: Mapping[str, Any], deployment: Mapping[str, Any] | None) -> workflow_pb2.Workflow:
        message = workflow_pb2.Workflow(
            workflow_id=workflow["workflow_id"],
            name=workflow["name"],
            display_name=workflow["display_name"],
            aliases=sorted(a for a, n in self.aliases.items() if n == workflow["name"]),
        )
        for d in workflow["deployments"]:
            message.deployments.append(deployment_message(d))
        if workflow["updated_ms"]:
            message.update_time.CopyFrom(timestamp_from_ms(workflow["updated_ms"]))
        if deployment is None:
            return message
        message.environment = deployment["environment"]
        message.description = deployment["description"]
        machine = self.route(workflow["name"])
        if machine is not None:
            message.machine_id = machine["machine_id"]
            message.machine_name = machine["name"]
            message.gpu = machine["gpu"]
        for spec in deployment["inputs"]:
            item = message.inputs.add(
                input_id=spec["input_id"],
                type=spec["type"],
                class_type=spec["class_type"],
                required=spec["required"],
                enum_options=spec["enum_options"],
                display_name=spec["display_name"],
                description=spec["description"],
            )
            if "default" in spec:
                item.default_value.CopyFrom(json_format.ParseDict(spec["default"], struct_pb2.Value()))
            for key in ("min_value", "max_value", "step"):
                if key in spec:
                    setattr(item, key, spec[key])
        for out in deployment["outputs"]:
            message.outputs.add(output_id=out["output_id"], class_type=out["class_type"], type=out["type"])
        message.version.workflow_version_id = deployment["workflow_version_id"]
        message.version.version = deployment["version"]
        if deployment["version_created_ms"]:
            message.version.create_time.CopyFrom(timestamp_from_ms(deployment["version_created_ms"]))
        return message


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


# --- input validation -----------------------------------------------------------------------------


_COLOR = re.compile(r"#[0-9A-Fa-f]{6}")


def _is_url(value: Any) -> bool:
    """An absolute http(s) URL with a host (files are uploaded first: UploadFile returns one)."""
    if not isinstance(value, str):
        return False
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _integral(value: Any) -> bool:
    return _number(value) is not None and float(value).is_integer()


def _check(spec: Mapping[str, Any], value: Any) -> str | None:
    """Why ``value`` does not fit ``spec``, or None when it does."""
    kind = spec["type"]
    low, high = spec.get("min_value"), spec.get("max_value")
    bounds = ""
    if low is not None or high is not None:
        bounds = (
            f" between {_fmt(low)} and {_fmt(high)}"
            if low is not None and high is not None
            else (f" of at least {_fmt(low)}" if low is not None else f" of at most {_fmt(high)}")
        )

    def in_bounds(number: float) -> bool:
        return (low is None or number >= low) and (high is None or number <= high)

    if kind == T.INPUT_TYPE_TEXT:
        return None if isinstance(value, str) else "must be a string"
    if kind == T.INPUT_TYPE_CHECKPOINT:
        return None if isinstance(value, str) and value else "must be a non-empty string (a checkpoint name or URL)"
    if kind == T.INPUT_TYPE_COLOR:
        return None if isinstance(value, str) and _COLOR.fullmatch(value) else "must be a colour as #RRGGBB"
    if kind == T.INPUT_TYPE_NUMBER:
        number = _number(value)
        return None if number is not None and in_bounds(number) else f"must be a number{bounds}"
    if kind == T.INPUT_TYPE_INTEGER:
        ok = _integral(value) and abs(float(value)) <= INT_LIMIT and in_bounds(float(value))
        return None if ok else f"must be an integer{bounds or f' between -{INT_LIMIT} and {INT_LIMIT}'}"
    if kind == T.INPUT_TYPE_SEED:
        ok = _integral(value) and (float(value) == -1 or in_bounds(float(value)))
        return None if ok else f"must be -1 (random) or an integer{bounds}"
    if kind == T.INPUT_TYPE_BOOLEAN:
        return None if isinstance(value, bool) else "must be true or false"
    if kind == T.INPUT_TYPE_ENUM:
        options = spec["enum_options"]
        if not isinstance(value, str):
            return "must be a string"
        return None if not options or value in options else f"must be one of {', '.join(options)}"
    if kind == T.INPUT_TYPE_IMAGE:
        return None if _is_url(value) else "must be an http(s) URL"
    if kind == T.INPUT_TYPE_IMAGE_BATCH:
        items = value
        if isinstance(value, str):
            try:
                items = json.loads(value)
            except ValueError:
                items = None
        ok = isinstance(items, list) and bool(items) and all(_is_url(i) for i in items)
        return None if ok else "must be a list of http(s) URLs"
    if kind in (
        T.INPUT_TYPE_LORA, T.INPUT_TYPE_VIDEO, T.INPUT_TYPE_AUDIO, T.INPUT_TYPE_FILE, T.INPUT_TYPE_EXR,
        T.INPUT_TYPE_FACE_MODEL,
    ):  # fmt: skip
        return None if _is_url(value) else "must be an http(s) URL"
    return None  # an input class this API does not know: passed through


def _fmt(number: float | None) -> str:
    return "" if number is None else (str(int(number)) if float(number).is_integer() else str(number))


def validate_inputs(
    specs: Sequence[Mapping[str, Any]], given: Mapping[str, Any], metadata: Mapping[str, str]
) -> tuple[dict[str, Any], list[str]]:
    """(complete inputs, ids that took their default); every problem in one INVALID_ARGUMENT."""
    by_id = {spec["input_id"]: spec for spec in specs}
    problems: list[FieldViolation] = []
    for key in sorted(given):
        if key not in by_id:
            problems.append(FieldViolation(f"inputs.{key}", "unknown input"))
    complete: dict[str, Any] = {}
    defaulted: list[str] = []
    for input_id, spec in by_id.items():
        value = given.get(input_id)
        if value is None:  # absent, or JSON null: not given
            if spec["required"]:
                problems.append(FieldViolation(f"inputs.{input_id}", "required"))
            else:
                complete[input_id] = spec.get("default")
                defaulted.append(input_id)
            continue
        why = _check(spec, value)
        if why:
            problems.append(FieldViolation(f"inputs.{input_id}", why))
        else:
            complete[input_id] = value
    if problems:
        error = InvalidArgument.for_fields(problems, reason="INVALID_INPUTS")
        error.metadata.update(metadata)
        raise error
    return complete, defaulted


def parse_pairs(raw: str) -> dict[str, str]:
    """``a=b,c=d`` -> {"a": "b", "c": "d"} (for the alias and routing tables)."""
    out = {}
    for item in raw.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError("expected name=value pairs separated by commas")
        out[key.strip()] = value.strip()
    return out
