"""The gateway's per-type JSON converters write exactly what json_format.MessageToDict writes.

Random messages of every reply type (and of the test message with every kind of field) are filled
from their descriptors: scalars at their edges, enums known and unknown, maps, repeated and nested
messages, Struct/Value/ListValue, Timestamp, Duration, wrappers, oneofs, proto3 optional.
"""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest
from google.protobuf import descriptor, json_format
from google.protobuf.message import Message

from gateway import jsonmap
from gateway.app import SERVICES
from gateway.routes import build_routes
from stationthis.comfyui.v1 import comfyui_service_pb2
from tests.test_gateway_transcode import _test_message

_F = descriptor.FieldDescriptor
STRINGS = ["", "a", "héllo", "日本", "\u2028", "x" * 50, '"quoted" \\ back']
INTS = {
    _F.CPPTYPE_INT32: [0, 1, -1, 2**31 - 1, -(2**31)],
    _F.CPPTYPE_INT64: [0, 7, -(2**63), 2**63 - 1, 2**53 + 1],
    _F.CPPTYPE_UINT32: [0, 1, 2**32 - 1],
    _F.CPPTYPE_UINT64: [0, 2**64 - 1, 2**53 + 1],
}
FLOATS = [0.0, -0.0, 1.5, 0.1, 1e-300, 3.4e38, float("inf"), float("-inf"), float("nan"), 123456789.123]


def _json_value(rng: random.Random, depth: int) -> Any:
    kind = rng.randrange(6 if depth < 3 else 4)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, 1.5, -2, 1e20, 0.1])
    if kind == 3:
        return rng.choice(STRINGS)
    if kind == 4:
        return [_json_value(rng, depth + 1) for _ in range(rng.randrange(3))]
    return {rng.choice(STRINGS): _json_value(rng, depth + 1) for _ in range(rng.randrange(3))}


def fill(message: Message, rng: random.Random, depth: int = 0) -> None:
    name = message.DESCRIPTOR.full_name
    if name == "google.protobuf.Struct":
        message.update({f"k{i}": _json_value(rng, depth) for i in range(rng.randrange(3))})  # type: ignore[attr-defined]
        return
    if name == "google.protobuf.Value":
        json_format.ParseDict(_json_value(rng, depth), message)
        return
    if name == "google.protobuf.ListValue":
        message.extend([_json_value(rng, depth) for _ in range(rng.randrange(3))])  # type: ignore[attr-defined]
        return
    if name == "google.protobuf.Timestamp":
        message.FromNanoseconds(rng.randrange(0, 2**62))  # type: ignore[attr-defined]
        return
    if name == "google.protobuf.Duration":
        message.FromNanoseconds(rng.randrange(-(10**15), 10**15))  # type: ignore[attr-defined]
        return
    if name == "google.protobuf.Any":
        return
    for field in message.DESCRIPTOR.fields:
        if rng.random() < 0.3:
            continue
        if field.containing_oneof is not None and message.WhichOneof(field.containing_oneof.name):
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field, value_field = (
                field.message_type.fields_by_name["key"],
                field.message_type.fields_by_name["value"],
            )
            container = getattr(message, field.name)
            for _ in range(rng.randrange(3)):
                key = _scalar(key_field, rng)
                if value_field.message_type is not None:
                    if depth < 3:
                        fill(container[key], rng, depth + 1)
                else:
                    container[key] = _scalar(value_field, rng)
            continue
        if field.is_repeated:
            container = getattr(message, field.name)
            for _ in range(rng.randrange(3)):
                if field.message_type is not None:
                    if depth < 3:
                        fill(container.add(), rng, depth + 1)
                else:
                    container.append(_scalar(field, rng))
            continue
        if field.message_type is not None:
            if depth < 3:
                fill(getattr(message, field.name), rng, depth + 1)
                getattr(message, field.name).SetInParent()
            continue
        setattr(message, field.name, _scalar(field, rng))


def _scalar(field: descriptor.FieldDescriptor, rng: random.Random) -> Any:
    kind = field.cpp_type
    if kind in INTS:
        return rng.choice(INTS[kind])
    if kind in (_F.CPPTYPE_DOUBLE, _F.CPPTYPE_FLOAT):
        return rng.choice(FLOATS)
    if kind == _F.CPPTYPE_BOOL:
        return rng.choice([True, False])
    if kind == _F.CPPTYPE_ENUM:
        numbers = [v.number for v in field.enum_type.values]
        return rng.choice(numbers + ([] if field.enum_type.is_closed else [999]))
    if field.type == _F.TYPE_BYTES:
        return rng.choice([b"", b"\x00\xff", bytes(range(40))])
    return rng.choice(STRINGS)


REPLY_TYPES = sorted(
    {route.output_type for route in build_routes(SERVICES)} | {comfyui_service_pb2.UploadFileResponse, _test_message()},
    key=lambda cls: cls.DESCRIPTOR.full_name,
)


@pytest.mark.parametrize("cls", REPLY_TYPES, ids=[cls.DESCRIPTOR.name for cls in REPLY_TYPES])
def test_converters_write_what_message_to_dict_writes(cls: type[Message]) -> None:
    rng = random.Random(cls.DESCRIPTOR.full_name)
    for _ in range(60):
        message = cls()
        fill(message, rng)
        try:
            expected = json_format.MessageToDict(message, preserving_proto_field_name=True)
        except json_format.SerializeToJsonError:
            with pytest.raises(ValueError):
                jsonmap.to_dict(message)
            continue
        got = jsonmap.to_dict(message)
        assert got == expected or orjson.dumps(got) == orjson.dumps(expected), message
        assert orjson.loads(jsonmap.dumps(got)) == orjson.loads(orjson.dumps(expected))
    assert jsonmap.to_dict(cls()) == {}
