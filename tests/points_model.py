"""An in-memory model of the StationThis points economy, written from points.proto (not from the Lua).

It is deliberately naive: plain ints, one loop iteration per regeneration boundary, points_held and
qoints_held recomputed from the open holds instead of kept as counters, and idempotency remembered
per RPC method exactly as points_service.proto states it. ``tests/test_points_model.py`` drives it
and the real service with the same random operations and compares them after every step.

Every operation returns a response dict or raises ``ModelError(reason)``, where reason is the
ErrorInfo.reason the service must send.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

# --- the rules' constants (points.proto, gpu.proto, points_service.proto) -------------------------

PERIOD_MS = 15 * 60 * 1000  # regeneration boundaries at :00, :15, :30, :45 (epoch aligned)
REGEN_PERIODS = 18
TOKEN_OFFSET = 199_800
TOKEN_DIVISOR = 540
DEFAULT_ESTIMATE = 100
DEFAULT_TTL_SECONDS = 3600
MIN_TTL_SECONDS, MAX_TTL_SECONDS = 60, 86_400
MAX_OPEN_HOLDS = 3
MINIMUM_CHARGE = 3
USD_PER_POINT = Fraction("0.000337")
MULTIPLIER = 2
# USD per second by GpuType value (defaults documented on stationthis.type.v1.GpuType).
GPU_PRICES = {
    1: Fraction("0.000042"),  # CPU
    2: Fraction("0.000181"),  # T4
    3: Fraction("0.000321"),  # L4
    4: Fraction("0.000337"),  # A10G
    5: Fraction("0.000596"),  # L40S
    6: Fraction("0.00114"),  # A100
    7: Fraction("0.001709"),  # A100-80GB
    8: Fraction("0.002338"),  # H100
    9: Fraction("0.001891"),  # H200
    10: Fraction("0.002604"),  # B200
}
RELEASE_REASONS = {1, 2, 3, 4, 5}  # 0 (UNSPECIFIED) is INVALID_ARGUMENT
QOINTS_SOURCES = {1, 2, 3, 4}
USER_ID = re.compile(r"[A-Za-z0-9._@-]{1,128}")

OPEN, CAPTURED, RELEASED, EXPIRED = "OPEN", "CAPTURED", "RELEASED", "EXPIRED"


class ModelError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def max_points(token_balance: int) -> int:
    return (token_balance + TOKEN_OFFSET) // TOKEN_DIVISOR


def regen_per_period(maximum: int) -> int:
    return math.ceil(Fraction(maximum, REGEN_PERIODS))


def level(exp: int) -> int:
    """The largest L with L**3 <= exp, by counting up."""
    result = 0
    while (result + 1) ** 3 <= exp:
        result += 1
    return result


def quote(gpu: int, seconds: int, nanos: int) -> int:
    """max(3, ceil(gpu_seconds * usd_per_second * 2 / 0.000337)), exactly."""
    gpu_seconds = Fraction(seconds) + Fraction(nanos, 10**9)
    return max(MINIMUM_CHARGE, math.ceil(gpu_seconds * GPU_PRICES[gpu] * MULTIPLIER / USD_PER_POINT))


@dataclass
class Hold:
    hold_id: str
    user: str
    estimate: int
    p: int  # points_held at reserve time (kept as a record)
    q: int  # qoints_held at reserve time (kept as a record)
    created: int
    expires: int
    state: str = OPEN
    settled: int = 0  # when it left OPEN; 0 while OPEN
    cost: int = 0
    points_charged: int = 0
    qoints_charged: int = 0
    unpaid: int = 0

    def view(self) -> dict[str, Any]:
        return {
            "hold_id": self.hold_id,
            "state": self.state,
            "estimate": self.estimate,
            "p": self.p,
            "q": self.q,
            "created": self.created,
            "expires": self.expires,
            "settled": self.settled,
            "cost": self.cost,
            "points_charged": self.points_charged,
            "qoints_charged": self.qoints_charged,
            "unpaid": self.unpaid,
        }


@dataclass
class Account:
    token_balance: int = 0
    points_used: int = 0
    qoints: int = 0
    unpaid: int = 0
    exp: int = 0
    evaluated_period: int | None = None  # the last period the account was evaluated in


@dataclass
class Model:
    now_ms: int
    accounts: dict[str, Account] = field(default_factory=dict)
    holds: dict[str, Hold] = field(default_factory=dict)
    credited_references: set[str] = field(default_factory=set)
    bound_references: dict[str, str] = field(default_factory=dict)  # reference -> the only user it may credit
    remembered: dict[tuple[str, str], tuple[Any, Any]] = field(default_factory=dict)
    ledger: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)
    _next_hold: int = 0

    # --- state ------------------------------------------------------------------------------------

    def _open_holds(self, user: str) -> list[Hold]:
        return sorted((h for h in self.holds.values() if h.user == user and h.state == OPEN), key=lambda h: h.created)

    def _held(self, user: str) -> tuple[int, int]:
        holds = self._open_holds(user)
        return sum(h.p for h in holds), sum(h.q for h in holds)

    def _points_available(self, user: str) -> int:
        a = self.accounts[user]
        return max(0, max_points(a.token_balance) - a.points_used - self._held(user)[0])

    def _qoints_available(self, user: str) -> int:
        return self.accounts[user].qoints - self._held(user)[1]

    def _write(self, user: str, kind: str, request_id: str, hold_id: str = "", **deltas: int) -> None:
        """A ledger entry (the deltas points.proto lists for the kind), with the balances after it."""
        a = self.accounts[user]
        names = ("used", "hp", "q", "hq", "exp", "unpaid")
        after = (a.points_used, a.qoints, a.exp, a.unpaid, a.token_balance, max_points(a.token_balance))
        entry = (kind, hold_id, *(deltas.get(n, 0) for n in names), *after, request_id, self.now_ms)
        self.ledger.setdefault(user, []).append(entry)

    def _evaluate(self, user: str) -> Account:
        """Regeneration, one boundary at a time, then expiry of holds past expire_time."""
        a = self.accounts.setdefault(user, Account())
        period = self.now_ms // PERIOD_MS
        if a.evaluated_period is not None:
            for _ in range(a.evaluated_period, period):
                a.points_used = max(0, a.points_used - regen_per_period(max_points(a.token_balance)))
        if a.evaluated_period is None or period > a.evaluated_period:
            a.evaluated_period = period
        for h in self._open_holds(user):
            if h.expires <= self.now_ms:
                h.state = EXPIRED
                h.settled = h.expires
                self._write(user, "HOLD_EXPIRED", "", h.hold_id, hp=-h.p, hq=-h.q)
        return a

    def view(self, user: str) -> dict[str, Any]:
        """The account as GetAccount returns it now (evaluating it, as any read does)."""
        a = self._evaluate(user)
        maximum = max_points(a.token_balance)
        held_p, held_q = self._held(user)
        regenerates = a.points_used > 0
        return {
            "token_balance": a.token_balance,
            "max_points": maximum,
            "points_used": a.points_used,
            "points_held": held_p,
            "points_available": max(0, maximum - a.points_used - held_p),
            "qoints": a.qoints,
            "qoints_held": held_q,
            "qoints_available": a.qoints - held_q,
            "unpaid_points": a.unpaid,
            "exp": a.exp,
            "level": level(a.exp),
            "next_regeneration_time": (self.now_ms // PERIOD_MS + 1) * PERIOD_MS if regenerates else 0,
            "next_regeneration_points": min(a.points_used, regen_per_period(maximum)) if regenerates else 0,
            "open_holds": sorted((h.hold_id, h.p, h.q, h.estimate, h.expires) for h in self._open_holds(user)),
        }

    # --- idempotency ------------------------------------------------------------------------------

    @staticmethod
    def _request_id(request_id: str) -> None:
        if not 1 <= len(request_id) <= 128 or not all(33 <= ord(c) <= 126 for c in request_id):
            raise ModelError("INVALID_REQUEST")

    def _idempotent(self, method: str, request_id: str, params: Any, run: Any) -> Any:
        """points_service.proto IDEMPOTENCY: per user (params[0], the acting user) and RPC method; only
        successes are remembered."""
        self._request_id(request_id)
        key = (params[0], method, request_id)
        if key in self.remembered:
            first_params, first_response = self.remembered[key]
            if first_params != params:
                raise ModelError("REQUEST_ID_REUSED")
            return first_response
        response = run()
        self.remembered[key] = (params, response)
        return response

    @staticmethod
    def _user(*users: str) -> None:
        if not all(USER_ID.fullmatch(u) for u in users):
            raise ModelError("INVALID_REQUEST")

    def _hold_of(self, user: str, hold_id: str) -> Hold:
        h = self.holds.get(hold_id)
        if h is None or h.user != user:
            raise ModelError("HOLD_NOT_FOUND")
        return h

    # --- the RPCs ---------------------------------------------------------------------------------

    def reserve(self, request_id: str, user: str, estimate: int, ttl_seconds: int | None = None) -> Any:
        self._user(user)
        if estimate < 0 or (ttl_seconds not in (None, 0) and not MIN_TTL_SECONDS <= ttl_seconds <= MAX_TTL_SECONDS):
            raise ModelError("INVALID_REQUEST")

        def run() -> Any:
            self._evaluate(user)
            if len(self._open_holds(user)) >= MAX_OPEN_HOLDS:
                raise ModelError("TOO_MANY_OPEN_HOLDS")
            e = estimate or DEFAULT_ESTIMATE
            from_points = min(e, self._points_available(user))
            from_qoints = min(e - from_points, self._qoints_available(user))
            if from_points + from_qoints < e:
                raise ModelError("INSUFFICIENT_POINTS")
            hold_id = f"h{self._next_hold}"
            self._next_hold += 1
            ttl_ms = (ttl_seconds or DEFAULT_TTL_SECONDS) * 1000
            h = Hold(hold_id, user, e, from_points, from_qoints, self.now_ms, self.now_ms + ttl_ms)
            self.holds[hold_id] = h
            self._write(user, "HOLD_RESERVED", request_id, hold_id, hp=from_points, hq=from_qoints)
            return {"hold": h.view(), "account": self.view(user)}

        # ttl unset and ttl 0 both mean the default: the same parameters (ReserveHoldRequest.ttl)
        return self._idempotent("ReserveHold", request_id, (user, estimate, ttl_seconds or None), run)

    def capture(
        self, request_id: str, user: str, hold_id: str, cost_points: int | None = None, usage: Any = None
    ) -> Any:
        self._user(user)
        if usage is not None:
            gpu, seconds, nanos = usage
            if gpu not in GPU_PRICES or seconds < 0 or not 0 <= nanos < 10**9:
                raise ModelError("INVALID_REQUEST")
            cost = quote(gpu, seconds, nanos)
        else:
            if cost_points is None or cost_points <= 0:
                raise ModelError("INVALID_REQUEST")
            cost = cost_points

        def run() -> Any:
            a = self._evaluate(user)
            h = self._hold_of(user, hold_id)
            if h.state in (CAPTURED, RELEASED):
                raise ModelError("HOLD_ALREADY_SETTLED")
            held_p, held_q = (h.p, h.q) if h.state == OPEN else (0, 0)
            all_p, all_q = self._held(user)
            room_points = max(held_p, max_points(a.token_balance) - a.points_used - (all_p - held_p))
            room_qoints = a.qoints - (all_q - held_q)
            points_charged = min(cost, room_points)
            qoints_charged = min(cost - points_charged, room_qoints)
            rest = cost - points_charged - qoints_charged
            unpaid = 0
            if rest > 0:
                if h.p > 0:  # the run was started on the free allowance: allowance debt
                    points_charged += rest
                else:
                    unpaid = rest
            h.state = CAPTURED
            h.settled = self.now_ms
            h.cost, h.points_charged, h.qoints_charged, h.unpaid = cost, points_charged, qoints_charged, unpaid
            a.points_used += points_charged
            a.qoints -= qoints_charged
            a.unpaid += unpaid
            a.exp += cost
            self._write(
                user, "HOLD_CAPTURED", request_id, hold_id,
                used=points_charged, hp=-held_p, q=-qoints_charged, hq=-held_q, exp=cost, unpaid=unpaid,
            )  # fmt: skip
            return {"hold": h.view(), "account": self.view(user)}

        return self._idempotent("CaptureHold", request_id, (user, hold_id, cost_points, usage), run)

    def release(self, request_id: str, user: str, hold_id: str, reason: int, memo: str = "") -> Any:
        self._user(user)
        if reason not in RELEASE_REASONS or len(memo) > 500:
            raise ModelError("INVALID_REQUEST")

        def run() -> Any:
            self._evaluate(user)
            h = self._hold_of(user, hold_id)
            if h.state == CAPTURED:
                raise ModelError("HOLD_ALREADY_SETTLED")
            changed = h.state == OPEN
            if changed:
                h.state = RELEASED
                h.settled = self.now_ms
                self._write(user, "HOLD_RELEASED", request_id, hold_id, hp=-h.p, hq=-h.q)
            return {"hold": h.view(), "account": self.view(user), "transaction": changed}

        return self._idempotent("ReleaseHold", request_id, (user, hold_id, reason, memo), run)

    def credit(self, request_id: str, user: str, qoints: int, reference: str, source: int = 1, memo: str = "") -> Any:
        self._user(user)
        if qoints <= 0 or not reference or len(reference) > 256 or source not in QOINTS_SOURCES or len(memo) > 500:
            raise ModelError("INVALID_REQUEST")

        self._request_id(request_id)
        # A reference is bound to the first user it is credited to; it can only ever credit them, and
        # this check comes first (CreditQointsRequest.external_reference). A refused request binds nothing.
        if self.bound_references.get(reference, user) != user:
            raise ModelError("DUPLICATE_EXTERNAL_REFERENCE")

        def run() -> Any:
            if reference in self.credited_references:
                raise ModelError("DUPLICATE_EXTERNAL_REFERENCE")
            a = self._evaluate(user)
            self.credited_references.add(reference)
            self.bound_references[reference] = user
            a.qoints += qoints
            self._write(user, "QOINTS_CREDITED", request_id, q=qoints)
            return {"account": self.view(user)}

        return self._idempotent("CreditQoints", request_id, (user, qoints, reference, source, memo), run)

    def transfer(self, request_id: str, from_user: str, to_user: str, qoints: int, memo: str = "") -> Any:
        self._user(from_user, to_user)
        if from_user == to_user or qoints <= 0 or len(memo) > 500:
            raise ModelError("INVALID_REQUEST")

        def run() -> Any:
            sender = self._evaluate(from_user)
            receiver = self._evaluate(to_user)
            if self._qoints_available(from_user) < qoints:
                raise ModelError("INSUFFICIENT_QOINTS")
            sender.qoints -= qoints
            receiver.qoints += qoints
            self._write(from_user, "QOINTS_TRANSFERRED_OUT", request_id, q=-qoints)
            self._write(to_user, "QOINTS_TRANSFERRED_IN", request_id, q=qoints)
            return {"from_account": self.view(from_user), "to_account": self.view(to_user)}

        return self._idempotent("TransferQoints", request_id, (from_user, to_user, qoints, memo), run)

    def set_token_balance(self, request_id: str, user: str, token_balance: int) -> Any:
        self._user(user)
        if token_balance < 0:
            raise ModelError("INVALID_REQUEST")

        def run() -> Any:
            a = self._evaluate(user)  # regeneration up to now at the old max_points
            a.token_balance = token_balance
            self._write(user, "TOKEN_BALANCE_SET", request_id)
            return {"account": self.view(user)}

        return self._idempotent("SetTokenBalance", request_id, (user, token_balance), run)
