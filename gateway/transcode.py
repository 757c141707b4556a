"""HTTP <-> protobuf translation: requests from path, query and body; responses and errors to JSON.

JSON follows the proto3 JSON mapping with the proto field names (snake_case) on output; input
accepts both snake_case and lowerCamelCase. Errors use one shape for every route:
``{"error": {"code": <http status>, "message", "status": <gRPC code name>, "details": [...]}}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from google.protobuf import descriptor, json_format, symbol_database
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from common.errors import FieldViolation, InvalidArgument, to_rpc_status

from .routes import Route

# One table from gRPC code to HTTP status (CONVENTIONS.md §6).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
}
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
DOMAIN = "gateway.stationthis.dev"

# Make sure the detail types can be unpacked from Any by name.
_DETAIL_TYPES = (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest)


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)


def error_body(status: status_pb2.Status) -> dict[str, Any]:
    code = _BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)
    details = []
    db = symbol_database.Default()
    for detail in status.details:
        try:
            cls = db.GetSymbol(detail.TypeName())
        except KeyError:
            continue  # a detail type we do not know is not shown rather than half-shown
        inner = cls()
        detail.Unpack(inner)
        details.append({"@type": detail.type_url, **json_format.MessageToDict(inner, preserving_proto_field_name=True)})
    return {"error": {"code": http_status(code), "message": status.message, "status": code.name, "details": details}}


def invalid(violations: Sequence[FieldViolation], reason: str = "INVALID_ARGUMENT") -> status_pb2.Status:
    return to_rpc_status(InvalidArgument.for_fields(violations, reason=reason), DOMAIN)


def simple_status(code: grpc.StatusCode, message: str, reason: str) -> status_pb2.Status:
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN))
    return status


class BadRequest(Exception):
    def __init__(self, violations: Sequence[FieldViolation]) -> None:
        super().__init__("bad request")
        self.violations = list(violations)


def _set_path(target: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise BadRequest([FieldViolation(path, "conflicts with another value for the same field")])
    target[parts[-1]] = value


def _field(message_descriptor: descriptor.Descriptor, path: str) -> descriptor.FieldDescriptor | None:
    current: descriptor.Descriptor | None = message_descriptor
    found = None
    for part in path.split("."):
        if current is None:
            return None
        found = current.fields_by_name.get(part) or next((f for f in current.fields if f.json_name == part), None)
        if found is None:
            return None
        current = found.message_type
    return found


_INTS = {
    descriptor.FieldDescriptor.TYPE_INT32,
    descriptor.FieldDescriptor.TYPE_INT64,
    descriptor.FieldDescriptor.TYPE_UINT32,
    descriptor.FieldDescriptor.TYPE_UINT64,
    descriptor.FieldDescriptor.TYPE_SINT32,
    descriptor.FieldDescriptor.TYPE_SINT64,
    descriptor.FieldDescriptor.TYPE_FIXED32,
    descriptor.FieldDescriptor.TYPE_FIXED64,
    descriptor.FieldDescriptor.TYPE_SFIXED32,
    descriptor.FieldDescriptor.TYPE_SFIXED64,
}
_FLOATS = {descriptor.FieldDescriptor.TYPE_DOUBLE, descriptor.FieldDescriptor.TYPE_FLOAT}


def _query_value(field: descriptor.FieldDescriptor, name: str, raw: str) -> Any:
    try:
        if field.type in _INTS:
            return int(raw)
        if field.type in _FLOATS:
            return float(raw)
        if field.type == descriptor.FieldDescriptor.TYPE_BOOL:
            lowered = raw.lower()
            if lowered not in {"true", "false", "1", "0"}:
                raise ValueError("expected true or false")
            return lowered in {"true", "1"}
    except ValueError as exc:
        raise BadRequest([FieldViolation(name, f"invalid value {raw!r}: {exc}")]) from None
    return raw


def build_request(
    route: Route,
    path_params: Mapping[str, str],
    query: Sequence[tuple[str, str]],
    body: bytes,
    idempotency_key: str | None,
    ignore_unknown_fields: bool = False,
) -> Message:
    """The gRPC request message for an HTTP request, or ``BadRequest`` with one violation per problem."""
    data: dict[str, Any] = {}
    if route.body:
        if body.strip():
            try:
                parsed = json.loads(body)
            except (ValueError, UnicodeDecodeError) as exc:
                raise BadRequest([FieldViolation("body", f"not valid JSON: {exc}")]) from None
        else:
            parsed = {}
        if route.body == "*":
            if not isinstance(parsed, dict):
                raise BadRequest([FieldViolation("body", "must be a JSON object")])
            data = parsed
        else:
            data[route.body] = parsed
    message_descriptor = route.input_type.DESCRIPTOR
    for name, value in path_params.items():
        field = _field(message_descriptor, name)
        _set_path(data, name, _query_value(field, name, value) if field else value)
    if route.body == "*" and query:
        # Every field comes from the body: a query parameter would be silently ignored.
        raise BadRequest([FieldViolation(name, "must be sent in the JSON body, not the query") for name, _ in query])
    if route.body != "*":
        grouped: dict[str, list[str]] = {}
        for name, value in query:
            grouped.setdefault(name, []).append(value)
        for name, values in grouped.items():
            if name in path_params or name.split(".")[0] == route.body:
                raise BadRequest([FieldViolation(name, "is already given by the path or the body")])
            field = _field(message_descriptor, name)
            if field is None:
                raise BadRequest([FieldViolation(name, "is not a field of this request")])
            converted = [_query_value(field, name, v) for v in values]
            if field.is_repeated:
                _set_path(data, name, converted)
            elif len(converted) > 1:
                raise BadRequest([FieldViolation(name, "given more than once")])
            else:
                _set_path(data, name, converted[0])
    if idempotency_key is not None and "request_id" in message_descriptor.fields_by_name:
        given = data.get("request_id", data.get("requestId"))
        if given not in (None, "", idempotency_key):
            raise BadRequest([FieldViolation("request_id", "differs from the Idempotency-Key header")])
        data.pop("requestId", None)
        data["request_id"] = idempotency_key
    try:
        request: Message = route.input_type()
        json_format.ParseDict(data, request, ignore_unknown_fields=ignore_unknown_fields)
        return request
    except json_format.ParseError as exc:
        raise BadRequest([FieldViolation("body", str(exc))]) from None


def to_json(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)
