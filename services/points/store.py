"""What the points servicer needs from the ledger's storage (CONVENTIONS.md §11), and what it gets back.

``ledger.RedisLedger`` (Redis, one Lua script call per single-user operation) is the implementation
that runs; the servicer knows only ``LedgerStore``. The records are plain typed values: amounts are
ints, times are epoch milliseconds (0: not set), enum values are their contract names without the
enum's prefix ("OPEN", "HOLD_RESERVED", "RUN_FAILED", "PURCHASE"; "" for none). ``convert`` turns
them into protobuf messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Hold:
    hold_id: str
    user_id: str
    run_id: str
    state: str  # HoldState without HOLD_STATE_
    estimate_points: int
    points_held: int
    qoints_held: int
    cost_points: int
    points_charged: int
    qoints_charged: int
    unpaid_points: int
    memo: str
    release_reason: str  # ReleaseReason without RELEASE_REASON_; "" unless released
    create_ms: int
    expire_ms: int
    settle_ms: int  # 0 while OPEN


@dataclass(frozen=True)
class Account:
    user_id: str
    token_balance: int
    max_points: int
    points_used: int
    points_held: int
    points_available: int
    qoints: int
    qoints_held: int
    qoints_available: int
    unpaid_points: int
    exp: int
    next_regeneration_ms: int  # 0 when nothing regenerates
    next_regeneration_points: int
    update_ms: int  # 0 for an account never written
    open_holds: tuple[Hold, ...]  # oldest first


@dataclass(frozen=True)
class Transaction:
    transaction_id: str  # "<user_id>/<seq>"
    user_id: str
    seq: int
    kind: str  # TransactionKind without TRANSACTION_KIND_
    create_ms: int
    points_used_delta: int
    points_held_delta: int
    qoints_delta: int
    qoints_held_delta: int
    exp_delta: int
    unpaid_delta: int
    points_used_after: int
    qoints_after: int
    exp_after: int
    unpaid_after: int
    token_balance_after: int
    max_points_after: int
    hold_id: str
    run_id: str
    external_reference: str
    counterparty_user_id: str
    memo: str
    request_id: str
    qoints_source: str  # QointsSource without QOINTS_SOURCE_; "" unless a credit
    release_reason: str  # "" unless a release


@dataclass(frozen=True)
class HoldResult:
    """ReserveHold, CaptureHold, ReleaseHold."""

    hold: Hold
    account: Account
    transaction: Transaction | None  # None: a release that changed nothing (the hold had expired)


@dataclass(frozen=True)
class AccountResult:
    """CreditQoints, SetTokenBalance."""

    account: Account
    transaction: Transaction


@dataclass(frozen=True)
class TransferResult:
    from_account: Account
    to_account: Account
    outgoing: Transaction
    incoming: Transaction


@dataclass(frozen=True)
class TransactionPage:
    transactions: list[Transaction]  # newest first
    next_before: int | None  # the seq to continue before; None at the end


class LedgerStore(Protocol):
    """Every mutation takes the request's ``request_id`` and ``fp`` (its fingerprint, a hex digest:
    ``common.idempotency.fingerprint``): a repeat returns the first result, other parameters under
    the same id are REQUEST_ID_REUSED. Errors are ``common.errors`` domain errors; a refused request
    writes nothing."""

    async def account(self, user_id: str) -> Account: ...

    async def hold(self, user_id: str, hold_id: str) -> Hold:
        """NOT_FOUND (HOLD_NOT_FOUND) unless the hold exists and belongs to ``user_id``."""
        ...

    async def transactions(self, user_id: str, page_size: int, before_seq: int | None) -> TransactionPage: ...

    async def reserve(
        self, user_id: str, request_id: str, fp: str, *, run_id: str, estimate: int, ttl_ms: int
    ) -> HoldResult: ...

    async def capture(self, user_id: str, request_id: str, fp: str, *, hold_id: str, cost: int) -> HoldResult: ...

    async def release(
        self, user_id: str, request_id: str, fp: str, *, hold_id: str, reason: str, memo: str
    ) -> HoldResult: ...

    async def credit(
        self, user_id: str, request_id: str, fp: str, *, qoints: int, reference: str, source: str, memo: str
    ) -> AccountResult: ...

    async def transfer(
        self, from_user: str, to_user: str, request_id: str, fp: str, *, qoints: int, memo: str
    ) -> TransferResult:
        """Both sides, or (the receiver refusing) neither: see ``ledger.RedisLedger.transfer``."""
        ...

    async def set_token_balance(
        self, user_id: str, request_id: str, fp: str, *, token_balance: int
    ) -> AccountResult: ...
