"""The points ledger store: Redis, one Lua script call per single-user operation.

``RedisLedger`` owns the key layout and the scripts (``lua/ledger.lua``) and implements
``store.LedgerStore``: it parses the script's JSON (short keys; numbers, or decimal strings in
records written before docs/decisions/0011) into the typed records of ``store`` and raises domain
errors. It knows nothing of gRPC.

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
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import attrgetter
from pathlib import Path
from typing import Any, Protocol, TypeVar, get_type_hints

import redis.asyncio as aioredis
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
from common.redis_client import answered

from .economy import Economy
from .store import Account, AccountResult, Hold, HoldResult, Transaction, TransactionPage, TransferResult

_LUA = Path(__file__).parent / "lua"
SCRIPT = (_LUA / "ledger.lua").read_text()  # what every script starts with
# The script of each group of operations: ledger.lua, then the group's file (see lua/ledger.lua).
GROUPS = {name: SCRIPT + (_LUA / f"{name}.lua").read_text() for name in ("holds", "reads", "credits", "transfers")}
# The names in the scripts that script_text replaces with the values of the settings.
CONSTANTS = (
    "PERIOD_MS", "REGEN_PERIODS", "TOKEN_OFFSET", "TOKEN_DIVISOR", "MAX_OPEN", "IDEM_TTL", "RETENTION", "MAX_BALANCE",
)  # fmt: skip
_CONSTANT = re.compile(rf"\b({'|'.join(CONSTANTS)})\b")
# Each operation (ARGV[1]) and its group; each call is one span named "ledger <op>".
OPS = {
    "reserve": "holds", "capture": "holds", "release": "holds",
    "account": "reads", "hold": "reads", "txs": "reads",
    "credit": "credits", "set_tokens": "credits",
    "xfer_out": "transfers", "xfer_in": "transfers", "xfer_done": "transfers", "xfer_revert": "transfers",
    "xfer_record": "transfers",
}  # fmt: skip
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


_CREATED = attrgetter("create_ms")


def parse_account(d: Mapping[str, Any]) -> Account:
    holds = d.get("holds")  # in replies stored before 0011, an empty Lua table came out as {}, not []
    open_holds = tuple(sorted(map(parse_hold, holds), key=_CREATED)) if isinstance(holds, list) else ()
    return _parse(Account, d, open_holds=open_holds)


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


def script_text(settings: LedgerSettings, group: str) -> str:
    """The script of a group of operations, its fixed parameters written in as constants: they reach
    Redis once, in SCRIPT LOAD, instead of being sent and decoded on every call (docs/decisions/0011)."""
    economy = settings.economy
    constants = {
        "PERIOD_MS": economy.regen_period_seconds * 1000,
        "REGEN_PERIODS": economy.regen_periods,
        "TOKEN_OFFSET": economy.token_offset,
        "TOKEN_DIVISOR": economy.token_divisor,
        "MAX_OPEN": settings.max_open_holds,
        "IDEM_TTL": settings.idempotency_ttl_seconds,
        "RETENTION": settings.retention_seconds,
        "MAX_BALANCE": MAX_BALANCE,
    }
    return _CONSTANT.sub(lambda name: str(int(constants[name.group()])), GROUPS[group])


class RedisLedger:
    def __init__(
        self, client: aioredis.Redis, settings: LedgerSettings | None = None, clock: Clock | None = None
    ) -> None:
        self.redis = client
        self.settings = settings or LedgerSettings()
        self.clock = clock or SystemClock()
        self._scripts = {group: client.register_script(script_text(self.settings, group)) for group in GROUPS}
        self._drop_if_stale = client.register_script(_DROP_IF_STALE)
        self._tracer = trace.get_tracer("stationthis.points.ledger")  # after telemetry.setup: no proxy
        connection = client.connection_pool.connection_kwargs
        # Built once: each span gets its name and attributes as they are (docs/decisions/0008, 0011).
        self._span_attributes = {
            "db.system": "redis",
            "db.operation.name": "EVALSHA",
            "server.address": str(connection.get("host", connection.get("path", ""))),
        }
        self._span_names = {op: f"ledger {op}" for op in OPS}
        self._finishing: set[asyncio.Task[dict[str, Any]]] = set()  # transfers past their debit
        # Test seam: awaited between the two sides of a transfer (a crash test makes it exit).
        self.after_transfer_debit: Callable[[], Awaitable[None]] | None = None

    # --- plumbing ---------------------------------------------------------------------------------

    def _args(self, op: str, user_id: str, request_id: str, fp: str, args: Sequence[str | int]) -> list[str | int]:
        """The script's ARGV: op, now, user, request id, fingerprint, then the operation's own."""
        return [op, self.clock.now_ms(), user_id, request_id, fp, *args]

    @staticmethod
    def _keys(user_id: str, keys: Sequence[str]) -> list[str]:
        """The script's KEYS: account, open holds and ledger, then the operation's own keys."""
        pfx = prefix(user_id)
        return [f"{pfx}:acct", f"{pfx}:open", f"{pfx}:tx", *keys]

    async def _run(
        self,
        op: str,
        user_id: str,
        keys: Sequence[str] = (),
        args: Sequence[str | int] = (),
        request_id: str = "",
        fp: str = "",
    ) -> Any:
        """The script's answer, parsed from JSON (a dict); its refusals raised as domain errors."""
        raw = await self._eval(
            self._scripts[OPS[op]], op, self._keys(user_id, keys), self._args(op, user_id, request_id, fp, args)
        )
        if raw[:1] != b"{":  # a mutation's reply comes after its fingerprint line (lua/ledger.lua)
            raw = raw[raw.index(b"\n") + 1 :]
        result = json.loads(raw)
        if "error" in result:
            _raise(result)
        return result

    async def _eval(self, script: Any, op: str, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        """One script call, in one client span named by ledger operation. The span is started and
        ended by hand (no context manager, not made current: nothing inside starts a span) with the
        attributes built once. The Redis instrumentation's own span per command is suppressed: it
        formats every argument on each call (docs/decisions/0008)."""
        span = self._tracer.start_span(
            self._span_names.get(op) or f"ledger {op}", kind=trace.SpanKind.CLIENT, attributes=self._span_attributes
        )
        try:
            with suppress_instrumentation():
                return await self._unavailable_guard(script(keys=keys, args=args))
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            span.end()

    async def _unavailable_guard(self, call: Awaitable[Any]) -> Any:
        return await answered(call, "the points store did not answer; retry with the same request_id")

    @staticmethod
    def _idem(user_id: str, rpc: str, request_id: str) -> str:
        return f"{prefix(user_id)}:idem:{rpc}:{request_id}"

    @staticmethod
    def _hold_key(user_id: str, hold_id: str) -> str:
        return f"{prefix(user_id)}:hold:{hold_id}"

    # --- reads ------------------------------------------------------------------------------------

    async def account(self, user_id: str) -> Account:
        return parse_account((await self._run("account", user_id))["account"])

    async def hold(self, user_id: str, hold_id: str) -> Hold:
        found = (await self._run("hold", user_id, [self._hold_key(user_id, hold_id)], [hold_id])).get("hold")
        if not isinstance(found, dict) or found.get("user") != user_id:
            raise NotFound(f"no hold {hold_id} for this user", reason="HOLD_NOT_FOUND", metadata={"hold_id": hold_id})
        return parse_hold(found)

    async def transactions(self, user_id: str, page_size: int, before_seq: int | None) -> TransactionPage:
        """Newest first, ``page_size`` of them before ``before_seq`` (None: from the newest)."""
        result = await self._run("txs", user_id, (), [page_size, "" if before_seq is None else before_seq])
        rows = [parse_transaction(row) for row in result["txs"]]
        more = len(rows) > page_size
        rows = rows[:page_size]
        return TransactionPage(rows, rows[-1].seq if more else None)

    # --- single-user mutations --------------------------------------------------------------------

    async def reserve(
        self, user_id: str, request_id: str, fp: str, *, run_id: str, estimate: int, ttl_ms: int
    ) -> HoldResult:
        hold_id = uuid.uuid4().hex
        keys = [self._idem(user_id, "ReserveHold", request_id), self._hold_key(user_id, hold_id)]
        result = await self._run("reserve", user_id, keys, [hold_id, run_id, estimate, ttl_ms], request_id, fp)
        return _hold_result(result)

    async def capture(self, user_id: str, request_id: str, fp: str, *, hold_id: str, cost: int) -> HoldResult:
        keys = [self._idem(user_id, "CaptureHold", request_id), self._hold_key(user_id, hold_id)]
        return _hold_result(await self._run("capture", user_id, keys, [hold_id, cost], request_id, fp))

    async def release(
        self, user_id: str, request_id: str, fp: str, *, hold_id: str, reason: str, memo: str
    ) -> HoldResult:
        keys = [self._idem(user_id, "ReleaseHold", request_id), self._hold_key(user_id, hold_id)]
        return _hold_result(await self._run("release", user_id, keys, [hold_id, reason, memo], request_id, fp))

    async def set_token_balance(self, user_id: str, request_id: str, fp: str, *, token_balance: int) -> AccountResult:
        keys = [self._idem(user_id, "SetTokenBalance", request_id)]
        return _account_result(await self._run("set_tokens", user_id, keys, [token_balance], request_id, fp))

    async def credit(
        self, user_id: str, request_id: str, fp: str, *, qoints: int, reference: str, source: str, memo: str
    ) -> AccountResult:
        """An external reference belongs to one user, ever: a claim in its own slot, then the credit
        in the user's slot. A reference claimed by another user is refused first, whatever the request.
        The claim is taken only by a request the user's slot has just accepted (the same checks, run
        once without writing), so a refused request binds nothing. Between the two steps a crash, or
        a concurrent request that changes the user's account, can leave a claim without its credit:
        the reference then stays bound to this user, and a retry completes the credit."""
        keys = [self._idem(user_id, "CreditQoints", request_id), f"{prefix(user_id)}:extref:{reference}"]
        args: list[str | int] = [qoints, reference, source, memo]
        claim = f"pts:extref:{{{reference}}}"
        owner = await self._unavailable_guard(self.redis.get(claim))
        if owner is None:
            checked = await self._run("credit", user_id, keys, [*args, "1"], request_id, fp)
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
        return _account_result(await self._run("credit", user_id, keys, [*args, ""], request_id, fp))

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
        keys = [self._idem(from_user, "TransferQoints", request_id), self._transfer_key(from_user, xfer_id)]
        try:
            started = await self._run("xfer_out", from_user, keys, [xfer_id, to_user, qoints, memo], request_id, fp)
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

    @staticmethod
    def _transfer_key(from_user: str, xfer_id: str) -> str:
        return f"{prefix(from_user)}:xfer:{xfer_id}"

    async def _unindex(self, member: str) -> None:
        """Remove an attempt's index entry; if Redis does not answer, the sweep drops it later."""
        with contextlib.suppress(Unavailable):
            await self._unavailable_guard(self.redis.zrem(PENDING_TRANSFERS, member))

    async def _finish_transfer(self, record: dict[str, Any], member: str) -> dict[str, Any]:
        from_user, to_user, xfer_id = record["from"], record["to"], record["xfer_id"]
        request_id, record_key = record["request_id"], self._transfer_key(from_user, xfer_id)
        try:
            incoming = await self._run(
                "xfer_in", to_user, [f"{prefix(to_user)}:xfer_in:{xfer_id}"],
                [xfer_id, from_user, int(record["qoints"]), record["memo"]], request_id,
            )  # fmt: skip
        except FailedPrecondition:
            # The receiver cannot take them (balance limit): give them back to the sender, once.
            await self._run("xfer_revert", from_user, [record_key], [xfer_id])
            await self._unindex(member)
            raise
        sender = record.get("account")
        if sender is None:
            sender = (await self._run("account", from_user))["account"]
        result = {
            "from_account": sender, "to_account": incoming["account"],
            "out_tx": record["out_tx"], "in_tx": incoming["tx"],
        }  # fmt: skip
        final: dict[str, Any] = await self._run(
            "xfer_done", from_user, [self._idem(from_user, "TransferQoints", request_id), record_key],
            [xfer_id, json.dumps(result)], request_id, record["fp"],
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
            found = await self._run("xfer_record", from_user, [self._transfer_key(from_user, xfer_id)], [xfer_id])
            record = found.get("record")
            if record is None and score > now - _UNSTARTED_KEEP_MS:
                continue
            if record is None or record["state"] in ("DONE", "REVERTED"):
                await self._unavailable_guard(self._drop_if_stale(keys=[PENDING_TRANSFERS], args=[member, cutoff]))
                continue
            with contextlib.suppress(FailedPrecondition):  # reverted: the sender has the qoints back
                await self._finish_transfer(record, member)
            finished += 1
        return finished
