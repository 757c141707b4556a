"""Typed inputs and outputs of a workflow: extracted from its ``workflow_api`` graph (the
``ComfyUIDeployExternal*`` input nodes and the known output nodes, reference §5.1) and checked against
a caller's values (``validate_inputs``). Rules: workflow.proto (InputType, OutputType) and
workflows_service.proto (ValidateInputs).

An input spec is a JSON-ready dict (stored in the catalog): ``input_id``, ``type`` (InputType),
``class_type``, ``required``, ``enum_options``, ``display_name``, ``description`` and, when set,
``default``, ``min_value``, ``max_value``, ``step``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from common.errors import FieldViolation, InvalidArgument
from stationthis.workflows.v1 import workflow_pb2

# --- extraction -----------------------------------------------------------------------------------

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


# --- validation -------------------------------------------------------------------------------


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
