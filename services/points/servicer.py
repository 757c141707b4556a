"""gRPC handlers of PointsService: validate at the edge, call the ledger, convert the result."""

from __future__ import annotations

from typing import TypeVar

import grpc
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from common.gpu import GPU_NAMES
from common.idempotency import clear_if_zero, fingerprint
from common.validation import Violations, decode_page_token, encode_page_token
from stationthis.points.v1 import points_pb2, points_service_pb2, points_service_pb2_grpc

from . import convert
from .economy import Economy
from .store import HoldResult, LedgerStore

SVC = points_service_pb2
H = TypeVar("H", SVC.ReserveHoldResponse, SVC.CaptureHoldResponse, SVC.ReleaseHoldResponse)
MAX_AMOUNT = 10**12  # per operation; balances stay far below 2^53
MAX_TOKENS = 10**13
MIN_TTL_SECONDS, MAX_TTL_SECONDS = 60, 86_400
MAX_GPU_SECONDS = 7 * 86_400
HOLD_ID_LENGTH = 32
MAX_MEMO = 500
MAX_REFERENCE = 256


def _hold_id(check: Violations, value: str) -> None:
    if len(value) != HOLD_ID_LENGTH or any(c not in "0123456789abcdef" for c in value):
        check.add("hold_id", "is not a hold id (32 lower-case hex digits)")


def _usage_violations(check: Violations, gpu: int, seconds: int, nanos: int, prefix: str) -> None:
    if gpu not in GPU_NAMES:
        check.add(f"{prefix}gpu", "must be a known GPU type, not GPU_TYPE_UNSPECIFIED")
    if seconds < 0 or nanos < 0 or nanos >= 1_000_000_000:
        check.add(f"{prefix}gpu_time", "must not be negative")
    elif seconds > MAX_GPU_SECONDS:
        check.add(f"{prefix}gpu_time", f"must be at most {MAX_GPU_SECONDS} seconds")


def _enum_name(check: Violations, field: str, enum: EnumTypeWrapper, value: int, prefix: str) -> str:
    """The name of a required enum value without its prefix ("" and a violation for UNSPECIFIED or a
    number the contract does not define: proto3 enums are open, so such numbers do arrive)."""
    names = [v.name.removeprefix(prefix) for v in enum.DESCRIPTOR.values if v.number]
    if value and value in enum.values():
        return enum.Name(value).removeprefix(prefix)
    choices = f"{', '.join(names[:-1])} or {names[-1]}"
    check.add(field, f"is required: one of {choices}" if not value else f"must be one of {choices}")
    return ""


def _hold_response(response: type[H], result: HoldResult) -> H:
    return response(
        hold=convert.hold(result.hold),
        account=convert.account(result.account),
        transaction=convert.transaction(result.transaction) if result.transaction is not None else None,
    )


class PointsServicer(points_service_pb2_grpc.PointsServiceServicer):
    def __init__(self, ledger: LedgerStore, economy: Economy, hold_estimate: int, hold_ttl_seconds: int) -> None:
        self.ledger = ledger
        self.economy = economy
        self.hold_estimate = hold_estimate
        self.hold_ttl_seconds = hold_ttl_seconds

    async def GetAccount(
        self, request: SVC.GetAccountRequest, context: grpc.aio.ServicerContext
    ) -> SVC.GetAccountResponse:
        check = Violations()
        check.user_id("user_id", request.user_id)
        check.check()
        return SVC.GetAccountResponse(account=convert.account(await self.ledger.account(request.user_id)))

    async def GetHold(self, request: SVC.GetHoldRequest, context: grpc.aio.ServicerContext) -> SVC.GetHoldResponse:
        check = Violations()
        check.user_id("user_id", request.user_id)
        _hold_id(check, request.hold_id)
        check.check()
        return SVC.GetHoldResponse(hold=convert.hold(await self.ledger.hold(request.user_id, request.hold_id)))

    async def ReserveHold(
        self, request: SVC.ReserveHoldRequest, context: grpc.aio.ServicerContext
    ) -> SVC.ReserveHoldResponse:
        check = Violations()
        check.request_id(request.request_id)
        check.user_id("user_id", request.user_id)
        check.text("run_id", request.run_id, 128)
        check.amount("estimate_points", request.estimate_points, MAX_AMOUNT, allow_zero=True)
        ttl_seconds = self.hold_ttl_seconds
        if request.HasField("ttl") and (request.ttl.seconds or request.ttl.nanos):
            ttl_seconds = request.ttl.seconds
            if request.ttl.nanos or not MIN_TTL_SECONDS <= ttl_seconds <= MAX_TTL_SECONDS:
                check.add("ttl", f"must be whole seconds from {MIN_TTL_SECONDS} to {MAX_TTL_SECONDS}")
        check.check()
        result = await self.ledger.reserve(
            request.user_id,
            request.request_id,
            fingerprint(request, normalize=lambda r: clear_if_zero(r, "ttl")),  # unset and 0s: the default
            run_id=request.run_id,
            estimate=request.estimate_points or self.hold_estimate,
            ttl_ms=ttl_seconds * 1000,
        )
        return _hold_response(SVC.ReserveHoldResponse, result)

    async def CaptureHold(
        self, request: SVC.CaptureHoldRequest, context: grpc.aio.ServicerContext
    ) -> SVC.CaptureHoldResponse:
        check = Violations()
        check.request_id(request.request_id)
        check.user_id("user_id", request.user_id)
        _hold_id(check, request.hold_id)
        which = request.WhichOneof("cost")
        if which == "cost_points":
            check.amount("cost_points", request.cost_points, MAX_AMOUNT)
        elif which == "usage":
            usage = request.usage
            _usage_violations(check, usage.gpu, usage.gpu_time.seconds, usage.gpu_time.nanos, "usage.")
        else:
            check.add("cost", "one of cost_points or usage is required")
        check.check()
        if which == "usage":
            cost = self.economy.quote(request.usage.gpu, request.usage.gpu_time.seconds, request.usage.gpu_time.nanos)
            cost_points = cost.cost_points
        else:
            cost_points = request.cost_points
        result = await self.ledger.capture(
            request.user_id,
            request.request_id,
            fingerprint(request, normalize=lambda r: clear_if_zero(r.usage, "gpu_time")),  # unset and 0s: 0s
            hold_id=request.hold_id,
            cost=cost_points,
        )
        return _hold_response(SVC.CaptureHoldResponse, result)

    async def ReleaseHold(
        self, request: SVC.ReleaseHoldRequest, context: grpc.aio.ServicerContext
    ) -> SVC.ReleaseHoldResponse:
        check = Violations()
        check.request_id(request.request_id)
        check.user_id("user_id", request.user_id)
        _hold_id(check, request.hold_id)
        check.text("memo", request.memo, MAX_MEMO)
        reason = _enum_name(check, "reason", points_pb2.ReleaseReason, request.reason, "RELEASE_REASON_")
        check.check()
        result = await self.ledger.release(
            request.user_id,
            request.request_id,
            fingerprint(request),
            hold_id=request.hold_id,
            reason=reason,
            memo=request.memo,
        )
        return _hold_response(SVC.ReleaseHoldResponse, result)

    async def CreditQoints(
        self, request: SVC.CreditQointsRequest, context: grpc.aio.ServicerContext
    ) -> SVC.CreditQointsResponse:
        check = Violations()
        check.request_id(request.request_id)
        check.user_id("user_id", request.user_id)
        check.amount("qoints", request.qoints, MAX_AMOUNT)
        check.text("external_reference", request.external_reference, MAX_REFERENCE, required=True)
        source = _enum_name(check, "source", points_pb2.QointsSource, request.source, "QOINTS_SOURCE_")
        check.text("memo", request.memo, MAX_MEMO)
        check.check()
        result = await self.ledger.credit(
            request.user_id,
            request.request_id,
            fingerprint(request),
            qoints=request.qoints,
            reference=request.external_reference,
            source=source,
            memo=request.memo,
        )
        return SVC.CreditQointsResponse(
            account=convert.account(result.account), transaction=convert.transaction(result.transaction)
        )

    async def TransferQoints(
        self, request: SVC.TransferQointsRequest, context: grpc.aio.ServicerContext
    ) -> SVC.TransferQointsResponse:
        check = Violations()
        check.request_id(request.request_id)
        check.user_id("from_user_id", request.from_user_id)
        check.user_id("to_user_id", request.to_user_id)
        if request.from_user_id and request.from_user_id == request.to_user_id:
            check.add("to_user_id", "must differ from from_user_id")
        check.amount("qoints", request.qoints, MAX_AMOUNT)
        check.text("memo", request.memo, MAX_MEMO)
        check.check()
        result = await self.ledger.transfer(
            request.from_user_id,
            request.to_user_id,
            request.request_id,
            fingerprint(request),
            qoints=request.qoints,
            memo=request.memo,
        )
        return SVC.TransferQointsResponse(
            from_account=convert.account(result.from_account),
            to_account=convert.account(result.to_account),
            outgoing_transaction=convert.transaction(result.outgoing),
            incoming_transaction=convert.transaction(result.incoming),
        )

    async def SetTokenBalance(
        self, request: SVC.SetTokenBalanceRequest, context: grpc.aio.ServicerContext
    ) -> SVC.SetTokenBalanceResponse:
        check = Violations()
        check.request_id(request.request_id)
        check.user_id("user_id", request.user_id)
        check.amount("token_balance", request.token_balance, MAX_TOKENS, allow_zero=True)
        check.check()
        result = await self.ledger.set_token_balance(
            request.user_id, request.request_id, fingerprint(request), token_balance=request.token_balance
        )
        return SVC.SetTokenBalanceResponse(
            account=convert.account(result.account), transaction=convert.transaction(result.transaction)
        )

    async def QuoteCost(
        self, request: SVC.QuoteCostRequest, context: grpc.aio.ServicerContext
    ) -> SVC.QuoteCostResponse:
        check = Violations()
        _usage_violations(check, request.gpu, request.gpu_time.seconds, request.gpu_time.nanos, "")
        check.check()
        quote = self.economy.quote(request.gpu, request.gpu_time.seconds, request.gpu_time.nanos)
        return SVC.QuoteCostResponse(
            cost_points=quote.cost_points,
            usd_per_second=str(quote.usd_per_second),
            usd_cost=format(quote.usd_cost.normalize(), "f"),
            minimum_applied=quote.minimum_applied,
            multiplier=format(self.economy.multiplier.normalize(), "f"),
            usd_per_point=format(self.economy.usd_per_point.normalize(), "f"),
        )

    async def ListTransactions(
        self, request: SVC.ListTransactionsRequest, context: grpc.aio.ServicerContext
    ) -> SVC.ListTransactionsResponse:
        check = Violations()
        check.user_id("user_id", request.user_id)
        page_size = check.page_size(request.page_size)
        check.check()
        before = None
        if request.page_token:
            before = decode_page_token(request.page_token, {"u": request.user_id}).get("s")
            if type(before) is not int or before < 1:
                decode_page_token("", {"u": request.user_id})  # raises INVALID_PAGE_TOKEN
        page = await self.ledger.transactions(request.user_id, page_size, before)
        return SVC.ListTransactionsResponse(
            transactions=[convert.transaction(t) for t in page.transactions],
            next_page_token=encode_page_token({"u": request.user_id, "s": page.next_before})
            if page.next_before
            else "",
        )
