"""Ledger results (dicts of decimal strings from the Lua script) to protobuf messages."""

from __future__ import annotations

from typing import Any

from google.protobuf import timestamp_pb2

from common.proto_time import timestamp_from_ms
from stationthis.points.v1 import points_pb2

from .economy import level


def _ts(ms: Any) -> timestamp_pb2.Timestamp | None:
    """None for 0 (the ledger's "not set")."""
    value = int(ms or 0)
    return timestamp_from_ms(value) if value > 0 else None


def hold(d: dict[str, Any]) -> points_pb2.Hold:
    message = points_pb2.Hold(
        hold_id=d["id"],
        user_id=d["user"],
        run_id=d.get("run") or "",
        state=f"HOLD_STATE_{d['state']}",
        estimate_points=int(d["est"]),
        points_held=int(d["p"]),
        qoints_held=int(d["q"]),
        cost_points=int(d["cost"]),
        points_charged=int(d["pc"]),
        qoints_charged=int(d["qc"]),
        unpaid_points=int(d["unpaid"]),
        memo=d.get("memo") or "",
        release_reason=f"RELEASE_REASON_{d['reason']}" if d.get("reason") else None,
    )
    for name, key in (("create_time", "created"), ("expire_time", "expires"), ("settle_time", "settled")):
        stamp = _ts(d.get(key))
        if stamp is not None:
            getattr(message, name).CopyFrom(stamp)
    return message


def account(d: dict[str, Any]) -> points_pb2.Account:
    holds = d.get("holds") or []
    message = points_pb2.Account(
        user_id=d["user"],
        token_balance=int(d["tb"]),
        max_points=int(d["maxp"]),
        points_used=int(d["used"]),
        points_held=int(d["hp"]),
        points_available=int(d["avail_p"]),
        qoints=int(d["q"]),
        qoints_held=int(d["hq"]),
        qoints_available=int(d["avail_q"]),
        unpaid_points=int(d["unpaid"]),
        exp=int(d["exp"]),
        level=level(int(d["exp"])),
        next_regeneration_points=int(d["next_points"]),
        open_holds=[hold(h) for h in (holds if isinstance(holds, list) else [])],
    )
    for name, key in (("next_regeneration_time", "next_at"), ("update_time", "updated")):
        stamp = _ts(d.get(key))
        if stamp is not None:
            getattr(message, name).CopyFrom(stamp)
    return message


def transaction(d: dict[str, Any] | None) -> points_pb2.Transaction | None:
    """None for no transaction (a release of a hold that had already expired changes nothing)."""
    if not isinstance(d, dict):
        return None
    message = points_pb2.Transaction(
        transaction_id=d["id"],
        user_id=d["id"].rpartition("/")[0],
        kind=f"TRANSACTION_KIND_{d['kind']}",
        points_used_delta=int(d["d_used"]),
        points_held_delta=int(d["d_hp"]),
        qoints_delta=int(d["d_q"]),
        qoints_held_delta=int(d["d_hq"]),
        exp_delta=int(d["d_exp"]),
        unpaid_delta=int(d["d_unpaid"]),
        points_used_after=int(d["used"]),
        qoints_after=int(d["q"]),
        exp_after=int(d["exp"]),
        unpaid_after=int(d["unpaid"]),
        token_balance_after=int(d["tb"]),
        max_points_after=int(d["maxp"]),
        hold_id=d.get("hold_id") or "",
        run_id=d.get("run_id") or "",
        external_reference=d.get("external_reference") or "",
        counterparty_user_id=d.get("counterparty") or "",
        memo=d.get("memo") or "",
        request_id=d.get("request_id") or "",
        qoints_source=f"QOINTS_SOURCE_{d['source']}" if d.get("source") else None,
        release_reason=f"RELEASE_REASON_{d['reason']}" if d.get("reason") else None,
    )
    stamp = _ts(d.get("at"))
    if stamp is not None:
        message.create_time.CopyFrom(stamp)
    return message
