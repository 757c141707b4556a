"""gRPC handlers of PointsService: validate at the edge, call the ledger, convert the result."""

from __future__ import annotations

import hashlib
from typing import Any

import grpc
from google.protobuf.message import Message

from common.validation import Violations, decode_page_token, encode_page_token
from stationthis.points.v1 import points_pb2, points_service_pb2, points_service_pb2_grpc

from . import convert
from .economy import GPU_NAMES, Economy
from .ledger import RedisLedger

MAX_AMOUNT = 10**12  # per operation; balances stay far below 2^53
MAX_TOKENS = 10**13
MIN_TTL_SECONDS, MAX_TTL_SECONDS = 60, 86_400
MAX_GPU_SECONDS = 7 * 86_400
HOLD_ID_LENGTH = 32
MAX_MEMO = 500
MAX_REFERENCE = 256


def fingerprint(request: Message) -> str:
    """The request's parameters without its request_id, for telling a replay from a reuse."""
    copy = type(request)()
    copy.CopyFrom(request)
    copy.ClearField("request_id")
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


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


class PointsServicer(points_service_pb2_grpc.PointsServiceServicer):
    def __init__(self, ledger: RedisLedger, economy: Economy, hold_estimate: int, hold_ttl_seconds: int) -> None:
        self.ledger = ledger
        self.economy = economy
        self.hold_estimate = hold_estimate
        self.hold_ttl_seconds = hold_ttl_seconds

    async def GetAccount(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        check = Violations()
        check.user_id("user_id", request.user_id)
        check.check()
        return points_service_pb2.GetAccountResponse(
            account=convert.account(await self.ledger.account(request.user_id))
        )

    async def GetHold(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        check = Violations()
        check.user_id("user_id", request.user_id)
        _hold_id(check, request.hold_id)
        check.check()
        return points_service_pb2.GetHoldResponse(
            hold=convert.hold(await self.ledger.hold(request.user_id, request.hold_id))
        )

    async def ReserveHold(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
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
            fingerprint(request),
            run_id=request.run_id,
            estimate=request.estimate_points or self.hold_estimate,
            ttl_ms=ttl_seconds * 1000,
        )
        return points_service_pb2.ReserveHoldResponse(
            hold=convert.hold(result["hold"]),
            account=convert.account(result["account"]),
            transaction=convert.transaction(result["tx"]),
        )

    async def CaptureHold(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
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
            request.user_id, request.request_id, fingerprint(request), hold_id=request.hold_id, cost=cost_points
        )
        return points_service_pb2.CaptureHoldResponse(
            hold=convert.hold(result["hold"]),
            account=convert.account(result["account"]),
            transaction=convert.transaction(result["tx"]),
        )

    async def ReleaseHold(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        check = Violations()
        check.request_id(request.request_id)
        check.user_id("user_id", request.user_id)
        _hold_id(check, request.hold_id)
        check.text("memo", request.memo, MAX_MEMO)
        if request.reason == points_pb2.RELEASE_REASON_UNSPECIFIED:
            check.add("reason", "is required (why the hold is released)")
        check.check()
        reason = points_pb2.ReleaseReason.Name(request.reason)
        result = await self.ledger.release(
            request.user_id,
            request.request_id,
            fingerprint(request),
            hold_id=request.hold_id,
            reason=reason.removeprefix("RELEASE_REASON_"),
            memo=request.memo,
        )
        return points_service_pb2.ReleaseHoldResponse(
            hold=convert.hold(result["hold"]),
            account=convert.account(result["account"]),
            transaction=convert.transaction(result["tx"]),
        )

    async def CreditQoints(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        check = Violations()
        check.request_id(request.request_id)
        check.user_id("user_id", request.user_id)
        check.amount("qoints", request.qoints, MAX_AMOUNT)
        check.text("external_reference", request.external_reference, MAX_REFERENCE, required=True)
        if request.source == points_pb2.QOINTS_SOURCE_UNSPECIFIED:
            check.add("source", "is required (PURCHASE, GRANT, BONUS or REFUND)")
        check.text("memo", request.memo, MAX_MEMO)
        check.check()
        result = await self.ledger.credit(
            request.user_id,
            request.request_id,
            fingerprint(request),
            qoints=request.qoints,
            reference=request.external_reference,
            source=points_pb2.QointsSource.Name(request.source).removeprefix("QOINTS_SOURCE_"),
            memo=request.memo,
        )
        return points_service_pb2.CreditQointsResponse(
            account=convert.account(result["account"]), transaction=convert.transaction(result["tx"])
        )

    async def TransferQoints(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
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
        return points_service_pb2.TransferQointsResponse(
            from_account=convert.account(result["from_account"]),
            to_account=convert.account(result["to_account"]),
            outgoing_transaction=convert.transaction(result["out_tx"]),
            incoming_transaction=convert.transaction(result["in_tx"]),
        )

    async def SetTokenBalance(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        check = Violations()
        check.request_id(request.request_id)
        check.user_id("user_id", request.user_id)
        check.amount("token_balance", request.token_balance, MAX_TOKENS, allow_zero=True)
        check.check()
        result = await self.ledger.set_token_balance(
            request.user_id, request.request_id, fingerprint(request), token_balance=request.token_balance
        )
        return points_service_pb2.SetTokenBalanceResponse(
            account=convert.account(result["account"]), transaction=convert.transaction(result["tx"])
        )

    async def QuoteCost(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        check = Violations()
        _usage_violations(check, request.gpu, request.gpu_time.seconds, request.gpu_time.nanos, "")
        check.check()
        quote = self.economy.quote(request.gpu, request.gpu_time.seconds, request.gpu_time.nanos)
        return points_service_pb2.QuoteCostResponse(
            cost_points=quote.cost_points,
            usd_per_second=str(quote.usd_per_second),
            usd_cost=format(quote.usd_cost.normalize(), "f"),
            minimum_applied=quote.minimum_applied,
        )

    async def ListTransactions(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        check = Violations()
        check.user_id("user_id", request.user_id)
        page_size = check.page_size(request.page_size)
        check.check()
        before = None
        if request.page_token:
            before = decode_page_token(request.page_token, {"u": request.user_id}).get("s")
            if type(before) is not int or before < 1:
                decode_page_token("", {"u": request.user_id})  # raises INVALID_PAGE_TOKEN
        rows, next_before = await self.ledger.transactions(request.user_id, page_size, before)
        return points_service_pb2.ListTransactionsResponse(
            transactions=[t for t in map(convert.transaction, rows) if t is not None],
            next_page_token=encode_page_token({"u": request.user_id, "s": next_before}) if next_before else "",
        )
