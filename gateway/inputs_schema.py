"""A workflow's inputs as a JSON Schema (draft 2020-12), built from the catalog's typed inputs.

Served at ``GET /v1/workflows/{workflow_id}/inputs.schema.json`` so a front end can render a form for
any workflow. The schema says what ``WorkflowsService.ValidateInputs`` accepts (InputType in
workflow.proto): an object with one property per input, ``additionalProperties: false`` (unknown
inputs are refused), required inputs listed in ``required``, and JSON ``null`` allowed on the
optional ones (ValidateInputs reads null as "not given"). Types, bounds, enum options, defaults,
titles and descriptions come from the inputs; ``x-input-type``, ``x-class-type`` and ``x-step`` carry
what JSON Schema has no word for.

One difference is left on purpose: an IMAGE_BATCH input also takes a string holding a JSON array of
URLs, which a schema can describe (``contentMediaType``/``contentSchema``) but validators do not
check, so such a string is accepted here and only ValidateInputs looks inside it.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from stationthis.workflows.v1 import workflow_pb2

T = workflow_pb2
INT_LIMIT = 2_147_483_647
# urlsplit's test (services/workflows/inputs.py): an http or https scheme, any case, and a host part.
URL = {"type": "string", "pattern": "^[Hh][Tt][Tt][Pp][Ss]?://[^/?#]"}
DIALECT = "https://json-schema.org/draft/2020-12/schema"
_URL_TYPES = (
    T.INPUT_TYPE_IMAGE,
    T.INPUT_TYPE_LORA,
    T.INPUT_TYPE_VIDEO,
    T.INPUT_TYPE_AUDIO,
    T.INPUT_TYPE_FILE,
    T.INPUT_TYPE_EXR,
    T.INPUT_TYPE_FACE_MODEL,
)


def _bounds(spec: T.WorkflowInput, low: float | None = None, high: float | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    lows = [v for v in (low, spec.min_value if spec.HasField("min_value") else None) if v is not None]
    highs = [v for v in (high, spec.max_value if spec.HasField("max_value") else None) if v is not None]
    if lows:
        out["minimum"] = _number(max(lows))
    if highs:
        out["maximum"] = _number(min(highs))
    return out


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def value_schema(spec: T.WorkflowInput) -> dict[str, Any]:
    """What a given (non-null) value of this input must be."""
    kind = spec.type
    if kind == T.INPUT_TYPE_TEXT:
        return {"type": "string"}
    if kind == T.INPUT_TYPE_CHECKPOINT:
        return {"type": "string", "minLength": 1}
    if kind == T.INPUT_TYPE_COLOR:
        return {"type": "string", "pattern": "^#[0-9A-Fa-f]{6}(?![\\s\\S])"}  # no $: it would allow a final newline
    if kind == T.INPUT_TYPE_NUMBER:
        return {"type": "number", **_bounds(spec)}
    if kind == T.INPUT_TYPE_INTEGER:
        return {"type": "integer", **_bounds(spec, -INT_LIMIT, INT_LIMIT)}
    if kind == T.INPUT_TYPE_SEED:
        bounded = _bounds(spec)
        if not bounded:
            return {"type": "integer"}
        return {"type": "integer", "anyOf": [{"const": -1}, bounded]}
    if kind == T.INPUT_TYPE_BOOLEAN:
        return {"type": "boolean"}
    if kind == T.INPUT_TYPE_ENUM:
        return {"type": "string", "enum": list(spec.enum_options)} if spec.enum_options else {"type": "string"}
    if kind in _URL_TYPES:
        return dict(URL)
    if kind == T.INPUT_TYPE_IMAGE_BATCH:
        urls = {"type": "array", "minItems": 1, "items": dict(URL)}
        return {"anyOf": [urls, {"type": "string", "contentMediaType": "application/json", "contentSchema": urls}]}
    return {}  # an input class this API does not know: any value is passed through


def input_schema(spec: T.WorkflowInput) -> dict[str, Any]:
    schema = value_schema(spec)
    if not spec.required:
        schema = {"anyOf": [schema, {"type": "null"}]} if schema else {}
    schema["title"] = spec.display_name or spec.input_id
    if spec.description:
        schema["description"] = spec.description
    if spec.HasField("default_value"):
        schema["default"] = json_format.MessageToDict(spec.default_value)
    schema["x-input-type"] = T.InputType.Name(spec.type)
    schema["x-class-type"] = spec.class_type
    if spec.HasField("step"):
        schema["x-step"] = _number(spec.step)
    return schema


def for_workflow(workflow: T.Workflow) -> dict[str, Any]:
    """The JSON Schema of ``workflow``'s inputs (the ``inputs`` of CreateRun and ValidateInputs)."""
    schema: dict[str, Any] = {
        "$schema": DIALECT,
        "title": f"Inputs of {workflow.display_name or workflow.name}",
        "type": "object",
        "properties": {spec.input_id: input_schema(spec) for spec in workflow.inputs},
        "required": [spec.input_id for spec in workflow.inputs if spec.required],
        "additionalProperties": False,
        "x-workflow-id": workflow.workflow_id,
        "x-workflow-name": workflow.name,
    }
    if workflow.description:
        schema["description"] = workflow.description
    if workflow.HasField("version"):
        schema["x-workflow-version-id"] = workflow.version.workflow_version_id
    return schema
