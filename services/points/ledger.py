"""The points ledger store: Redis, one Lua script call per single-user operation.

``RedisLedger`` owns the key layout and the scripts (``lua/ledger.lua``); it returns plain dicts
whose amounts are ints, and raises domain errors. It knows nothing of gRPC.

Key layout (Redis Cluster ready: everything of one user shares the hash tag ``{<user_id>}``):
  pts:{u}:acct              hash: token balance, used, held, qoints, exp, regen period, seq, ...
  pts:{u}:open              zset: open hold id -> expire time (ms)
  pts:{u}:tx                zset: seq -> transaction JSON (the ledger, never trimmed)
  pts:{u}:hold:<id>         hold JSON (kept 30 days after it settles)
  pts:{u}:idem:<rpc>:<rid>  first response of a request id (24 h)
  pts:{u}:extref:<ref>      the transaction that credited an external reference (forever)
  pts:{u}:xfer:<id>         sender side of a transfer; pts:{u}:xfer_in:<id> receiver marker
  pts:extref:{<ref>}        which user claimed an external reference (forever)
  pts:xfer:pending          zset of transfers that may be unfinished (recovery index)
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import redis.asyncio as aioredis
import redis.exceptions
from opentelemetry import trace
from opentelemetry.instrumentation.utils import suppress_instrumentation

from common.errors import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

from .economy import Economy

SCRIPT = (Path(__file__).parent / "lua" / "ledger.lua").read_text()
PENDING_TRANSFERS = "pts:xfer:pending"
# Drop a recovery-index entry only if nobody has touched it since the sweep read it: a transfer
# attempt re-adds its entry with a newer score before it writes anything, so it is never dropped.
_DROP_IF_STALE = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) <= tonumber(ARGV[2]) then return redis.call('ZREM', KEYS[1], ARGV[1]) end
return 0
"""
_TRANSFER_NS = uuid.UUID("6b1f9a3e-3c1d-4f57-9d0e-7a2c1b5e8f10")
MAX_BALANCE = 10**13  # far below 2^53, so Lua's doubles stay exact


class Clock(Protocol):
    def now_ms(self) -> int: ...


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class LedgerSettings:
    economy: Economy = field(default_factory=Economy)
    max_open_holds: int = 3
    idempotency_ttl_seconds: int = 86_400
    retention_seconds: int = 30 * 86_400


_ERRORS: dict[str, Callable[[str, dict[str, str]], DomainError]] = {
    "REQUEST_ID_REUSED": lambda r, m: InvalidArgument(
        "request_id was already used with different parameters",
        reason=r,
        metadata=m,
        violations=[FieldViolation("request_id", "already used with different parameters")],
    ),
    "TOO_MANY_OPEN_HOLDS": lambda r, m: ResourceExhausted(
        f"at most {m.get('max_open_holds')} runs may hold points at once", reason=r, metadata=m
    ),
    "INSUFFICIENT_POINTS": lambda r, m: FailedPrecondition(
        f"not enough points: {m.get('required')} needed", reason=r, metadata=m
    ),
    "INSUFFICIENT_QOINTS": lambda r, m: FailedPrecondition(
        f"not enough qoints: {m.get('required')} needed", reason=r, metadata=m
    ),
    "HOLD_NOT_FOUND": lambda r, m: NotFound(f"no hold {m.get('hold_id')} for this user", reason=r, metadata=m),
    "HOLD_ALREADY_SETTLED": lambda r, m: FailedPrecondition(
        f"hold {m.get('hold_id')} is already {m.get('state', '').lower()}", reason=r, metadata=m
    ),
    "DUPLICATE_EXTERNAL_REFERENCE": lambda r, m: AlreadyExists(
        "this external_reference was already credited", reason=r, metadata=m
    ),
    "BALANCE_LIMIT": lambda r, m: FailedPrecondition(
        "the balance would exceed the largest the ledger keeps", reason=r, metadata=m
    ),
}


def _rfc3339(ms: str) -> str:
    return datetime.fromtimestamp(int(ms) / 1000, tz=UTC).isoformat().replace("+00:00", "Z")


def _raise(result: dict[str, Any]) -> None:
    reason = result["error"]
    meta = {k: str(v) for k, v in (result.get("meta") or {}).items()}
    regen = meta.pop("next_regeneration_at", None)
    if regen and regen != "0":
        meta["next_regeneration_time"] = _rfc3339(regen)
    factory = _ERRORS.get(reason)
    if factory is None:
        raise RuntimeError(f"ledger script failed: {reason}")
    raise factory(reason, meta)


def prefix(user_id: str) -> str:
    return f"pts:{{{user_id}}}"


class RedisLedger:
    def __init__(
        self, client: aioredis.Redis, settings: LedgerSettings | None = None, clock: Clock | None = None
    ) -> None:
        self.redis = client
        self.settings = settings or LedgerSettings()
        self.clock = clock or SystemClock()
        self._script = client.register_script(SCRIPT)
        self._drop_if_stale = client.register_script(_DROP_IF_STALE)
        economy = self.settings.economy
        self._static_params = {  # the script's parameters that never change, built once
            "period_ms": economy.regen_period_seconds * 1000,
            "regen_periods": economy.regen_periods,
            "token_offset": economy.token_offset,
            "token_divisor": economy.token_divisor,
            "max_open": self.settings.max_open_holds,
            "idem_ttl": self.settings.idempotency_ttl_seconds,
            "retention": self.settings.retention_seconds,
            "max_balance": MAX_BALANCE,
        }
        self._tracer = trace.get_tracer("stationthis.points.ledger")  # after telemetry.setup: no proxy
        connection = client.connection_pool.connection_kwargs
        self._span_attributes = {
            "db.system": "redis",
            "db.operation.name": "EVALSHA",
            "server.address": str(connection.get("host", connection.get("path", ""))),
        }
        # Test seam: awaited between the two sides of a transfer (a crash test makes it exit).
        self.after_transfer_debit: Callable[[], Awaitable[None]] | None = None

    # --- plumbing ---------------------------------------------------------------------------------

    def _params(self, user_id: str) -> str:
        return json.dumps({**self._static_params, "now": self.clock.now_ms(), "user": user_id, "pfx": prefix(user_id)})

    @staticmethod
    def _keys(user_id: str, rpc: str, request_id: str) -> Sequence[str]:
        """The script's KEYS: account, open holds, ledger and the request's idempotency key."""
        pfx = prefix(user_id)
        idem = f"{pfx}:idem:{rpc}:{request_id}" if rpc else ""
        return (f"{pfx}:acct", f"{pfx}:open", f"{pfx}:tx", idem)

    async def _run(self, user_id: str, request: dict[str, Any], rpc: str = "", request_id: str = "") -> Any:
        keys = self._keys(user_id, rpc, request_id)
        raw = await self._eval(self._script, request["op"], keys, [self._params(user_id), json.dumps(request)])
        result = json.loads(raw)
        if isinstance(result, dict) and "error" in result:
            _raise(result)
        return result

    async def _eval(self, script: Any, op: str, keys: Sequence[str], args: list[str]) -> Any:
        """One script call, in one span named by ledger operation. The Redis instrumentation's own
        span per command is suppressed here: it formats every argument (our JSON) on each call and
        cost more CPU than the rest of a ledger mutation (docs/decisions/0008)."""
        with self._tracer.start_as_current_span(
            f"ledger {op}", kind=trace.SpanKind.CLIENT, attributes=self._span_attributes
        ):
            with suppress_instrumentation():
                return await self._unavailable_guard(script(keys=keys, args=args))

    async def _unavailable_guard(self, call: Awaitable[Any]) -> Any:
        try:
            return await call
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise Unavailable(
                "the points store did not answer; retry with the same request_id", reason="STORE_UNAVAILABLE"
            ) from exc

    @staticmethod
    def _replayed(result: Any) -> Any:
        """A replayed response is stored as the JSON text of the first one."""
        return json.loads(result) if isinstance(result, str) else result

    # --- reads ------------------------------------------------------------------------------------

    async def account(self, user_id: str) -> dict[str, Any]:
        result = await self._run(user_id, {"op": "read"})
        return dict(result["account"])

    async def hold(self, user_id: str, hold_id: str) -> dict[str, Any]:
        result = await self._run(user_id, {"op": "read", "hold_id": hold_id})
        if not isinstance(result.get("hold"), dict) or result["hold"].get("user") != user_id:
            raise NotFound(f"no hold {hold_id} for this user", reason="HOLD_NOT_FOUND", metadata={"hold_id": hold_id})
        return dict(result["hold"])

    async def transactions(
        self, user_id: str, page_size: int, before_seq: int | None
    ) -> tuple[list[dict[str, Any]], int | None]:
        """Newest first; returns (page, seq to continue before or None at the end)."""
        request: dict[str, Any] = {"op": "read", "page_size": page_size}
        if before_seq is not None:
            request["before"] = before_seq
        result = await self._run(user_id, request)
        rows = [json.loads(row) for row in result["txs"]]
        more = len(rows) > page_size
        rows = rows[:page_size]
        return rows, (int(rows[-1]["seq"]) if more else None)

    # --- single-user mutations --------------------------------------------------------------------

    async def reserve(
        self, user_id: str, request_id: str, fp: str, *, run_id: str, estimate: int, ttl_ms: int
    ) -> dict[str, Any]:
        request = {
            "op": "reserve", "request_id": request_id, "fp": fp, "hold_id": uuid.uuid4().hex,
            "run_id": run_id, "estimate": estimate, "ttl_ms": ttl_ms,
        }  # fmt: skip
        return self._replayed(await self._run(user_id, request, "ReserveHold", request_id))  # type: ignore[no-any-return]

    async def capture(self, user_id: str, request_id: str, fp: str, *, hold_id: str, cost: int) -> dict[str, Any]:
        request = {"op": "capture", "request_id": request_id, "fp": fp, "hold_id": hold_id, "cost": cost}
        return self._replayed(await self._run(user_id, request, "CaptureHold", request_id))  # type: ignore[no-any-return]

    async def release(
        self, user_id: str, request_id: str, fp: str, *, hold_id: str, reason: str, memo: str
    ) -> dict[str, Any]:
        request = {
            "op": "release", "request_id": request_id, "fp": fp, "hold_id": hold_id, "reason": reason, "memo": memo,
        }  # fmt: skip
        return self._replayed(await self._run(user_id, request, "ReleaseHold", request_id))  # type: ignore[no-any-return]

    async def set_token_balance(self, user_id: str, request_id: str, fp: str, *, token_balance: int) -> dict[str, Any]:
        request = {"op": "set_tokens", "request_id": request_id, "fp": fp, "token_balance": token_balance}
        return self._replayed(await self._run(user_id, request, "SetTokenBalance", request_id))  # type: ignore[no-any-return]

    async def credit(
        self, user_id: str, request_id: str, fp: str, *, qoints: int, reference: str, source: str, memo: str
    ) -> dict[str, Any]:
        # An external reference belongs to one user, ever: claim it (its own slot) before the credit
        # (the user's slot). A crash between the two leaves a claim without a credit, which the
        # caller's retry completes; a claim by another user is a duplicate.
        claim = f"pts:extref:{{{reference}}}"
        claimed = await self._unavailable_guard(self.redis.set(claim, user_id, nx=True))
        if not claimed:
            owner = await self._unavailable_guard(self.redis.get(claim))
            if owner is not None and owner.decode() != user_id:
                earlier = await self._unavailable_guard(self.redis.get(f"{prefix(owner.decode())}:extref:{reference}"))
                metadata = {"external_reference": reference}
                if earlier is not None:
                    metadata["transaction_id"] = earlier.decode()
                raise AlreadyExists(
                    "this external_reference was already credited to another user",
                    reason="DUPLICATE_EXTERNAL_REFERENCE",
                    metadata=metadata,
                )
        request = {
            "op": "credit", "request_id": request_id, "fp": fp, "qoints": qoints, "ref": reference,
            "source": source, "memo": memo,
        }  # fmt: skip
        return self._replayed(await self._run(user_id, request, "CreditQoints", request_id))  # type: ignore[no-any-return]

    # --- transfers (two users, two slots) ---------------------------------------------------------

    async def transfer(
        self, from_user: str, to_user: str, request_id: str, fp: str, *, qoints: int, memo: str
    ) -> dict[str, Any]:
        """Debit, credit, done: crash-safe across slots (see lua/ledger.lua and the README)."""
        xfer_id = uuid.uuid5(_TRANSFER_NS, f"{from_user}\n{request_id}").hex
        member = f"{from_user}\n{xfer_id}"
        await self._unavailable_guard(self.redis.zadd(PENDING_TRANSFERS, {member: self.clock.now_ms()}))
        request = {
            "op": "xfer_out", "request_id": request_id, "fp": fp, "xfer_id": xfer_id, "to": to_user,
            "qoints": qoints, "memo": memo,
        }  # fmt: skip
        # On an error the index entry stays: it may belong to an earlier, interrupted attempt of this
        # request. It is only a hint, not ledger state; the sweep drops it once it is stale and no
        # PENDING record goes with it.
        started = await self._run(from_user, request, "TransferQoints", request_id)
        if "done" in started:
            await self._unavailable_guard(self.redis.zrem(PENDING_TRANSFERS, member))
            return self._replayed(started["done"])  # type: ignore[no-any-return]
        if self.after_transfer_debit is not None:
            await self.after_transfer_debit()
        return await self._finish_transfer(started["record"])

    async def _finish_transfer(self, record: dict[str, Any]) -> dict[str, Any]:
        from_user, xfer_id = record["from"], record["xfer_id"]
        try:
            incoming = await self._run(
                record["to"],
                {"op": "xfer_in", "xfer_id": xfer_id, "from": from_user, "qoints": int(record["qoints"]),
                 "memo": record["memo"], "request_id": record["request_id"]},
            )  # fmt: skip
        except FailedPrecondition as refused:
            # The receiver cannot take them (balance limit): give them back to the sender, once.
            await self._run(from_user, {"op": "xfer_revert", "xfer_id": xfer_id})
            await self._unavailable_guard(self.redis.zrem(PENDING_TRANSFERS, f"{from_user}\n{xfer_id}"))
            raise refused
        sender = record.get("account")
        if sender is None:
            sender = await self.account(from_user)
        result = {
            "from_account": sender, "to_account": incoming["account"],
            "out_tx": record["out_tx"], "in_tx": incoming["tx"],
        }  # fmt: skip
        final = await self._run(
            from_user,
            {"op": "xfer_done", "xfer_id": xfer_id, "request_id": record["request_id"], "fp": record["fp"],
             "result": json.dumps(result)},
            "TransferQoints",
            record["request_id"],
        )  # fmt: skip
        await self._unavailable_guard(self.redis.zrem(PENDING_TRANSFERS, f"{from_user}\n{xfer_id}"))
        return self._replayed(final)  # type: ignore[no-any-return]

    async def recover_transfers(self, older_than_ms: int) -> int:
        """Carry forward transfers left between their sides (by a crash); returns how many."""
        cutoff = self.clock.now_ms() - older_than_ms
        members = await self._unavailable_guard(self.redis.zrangebyscore(PENDING_TRANSFERS, "-inf", cutoff))
        finished = 0
        for raw in members:
            member = raw.decode()
            from_user, _, xfer_id = member.partition("\n")
            found = await self._run(from_user, {"op": "xfer_record", "xfer_id": xfer_id})
            record = found.get("record")
            if record is None or record["state"] in ("DONE", "REVERTED"):
                await self._unavailable_guard(self._drop_if_stale(keys=[PENDING_TRANSFERS], args=[member, cutoff]))
                continue
            try:
                await self._finish_transfer(record)
            except FailedPrecondition:
                pass  # reverted: the sender has the qoints back
            finished += 1
        return finished
