"""The gateway's JSON checks against the proto3 JSON mapping, on a message with every kind of field.

The contracts use few well-known types, so this builds a test message (Timestamp, Duration,
FieldMask, wrappers, Any, Struct/Value/ListValue, bytes, floats, maps with integer keys, oneofs,
nested and repeated messages) and a route for it, and compares ``transcode.build_request`` with
``json_format.ParseDict`` itself: whatever the parser accepts, the gateway accepts and builds the
same message from (but for the few inputs listed as refused on purpose); whatever it refuses, the
gateway refuses with a violation naming the field.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    duration_pb2,
    field_mask_pb2,
    json_format,
    message_factory,
    struct_pb2,
    timestamp_pb2,
    wrappers_pb2,
)
from google.protobuf.message import Message

from gateway import transcode
from gateway.routes import Route, compile_template

_F = descriptor_pb2.FieldDescriptorProto
PACKAGE = "stationthis.gatewaytest.v1"


def _test_message() -> type[Message]:
    pool = descriptor_pool.Default()
    name = "stationthis/gatewaytest/v1/everything.proto"
    try:
        pool.FindFileByName(name)
    except KeyError:
        file = descriptor_pb2.FileDescriptorProto(name=name, package=PACKAGE, syntax="proto3")
        file.dependency.extend(
            module.DESCRIPTOR.name for module in (duration_pb2, field_mask_pb2, struct_pb2, timestamp_pb2, wrappers_pb2)
        )
        file.dependency.append("google/protobuf/any.proto")
        kind = file.enum_type.add(name="Kind")
        for number, value in enumerate(("KIND_UNSPECIFIED", "KIND_A", "KIND_B")):
            kind.value.add(name=value, number=number)
        message = file.message_type.add(name="Everything")
        message.oneof_decl.add(name="choice")
        scalar = {
            "name": _F.TYPE_STRING,
            "count": _F.TYPE_INT32,
            "big": _F.TYPE_INT64,
            "ucount": _F.TYPE_UINT32,
            "ubig": _F.TYPE_UINT64,
            "ratio": _F.TYPE_FLOAT,
            "precise": _F.TYPE_DOUBLE,
            "flag": _F.TYPE_BOOL,
            "blob": _F.TYPE_BYTES,
        }
        typed = {
            "when": "google.protobuf.Timestamp",
            "ttl": "google.protobuf.Duration",
            "mask": "google.protobuf.FieldMask",
            "maybe_count": "google.protobuf.Int64Value",
            "maybe_flag": "google.protobuf.BoolValue",
            "maybe_ratio": "google.protobuf.FloatValue",
            "extra": "google.protobuf.Any",
            "data": "google.protobuf.Struct",
            "value": "google.protobuf.Value",
            "items": "google.protobuf.ListValue",
            "child": f"{PACKAGE}.Everything",
        }
        number = 0

        def add(field_name: str, **kwargs: Any) -> Any:
            nonlocal number
            number += 1
            label = kwargs.pop("label", _F.LABEL_OPTIONAL)
            return message.field.add(name=field_name, number=number, label=label, **kwargs)

        for field_name, field_type in scalar.items():
            add(field_name, type=field_type)
        add("kind", type=_F.TYPE_ENUM, type_name=f".{PACKAGE}.Kind")
        add("kinds", type=_F.TYPE_ENUM, type_name=f".{PACKAGE}.Kind", label=_F.LABEL_REPEATED)
        add("tags", type=_F.TYPE_STRING, label=_F.LABEL_REPEATED)
        add("values", type=_F.TYPE_MESSAGE, type_name=".google.protobuf.Value", label=_F.LABEL_REPEATED)
        for field_name, type_name in typed.items():
            add(field_name, type=_F.TYPE_MESSAGE, type_name=f".{type_name}")
        add("children", type=_F.TYPE_MESSAGE, type_name=f".{PACKAGE}.Everything", label=_F.LABEL_REPEATED)
        add("left", type=_F.TYPE_STRING, oneof_index=0)
        add("right", type=_F.TYPE_INT32, oneof_index=0)
        for field_name, key_type, value_type, value_name in (
            ("by_number", _F.TYPE_INT32, _F.TYPE_STRING, ""),
            ("by_flag", _F.TYPE_BOOL, _F.TYPE_INT64, ""),
            ("by_name", _F.TYPE_STRING, _F.TYPE_MESSAGE, f".{PACKAGE}.Everything"),
        ):
            entry = message.nested_type.add(name="".join(p.title() for p in field_name.split("_")) + "Entry")
            entry.options.map_entry = True
            entry.field.add(name="key", number=1, type=key_type, label=_F.LABEL_OPTIONAL)
            value = entry.field.add(name="value", number=2, type=value_type, label=_F.LABEL_OPTIONAL)
            if value_name:
                value.type_name = value_name
            add(
                field_name,
                type=_F.TYPE_MESSAGE,
                type_name=f".{PACKAGE}.Everything.{entry.name}",
                label=_F.LABEL_REPEATED,
            )
        pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.Everything"))


EVERYTHING = _test_message()


def route(template: str = "/v1/things", body: str = "*", method: str = "POST") -> Route:
    pattern, fields = compile_template(template)
    return Route(
        http_method=method,
        template=template,
        pattern=pattern,
        path_fields=fields,
        body=body,
        service=f"{PACKAGE}.TestService",
        method="Do",
        input_type=EVERYTHING,
        output_type=EVERYTHING,
        server_streaming=False,
        client_streaming=False,
    )


def build(data: Any, lenient: bool = False, **kwargs: Any) -> Message:
    body = data if isinstance(data, bytes) else json.dumps(data).encode()
    return transcode.build_request(
        kwargs.pop("route", route()),
        kwargs.pop("path", {}),
        kwargs.pop("query", []),
        body,
        None,
        ignore_unknown_fields=lenient,
    )


def refusal(data: Any, **kwargs: Any) -> list[tuple[str, str]]:
    with pytest.raises(transcode.BadRequest) as raised:
        build(data, **kwargs)
    return [(v.field, v.description) for v in raised.value.violations]


def parser(data: Any, lenient: bool = False) -> Message | None:
    message = EVERYTHING()
    try:
        json_format.ParseDict(copy.deepcopy(data), message, ignore_unknown_fields=lenient)
        message.SerializeToString()
    except Exception:
        return None
    return message


# Field values the proto3 JSON mapping defines, good and bad: (field, value).
SAMPLES: list[tuple[str, Any]] = [
    *[("name", v) for v in ("x", "", 1, None, True, ["x"], "\ud800", "\U0001f600")],
    *[("count", v) for v in (1, -1, "12", "-12", 1.0, "1e3", 1.5, "1.5", "x", " 1", True, 2**31, -(2**31), [1])],
    *[("big", v) for v in ("9223372036854775807", 2**63, "-9223372036854775808", "1e400", 1e18, "0x10", "")],
    *[("ucount", v) for v in (0, -1, 2**32 - 1, 2**32, "4294967295")],
    *[("ubig", v) for v in (2**64 - 1, 2**64, "18446744073709551615", -1)],
    *[("ratio", v) for v in (1.5, 1, "2.5", "NaN", "Infinity", "-Infinity", 3.5e38, "3.5e38", "x", True, "1e5")],
    *[("precise", v) for v in (1e308, "1e308", "1e309", 10**400, 0, "-0.0", "nan")],
    *[("flag", v) for v in (True, False, "true", 1, None)],
    *[("blob", v) for v in ("aGVsbG8=", "aGVsbG8", "-_8=", "+/8=", "a", "!!", 5, "")],
    *[("kind", v) for v in ("KIND_A", "KIND_UNSPECIFIED", 1, 7, "7", "kind_a", "KIND_C", 1.5, True, -1)],
    *[("kinds", v) for v in (["KIND_A", 2], [], ["KIND_C"], [None], "KIND_A", None)],
    *[("tags", v) for v in (["a", "b"], [1], [None], "a", [["a"]])],
    *[("values", v) for v in ([1, "a", None, {"x": [True]}], [], {"a": 1})],
    *[
        ("when", v)
        for v in (
            "2024-05-01T12:00:00Z",
            "2024-05-01T12:00:00.123456789+02:00",
            "2024-05-01",
            "2024-13-01T00:00:00Z",
            "0000-01-01T00:00:00Z",
            1714564800,
            {"seconds": 1},
        )
    ],
    *[("ttl", v) for v in ("30s", "1.5s", "-2s", "0.000000001s", "30", "1m", "315576000001s", 30, {"seconds": 3})],
    *[("mask", v) for v in ("name,count", "maybeCount", "", "a..b", 5, ["name"])],
    *[("maybe_count", v) for v in (5, "5", None, "x", {"value": 5})],
    *[("maybe_flag", v) for v in (True, None, "true", 0)],
    *[("maybe_ratio", v) for v in (1.5, "NaN", 1e39, "x")],
    *[
        ("extra", v)
        for v in (
            {"@type": "type.googleapis.com/google.protobuf.Duration", "value": "3s"},
            {"@type": "type.googleapis.com/google.protobuf.Duration", "value": "3"},
            {"@type": "type.googleapis.com/no.Such"},
            {"value": 1},
            {},
            "x",
        )
    ],
    *[("data", v) for v in ({"a": [1, {"b": None}], "c": "d"}, {}, [1], "x", 1, {"n": 1e308}, {"\ud800": 1})],
    *[("value", v) for v in (None, 1, "x", [1, [2]], {"a": {}}, True)],
    *[("items", v) for v in ([1, "x", None, []], [], {"a": 1}, "x")],
    *[("child", v) for v in ({"name": "x", "child": {"count": 2}}, {}, "x", [], {"nope": 1}, {"count": "x"})],
    *[("children", v) for v in ([{"name": "x"}, {}], [None], {"name": "x"}, [{"count": "x"}])],
    *[("by_number", v) for v in ({"1": "a", "-2": "b"}, {"x": "a"}, {"1.5": "a"}, {"1": 2}, {"1": None}, [])],
    *[("by_flag", v) for v in ({"true": 1, "false": "2"}, {"yes": 1}, {"true": "x"})],
    *[("by_name", v) for v in ({"a": {"name": "x"}}, {"a": {"nope": 1}}, {"a": None}, {"a": 1})],
    *[("left", v) for v in ("x", 1)],
    *[("right", v) for v in (1, "x")],
]
# Accepted by json_format, refused by the gateway on purpose: Python's float() spellings that are
# not JSON numbers, booleans and fractions read as numbers or enum values, base64 with characters
# the parser silently drops, numbers out of the field's range (which the parser turns into
# infinity), and an array for a message.
STRICTER = {
    (field, json.dumps(value))
    for field, value in [
        ("precise", "nan"),
        ("precise", "1e309"),
        ("ratio", True),
        ("ratio", 3.5e38),
        ("ratio", "3.5e38"),
        ("maybe_ratio", 1e39),
        ("blob", "a"),
        ("blob", "!!"),
        ("kind", 1.5),
        ("kind", True),
        ("child", []),  # the parser reads any iterable of names as a message
    ]
}


def _sample_id(sample: tuple[str, Any]) -> str:
    return f"{sample[0]}={json.dumps(sample[1], ensure_ascii=True)[:40]}"


@pytest.mark.parametrize("sample", SAMPLES, ids=[_sample_id(s) for s in SAMPLES])
def test_the_gateway_agrees_with_the_parser(sample: tuple[str, Any]) -> None:
    field, value = sample
    data = {field: value}
    expected = parser(data)
    if expected is None or (field, json.dumps(value)) in STRICTER:
        found = refusal(data)
        assert found and all(name == field or name.startswith((f"{field}.", f"{field}[")) for name, _ in found), found
        for _, description in found:
            assert "Traceback" not in description and "Message type" not in description
    else:
        assert build(data) == expected


def test_camel_case_and_snake_case_both_build_the_message() -> None:
    data = {"maybeCount": "7", "byNumber": {"3": "c"}, "child": {"maybeFlag": False, "byName": {"k": {"big": 5}}}}
    expected = EVERYTHING()
    expected.maybe_count.value = 7
    expected.by_number[3] = "c"
    expected.child.maybe_flag.value = False
    expected.child.by_name["k"].big = 5
    assert build(data) == expected
    assert build({"maybe_count": "7", "by_number": {"3": "c"}, "child": data["child"]}) == expected


def test_oneof_and_spellings_given_twice() -> None:
    assert refusal({"left": "x", "right": 1}) == [
        ("right", "cannot be given together with left (only one of them may be set)")
    ]
    assert build({"left": None, "right": 1}) == EVERYTHING(right=1)
    assert refusal({"maybe_count": 1, "maybeCount": 1}) == [
        ("maybe_count", "is given twice (as maybe_count and as maybeCount)")
    ]
    assert refusal(b'{"child": {"name": "a", "name": "b"}}') == [("child.name", "is given more than once")]
    assert refusal(b'{"data": {"k": 1, "k": 2}}') == [("data.k", "is given more than once")]


def test_lenient_routes_drop_unknown_fields_and_enum_names_only() -> None:
    data = {"nope": {"deep": [1]}, "kind": "KIND_FROM_THE_FUTURE", "kinds": ["KIND_A", "KIND_C"], "name": "x"}
    assert build(data, lenient=True) == EVERYTHING(name="x", kinds=[1])
    assert parser(data, lenient=True) == EVERYTHING(name="x", kinds=[1])
    assert [field for field, _ in refusal({**data, "count": "x"}, lenient=True)] == ["count"]


def test_path_and_query_values_are_typed_and_checked() -> None:
    get = route("/v1/things/{count}/{child.name}", body="", method="GET")
    message = build(
        b"",
        route=get,
        path={"count": "5", "child.name": "n"},
        query=[("ttl", "3s"), ("kinds", "KIND_A"), ("kinds", "2"), ("maybeFlag", "true"), ("child.big", "9")],
    )
    expected = EVERYTHING(count=5, kinds=[1, 2])
    expected.child.name = "n"
    expected.child.big = 9
    expected.ttl.seconds = 3
    expected.maybe_flag.value = True
    assert message == expected
    for query, field in [
        ([("ttl", "3")], "ttl"),
        ([("kinds", "KIND_C")], "kinds"),
        ([("maybe_flag", "maybe")], "maybe_flag"),
        ([("child", "x")], "child"),
        ([("by_name", "x")], "by_name"),
        ([("data", "{}")], "data"),
        ([("ttl.seconds", "3")], "ttl.seconds"),
        ([("children.name", "x")], "children.name"),
        ([("childName", "x")], "childName"),
        ([("count", "6")], "count"),
        ([("child.name", "m")], "child.name"),
        ([("name", "a"), ("name", "b")], "name"),
    ]:
        found = refusal(b"", route=get, path={"count": "5", "child.name": "n"}, query=query)
        assert [name for name, _ in found] == [field], (query, found)
    assert refusal(b"", route=get, path={"count": "five", "child.name": "n"}) == [("count", "must be an integer")]


def test_a_body_field_may_repeat_the_path_but_not_contradict_it() -> None:
    post = route("/v1/things/{name}/{count}:do")
    path = {"name": "bob", "count": "5"}
    assert build({"name": "bob", "count": "5"}, route=post, path=path) == EVERYTHING(name="bob", count=5)
    assert build({"count": 5.0}, route=post, path=path) == EVERYTHING(name="bob", count=5)
    assert refusal({"name": "eve", "count": 6}, route=post, path=path) == [
        ("name", "differs from the value in the path"),
        ("count", "differs from the value in the path"),
    ]


def test_a_body_field_route_names_fields_under_that_field() -> None:
    webhook_like = route("/v1/hooks", body="child")
    assert build({"name": "x"}, route=webhook_like) == EVERYTHING(child=EVERYTHING(name="x"))
    assert refusal({"count": "x"}, route=webhook_like) == [("child.count", "must be an integer")]
    assert refusal([1], route=webhook_like) == [("child", "must be a JSON object")]
    assert build(b"", route=webhook_like) == EVERYTHING()
    assert build(b"null", route=webhook_like) == EVERYTHING()


def test_depth_is_checked_without_recursion() -> None:
    depth = transcode.MAX_JSON_DEPTH
    assert transcode.json_depth('{"a": "[[[{{{", "b": [[1]], "c": "\\"]]"}') == 3
    assert transcode.json_depth("[" * 1_000_000) == 1_000_000
    assert transcode.json_depth('"unterminated [[[') == 0
    assert transcode.json_depth('"\\"' * 100_000) == 0  # linear even when every string is cut short
    within = b'{"data": ' + b'{"a":' * (depth - 1) + b"1" + b"}" * (depth - 1) + b"}"
    assert transcode.json_depth(within.decode()) == depth
    assert build(within).data  # type: ignore[attr-defined]
    beyond = b'{"data": ' + b'{"a":' * depth + b"1" + b"}" * depth + b"}"
    assert refusal(beyond) == [("body", f"is nested too deeply (at most {depth} levels of arrays and objects)")]


def test_protobuf_nesting_is_checked_too() -> None:
    """Within the JSON limit, a message chain can still exceed protobuf's 100 levels: refused by name."""
    data: dict[str, Any] = {}
    inner = data
    for _ in range(transcode.MAX_MESSAGE_DEPTH + 1):
        inner["child"] = {}
        inner = inner["child"]
    with pytest.raises(transcode.BadRequest):
        transcode.parse_json(json.dumps(data).encode())  # the JSON limit refuses it first
    walker = transcode._Walker(lenient=False)
    walker.fields(data, EVERYTHING.DESCRIPTOR, "", 1)
    [(field, description)] = [(v.field, v.description) for v in walker.violations]
    assert field == "child" + ".child" * (transcode.MAX_MESSAGE_DEPTH - 1) and description == "is nested too deeply"
