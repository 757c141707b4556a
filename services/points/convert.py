"""Ledger records (``store``) to protobuf messages.

A record's fields carry the names of the message's fields, so plain values (ints, strings) are copied
by name; what differs is spelled out: enum values (the records keep names without the enum's
prefix), times (epoch ms, 0 for unset) and nested messages.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from google.protobuf.message import Message

from common.proto_time import timestamp_from_ms
from stationthis.points.v1 import points_pb2

from . import store
from .economy import level

M = TypeVar("M", bound=Message)


_PLAIN: dict[tuple[type, type], tuple[str, ...]] = {}


def _plain(message_type: type[Message], record_type: type) -> tuple[str, ...]:
    """The fields of a record type that the message type has by the same name, worked out once."""
    names = _PLAIN.get((message_type, record_type))
    if names is None:
        has = message_type.DESCRIPTOR.fields_by_name
        names = tuple(f.name for f in dataclasses.fields(record_type) if f.name in has)
        _PLAIN[message_type, record_type] = names
    return names


def _message(message_type: type[M], record: Any, times: dict[str, int], **special: Any) -> M:
    """``message_type`` with each field of ``record`` it has by the same name, then ``special``, and
    the Timestamp fields in ``times`` that are set (not 0)."""
    plain = {name: getattr(record, name) for name in _plain(message_type, type(record))}
    message = message_type(**{**plain, **special})
    for field, ms in times.items():
        if ms > 0:
            getattr(message, field).CopyFrom(timestamp_from_ms(ms))
    return message


def _enum(prefix: str, name: str) -> str | None:
    """The enum value name for a record's short one; None (unset) for ""."""
    return f"{prefix}{name}" if name else None


def hold(h: store.Hold) -> points_pb2.Hold:
    return _message(
        points_pb2.Hold,
        h,
        {"create_time": h.create_ms, "expire_time": h.expire_ms, "settle_time": h.settle_ms},
        state=_enum("HOLD_STATE_", h.state),
        release_reason=_enum("RELEASE_REASON_", h.release_reason),
    )


def account(a: store.Account) -> points_pb2.Account:
    return _message(
        points_pb2.Account,
        a,
        {"next_regeneration_time": a.next_regeneration_ms, "update_time": a.update_ms},
        level=level(a.exp),
        open_holds=[hold(h) for h in a.open_holds],
    )


def transaction(t: store.Transaction) -> points_pb2.Transaction:
    return _message(
        points_pb2.Transaction,
        t,
        {"create_time": t.create_ms},
        kind=_enum("TRANSACTION_KIND_", t.kind),
        qoints_source=_enum("QOINTS_SOURCE_", t.qoints_source),
        release_reason=_enum("RELEASE_REASON_", t.release_reason),
    )
