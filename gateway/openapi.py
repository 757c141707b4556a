"""The OpenAPI 3.1 document of the gateway, generated at start-up from the service descriptors.

The same descriptors and ``google.api.http`` annotations that make the routes make the document:
every route with its path, query and body parameters in the proto3 JSON mapping, its response, the
one error shape, the authentication schemes, and the comments of the protos as descriptions. The
comments are not in the generated Python modules (protoc keeps source info out of them): they are
read from the descriptor set ``make protos`` writes beside them (``gen/descriptors.binpb``, protoc
``--include_source_info``), or, where that file is missing, from a descriptor set protoc builds from
``protos/`` at start-up; with neither, the document has no descriptions.

Stateful links: an operation whose reply carries an id that another route takes in its path (a new
hold's ``hold_id``, a run's ``run_id``) links to that route, so a client (or schemathesis) can follow
one into the other.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from google.protobuf import descriptor, descriptor_pb2

from stationthis.points.v1 import points_service_pb2

from .routes import Route

log = logging.getLogger("stationthis.gateway")

_F = descriptor.FieldDescriptor
GEN = Path(points_service_pb2.__file__).resolve().parents[3]
DESCRIPTOR_SET = GEN / "descriptors.binpb"
PROTOS = Path(__file__).resolve().parents[1] / "protos"
SEGMENT = "^[^/:.][^/:]*$"
_VARIABLE = re.compile(r"\{([a-zA-Z_][\w.]*)(?:=[^}]*)?\}")

ERROR_SCHEMA = {
    "type": "object",
    "description": "The one error shape of every route: the gRPC status, its HTTP code and its details "
    "(google.rpc.ErrorInfo with a reason in UPPER_SNAKE and a domain; google.rpc.BadRequest naming each "
    "offending field).",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "status", "details"],
            "additionalProperties": False,
            "properties": {
                "code": {"type": "integer", "description": "The HTTP status code."},
                "message": {"type": "string", "description": "What went wrong, in plain words."},
                "status": {"type": "string", "description": "The gRPC status code name, e.g. INVALID_ARGUMENT."},
                "details": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["@type"],
                        "properties": {"@type": {"type": "string"}},
                        "description": "A google.rpc detail as proto3 JSON: ErrorInfo {reason, domain, metadata} "
                        "or BadRequest {field_violations: [{field, description}]}.",
                    },
                },
            },
        }
    },
}
_TRACE_HEADERS = {
    "X-Request-Id": {
        "description": "The request's id: the caller's X-Request-Id when it is valid (1-128 "
        "characters of A-Z a-z 0-9 . _ : @ + = / -), else a new one.",
        "schema": {"type": "string"},
    },
    "X-Trace-Id": {"description": "The trace id of the request (when tracing is on).", "schema": {"type": "string"}},
}


# --- comments ---------------------------------------------------------------------------------------


def _descriptor_set() -> descriptor_pb2.FileDescriptorSet | None:
    data: bytes | None = None
    if DESCRIPTOR_SET.is_file():
        data = DESCRIPTOR_SET.read_bytes()
    elif PROTOS.is_dir():
        data = _compile_protos()
    if data is None:
        log.warning("no descriptor set with comments (%s): the API document has no descriptions", DESCRIPTOR_SET)
        return None
    return descriptor_pb2.FileDescriptorSet.FromString(data)


def _compile_protos() -> bytes | None:
    """The contracts' descriptor set with comments, built by protoc from ``protos/``."""
    import sysconfig

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "descriptors.binpb"
        protos = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
        args = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"-I{sysconfig.get_paths()['purelib']}",
            "--include_source_info",
            "--include_imports",
            f"--descriptor_set_out={out}",
            *protos,
        ]
        done = subprocess.run(args, capture_output=True, check=False, timeout=60)
        if done.returncode != 0 or not out.is_file():
            log.warning("protoc could not read protos/: %s", done.stderr.decode(errors="replace")[-500:])
            return None
        return out.read_bytes()


def _clean(comment: str) -> str:
    lines = [line[1:] if line.startswith(" ") else line for line in comment.strip("\n").split("\n")]
    return "\n".join(lines).strip()


def comments(files: Iterable[descriptor_pb2.FileDescriptorProto]) -> dict[str, str]:
    """Leading comments by full name: messages, fields, enums, enum values, services and methods."""
    found: dict[str, str] = {}
    for file in files:
        _Comments(file, found).walk()
    return found


class _Comments:
    """One file's comments (source info locations are addressed by descriptor paths)."""

    def __init__(self, file: descriptor_pb2.FileDescriptorProto, found: dict[str, str]) -> None:
        self.file = file
        self.found = found
        self.by_path = {tuple(loc.path): loc.leading_comments for loc in file.source_code_info.location}

    def note(self, name: str, path: tuple[int, ...]) -> None:
        text = self.by_path.get(path, "")
        if text.strip():
            self.found[name] = _clean(text)

    def enum(self, value: descriptor_pb2.EnumDescriptorProto, scope: str, path: tuple[int, ...]) -> None:
        name = f"{scope}.{value.name}"
        self.note(name, path)
        for index, item in enumerate(value.value):
            self.note(f"{name}.{item.name}", (*path, 2, index))

    def message(self, value: descriptor_pb2.DescriptorProto, scope: str, path: tuple[int, ...]) -> None:
        name = f"{scope}.{value.name}"
        self.note(name, path)
        for index, field in enumerate(value.field):
            self.note(f"{name}.{field.name}", (*path, 2, index))
        for index, nested in enumerate(value.nested_type):
            self.message(nested, name, (*path, 3, index))
        for index, nested_enum in enumerate(value.enum_type):
            self.enum(nested_enum, name, (*path, 4, index))

    def walk(self) -> None:
        package = self.file.package
        for index, value in enumerate(self.file.message_type):
            self.message(value, package, (4, index))
        for index, enum_value in enumerate(self.file.enum_type):
            self.enum(enum_value, package, (5, index))
        for index, service in enumerate(self.file.service):
            name = f"{package}.{service.name}"
            self.note(name, (6, index))
            for m_index, method in enumerate(service.method):
                self.note(f"{name}.{method.name}", (6, index, 2, m_index))


# --- schemas ----------------------------------------------------------------------------------------

_INT32 = {"type": "integer", "format": "int32", "minimum": -(2**31), "maximum": 2**31 - 1}
_UINT32 = {"type": "integer", "format": "uint32", "minimum": 0, "maximum": 2**32 - 1}
_INT64 = {
    "type": "string",
    "format": "int64",
    "pattern": "^-?(0|[1-9][0-9]{0,18})$",
    "description": "A 64-bit integer, as a decimal string (a JSON number is accepted too).",
}
_UINT64 = {
    "type": "string",
    "format": "uint64",
    "pattern": "^(0|[1-9][0-9]{0,19})$",
    "description": "An unsigned 64-bit integer, as a decimal string (a JSON number is accepted too).",
}
_SPECIAL_FLOAT = {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]}
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {
        "type": "string",
        "format": "date-time",
        "description": "An RFC 3339 timestamp, e.g. 2024-05-01T12:00:00Z.",
    },
    "google.protobuf.Duration": {
        "type": "string",
        "pattern": "^-?[0-9]{1,12}(\\.[0-9]{1,9})?s$",
        "description": 'A duration in seconds with an "s", e.g. "30s" or "1.5s".',
    },
    "google.protobuf.FieldMask": {"type": "string", "description": "Comma-separated field paths."},
    "google.protobuf.Struct": {"type": "object", "description": "Any JSON object."},
    "google.protobuf.Value": {"description": "Any JSON value."},
    "google.protobuf.ListValue": {"type": "array", "description": "Any JSON array."},
    "google.protobuf.Empty": {"type": "object", "additionalProperties": False},
    "google.protobuf.Any": {"type": "object", "required": ["@type"], "properties": {"@type": {"type": "string"}}},
}
_WRAPPED = {
    "google.protobuf.DoubleValue": {"type": "number"},
    "google.protobuf.FloatValue": {"type": "number"},
    "google.protobuf.Int64Value": _INT64,
    "google.protobuf.UInt64Value": _UINT64,
    "google.protobuf.Int32Value": _INT32,
    "google.protobuf.UInt32Value": _UINT32,
    "google.protobuf.BoolValue": {"type": "boolean"},
    "google.protobuf.StringValue": {"type": "string"},
    "google.protobuf.BytesValue": {"type": "string", "contentEncoding": "base64"},
}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


class Schemas:
    """Component schemas of messages and enums, built as they are referenced."""

    def __init__(self, notes: dict[str, str]) -> None:
        self.notes = notes
        self.components: dict[str, Any] = {}

    def message(self, message_type: Any) -> dict[str, Any]:
        name = message_type.full_name
        if name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[name])
        if name in _WRAPPED:
            return {"anyOf": [_WRAPPED[name], {"type": "null"}]}
        if name not in self.components:
            self.components[name] = {}  # reserved first: a message may contain itself
            self.components[name] = self.object(message_type)
        return _ref(name)

    def object(self, message_type: descriptor.Descriptor, leave_out: Sequence[str] = ()) -> dict[str, Any]:
        properties = {field.name: self.field(field) for field in message_type.fields if field.name not in leave_out}
        schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
        oneofs = [
            o
            for o in message_type.oneofs
            if not (len(o.fields) == 1 and o.fields[0].has_presence and o.name.startswith("_"))
        ]
        text = self.notes.get(message_type.full_name, "")
        if oneofs:
            groups = "; ".join(", ".join(f.name for f in o.fields) for o in oneofs)
            text = (text + "\n\n" if text else "") + f"At most one of each group may be set: {groups}."
        if text:
            schema["description"] = text
        return schema

    def enum(self, enum_type: descriptor.EnumDescriptor) -> dict[str, Any]:
        name = enum_type.full_name
        if name not in self.components:
            lines = [self.notes.get(name, "")]
            for value in enum_type.values:
                note = self.notes.get(f"{name}.{value.name}")
                if note:
                    lines.append(f"- `{value.name}`: {' '.join(note.split())}")
            schema: dict[str, Any] = {"type": "string", "enum": [value.name for value in enum_type.values]}
            text = "\n".join(line for line in lines if line).strip()
            if text:
                schema["description"] = text
            self.components[name] = schema
        return _ref(name)

    def single(self, field: descriptor.FieldDescriptor) -> dict[str, Any]:
        kind = field.cpp_type
        if field.message_type is not None:
            return self.message(field.message_type)
        if field.enum_type is not None:
            if field.enum_type.full_name == "google.protobuf.NullValue":
                return {"type": "null"}
            return self.enum(field.enum_type)
        if kind == _F.CPPTYPE_STRING:
            if field.type == _F.TYPE_BYTES:
                return {"type": "string", "contentEncoding": "base64"}
            return {"type": "string"}
        if kind == _F.CPPTYPE_BOOL:
            return {"type": "boolean"}
        if kind == _F.CPPTYPE_INT32:
            return dict(_INT32)
        if kind == _F.CPPTYPE_UINT32:
            return dict(_UINT32)
        if kind == _F.CPPTYPE_INT64:
            return dict(_INT64)
        if kind == _F.CPPTYPE_UINT64:
            return dict(_UINT64)
        number: dict[str, Any] = {"type": "number", "format": "float" if kind == _F.CPPTYPE_FLOAT else "double"}
        return {"anyOf": [number, _SPECIAL_FLOAT]}

    def field(self, field: descriptor.FieldDescriptor) -> dict[str, Any]:
        message_type = field.message_type
        if message_type is not None and message_type.GetOptions().map_entry:
            key = message_type.fields_by_name["key"]
            schema: dict[str, Any] = {
                "type": "object",
                "additionalProperties": self.single(message_type.fields_by_name["value"]),
            }
            if key.cpp_type in (_F.CPPTYPE_INT32, _F.CPPTYPE_INT64, _F.CPPTYPE_UINT32, _F.CPPTYPE_UINT64):
                schema["propertyNames"] = {"pattern": "^-?[0-9]+$"}
            elif key.cpp_type == _F.CPPTYPE_BOOL:
                schema["propertyNames"] = {"enum": ["true", "false"]}
        elif field.is_repeated:
            schema = {"type": "array", "items": self.single(field)}
        else:
            schema = self.single(field)
        note = self.notes.get(field.full_name)
        if note:
            schema = {"allOf": [schema], "description": note} if "$ref" in schema else {**schema, "description": note}
        return schema


# --- operations -------------------------------------------------------------------------------------


def _query_fields(
    message_type: descriptor.Descriptor, bound: set[str], prefix: str = "", depth: int = 0
) -> Iterator[tuple[str, descriptor.FieldDescriptor]]:
    """Fields a query parameter may set (dotted for nested messages), as the gateway reads them."""
    for field in message_type.fields:
        name = prefix + field.name
        if name in bound or any(b.startswith(name + ".") for b in bound):
            continue
        inner = field.message_type
        if inner is not None and inner.GetOptions().map_entry:
            continue
        if inner is not None and inner.full_name not in _WELL_KNOWN and inner.full_name not in _WRAPPED:
            if not field.is_repeated and depth < 2:
                yield from _query_fields(inner, bound, name + ".", depth + 1)
            continue
        if inner is not None and inner.full_name in (
            "google.protobuf.Struct",
            "google.protobuf.Value",
            "google.protobuf.ListValue",
            "google.protobuf.Any",
        ):
            continue
        yield name, field


def _operation_id(route: Route) -> str:
    return route.method


def _id_fields(message_type: descriptor.Descriptor, prefix: str = "", depth: int = 0) -> Iterator[tuple[str, str]]:
    """(field name, JSON pointer) of the singular string fields of a reply, two levels deep."""
    for field in message_type.fields:
        pointer = f"{prefix}/{field.name}"
        if field.is_repeated:
            continue
        if field.cpp_type == _F.CPPTYPE_STRING and field.type != _F.TYPE_BYTES:
            yield field.name, pointer
        elif field.message_type is not None and depth < 1 and field.message_type.full_name not in _WELL_KNOWN:
            yield from _id_fields(field.message_type, pointer, depth + 1)


def _links(route: Route, routes: Sequence[Route]) -> dict[str, Any]:
    """Links from ``route``'s reply to the routes that take, in their path, an id the reply introduces:
    ``<x>_id`` at ``/<x>_id`` or ``/<x>/<x>_id`` (a run's ``run_id``, a hold's ``hold_id``); their other
    path variables come from the same object of the reply, else from this request's own path."""
    fields = list(_id_fields(route.output_type.DESCRIPTOR))
    own = set(route.path_fields)
    links: dict[str, Any] = {}
    for target in routes:
        if target is route or not target.path_fields or target.server_streaming:
            continue
        parameters: dict[str, str] = {}
        for name in target.path_fields:
            if not name.endswith("_id") or name in own:
                continue
            resource = name[:-3]
            for field, pointer in fields:
                if field == name and pointer in (f"/{name}", f"/{resource}/{name}"):
                    parameters[name] = f"$response.body#{pointer}"
                    break
        if not parameters:
            continue
        scope = next(iter(parameters.values())).rsplit("/", 1)[0]
        for name in target.path_fields:
            if name in parameters:
                continue
            inside = f"{scope}/{name}"
            if any(pointer == inside[len("$response.body#") :] for _, pointer in fields):
                parameters[name] = inside
            elif name in own:
                parameters[name] = f"$request.path.{name}"
            else:
                break
        else:
            links[target.method] = {
                "operationId": _operation_id(target),
                "parameters": {n: parameters[n] for n in target.path_fields},
            }
    return links


def _summary(text: str) -> str:
    first = text.split("\n\n")[0].replace("\n", " ")
    sentence = first.split(". ")[0].rstrip(".")
    return sentence[:120]


class Document:
    def __init__(self, notes: dict[str, str]) -> None:
        self.notes = notes
        self.schemas = Schemas(notes)
        self.paths: dict[str, dict[str, Any]] = {}

    def parameter(self, name: str, where: str, field: descriptor.FieldDescriptor, required: bool) -> dict[str, Any]:
        schema = self.schemas.field(field)
        if field.is_repeated:
            schema = {"type": "array", "items": self.schemas.single(field)}
        description = self.notes.get(field.full_name)
        parameter: dict[str, Any] = {"name": name, "in": where, "required": required, "schema": schema}
        if field.is_repeated and where == "query":
            parameter.update(style="form", explode=True)
        if description:
            parameter["description"] = description
        return parameter

    def route(self, route: Route, routes: Sequence[Route]) -> None:
        input_type: descriptor.Descriptor = route.input_type.DESCRIPTOR
        path = _VARIABLE.sub(lambda m: "{" + m.group(1) + "}", route.template)
        parameters: list[dict[str, Any]] = []
        for name in route.path_fields:
            field = _resolve(input_type, name)
            parameter = self.parameter(name, "path", field, True)
            if parameter["schema"].get("type") == "string":
                # One path segment ('*'): no '/', and no ':' (it starts the custom verb); not a dot segment.
                parameter["schema"]["pattern"] = SEGMENT
            parameters.append(parameter)
        webhook = route.method == "HandleWebhook"
        if route.body != "*":
            bound = set(route.path_fields) | ({route.body} if route.body else set())
            if webhook:
                bound.add("token")  # the webhook's security scheme
            for name, field in _query_fields(input_type, bound):
                parameters.append(self.parameter(name, "query", field, False))
        if "request_id" in input_type.fields_by_name:
            parameters.append(
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string"},
                    "description": "Fills request_id (a body request_id must then be equal or absent).",
                }
            )
        parameters.append(
            {
                "name": "X-Request-Id",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:@+=/-]{1,128}$"},
                "description": "An id for this request, logged and passed on to the services; "
                "one is made when absent or invalid.",
            }
        )
        service_name = route.service.rsplit(".", 1)[1]
        text = self.notes.get(f"{route.service}.{route.method}", "")
        operation: dict[str, Any] = {
            "operationId": _operation_id(route),
            "tags": [service_name],
            "summary": _summary(text) or route.method,
            "description": text + f"\n\ngRPC: `{route.full_method}`",
            "parameters": parameters,
            "responses": self.responses(route, routes),
        }
        if route.body:
            operation["requestBody"] = self.body(route)
        if webhook:
            operation["security"] = [{"webhookToken": []}]
        if route.http_method != "GET":
            operation["x-rate-limit-budgets"] = ["all", "mutations"] if not webhook else ["webhook"]
        self.paths.setdefault(path, {})[route.http_method.lower()] = operation

    def body(self, route: Route) -> dict[str, Any]:
        input_type: descriptor.Descriptor = route.input_type.DESCRIPTOR
        if route.body == "*":
            top = {name.split(".")[0] for name in route.path_fields}
            if top:
                schema = self.schemas.object(input_type, leave_out=sorted(top))
            else:
                schema = self.schemas.message(input_type)
        else:
            schema = self.schemas.field(input_type.fields_by_name[route.body])
        return {"required": False, "content": {"application/json": {"schema": schema}}}

    def responses(self, route: Route, routes: Sequence[Route]) -> dict[str, Any]:
        output = self.schemas.message(route.output_type.DESCRIPTOR)
        if route.server_streaming:
            ok: dict[str, Any] = {
                "description": 'Server-Sent Events: `event: result` with `{"result": <'
                + route.output_type.DESCRIPTOR.name
                + ">}` per message; on failure a last `event: error` "
                "with the error shape.",
                "headers": dict(_TRACE_HEADERS),
                "content": {
                    "text/event-stream": {
                        "schema": {
                            "type": "object",
                            "description": "One event.",
                            "required": ["event", "data"],
                            "properties": {
                                "event": {"enum": ["result", "error"]},
                                "data": {
                                    "type": "string",
                                    "contentMediaType": "application/json",
                                    "contentSchema": {
                                        "oneOf": [
                                            {
                                                "type": "object",
                                                "required": ["result"],
                                                "additionalProperties": False,
                                                "properties": {"result": output},
                                            },
                                            _ref("Error"),
                                        ]
                                    },
                                },
                            },
                        }
                    }
                },
            }
        else:
            ok = {
                "description": "OK",
                "headers": dict(_TRACE_HEADERS),
                "content": {"application/json": {"schema": output}},
            }
            links = _links(route, routes)
            if links:
                ok["links"] = links
        return {
            "200": ok,
            "401": {"$ref": "#/components/responses/Unauthenticated"},
            "429": {"$ref": "#/components/responses/RateLimited"},
            "default": {"$ref": "#/components/responses/Error"},
        }

    def document(self, extra: dict[str, dict[str, Any]]) -> dict[str, Any]:
        for path, operations in extra.items():
            self.paths.setdefault(path, {}).update(operations)
        self.schemas.components["Error"] = ERROR_SCHEMA
        error = {"application/json": {"schema": _ref("Error")}}
        tags = [
            {"name": name.rsplit(".", 1)[1], "description": self.notes.get(name, "")}
            for name in (
                "stationthis.points.v1.PointsService",
                "stationthis.workflows.v1.WorkflowsService",
                "stationthis.comfyui.v1.ComfyUIService",
            )
        ]
        return {
            "openapi": "3.1.0",
            "info": {
                "title": "StationThis core API",
                "version": "v1",
                "description": "The HTTP JSON face of the StationThis services, generated from their contracts "
                "(google.api.http annotations). Requests and replies follow the proto3 JSON mapping with the "
                'proto field names (requests also accept lowerCamelCase). Every error is `{"error": {code, '
                "message, status, details}}`. Each API key belongs to an adapter; each adapter has a rate "
                "limit for all its requests and a separate one for mutations (POST); over it the answer is 429 "
                "with Retry-After.",
            },
            "servers": [{"url": "/"}],
            "tags": tags,
            "security": [{"bearerAuth": []}, {"apiKeyHeader": []}],
            "paths": dict(sorted(self.paths.items())),
            "components": {
                "schemas": dict(sorted(self.schemas.components.items())),
                "securitySchemes": {
                    "bearerAuth": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "An adapter's API key: `Authorization: Bearer <key>`.",
                    },
                    "apiKeyHeader": {
                        "type": "apiKey",
                        "in": "header",
                        "name": "X-API-Key",
                        "description": "An adapter's API key, as `X-API-Key: <key>`.",
                    },
                    "webhookToken": {
                        "type": "apiKey",
                        "in": "query",
                        "name": "token",
                        "description": "The per-run token ComfyUIService put in the webhook URL.",
                    },
                },
                "responses": {
                    "Error": {"description": "An error, in the one error shape.", "content": error},
                    "Unauthenticated": {
                        "description": "Missing or invalid API key (or webhook token).",
                        "content": error,
                    },
                    "RateLimited": {
                        "description": "The adapter's rate limit is exceeded (or the service refused: "
                        "RESOURCE_EXHAUSTED).",
                        "headers": {
                            "Retry-After": {
                                "description": "Seconds to wait before trying again.",
                                "schema": {"type": "integer", "minimum": 1},
                            }
                        },
                        "content": error,
                    },
                },
            },
        }


def _resolve(message_type: descriptor.Descriptor, dotted: str) -> descriptor.FieldDescriptor:
    current = message_type
    field = None
    for part in dotted.split("."):
        field = current.fields_by_name[part]
        if field.message_type is not None:
            current = field.message_type
    assert field is not None
    return field


def build(
    routes: Sequence[Route], extra: dict[str, dict[str, Any]] | None = None, notes: dict[str, str] | None = None
) -> dict[str, Any]:
    """The OpenAPI document of ``routes`` (and of the gateway's own ``extra`` operations)."""
    if notes is None:
        found = _descriptor_set()
        notes = comments(found.file) if found is not None else {}
    document = Document(notes)
    for route in routes:
        document.route(route, routes)
    # What the gateway's own operations refer to.
    from stationthis.comfyui.v1 import comfyui_service_pb2
    from stationthis.workflows.v1 import workflow_pb2

    document.schemas.message(comfyui_service_pb2.UploadFileResponse.DESCRIPTOR)
    document.schemas.enum(workflow_pb2.Environment.DESCRIPTOR)
    return document.document(extra or {})


def gateway_operations(config: Any) -> dict[str, dict[str, Any]]:
    """The operations the gateway serves itself (not from an annotation)."""
    error = {"$ref": "#/components/responses/Error"}
    request_id = {
        "name": "X-Request-Id",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:@+=/-]{1,128}$"},
    }
    upload = {
        "operationId": "UploadFileOverHttp",
        "tags": ["ComfyUIService"],
        "summary": "Upload a file to ComfyUI Deploy storage",
        "description": "Streams the body to ComfyUIService.UploadFile in chunks and returns its reply. Either the "
        "raw file as the body (its Content-Type is the file's; Content-Length is required; `user_id` and "
        "`filename` in the query), or `multipart/form-data` with the fields `user_id`, optionally `filename`, "
        f"and one `file` part. At most {config.max_upload_bytes} bytes: a larger Content-Length is refused "
        "with 413 before any of the body is read, and a body that grows past it is cut off with 413 (the "
        "connection is closed).\n\ngRPC: `/stationthis.comfyui.v1.ComfyUIService/UploadFile`",
        "parameters": [
            {
                "name": "user_id",
                "in": "query",
                "required": False,
                "schema": {"type": "string"},
                "description": "The user uploading (required with a raw body).",
            },
            {
                "name": "filename",
                "in": "query",
                "required": False,
                "schema": {"type": "string"},
                "description": "File name with extension, e.g. cat.png (required with a raw body).",
            },
            {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string"}},
            request_id,
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["user_id", "file"],
                        "properties": {
                            "user_id": {"type": "string"},
                            "filename": {"type": "string"},
                            "file": {"type": "string", "format": "binary"},
                        },
                    }
                },
            },
        },
        "responses": {
            "200": {
                "description": "OK",
                "headers": dict(_TRACE_HEADERS),
                "content": {"application/json": {"schema": _ref("stationthis.comfyui.v1.UploadFileResponse")}},
            },
            "401": {"$ref": "#/components/responses/Unauthenticated"},
            "413": {
                "description": "The file is larger than the limit.",
                "content": {"application/json": {"schema": _ref("Error")}},
            },
            "429": {"$ref": "#/components/responses/RateLimited"},
            "default": error,
        },
        "x-rate-limit-budgets": ["all", "mutations"],
    }
    inputs = {
        "operationId": "GetWorkflowInputsSchema",
        "tags": ["WorkflowsService"],
        "summary": "A workflow's inputs as a JSON Schema",
        "description": "The inputs of the workflow (as GetWorkflow returns them) as a JSON Schema, draft 2020-12: "
        "one property per input with its type, bounds, options, default, title and description; required "
        "inputs listed; unknown inputs refused. What it accepts is what ValidateInputs accepts (but for an "
        "IMAGE_BATCH given as a string holding a JSON array, whose content only ValidateInputs checks).",
        "parameters": [
            {
                "name": "workflow_id",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "pattern": SEGMENT},
                "description": "Upstream workflow id (UUID).",
            },
            {
                "name": "environment",
                "in": "query",
                "required": False,
                "schema": _ref("stationthis.workflows.v1.Environment"),
            },
            request_id,
        ],
        "responses": {
            "200": {
                "description": "A JSON Schema",
                "headers": dict(_TRACE_HEADERS),
                "content": {"application/schema+json": {"schema": {"type": "object"}}},
            },
            "401": {"$ref": "#/components/responses/Unauthenticated"},
            "429": {"$ref": "#/components/responses/RateLimited"},
            "default": error,
        },
    }
    return {"/v1/uploads": {"post": upload}, "/v1/workflows/{workflow_id}/inputs.schema.json": {"get": inputs}}
