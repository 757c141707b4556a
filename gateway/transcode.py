"""HTTP <-> protobuf translation: requests from path, query and body; responses and errors to JSON.

JSON follows the proto3 JSON mapping with the proto field names (snake_case) on output; input
accepts both snake_case and lowerCamelCase. Errors use one shape for every route:
``{"error": {"code": <http status>, "message", "status": <gRPC code name>, "details": [...]}}``.

Requests are checked before protobuf sees them. The JSON is walked against the request message's
descriptor, so every problem is reported as a ``BadRequest`` field violation that names the field by
its proto path (``ttl``, ``usage.gpu``, ``inputs.width``, ``labels.team``, ``statuses``) and says, in
plain words, what was expected. No parser's own text reaches a client. Limits:

- a body nested more than ``MAX_JSON_DEPTH`` (32) arrays/objects deep is refused before it is parsed
  (protobuf's binary decoder refuses messages nested more than 100 deep, and each JSON object level
  inside a ``Struct`` such as ``inputs`` costs three of those, so deeper input could never reach a
  service anyway); the walk also checks the protobuf nesting itself (``MAX_MESSAGE_DEPTH``);
- a JSON object that names a key twice (or a field in both spellings) is refused;
- at most ``MAX_VIOLATIONS`` violations are reported for one request.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal
from itertools import accumulate
from typing import Any

import grpc
from google.protobuf import (
    any_pb2,
    descriptor,
    duration_pb2,
    field_mask_pb2,
    json_format,
    symbol_database,
    timestamp_pb2,
)
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from common.errors import FieldViolation, InvalidArgument, to_rpc_status

from . import jsonmap
from .routes import Route

log = logging.getLogger("stationthis.gateway")

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

MAX_JSON_DEPTH = 32
MAX_MESSAGE_DEPTH = 100  # protobuf's decoder refuses deeper messages (the request itself is 1)
MAX_VIOLATIONS = 20


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
        details.append({"@type": detail.type_url, **jsonmap.to_dict(inner)})
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


# --- reading the JSON body -------------------------------------------------------------------------


class _Object(dict[str, Any]):
    """A JSON object as parsed, remembering the keys it had more than once."""

    repeated: tuple[str, ...] = ()


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    found = _Object(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        repeated: dict[str, None] = {}
        for key, _ in pairs:
            if key in seen:
                repeated[key] = None
            seen.add(key)
        found.repeated = tuple(repeated)
    return found


class _NotJson(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise _NotJson(name)  # NaN, Infinity and -Infinity are not JSON


# A JSON string, or an unterminated one up to the end; possessive, so each is matched in one pass.
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def json_depth(text: str) -> int:
    """How deeply ``text`` nests arrays and objects, counted without parsing (so without recursion)."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0)


def parse_json(body: bytes) -> Any:
    """The JSON value of ``body``, or ``BadRequest`` naming ``body``."""

    def refuse(description: str) -> BadRequest:
        return BadRequest([FieldViolation("body", description)])

    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise refuse("is not valid UTF-8 JSON") from None
    if json_depth(text) > MAX_JSON_DEPTH:
        raise refuse(f"is nested too deeply (at most {MAX_JSON_DEPTH} levels of arrays and objects)")
    try:
        return json.loads(text, object_pairs_hook=_object, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise refuse(f"is not valid JSON (line {exc.lineno}, column {exc.colno})") from None
    except _NotJson:
        raise refuse('is not valid JSON (write NaN and Infinity as the strings "NaN" and "Infinity")') from None
    except (ValueError, RecursionError):  # e.g. a number with thousands of digits
        raise refuse("is not valid JSON") from None


# --- checking JSON against a message descriptor ----------------------------------------------------

_F = descriptor.FieldDescriptor
_INT_RANGES = {
    _F.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    _F.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    _F.CPPTYPE_UINT32: (0, 2**32 - 1),
    _F.CPPTYPE_UINT64: (0, 2**64 - 1),
}
_FLOAT32_MAX = 3.4028234663852886e38
_SPECIAL_FLOATS = frozenset({"NaN", "Infinity", "-Infinity"})
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_SURROGATE = re.compile("[\ud800-\udfff]")
_BASE64 = re.compile(r"[A-Za-z0-9+/\-_]*={0,2}")
_NOT_UNICODE = "is not valid Unicode text (it has an unpaired surrogate escape)"

_STRUCT = "google.protobuf.Struct"
_VALUE = "google.protobuf.Value"
_LIST_VALUE = "google.protobuf.ListValue"
_ANY = "google.protobuf.Any"
_WRAPPERS = frozenset(
    f"google.protobuf.{name}Value"
    for name in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
)
# Well-known types written as one JSON string: their class and, in plain words, what they expect.
_TEXT_TYPES: dict[str, tuple[type[Message], str]] = {
    "google.protobuf.Duration": (duration_pb2.Duration, 'must be a duration in seconds such as "30s" or "1.5s"'),
    "google.protobuf.Timestamp": (
        timestamp_pb2.Timestamp,
        'must be an RFC 3339 timestamp such as "2024-05-01T12:00:00Z"',
    ),
    "google.protobuf.FieldMask": (
        field_mask_pb2.FieldMask,
        'must be a comma-separated list of field paths such as "user_id,ttl"',
    ),
}
_SPECIAL_MESSAGES = frozenset({_STRUCT, _VALUE, _LIST_VALUE, _ANY, *_WRAPPERS, *_TEXT_TYPES})


class _Skip:
    """Returned for a value that sets nothing (refused, or ignored on a lenient route)."""


_SKIP = _Skip()
_MISSING = object()


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _show(key: str) -> str:
    """A client's key, safe to echo: no lone surrogates, not overly long."""
    shown = _SURROGATE.sub("\ufffd", key)
    return shown if len(shown) <= 64 else shown[:63] + "\u2026"


_BY_ANY_NAME: dict[str, dict[str, descriptor.FieldDescriptor]] = {}


def _fields(message_descriptor: descriptor.Descriptor) -> dict[str, descriptor.FieldDescriptor]:
    """The fields of a message by proto name and by lowerCamelCase JSON name."""
    found = _BY_ANY_NAME.get(message_descriptor.full_name)
    if found is None:
        found = {}
        for field in message_descriptor.fields:
            found[field.name] = field
            found.setdefault(field.json_name, field)
        _BY_ANY_NAME[message_descriptor.full_name] = found
    return found


def _is_map(field: descriptor.FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _is_repeated(field: descriptor.FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _is_value(field: descriptor.FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.full_name == _VALUE


def _takes_null(field: descriptor.FieldDescriptor) -> bool:
    """JSON null sets these singular fields; on any other field it means "not set"."""
    if _is_repeated(field):
        return False
    null_enum = field.enum_type is not None and field.enum_type.full_name == "google.protobuf.NullValue"
    return _is_value(field) or null_enum


def _integer(value: Any) -> int | None:
    """``value`` as an integer, if the proto3 JSON mapping reads it as one (number or string)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else None
    if not isinstance(value, str) or not _JSON_NUMBER.fullmatch(value):
        return None
    number = Decimal(value)
    if number.adjusted() > 40:  # far outside every integer type; no need to build it
        return 2**160 if number > 0 else -(2**160)
    if number != number.to_integral_value():
        return None
    return int(number)


class _Walker:
    """Checks JSON against a message descriptor and returns it with proto field names.

    Every problem becomes a violation naming the field's path; the result is what
    ``json_format.ParseDict`` then reads. ``level`` is the protobuf nesting depth of the message
    being filled (the request is 1).
    """

    def __init__(self, lenient: bool, violations: list[FieldViolation] | None = None) -> None:
        self.lenient = lenient
        self.violations: list[FieldViolation] = [] if violations is None else violations

    def bad(self, path: str, description: str) -> _Skip:
        self.violations.append(FieldViolation(path or "body", description))
        if len(self.violations) >= MAX_VIOLATIONS:
            raise BadRequest(self.violations)
        return _SKIP

    # messages

    def message(self, value: Any, message_descriptor: descriptor.Descriptor, path: str, level: int) -> Any:
        if level > MAX_MESSAGE_DEPTH:
            return self.bad(path, "is nested too deeply")
        name = message_descriptor.full_name
        if name in _WRAPPERS:
            return self.scalar(value, message_descriptor.fields_by_name["value"], path)
        if name == _STRUCT:
            if not isinstance(value, dict):
                return self.bad(path, "must be a JSON object")
            return self.struct(value, path, level)
        if name == _LIST_VALUE:
            if not isinstance(value, list):
                return self.bad(path, "must be a JSON array")
            return self.list_value(value, path, level)
        if name == _VALUE:
            return self.value(value, path, level)
        if name in _TEXT_TYPES:
            return self.text_type(value, name, path)
        if name == _ANY:
            return self.any(value, path)
        if not isinstance(value, dict):
            return self.bad(path, "must be a JSON object")
        return self.fields(value, message_descriptor, path, level)

    def fields(self, value: dict[str, Any], message_descriptor: descriptor.Descriptor, path: str, level: int) -> Any:
        by_name = _fields(message_descriptor)
        for key in getattr(value, "repeated", ()):
            if key in by_name or not self.lenient:
                self.bad(_join(path, by_name[key].name if key in by_name else _show(key)), "is given more than once")
        out: dict[str, Any] = {}
        seen: set[str] = set()
        chosen: dict[str, str] = {}  # oneof name -> the field of it that was given
        for key, item in value.items():
            field = by_name.get(key)
            if field is None:
                if not self.lenient:
                    self.bad(_join(path, _show(key)), "unknown field")
                continue
            where = _join(path, field.name)
            if field.name in seen:
                self.bad(where, f"is given twice (as {field.name} and as {field.json_name})")
                continue
            seen.add(field.name)
            oneof = field.containing_oneof
            if oneof is not None and item is not None:
                other = chosen.setdefault(oneof.name, field.name)
                if other != field.name:
                    self.bad(where, f"cannot be given together with {_join(path, other)} (only one of them may be set)")
                    continue
            if item is None:
                if _takes_null(field):
                    out[field.name] = None
                continue
            converted = self.field(item, field, where, level)
            if converted is not _SKIP:
                out[field.name] = converted
        return out

    def field(self, value: Any, field: descriptor.FieldDescriptor, path: str, level: int) -> Any:
        """A value for ``field`` of a message at ``level``: a map, a list or a single value."""
        if _is_map(field):
            return self.map(value, field, path, level)
        if not _is_repeated(field):
            return self.single(value, field, path, level)
        if not isinstance(value, list):
            return self.bad(path, "must be a JSON array")
        out = []
        for index, item in enumerate(value):
            where = f"{path}[{index}]"
            if item is None and not _is_value(field):
                self.bad(where, "must not be null")
                continue
            converted = self.single(item, field, where, level)
            if converted is not _SKIP:
                out.append(converted)
        return out

    def single(self, value: Any, field: descriptor.FieldDescriptor, path: str, level: int) -> Any:
        if field.message_type is not None:
            return self.message(value, field.message_type, path, level + 1)
        if field.enum_type is not None:
            return self.enum(value, field.enum_type, path)
        return self.scalar(value, field, path)

    def map(self, value: Any, field: descriptor.FieldDescriptor, path: str, level: int) -> Any:
        if not isinstance(value, dict):
            return self.bad(path, "must be a JSON object")
        entry = field.message_type
        assert entry is not None  # a map field's entry message
        key_field = entry.fields_by_name["key"]
        value_field = entry.fields_by_name["value"]
        for key in getattr(value, "repeated", ()):
            self.bad(_join(path, _show(key)), "is given more than once")
        out: dict[str, Any] = {}
        for key, item in value.items():
            where = _join(path, _show(key))
            if not self.map_key(key, key_field, where):
                continue
            if item is None and not _is_value(value_field):
                self.bad(where, "must not be null")
                continue
            converted = self.single(item, value_field, where, level + 1)  # each entry is a message
            if converted is not _SKIP:
                out[key] = converted
        return out

    def map_key(self, key: str, field: descriptor.FieldDescriptor, path: str) -> bool:
        if field.cpp_type == _F.CPPTYPE_BOOL:
            ok = key in ("true", "false")
            description = 'must be "true" or "false" (a map key)'
        elif field.cpp_type in _INT_RANGES:
            low, high = _INT_RANGES[field.cpp_type]
            number = _integer(key)
            ok = number is not None and low <= number <= high
            description = f"must be an integer from {low} to {high} (a map key)"
        else:
            ok = not _SURROGATE.search(key)
            description = _NOT_UNICODE
        if not ok:
            self.bad(path, description)
        return ok

    # google.protobuf.Struct, Value and ListValue: any JSON

    def struct(self, value: dict[str, Any], path: str, level: int) -> Any:
        if level > MAX_MESSAGE_DEPTH:
            return self.bad(path, "is nested too deeply")
        for key in getattr(value, "repeated", ()):
            self.bad(_join(path, _show(key)), "is given more than once")
        out: dict[str, Any] = {}
        for key, item in value.items():
            where = _join(path, _show(key))
            if _SURROGATE.search(key):
                self.bad(where, _NOT_UNICODE)
                continue
            converted = self.value(item, where, level + 2)  # a map entry, then a Value
            if converted is not _SKIP:
                out[key] = converted
        return out

    def list_value(self, value: list[Any], path: str, level: int) -> Any:
        if level > MAX_MESSAGE_DEPTH:
            return self.bad(path, "is nested too deeply")
        out = []
        for index, item in enumerate(value):
            converted = self.value(item, f"{path}[{index}]", level + 1)
            if converted is not _SKIP:
                out.append(converted)
        return out

    def value(self, value: Any, path: str, level: int) -> Any:
        if level > MAX_MESSAGE_DEPTH:
            return self.bad(path, "is nested too deeply")
        if isinstance(value, dict):
            return self.struct(value, path, level + 1)
        if isinstance(value, list):
            return self.list_value(value, path, level + 1)
        if isinstance(value, str) and _SURROGATE.search(value):
            return self.bad(path, _NOT_UNICODE)
        if isinstance(value, float) and not math.isfinite(value):
            return self.bad(path, "is a number too large to represent")
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                float(value)
            except OverflowError:
                return self.bad(path, "is a number too large to represent")
        return value

    # other well-known types

    def text_type(self, value: Any, name: str, path: str) -> Any:
        cls, expected = _TEXT_TYPES[name]
        if not isinstance(value, str):
            return self.bad(path, expected)
        text: Any = value  # the mapping writes these types as one string
        try:
            json_format.ParseDict(text, cls())  # exactly the checks the parser makes
        except Exception:  # any refusal, in protobuf's words: ours are the ones shown
            return self.bad(path, expected)
        return value

    def any(self, value: Any, path: str) -> Any:
        if not isinstance(value, dict) or (value and not isinstance(value.get("@type"), str)):
            return self.bad(path, 'must be a JSON object with an "@type"')
        try:
            json_format.ParseDict(value, any_pb2.Any(), ignore_unknown_fields=self.lenient)
        except Exception:
            return self.bad(path, 'must name a known message type in "@type" and match that message')
        return value

    # scalars

    def enum(self, value: Any, enum_type: descriptor.EnumDescriptor, path: str) -> Any:
        number: int | None = None
        if isinstance(value, str):
            named = enum_type.values_by_name.get(value)
            if named is not None:
                return named.name
            if re.fullmatch(r"-?[0-9]{1,10}", value):
                number = int(value)
            elif self.lenient:
                return _SKIP  # perhaps a value added upstream after this contract
        elif isinstance(value, int | float) and not isinstance(value, bool):
            number = _integer(value)
        if number is not None and -(2**31) <= number < 2**31:
            known = enum_type.values_by_number.get(number)
            if known is not None:
                return known.name
            if not enum_type.is_closed:
                return number  # proto3 enums are open: the service decides about numbers it does not know
        names = [v.name for v in enum_type.values if not (v.number == 0 and v.name.endswith("_UNSPECIFIED"))]
        return self.bad(path, "must be one of " + ", ".join(names))

    def scalar(self, value: Any, field: descriptor.FieldDescriptor, path: str) -> Any:
        kind = field.cpp_type
        if kind in _INT_RANGES:
            low, high = _INT_RANGES[kind]
            number = _integer(value)
            if number is None:
                return self.bad(path, "must be an integer")
            if not low <= number <= high:
                return self.bad(path, f"is out of range (must be an integer from {low} to {high})")
            return number
        if kind in (_F.CPPTYPE_DOUBLE, _F.CPPTYPE_FLOAT):
            return self.floating(value, kind == _F.CPPTYPE_FLOAT, path)
        if kind == _F.CPPTYPE_BOOL:
            return value if isinstance(value, bool) else self.bad(path, "must be true or false")
        if field.type == _F.TYPE_BYTES:
            return self.base64(value, path)
        if not isinstance(value, str):
            return self.bad(path, "must be a string")
        if _SURROGATE.search(value):
            return self.bad(path, _NOT_UNICODE)
        return value

    def floating(self, value: Any, single: bool, path: str) -> Any:
        number: float | None = None
        if isinstance(value, str):
            if value in _SPECIAL_FLOATS:
                return value
            if _JSON_NUMBER.fullmatch(value):
                number = float(value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
        if number is None:
            return self.bad(path, 'must be a number (or "NaN", "Infinity", "-Infinity")')
        if not math.isfinite(number) or (single and abs(number) > _FLOAT32_MAX):
            return self.bad(path, "is out of range")
        return number

    def base64(self, value: Any, path: str) -> Any:
        expected = "must be a base64-encoded string"
        if not isinstance(value, str) or not _BASE64.fullmatch(value):
            return self.bad(path, expected)
        standard = value.rstrip("=").replace("-", "+").replace("_", "/")
        try:
            decoded = base64.b64decode(standard + "=" * (-len(standard) % 4), validate=True)
        except (binascii.Error, ValueError):
            return self.bad(path, expected)
        return base64.urlsafe_b64encode(decoded).decode()  # the form json_format decodes exactly


# --- path and query values -------------------------------------------------------------------------


def _resolve(
    message_descriptor: descriptor.Descriptor, dotted: str
) -> tuple[str, descriptor.FieldDescriptor, int] | None:
    """The proto path, field and message depth for a dotted name in either spelling, if it is one."""
    current = message_descriptor
    parts = dotted.split(".")
    names: list[str] = []
    level = 1
    for index, part in enumerate(parts):
        field = _fields(current).get(part)
        if field is None:
            return None
        names.append(field.name)
        if index == len(parts) - 1:
            return ".".join(names), field, level
        inner = field.message_type
        if inner is None or _is_repeated(field) or inner.full_name in _SPECIAL_MESSAGES:
            return None
        current = inner
        level += 1
    return None


def _from_text(field: descriptor.FieldDescriptor, raw: str) -> Any:
    """The JSON value a path or query string stands for, or ``_MISSING`` if the field takes no text."""
    target = field
    if field.message_type is not None:
        name = field.message_type.full_name
        if name in _TEXT_TYPES:
            return raw
        if name not in _WRAPPERS:
            return _MISSING
        target = field.message_type.fields_by_name["value"]
    if target.cpp_type == _F.CPPTYPE_BOOL:
        return {"true": True, "1": True, "false": False, "0": False}.get(raw.lower(), raw)
    return raw


def _get_path(target: dict[str, Any], path: str) -> Any:
    current: Any = target
    for part in path.split("."):
        if not isinstance(current, dict) or part not in current:
            return _MISSING
        current = current[part]
    return current


def _set_path(target: dict[str, Any], path: str, value: Any) -> bool:
    parts = path.split(".")
    for part in parts[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            return False
    target[parts[-1]] = value
    return True


def _overlap(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _query_field(
    walker: _Walker,
    data: dict[str, Any],
    message_descriptor: descriptor.Descriptor,
    name: str,
    values: list[str],
    taken: list[str],
) -> None:
    """Set one query parameter's field in ``data``, or record why not."""
    resolved = _resolve(message_descriptor, name)
    if resolved is None:
        walker.bad(_show(name), "unknown field")
        return
    path, field, level = resolved
    if any(_overlap(path, other) for other in taken if other):
        walker.bad(path, "is already given by the path or the body")
        return
    if not _is_repeated(field) and len(values) > 1:
        walker.bad(path, "is given more than once")
        return
    texts = [_from_text(field, raw) for raw in values]
    if _is_map(field) or any(text is _MISSING for text in texts):
        walker.bad(path, "cannot be given in the query")
        return
    converted = [walker.single(text, field, path, level) for text in texts]
    if any(value is _SKIP for value in converted):
        return
    if not _set_path(data, path, converted if _is_repeated(field) else converted[0]):
        walker.bad(path, "conflicts with another value for the same field")


_SIMPLE_TYPES = frozenset(
    {_F.CPPTYPE_INT32, _F.CPPTYPE_INT64, _F.CPPTYPE_UINT32, _F.CPPTYPE_UINT64, _F.CPPTYPE_BOOL, _F.CPPTYPE_ENUM}
)
_simple_fields: dict[str, dict[str, int]] = {}


def _simple(message_descriptor: descriptor.Descriptor) -> dict[str, int]:
    """Fields of a message that a checked value sets as a constructor argument: singular scalars,
    strings and enums (not bytes, messages, floats or null-taking enums), by proto name."""
    found = _simple_fields.get(message_descriptor.full_name)
    if found is None:
        found = {}
        for field in message_descriptor.fields:
            if _is_repeated(field) or _takes_null(field) or field.type == _F.TYPE_BYTES:
                continue
            if field.cpp_type in _SIMPLE_TYPES or field.cpp_type == _F.CPPTYPE_STRING:
                found[field.name] = field.cpp_type
        _simple_fields[message_descriptor.full_name] = found
    return found


def _construct(route: Route, data: dict[str, Any], lenient: bool) -> Message:
    """The request message from checked data: directly when every value is a plain top-level scalar
    (the common case: ids from the path, page sizes from the query), else through the JSON parser."""
    simple = _simple(route.input_type.DESCRIPTOR)
    if all(key in simple for key in data):
        try:
            made: Message = route.input_type(**data)
            return made
        except (TypeError, ValueError):  # e.g. an open enum's unknown number: let the parser decide
            pass
    request: Message = route.input_type()
    try:
        json_format.ParseDict(data, request, ignore_unknown_fields=lenient)
    except Exception:
        # The walk accepts only what the parser accepts; if they ever disagree, the client still
        # gets a plain 400 and the parser's words go to the log only.
        log.warning("a checked request was refused by the JSON parser", exc_info=True, extra={"rpc": route.full_method})
        raise BadRequest([FieldViolation("body", "is not a valid request")]) from None
    return request


def _path_only(route: Route, path_params: Mapping[str, str]) -> Message | None:
    """The request of a route whose only input is top-level string fields in the path, if that is
    all this request has (GetAccount, GetRun, ...); None when the full check must run."""
    simple = _simple(route.input_type.DESCRIPTOR)
    values: dict[str, str] = {}
    for name, raw in path_params.items():
        if simple.get(name) != _F.CPPTYPE_STRING or _SURROGATE.search(raw):
            return None
        values[name] = raw
    made: Message = route.input_type(**values)
    return made


def build_request(
    route: Route,
    path_params: Mapping[str, str],
    query: Sequence[tuple[str, str]],
    body: bytes,
    idempotency_key: str | None,
    ignore_unknown_fields: bool = False,
) -> Message:
    """The gRPC request message for an HTTP request, or ``BadRequest`` with one violation per problem.

    ``ignore_unknown_fields`` (a lenient route) drops body fields, and enum names, the contract does
    not know; query parameters are always checked.
    """
    if not query and not route.body and idempotency_key is None:
        fast = _path_only(route, path_params)  # the same checks, for the one kind of value they apply to
        if fast is not None:
            return fast
    message_descriptor = route.input_type.DESCRIPTOR
    walker = _Walker(ignore_unknown_fields)
    data: dict[str, Any] = {}
    if route.body:
        parsed = parse_json(body) if body.strip() else _MISSING
        if route.body == "*":
            if parsed is _MISSING:
                parsed = {}
            if not isinstance(parsed, dict):
                raise BadRequest([FieldViolation("body", "must be a JSON object")])
            data = walker.fields(parsed, message_descriptor, "", 1)
        else:
            body_field = message_descriptor.fields_by_name[route.body]
            if parsed is None and _takes_null(body_field):
                data[body_field.name] = None
            elif parsed is not _MISSING and parsed is not None:
                converted = walker.field(parsed, body_field, body_field.name, 1)
                if converted is not _SKIP:
                    data[body_field.name] = converted

    # Leniency is for an upstream's payload only: the path and the query are checked strictly on every route.
    strict = _Walker(lenient=False, violations=walker.violations)
    bound: list[str] = []  # proto paths the URL path sets
    for name, raw in path_params.items():
        resolved = _resolve(message_descriptor, name)
        if resolved is None or _is_repeated(resolved[1]):
            strict.bad(name, "is not a field this request can take from the path")
            continue
        path, field, level = resolved
        bound.append(path)
        text = _from_text(field, raw)
        if text is _MISSING:
            strict.bad(path, "cannot be given in the path")
            continue
        value = strict.single(text, field, path, level)
        if value is _SKIP:
            continue
        given = _get_path(data, path)
        if given is not _MISSING and given is not None and given != value:
            strict.bad(path, "differs from the value in the path")
        elif not _set_path(data, path, value):
            strict.bad(path, "conflicts with another value for the same field")

    if route.body == "*":
        # Every field comes from the body: a query parameter would be silently ignored.
        for name, _ in query:
            resolved = _resolve(message_descriptor, name)
            strict.bad(resolved[0] if resolved else _show(name), "must be sent in the JSON body, not the query")
    else:
        grouped: dict[str, list[str]] = {}
        for name, raw in query:
            grouped.setdefault(name, []).append(raw)
        for name, values in grouped.items():
            _query_field(strict, data, message_descriptor, name, values, [*bound, route.body])

    if idempotency_key is not None and "request_id" in message_descriptor.fields_by_name:
        given = data.get("request_id")
        if given not in (None, "", idempotency_key):
            walker.bad("request_id", "differs from the Idempotency-Key header")
        else:
            data["request_id"] = idempotency_key

    if walker.violations:
        raise BadRequest(walker.violations)
    return _construct(route, data, ignore_unknown_fields)


def to_json(message: Message) -> dict[str, Any]:
    converted: dict[str, Any] = jsonmap.to_dict(message)
    return converted
