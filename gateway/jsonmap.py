"""Protobuf messages to JSON values, with one converter per message type built once.

``to_dict(message)`` returns exactly what
``json_format.MessageToDict(message, preserving_proto_field_name=True)`` returns (the proto3 JSON
mapping with the proto field names; tests compare the two on random messages of every response
type), at a fraction of its cost: ``MessageToDict`` looks up each field's kind, its name and the
well-known-type table again for every field of every message, while here each message type's
fields are resolved to a (name, converter) table the first time the type is seen. ``dumps`` writes
the result with orjson.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from typing import Any

import orjson
from google.protobuf import descriptor, json_format
from google.protobuf.internal import type_checkers
from google.protobuf.message import Message

_F = descriptor.FieldDescriptor
Converter = Callable[[Any], Any]

_WRAPPERS = frozenset(
    f"google.protobuf.{name}Value"
    for name in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
)
_TEXT_TYPES = frozenset({"google.protobuf.Duration", "google.protobuf.Timestamp", "google.protobuf.FieldMask"})

_converters: dict[str, Converter] = {}


def _identity(value: Any) -> Any:
    return value


def _int64(value: int) -> str:
    return str(value)


def _bytes(value: bytes) -> str:
    return base64.b64encode(value).decode("utf-8")


def _double(value: float) -> Any:
    if math.isinf(value):
        return "-Infinity" if value < 0.0 else "Infinity"
    if math.isnan(value):
        return "NaN"
    return value


def _float(value: float) -> Any:
    if math.isinf(value):
        return "-Infinity" if value < 0.0 else "Infinity"
    if math.isnan(value):
        return "NaN"
    return type_checkers.ToShortestFloat(value)


def _enum(enum_type: descriptor.EnumDescriptor) -> Converter:
    if enum_type.full_name == "google.protobuf.NullValue":
        return lambda _value: None
    names = {value.number: value.name for value in enum_type.values}
    if enum_type.is_closed:

        def closed(value: int) -> Any:
            name = names.get(value)
            if name is None:
                raise ValueError("Enum field contains an integer value which can not mapped to an enum value.")
            return name

        return closed
    get = names.get
    return lambda value: get(value, value)


_SCALARS: dict[int, Converter] = {
    _F.CPPTYPE_INT32: _identity,
    _F.CPPTYPE_UINT32: _identity,
    _F.CPPTYPE_INT64: _int64,
    _F.CPPTYPE_UINT64: _int64,
    _F.CPPTYPE_DOUBLE: _double,
    _F.CPPTYPE_FLOAT: _float,
    _F.CPPTYPE_BOOL: _identity,
}


def _single(field: descriptor.FieldDescriptor) -> Converter:
    """The converter of one value of ``field`` (an element, for a repeated field)."""
    if field.message_type is not None:
        return converter(field.message_type)
    if field.enum_type is not None:
        return _enum(field.enum_type)
    if field.cpp_type == _F.CPPTYPE_STRING:
        return _bytes if field.type == _F.TYPE_BYTES else _identity
    return _SCALARS[field.cpp_type]


def _map_key(key: Any) -> str:
    if isinstance(key, bool):
        return "true" if key else "false"
    return str(key)


def _field(field: descriptor.FieldDescriptor) -> Converter:
    message_type = field.message_type
    if message_type is not None and message_type.GetOptions().map_entry:
        value_of = _single(message_type.fields_by_name["value"])
        if value_of is _identity:
            return lambda mapping: {_map_key(k): v for k, v in mapping.items()}
        return lambda mapping: {_map_key(k): value_of(v) for k, v in mapping.items()}
    single = _single(field)
    if field.is_repeated:
        if single is _identity:
            return list
        return lambda values: [single(v) for v in values]
    return single


def _value(message: Any) -> Any:
    which = message.WhichOneof("kind")
    if which is None or which == "null_value":
        return None
    if which == "number_value":
        number = message.number_value
        if math.isinf(number) or math.isnan(number):
            raise ValueError("Fail to serialize Infinity or NaN for Value.number_value")
        return number
    if which == "struct_value":
        return _struct(message.struct_value)
    if which == "list_value":
        return [_value(v) for v in message.list_value.values]
    return getattr(message, which)  # string_value, bool_value


def _struct(message: Any) -> dict[str, Any]:
    return {key: _value(value) for key, value in message.fields.items()}


def _list_value(message: Any) -> list[Any]:
    return [_value(v) for v in message.values]


def _any(message: Any) -> Any:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _to_json_string(message: Any) -> Any:
    return message.ToJsonString()


def converter(message_descriptor: Any) -> Converter:
    """The converter of messages of this type (built on first use, then shared)."""
    name = message_descriptor.full_name
    found = _converters.get(name)
    if found is not None:
        return found
    if name in _WRAPPERS:
        inner = _single(message_descriptor.fields_by_name["value"])
        made: Converter = lambda message: inner(message.value)  # noqa: E731
    elif name in _TEXT_TYPES:
        made = _to_json_string
    elif name == "google.protobuf.Struct":
        made = _struct
    elif name == "google.protobuf.Value":
        made = _value
    elif name == "google.protobuf.ListValue":
        made = _list_value
    elif name == "google.protobuf.Any":
        made = _any
    else:
        table: dict[int, tuple[str, Converter]] = {}

        def regular(message: Any) -> dict[str, Any]:
            out = {}
            for field, value in message.ListFields():
                entry = table[field.number]
                out[entry[0]] = entry[1](value)
            return out

        # Registered before its fields are built, so a recursive message type finds itself.
        _converters[name] = regular
        for field in message_descriptor.fields:
            table[field.number] = (field.name, _field(field))
        return regular
    _converters[name] = made
    return made


def to_dict(message: Message) -> Any:
    """``message`` as the proto3 JSON mapping's value (proto field names)."""
    return converter(message.DESCRIPTOR)(message)


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)
