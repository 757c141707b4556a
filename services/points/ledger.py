"""The points ledger store: Redis, one Lua script call per single-user operation.

``RedisLedger`` owns the key layout and the scripts (``lua/ledger.lua``) and implements
``store.LedgerStore``: it parses the script's JSON (decimal strings, two-letter keys) into the typed
records of ``store`` and raises domain errors. It knows nothing of gRPC.

Key layout (Redis Cluster ready: everything of one user shares the hash tag ``{<user_id>}``):
  pts:{u}:acct              hash: token balance, used, held, qoints, exp, regen period, seq, ...
  pts:{u}:open              zset: open hold id -> expire time (ms)
  pts:{u}:tx                zset: seq -> transaction JSON (the ledger, never trimmed)
  pts:{u}:hold:<id>         hold JSON (kept 30 days after it settles)
  pts:{u}:idem:<rpc>:<rid>  first response of a request id (24 h)
  pts:{u}:extref:<ref>      the transaction that credited an external reference (forever)
  pts:{u}:xfer:<id>         sender side of a transfer; pts:{u}:xfer_in:<id> receiver marker
  pts:extref:{<ref>}        which user claimed an external reference (forever)
  pts:xfer:pending          zset of transfer attempts that may be unfinished (recovery index):
                            "<from user>\\n<transfer id>\\n<attempt>" -> when the attempt began (ms)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar, get_type_hints

import redis.asyncio as aioredis
import redis.exceptions
from opentelemetry import trace
from opentelemetry.instrumentation.utils import suppress_instrumentation

from common.errors import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from common.idempotency import request_id_reused

from .economy import Economy
from .store import Account, AccountResult, Hold, HoldResult, Transaction, TransactionPage, TransferResult

SCRIPT = (Path(__file__).parent / "lua" / "ledger.lua").read_text()
PENDING_TRANSFERS = "pts:xfer:pending"
# Drop a recovery-index entry only if nobody has touched it since the sweep read it. Each attempt
# adds an entry of its own, so this matters only for entries in the older format ("<user>\n<id>"),
# which every attempt re-added with a newer score before it wrote anything.
_DROP_IF_STALE = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) <= tonumber(ARGV[2]) then return redis.call('ZREM', KEYS[1], ARGV[1]) end
return 0
"""
# An index entry without a transfer record is an attempt that never debited (its process died first,
# or it was refused and could not remove its entry) or one whose debit is still on its way to Redis:
# it is dropped only once it is this old, long after any debit could still arrive.
_UNSTARTED_KEEP_MS = 600_000
_TRANSFER_NS = uuid.UUID("6b1f9a3e-3c1d-4f57-9d0e-7a2c1b5e8f10")
MAX_BALANCE = 10**13  # far below 2^53, so Lua's doubles stay exact
DRAIN_SECONDS = 5.0
log = logging.getLogger("stationthis.points")


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
    "REQUEST_ID_REUSED": lambda r, m: request_id_reused(m.get("request_id", "")),
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


# --- the script's JSON to records ----------------------------------------------------------------

# The script's short JSON keys, by record field; a field not listed has a key of its own name.
_KEYS: dict[type, dict[str, str]] = {
    Hold: {
        "hold_id": "id", "user_id": "user", "run_id": "run", "estimate_points": "est", "points_held": "p",
        "qoints_held": "q", "cost_points": "cost", "points_charged": "pc", "qoints_charged": "qc",
        "unpaid_points": "unpaid", "release_reason": "reason", "create_ms": "created", "expire_ms": "expires",
        "settle_ms": "settled",
    },
    Account: {
        "user_id": "user", "token_balance": "tb", "max_points": "maxp", "points_used": "used", "points_held": "hp",
        "points_available": "avail_p", "qoints": "q", "qoints_held": "hq", "qoints_available": "avail_q",
        "unpaid_points": "unpaid", "next_regeneration_ms": "next_at", "next_regeneration_points": "next_points",
        "update_ms": "updated",
    },
    Transaction: {
        "transaction_id": "id", "create_ms": "at", "points_used_delta": "d_used", "points_held_delta": "d_hp",
        "qoints_delta": "d_q", "qoints_held_delta": "d_hq", "exp_delta": "d_exp", "unpaid_delta": "d_unpaid",
        "points_used_after": "used", "qoints_after": "q", "exp_after": "exp", "unpaid_after": "unpaid",
        "token_balance_after": "tb", "max_points_after": "maxp", "counterparty_user_id": "counterparty",
        "qoints_source": "source", "release_reason": "reason",
    },
}  # fmt: skip
# Per record type: (field, JSON key, is an int) for each field, worked out once.
_LAYOUT = {
    kind: [(f.name, keys.get(f.name, f.name), get_type_hints(kind)[f.name] is int) for f in dataclasses.fields(kind)]
    for kind, keys in _KEYS.items()
}
R = TypeVar("R", Hold, Account, Transaction)


def _parse(kind: type[R], d: Mapping[str, Any], **given: Any) -> R:
    """A record from the script's JSON, whose numbers are decimal strings: int fields as ints (0 when
    absent or null), the others as strings ("" when absent or null); the ``given`` fields as given."""
    values = dict(given)
    for name, key, is_int in _LAYOUT[kind]:
        if name not in values:
            raw = d.get(key)
            values[name] = int(raw or 0) if is_int else raw if isinstance(raw, str) else ""
    return kind(**values)


def parse_hold(d: Mapping[str, Any]) -> Hold:
    return _parse(Hold, d)


def parse_account(d: Mapping[str, Any]) -> Account:
    holds = d.get("holds")  # an empty Lua table comes out as {}, not []
    return _parse(Account, d, open_holds=tuple(map(parse_hold, holds)) if isinstance(holds, list) else ())


def parse_transaction(d: Mapping[str, Any]) -> Transaction:
    return _parse(Transaction, d, user_id=str(d["id"]).rpartition("/")[0])  # ids are "<user_id>/<seq>"


def _hold_result(d: Mapping[str, Any]) -> HoldResult:
    tx = d.get("tx")  # null for a release that changed nothing
    return HoldResult(
        hold=parse_hold(d["hold"]),
        account=parse_account(d["account"]),
        transaction=parse_transaction(tx) if isinstance(tx, dict) else None,
    )


def _account_result(d: Mapping[str, Any]) -> AccountResult:
    return AccountResult(account=parse_account(d["account"]), transaction=parse_transaction(d["tx"]))


def _transfer_result(d: Mapping[str, Any]) -> TransferResult:
    return TransferResult(
        from_account=parse_account(d["from_account"]),
        to_account=parse_account(d["to_account"]),
        outgoing=parse_transaction(d["out_tx"]),
        incoming=parse_transaction(d["in_tx"]),
    )


def _report_abandoned(task: asyncio.Task[dict[str, Any]]) -> None:
    """Done callback of a transfer's finishing task whose caller went away: nobody else will hear
    how it ended."""
    if task.cancelled():
        log.warning("a transfer's second step was cancelled; the recovery sweep will finish it")
    elif (error := task.exception()) is not None:
        log.warning("a transfer whose caller went away ended in %s: %s", type(error).__name__, error)


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
        self._finishing: set[asyncio.Task[dict[str, Any]]] = set()  # transfers past their debit
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
        """The script's answer, parsed from JSON (a dict); its refusals raised as domain errors."""
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

    # --- reads ------------------------------------------------------------------------------------

    async def account(self, user_id: str) -> Account:
        return parse_account((await self._run(user_id, {"op": "read"}))["account"])

    async def hold(self, user_id: str, hold_id: str) -> Hold:
        found = (await self._run(user_id, {"op": "read", "hold_id": hold_id})).get("hold")
        if not isinstance(found, dict) or found.get("user") != user_id:
            raise NotFound(f"no hold {hold_id} for this user", reason="HOLD_NOT_FOUND", metadata={"hold_id": hold_id})
        return parse_hold(found)

    async def transactions(self, user_id: str, page_size: int, before_seq: int | None) -> TransactionPage:
        """Newest first, ``page_size`` of them before ``before_seq`` (None: from the newest)."""
        request: dict[str, Any] = {"op": "read", "page_size": page_size}
        if before_seq is not None:
            request["before"] = before_seq
        result = await self._run(user_id, request)
        rows = [parse_transaction(json.loads(row)) for row in result["txs"]]
        more = len(rows) > page_size
        rows = rows[:page_size]
        return TransactionPage(rows, rows[-1].seq if more else None)

    # --- single-user mutations --------------------------------------------------------------------

    async def reserve(
        self, user_id: str, request_id: str, fp: str, *, run_id: str, estimate: int, ttl_ms: int
    ) -> HoldResult:
        request = {
            "op": "reserve", "request_id": request_id, "fp": fp, "hold_id": uuid.uuid4().hex,
            "run_id": run_id, "estimate": estimate, "ttl_ms": ttl_ms,
        }  # fmt: skip
        return _hold_result(await self._run(user_id, request, "ReserveHold", request_id))

    async def capture(self, user_id: str, request_id: str, fp: str, *, hold_id: str, cost: int) -> HoldResult:
        request = {"op": "capture", "request_id": request_id, "fp": fp, "hold_id": hold_id, "cost": cost}
        return _hold_result(await self._run(user_id, request, "CaptureHold", request_id))

    async def release(
        self, user_id: str, request_id: str, fp: str, *, hold_id: str, reason: str, memo: str
    ) -> HoldResult:
        request = {
            "op": "release", "request_id": request_id, "fp": fp, "hold_id": hold_id, "reason": reason, "memo": memo,
        }  # fmt: skip
        return _hold_result(await self._run(user_id, request, "ReleaseHold", request_id))

    async def set_token_balance(self, user_id: str, request_id: str, fp: str, *, token_balance: int) -> AccountResult:
        request = {"op": "set_tokens", "request_id": request_id, "fp": fp, "token_balance": token_balance}
        return _account_result(await self._run(user_id, request, "SetTokenBalance", request_id))

    async def credit(
        self, user_id: str, request_id: str, fp: str, *, qoints: int, reference: str, source: str, memo: str
    ) -> AccountResult:
        """An external reference belongs to one user, ever: a claim in its own slot, then the credit
        in the user's slot. A reference claimed by another user is refused first, whatever the request.
        The claim is taken only by a request the user's slot has just accepted (the same checks, run
        once without writing), so a refused request binds nothing. Between the two steps a crash, or
        a concurrent request that changes the user's account, can leave a claim without its credit:
        the reference then stays bound to this user, and a retry completes the credit."""
        request = {
            "op": "credit", "request_id": request_id, "fp": fp, "qoints": qoints, "ref": reference,
            "source": source, "memo": memo,
        }  # fmt: skip
        claim = f"pts:extref:{{{reference}}}"
        owner = await self._unavailable_guard(self.redis.get(claim))
        if owner is None:
            checked = await self._run(user_id, {**request, "check_only": True}, "CreditQoints", request_id)
            if "checked" not in checked:
                return _account_result(checked)  # the remembered answer to this request_id
            if not await self._unavailable_guard(self.redis.set(claim, user_id, nx=True)):
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
        return _account_result(await self._run(user_id, request, "CreditQoints", request_id))

    # --- transfers (two users, two slots) ---------------------------------------------------------

    async def transfer(
        self, from_user: str, to_user: str, request_id: str, fp: str, *, qoints: int, memo: str
    ) -> TransferResult:
        """Debit, credit, done: crash-safe across slots (see lua/ledger.lua and the README).

        The attempt adds an index entry of its own before the debit, so that the recovery sweep finds
        the transfer if the process dies after it; an attempt the script refuses removes its entry
        again (a refused request writes nothing). Once the sender is debited, the rest runs in a task
        that the caller going away (deadline, cancellation) does not stop."""
        xfer_id = uuid.uuid5(_TRANSFER_NS, f"{from_user}\n{request_id}").hex
        member = f"{from_user}\n{xfer_id}\n{uuid.uuid4().hex}"
        await self._unavailable_guard(self.redis.zadd(PENDING_TRANSFERS, {member: self.clock.now_ms()}))
        request = {
            "op": "xfer_out", "request_id": request_id, "fp": fp, "xfer_id": xfer_id, "to": to_user,
            "qoints": qoints, "memo": memo,
        }  # fmt: skip
        try:
            started = await self._run(from_user, request, "TransferQoints", request_id)
        except Unavailable:
            raise  # the debit may have happened: the entry stays for the sweep
        except DomainError:
            await self._unindex(member)  # refused before any write
            raise
        if "done" in started:
            await self._unindex(member)
            return _transfer_result(json.loads(started["done"]))
        return _transfer_result(await self._carry_forward(started["record"], member))

    async def _carry_forward(self, record: dict[str, Any], member: str) -> dict[str, Any]:
        """Steps 2 and 3 in a task of their own: cancelling the caller (a deadline, a client gone)
        cancels only its wait, so the receiver is credited moments after the debit whatever the
        caller does. Only the process dying, or Redis failing, leaves it to the recovery sweep."""

        async def finish() -> dict[str, Any]:
            if self.after_transfer_debit is not None:
                await self.after_transfer_debit()
            return await self._finish_transfer(record, member)

        task = asyncio.create_task(finish(), name=f"transfer-{record['xfer_id']}")
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_report_abandoned)
            raise

    async def drain(self) -> None:
        """Wait (up to DRAIN_SECONDS) for transfers whose callers went away to finish; before closing
        the Redis client. What is still running then is left to the next process's sweep."""
        if self._finishing:
            await asyncio.wait(set(self._finishing), timeout=DRAIN_SECONDS)

    async def _unindex(self, member: str) -> None:
        """Remove an attempt's index entry; if Redis does not answer, the sweep drops it later."""
        with contextlib.suppress(Unavailable):
            await self._unavailable_guard(self.redis.zrem(PENDING_TRANSFERS, member))

    async def _finish_transfer(self, record: dict[str, Any], member: str) -> dict[str, Any]:
        from_user, xfer_id = record["from"], record["xfer_id"]
        try:
            incoming = await self._run(
                record["to"],
                {"op": "xfer_in", "xfer_id": xfer_id, "from": from_user, "qoints": int(record["qoints"]),
                 "memo": record["memo"], "request_id": record["request_id"]},
            )  # fmt: skip
        except FailedPrecondition:
            # The receiver cannot take them (balance limit): give them back to the sender, once.
            await self._run(from_user, {"op": "xfer_revert", "xfer_id": xfer_id})
            await self._unindex(member)
            raise
        sender = record.get("account")
        if sender is None:
            sender = (await self._run(from_user, {"op": "read"}))["account"]
        result = {
            "from_account": sender, "to_account": incoming["account"],
            "out_tx": record["out_tx"], "in_tx": incoming["tx"],
        }  # fmt: skip
        final: dict[str, Any] = await self._run(
            from_user,
            {"op": "xfer_done", "xfer_id": xfer_id, "request_id": record["request_id"], "fp": record["fp"],
             "result": json.dumps(result)},
            "TransferQoints",
            record["request_id"],
        )  # fmt: skip
        await self._unindex(member)
        return final

    async def recover_transfers(self, older_than_ms: int) -> int:
        """Carry forward the transfers whose attempt began over ``older_than_ms`` ago and is still
        between its two sides (its process died, or Redis failed between the steps); returns how many."""
        now = self.clock.now_ms()
        cutoff = now - older_than_ms
        entries = await self._unavailable_guard(
            self.redis.zrangebyscore(PENDING_TRANSFERS, "-inf", cutoff, withscores=True)
        )
        finished = 0
        for raw, score in entries:
            member = raw.decode()
            from_user, xfer_id = member.split("\n")[:2]
            record = (await self._run(from_user, {"op": "xfer_record", "xfer_id": xfer_id})).get("record")
            if record is None and score > now - _UNSTARTED_KEEP_MS:
                continue
            if record is None or record["state"] in ("DONE", "REVERTED"):
                await self._unavailable_guard(self._drop_if_stale(keys=[PENDING_TRANSFERS], args=[member, cutoff]))
                continue
            with contextlib.suppress(FailedPrecondition):  # reverted: the sender has the qoints back
                await self._finish_transfer(record, member)
            finished += 1
        return finished
