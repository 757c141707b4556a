"""What the server reads from a workflow: input types (§5.1), output types (§4.4), input application (§5.2),
execution order and the output nodes a run produces."""

from __future__ import annotations

import copy
import json
from typing import Any

# class_type -> V2 `type` (comfy-deploy/api src/api/utils/inputs.py). Seed and FaceModel are *not* in the
# V2 list: the hosted front end knows them, the API's input_types does not.
INPUT_TYPES: dict[str, str] = {
    "ComfyUIDeployExternalText": "string",
    "ComfyUIDeployExternalTextAny": "string",
    "ComfyUIDeployExternalTextSingleLine": "string",
    "ComfyUIDeployExternalImage": "string",
    "ComfyUIDeployExternalImageAlpha": "string",
    "ComfyUIDeployExternalImageBatch": "string",
    "ComfyUIDeployExternalNumber": "float",
    "ComfyUIDeployExternalNumberInt": "integer",
    "ComfyUIDeployExternalNumberSlider": "float",
    "ComfyUIDeployExternalNumberSliderInt": "integer",
    "ComfyUIDeployExternalBoolean": "boolean",
    "ComfyUIDeployExternalEnum": "string",
    "ComfyUIDeployExternalLora": "string",
    "ComfyUIDeployExternalCheckpoint": "string",
    "ComfyUIDeployExternalVideo": "string",
    "ComfyUIDeployExternalAudio": "string",
    "ComfyUIDeployExternalEXR": "string",
    "ComfyUIDeployExternalFile": "string",
    "ComfyDeployWebscoketImageInput": "binary",
}
STD_OUTPUT_NODES = ("ComfyDeployStdOutputImage", "ComfyDeployStdOutputAny")
# Node classes that produce an output record when they execute (PreviewImage is skipped by the server).
OUTPUT_NODES = (
    "SaveImage",
    "ComfyDeployOutputImage",
    "ComfyDeployStdOutputImage",
    "ComfyDeployStdOutputAny",
    "ComfyDeployOutputText",
    "ComfyDeployOutputFile",
    "VHS_VideoCombine",
    "SaveAnimatedWEBP",
    "ShowText|pysssss",
)
# Node-side fields set besides input_id when a value is applied (custom_routes.apply_inputs_to_workflow).
VALUE_FIELDS: dict[str, str] = {
    "ComfyUIDeployExternalText": "default_value",
    "ComfyUIDeployExternalTextAny": "default_value",
    "ComfyUIDeployExternalCheckpoint": "default_value",
    "ComfyUIDeployExternalEnum": "default_value",
    "ComfyUIDeployExternalBoolean": "default_value",
    "ComfyUIDeployExternalSeed": "default_value",
    "ComfyUIDeployExternalNumberSlider": "default_value",
    "ComfyUIDeployExternalNumberSliderInt": "default_value",
    "ComfyUIDeployExternalImageBatch": "images",
    "ComfyUIDeployExternalLora": "lora_url",
    "ComfyUIDeployExternalFaceModel": "face_model_url",
    "ComfyUIDeployExternalAudio": "audio_file",
    "ComfyUIDeployExternalEXR": "exr_file",
    "ComfyUIDeployExternalFile": "file_url",
}


def input_types(workflow_api: dict[str, Any] | None) -> list[dict[str, Any]]:
    """``input_types`` as the V2 server derives it: every node input plus the InputModel fields."""
    found: list[dict[str, Any]] = []
    for node in (workflow_api or {}).values():
        if not isinstance(node, dict):
            continue
        class_type = node.get("class_type")
        inputs = node.get("inputs") or {}
        if class_type not in INPUT_TYPES or not isinstance(inputs.get("input_id"), str):
            continue  # not an input node, or its input_id is wired to another node
        enum_options = None
        if class_type == "ComfyUIDeployExternalEnum":
            try:
                parsed = json.loads(inputs.get("options") or "[]")
                enum_options = parsed if isinstance(parsed, list) else None
            except (TypeError, json.JSONDecodeError):
                enum_options = None
        found.append(
            {
                **inputs,
                "class_type": class_type,
                "type": INPUT_TYPES[class_type],
                "input_id": inputs["input_id"],
                "default_value": inputs.get("default_value"),
                "min_value": inputs.get("min_value"),
                "max_value": inputs.get("max_value"),
                "display_name": inputs.get("display_name") or "",
                "description": inputs.get("description") or "",
                "enum_options": enum_options,
                "step": inputs.get("step"),
            }
        )
    return found


def output_types(workflow: dict[str, Any] | None) -> list[dict[str, Any]]:
    """``output_types`` from the UI-format workflow: std output nodes, output_id = widgets_values[0]."""
    found = []
    for node in (workflow or {}).get("nodes") or []:
        if isinstance(node, dict) and node.get("type") in STD_OUTPUT_NODES:
            widgets = node.get("widgets_values") or []
            found.append({"class_type": node["type"], "output_id": widgets[0] if widgets else None})
    return found


def apply_inputs(workflow_api: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """A copy of the graph with each value applied to the node(s) whose input_id is its key."""
    graph = copy.deepcopy(workflow_api)
    for key, value in inputs.items():
        for node in graph.values():
            node_inputs = node.get("inputs") if isinstance(node, dict) else None
            if not isinstance(node_inputs, dict) or node_inputs.get("input_id") != key:
                continue
            node_inputs["input_id"] = value
            field = VALUE_FIELDS.get(node.get("class_type", ""))
            if field:
                node_inputs[field] = value
    return graph


def execution_order(workflow_api: dict[str, Any]) -> list[tuple[str, str]]:
    """``(node_id, class_type)`` in dependency order (ties by numeric id), as ComfyUI would execute them."""
    nodes = {key: node for key, node in workflow_api.items() if isinstance(node, dict) and "class_type" in node}
    deps: dict[str, set[str]] = {}
    for key, node in nodes.items():
        links = set()
        for value in (node.get("inputs") or {}).values():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] in nodes:
                links.add(value[0])
        deps[key] = links

    def sort_key(key: str) -> tuple[int, str]:
        return (int(key), key) if key.isdigit() else (1 << 30, key)

    order: list[str] = []
    done: set[str] = set()
    pending = sorted(nodes, key=sort_key)
    while pending:
        ready = [key for key in pending if deps[key] <= done] or pending[:1]  # a cycle: break it
        key = ready[0]
        order.append(key)
        done.add(key)
        pending.remove(key)
    return [(key, str(nodes[key]["class_type"])) for key in order]
