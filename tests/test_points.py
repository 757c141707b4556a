"""PointsService integration tests: real Redis, real gRPC, a fake clock (no mocks, no sleeps to wait for time).

The economy rules under test are those of protos/stationthis/points/v1/points.proto (normative).
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from common import redis_client, telemetry
from services.points.config import PointsConfig
from services.points.ledger import LedgerSettings, RedisLedger, SystemClock
from services.points.server import build
from stationthis.points.v1 import points_pb2, points_service_pb2, points_service_pb2_grpc
from stationthis.type.v1 import gpu_pb2
from tests.conftest import PYTHON, ROOT, python_env, wait_serving
from tests.support import expect_failure, rpc_details

PERIOD_MS = 900_000
T0 = 1_700_000_100_000  # 2023-11-14T22:15:00Z, a 15-minute boundary of the Unix epoch
assert T0 % PERIOD_MS == 0
DOMAIN = "points.stationthis.dev"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
pb = points_pb2
rpc = points_service_pb2
A10G, T4, H100, CPU = gpu_pb2.GPU_TYPE_A10G, gpu_pb2.GPU_TYPE_T4, gpu_pb2.GPU_TYPE_H100, gpu_pb2.GPU_TYPE_CPU


class FakeClock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def now_ms(self) -> int:
        return self.ms

    def advance(self, ms: int) -> None:
        self.ms += ms


def rid() -> str:
    return uuid.uuid4().hex


def seconds(s: int, nanos: int = 0) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=s, nanos=nanos)


details = rpc_details


async def fails(
    call: Awaitable[Any], code: grpc.StatusCode, reason: str
) -> tuple[error_details_pb2.ErrorInfo, error_details_pb2.BadRequest | None]:
    """Await ``call``, expecting ``code`` with ErrorInfo ``reason`` in this service's domain."""
    return await expect_failure(call, code, reason, DOMAIN)


def fields(bad: error_details_pb2.BadRequest | None) -> set[str]:
    assert bad is not None, "no BadRequest"
    return {v.field for v in bad.field_violations}


@dataclass
class Points:
    """A PointsService on a fake clock, with shortcuts for the calls the tests make."""

    stub: points_service_pb2_grpc.PointsServiceStub
    clock: FakeClock
    redis: aioredis.Redis
    app: Any  # PointsApp

    async def account(self, user: str) -> pb.Account:
        return (await self.stub.GetAccount(rpc.GetAccountRequest(user_id=user), timeout=10)).account

    async def hold(self, user: str, hold_id: str) -> pb.Hold:
        return (await self.stub.GetHold(rpc.GetHoldRequest(user_id=user, hold_id=hold_id), timeout=10)).hold

    async def txs(self, user: str, page_size: int = 200) -> list[pb.Transaction]:
        """Every ledger entry of ``user``, newest first, following next_page_token."""
        out: list[pb.Transaction] = []
        token = ""
        while True:
            page = await self.stub.ListTransactions(
                rpc.ListTransactionsRequest(user_id=user, page_size=page_size, page_token=token), timeout=10
            )
            out.extend(page.transactions)
            token = page.next_page_token
            if not token:
                return out

    def credit(self, user: str, qoints: int, ref: str | None = None, request_id: str | None = None, **kw: Any):
        return self.stub.CreditQoints(
            rpc.CreditQointsRequest(
                request_id=request_id or rid(),
                user_id=user,
                qoints=qoints,
                external_reference=ref or f"pay-{rid()}",
                source=kw.pop("source", pb.QOINTS_SOURCE_PURCHASE),
                **kw,
            ),
            timeout=10,
        )

    def reserve(self, user: str, estimate: int = 0, request_id: str | None = None, **kw: Any):
        return self.stub.ReserveHold(
            rpc.ReserveHoldRequest(request_id=request_id or rid(), user_id=user, estimate_points=estimate, **kw),
            timeout=10,
        )

    def capture(self, user: str, hold_id: str, cost: int | None = None, request_id: str | None = None, **kw: Any):
        if cost is not None:
            kw["cost_points"] = cost
        return self.stub.CaptureHold(
            rpc.CaptureHoldRequest(request_id=request_id or rid(), user_id=user, hold_id=hold_id, **kw), timeout=10
        )

    def release(self, user: str, hold_id: str, request_id: str | None = None, **kw: Any):
        kw.setdefault("reason", pb.RELEASE_REASON_RUN_FAILED)
        return self.stub.ReleaseHold(
            rpc.ReleaseHoldRequest(request_id=request_id or rid(), user_id=user, hold_id=hold_id, **kw), timeout=10
        )

    def transfer(self, sender: str, receiver: str, qoints: int, request_id: str | None = None, **kw: Any):
        return self.stub.TransferQoints(
            rpc.TransferQointsRequest(
                request_id=request_id or rid(), from_user_id=sender, to_user_id=receiver, qoints=qoints, **kw
            ),
            timeout=10,
        )

    async def interrupted_transfer(
        self, sender: str, receiver: str, qoints: int, request_id: str
    ) -> grpc.aio.AioRpcError:
        """A transfer that fails between its two sides (an exception at the ledger's test seam): the
        sender is debited, the receiver not credited. Returns the error the caller got."""

        async def boom() -> None:
            raise RuntimeError("interrupted")

        self.app.ledger.after_transfer_debit = boom
        try:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await self.transfer(sender, receiver, qoints, request_id=request_id)
        finally:
            self.app.ledger.after_transfer_debit = None
        return caught.value

    def set_tokens(self, user: str, tokens: int, request_id: str | None = None):
        return self.stub.SetTokenBalance(
            rpc.SetTokenBalanceRequest(request_id=request_id or rid(), user_id=user, token_balance=tokens), timeout=10
        )

    async def store(self) -> dict[bytes, Any]:
        """Every key of the Redis database with its value (the transfer recovery index included): equal
        before and after means nothing was written."""
        state: dict[bytes, Any] = {}
        async for key in self.redis.scan_iter(count=1000):
            kind = (await self.redis.type(key)).decode()
            if kind == "string":
                state[key] = await self.redis.get(key)
            elif kind == "hash":
                state[key] = await self.redis.hgetall(key)
            elif kind == "zset":
                state[key] = await self.redis.zrange(key, 0, -1, withscores=True)
            else:
                state[key] = kind
        return state


@pytest.fixture
async def make_points(redis_url, start_service):
    clients: list[aioredis.Redis] = []

    async def make(clock: FakeClock | None = None, **env: str) -> Points:
        clock = clock or FakeClock(T0)
        running = await start_service(
            lambda config: build(config, clock=clock), PointsConfig, {"REDIS_URL": redis_url, **env}
        )
        await wait_serving(running)
        client = redis_client.connect(redis_url)
        clients.append(client)
        stub = points_service_pb2_grpc.PointsServiceStub(running.channel)
        return Points(stub, clock, client, running.app)

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture
async def points(make_points) -> Points:
    return await make_points()


def check_account(a: pb.Account, holds: bool = True) -> None:
    """The invariants every Account must satisfy (``holds=False``: not its open_holds)."""
    assert a.max_points == (a.token_balance + 199_800) // 540
    assert a.points_available == max(0, a.max_points - a.points_used - a.points_held)
    assert a.points_used >= 0 and a.points_held >= 0 and a.points_available >= 0
    assert 0 <= a.qoints_held <= a.qoints and a.qoints_available == a.qoints - a.qoints_held
    assert a.unpaid_points >= 0 and a.exp >= 0
    assert a.level**3 <= a.exp < (a.level + 1) ** 3
    if not holds:
        return
    assert len({h.hold_id for h in a.open_holds}) == len(a.open_holds)
    assert sum(h.points_held for h in a.open_holds) == a.points_held
    assert sum(h.qoints_held for h in a.open_holds) == a.qoints_held


def check_ledger(a: pb.Account, txs: list[pb.Transaction]) -> None:
    """With a frozen clock (no regeneration) the ledger replays exactly to the balances."""
    chron = list(reversed(txs))
    used = held_p = q = held_q = exp = unpaid = 0
    for t in chron:
        used += t.points_used_delta
        held_p += t.points_held_delta
        q += t.qoints_delta
        held_q += t.qoints_held_delta
        exp += t.exp_delta
        unpaid += t.unpaid_delta
        assert (t.points_used_after, t.qoints_after, t.exp_after, t.unpaid_after) == (used, q, exp, unpaid), t
        assert q >= 0 and held_q >= 0 and held_p >= 0 and q >= held_q
    assert (a.points_used, a.points_held, a.qoints, a.qoints_held, a.exp, a.unpaid_points) == (
        used,
        held_p,
        q,
        held_q,
        exp,
        unpaid,
    )
    assert len({t.transaction_id for t in txs}) == len(txs)


# --- 1. legacy formulas ---------------------------------------------------------------------------


async def test_new_account_and_token_balance(points):
    a = await points.account("tg-1")
    assert (a.user_id, a.token_balance, a.max_points, a.points_available) == ("tg-1", 0, 370, 370)
    assert (a.points_used, a.points_held, a.qoints, a.exp, a.level, a.unpaid_points) == (0, 0, 0, 0, 0, 0)
    assert not a.HasField("update_time") and not a.HasField("next_regeneration_time")
    assert a.next_regeneration_points == 0 and len(a.open_holds) == 0
    assert await points.txs("tg-1") == []

    reply = await points.set_tokens("tg-1", 1_000_000)
    assert (reply.account.token_balance, reply.account.max_points, reply.account.points_available) == (
        1_000_000,
        2221,
        2221,
    )
    assert reply.account.update_time.ToMilliseconds() == T0
    t = reply.transaction
    assert t.kind == pb.TRANSACTION_KIND_TOKEN_BALANCE_SET and t.user_id == "tg-1"
    assert (t.token_balance_after, t.max_points_after, t.points_used_delta, t.qoints_delta) == (1_000_000, 2221, 0, 0)
    assert (await points.account("tg-1")).max_points == 2221
    for tokens, expected in ((539, 370), (540, 371), (1079, 371), (1080, 372), (0, 370)):
        assert (await points.set_tokens("tg-1", tokens)).account.max_points == expected


COSTS = [
    # (gpu, seconds, nanos, cost, usd_per_second, usd_cost, minimum_applied)
    (A10G, 1, 0, 3, "0.000337", "0.000337", True),
    (A10G, 30, 0, 60, "0.000337", "0.01011", False),
    (T4, 1, 0, 3, "0.000181", "0.000181", True),
    (T4, 30, 0, 33, "0.000181", "0.00543", False),
    (H100, 10, 0, 139, "0.002338", "0.02338", False),
    (H100, 1, 500_000_000, 21, "0.002338", "0.003507", False),
    (CPU, 60, 0, 15, "0.000042", "0.00252", False),
    (gpu_pb2.GPU_TYPE_A100_80GB, 7, 0, 71, "0.001709", "0.011963", False),
]


async def test_quote_cost_price_table(points):
    for gpu, s, nanos, cost, price, usd, minimum in COSTS:
        q = await points.stub.QuoteCost(rpc.QuoteCostRequest(gpu=gpu, gpu_time=seconds(s, nanos)), timeout=10)
        assert (q.cost_points, q.usd_per_second, q.usd_cost, q.minimum_applied) == (cost, price, usd, minimum), gpu
        assert (q.multiplier, q.usd_per_point) == ("2", "0.000337")  # what a receipt shows


async def test_capture_usage_costs_like_quote(points):
    await points.credit("web-0xabc", 10_000)
    exp = 0
    for gpu, s, nanos, cost, *_ in COSTS:
        hold = (await points.reserve("web-0xabc", 200)).hold
        usage = pb.Usage(gpu=gpu, gpu_time=seconds(s, nanos))
        reply = await points.capture("web-0xabc", hold.hold_id, usage=usage)
        exp += cost
        assert reply.hold.cost_points == cost and reply.hold.state == pb.HOLD_STATE_CAPTURED
        assert reply.transaction.exp_delta == cost and reply.account.exp == exp


async def test_allowance_regenerates_in_exactly_18_steps(points):
    user = "tg-regen"
    hold = (await points.reserve(user, 370)).hold
    assert hold.points_held == 370 and hold.qoints_held == 0
    a = (await points.capture(user, hold.hold_id, 370)).account
    assert (a.points_used, a.points_available, a.next_regeneration_points) == (370, 0, 21)
    assert a.next_regeneration_time.ToMilliseconds() == T0 + PERIOD_MS

    points.clock.advance(PERIOD_MS - 1)  # not yet at the boundary
    a = await points.account(user)
    assert (a.points_used, a.points_available) == (370, 0)
    points.clock.advance(1)  # exactly at the boundary
    a = await points.account(user)
    assert (a.points_used, a.points_available, a.next_regeneration_points) == (349, 21, 21)
    assert a.next_regeneration_time.ToMilliseconds() == T0 + 2 * PERIOD_MS

    points.clock.ms = T0 + 17 * PERIOD_MS + 123_456  # 17 boundaries crossed: 17 * ceil(370/18) = 357
    a = await points.account(user)
    assert (a.points_used, a.points_available) == (13, 357)
    assert (a.next_regeneration_points, a.next_regeneration_time.ToMilliseconds()) == (13, T0 + 18 * PERIOD_MS)

    points.clock.ms = T0 + 18 * PERIOD_MS
    a = await points.account(user)
    assert (a.points_used, a.points_available, a.next_regeneration_points) == (0, 370, 0)
    assert not a.HasField("next_regeneration_time")
    assert a.update_time.ToMilliseconds() == T0  # regeneration does not move update_time
    assert len(await points.txs(user)) == 2  # and is never a transaction

    await points.credit(user, 1)  # a mutation records the regenerated state
    points.clock.ms = T0  # a clock that goes back (a replica behind) undoes nothing
    a = await points.account(user)
    assert (a.points_used, a.points_available) == (0, 370)


async def test_regeneration_is_aligned_to_the_epoch(points):
    points.clock.ms = T0 + PERIOD_MS - 1  # one millisecond before a boundary
    user = "tg-aligned"
    await points.set_tokens(user, 1_000_000)  # max 2221, step ceil(2221/18) = 124
    hold = (await points.reserve(user, 500)).hold
    await points.capture(user, hold.hold_id, 500)
    points.clock.advance(1)
    a = await points.account(user)
    assert (a.points_used, a.next_regeneration_points) == (376, 124)
    points.clock.advance(3 * PERIOD_MS)
    assert (await points.account(user)).points_used == 4
    points.clock.advance(PERIOD_MS)
    assert (await points.account(user)).points_used == 0


async def test_level_is_floor_cbrt_of_exp(points):
    user = "tg-level"
    await points.credit(user, 100_000)
    expected = {0: 0, 1: 1, 7: 1, 8: 2, 26: 2, 27: 3, 63: 3, 64: 4, 999: 9, 1000: 10}
    exp = 0
    for target, level in expected.items():
        if target > exp:
            hold = (await points.reserve(user, 1)).hold
            a = (await points.capture(user, hold.hold_id, target - exp)).account
            exp = target
        else:
            a = await points.account(user)
        assert (a.exp, a.level) == (target, level)
        assert (await points.account(user)).level == level


# --- 2. holds -------------------------------------------------------------------------------------


async def test_reserve_takes_allowance_then_qoints_and_refuses_atomically(points):
    user = "tg-holds"
    await points.credit(user, 500)
    first = await points.reserve(user, 300, run_id="run-1")
    assert (first.hold.points_held, first.hold.qoints_held, first.hold.estimate_points) == (300, 0, 300)
    assert first.hold.state == pb.HOLD_STATE_OPEN and first.hold.run_id == "run-1"
    assert first.hold.expire_time.ToMilliseconds() == T0 + 3600_000
    assert not first.hold.HasField("settle_time")
    t = first.transaction
    assert t.kind == pb.TRANSACTION_KIND_HOLD_RESERVED and t.hold_id == first.hold.hold_id and t.run_id == "run-1"
    assert (t.points_held_delta, t.qoints_held_delta) == (300, 0)

    points.clock.advance(1)
    second = await points.reserve(user, 200)
    assert (second.hold.points_held, second.hold.qoints_held) == (70, 130)
    a = second.account
    assert (a.points_held, a.points_available, a.qoints, a.qoints_held, a.qoints_available) == (370, 0, 500, 130, 370)
    check_account(a)
    a = await points.account(user)
    assert [h.hold_id for h in a.open_holds] == [first.hold.hold_id, second.hold.hold_id]
    check_account(a)

    before_txs, before_store = await points.txs(user), await points.store()
    info, _ = await fails(points.reserve(user, 371), PRECONDITION, "INSUFFICIENT_POINTS")
    assert info.metadata["required"] == "371"
    assert info.metadata["points_available"] == "0" and info.metadata["qoints_available"] == "370"
    assert await points.txs(user) == before_txs and await points.store() == before_store

    points.clock.advance(1)
    third = await points.reserve(user, 0)  # 0 means the default estimate, 100
    assert (third.hold.estimate_points, third.hold.points_held, third.hold.qoints_held) == (100, 0, 100)
    before_store = await points.store()
    info, _ = await fails(points.reserve(user, 1), grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_OPEN_HOLDS")
    assert (info.metadata["open_holds"], info.metadata["max_open_holds"]) == ("3", "3")
    assert await points.store() == before_store

    a = await points.account(user)
    assert [h.hold_id for h in a.open_holds] == [first.hold.hold_id, second.hold.hold_id, third.hold.hold_id]
    assert all(h.state == pb.HOLD_STATE_OPEN for h in a.open_holds)
    check_account(a)
    await points.release(user, second.hold.hold_id)
    assert (await points.reserve(user, 1)).hold.points_held == 1  # a slot and the allowance came back


async def test_capture_less_than_the_hold_returns_the_rest(points):
    reply = await points.capture("u1", (await points.reserve("u1", 100)).hold.hold_id, 30)
    h, a, t = reply.hold, reply.account, reply.transaction
    assert (h.state, h.cost_points, h.points_charged, h.qoints_charged, h.unpaid_points) == (
        pb.HOLD_STATE_CAPTURED,
        30,
        30,
        0,
        0,
    )
    assert h.points_held == 100 and h.settle_time.ToMilliseconds() == T0  # the record is kept
    assert (a.points_used, a.points_held, a.points_available, a.exp, a.level) == (30, 0, 340, 30, 3)
    assert t.kind == pb.TRANSACTION_KIND_HOLD_CAPTURED
    assert (t.points_used_delta, t.points_held_delta, t.qoints_delta, t.exp_delta) == (30, -100, 0, 30)
    assert len(a.open_holds) == 0

    # a qoints-funded hold captured for less: the charge comes off qoints, the rest is released
    await points.capture("u2", (await points.reserve("u2", 370)).hold.hold_id, 370)
    await points.credit("u2", 100)
    hold = (await points.reserve("u2", 100)).hold
    assert (hold.points_held, hold.qoints_held) == (0, 100)
    reply = await points.capture("u2", hold.hold_id, 40)
    assert (reply.hold.points_charged, reply.hold.qoints_charged, reply.hold.unpaid_points) == (0, 40, 0)
    a = reply.account
    assert (a.qoints, a.qoints_held, a.qoints_available, a.points_used) == (60, 0, 60, 370)
    t = reply.transaction
    assert (t.qoints_delta, t.qoints_held_delta, t.points_used_delta) == (-40, -100, 0)


async def test_capture_more_than_an_allowance_hold_goes_into_debt(points):
    reply = await points.capture("u3", (await points.reserve("u3", 100)).hold.hold_id, 500)
    assert (reply.hold.points_charged, reply.hold.qoints_charged, reply.hold.unpaid_points) == (500, 0, 0)
    a = reply.account
    assert (a.points_used, a.points_available, a.unpaid_points, a.exp) == (500, 0, 0, 500)
    # debt is paid off by regeneration: 500 - 7 * 21 = 353 < 370
    points.clock.advance(6 * PERIOD_MS)
    assert (await points.account("u3")).points_available == 0
    points.clock.advance(PERIOD_MS)
    assert (await points.account("u3")).points_available == 17

    # with qoints: allowance room first, then qoints down to zero, then debt
    await points.credit("u4", 50)
    reply = await points.capture("u4", (await points.reserve("u4", 100)).hold.hold_id, 500)
    assert (reply.hold.points_charged, reply.hold.qoints_charged, reply.hold.unpaid_points) == (450, 50, 0)
    assert (reply.account.points_used, reply.account.qoints) == (450, 0)


async def test_capture_more_than_a_qoints_hold_records_unpaid(points):
    await points.capture("u5", (await points.reserve("u5", 370)).hold.hold_id, 370)
    await points.credit("u5", 100)
    hold = (await points.reserve("u5", 100)).hold
    reply = await points.capture("u5", hold.hold_id, 150)
    assert (reply.hold.points_charged, reply.hold.qoints_charged, reply.hold.unpaid_points) == (0, 100, 50)
    a = reply.account
    assert (a.qoints, a.qoints_held, a.points_used, a.unpaid_points, a.exp) == (0, 0, 370, 50, 520)
    assert reply.transaction.unpaid_delta == 50 and reply.transaction.unpaid_after == 50
    check_ledger(a, await points.txs("u5"))


async def test_capture_counts_the_room_left_by_other_holds(points):
    user = "u6"
    await points.credit(user, 100)
    other = (await points.reserve(user, 300)).hold  # 300 of the allowance
    mine = (await points.reserve(user, 100)).hold  # 70 allowance + 30 qoints
    assert (mine.points_held, mine.qoints_held) == (70, 30)
    reply = await points.capture(user, mine.hold_id, 150)
    # room_points = max(70, 370 - 0 - 300) = 70, room_qoints = 100 - (30 - 30) = 100
    assert (reply.hold.points_charged, reply.hold.qoints_charged) == (70, 80)
    a = reply.account
    assert (a.points_used, a.points_held, a.qoints, a.qoints_held) == (70, 300, 20, 0)
    assert [h.hold_id for h in a.open_holds] == [other.hold_id]
    check_account(a)


async def test_release_refunds_in_full_and_settled_holds_stay_settled(points):
    user = "u7"
    await points.credit(user, 100)
    await points.reserve(user, 300)
    hold = (await points.reserve(user, 100, run_id="run-7")).hold
    reply = await points.release(user, hold.hold_id, reason=pb.RELEASE_REASON_RUN_CANCELLED, memo="user cancelled")
    assert reply.hold.state == pb.HOLD_STATE_RELEASED and reply.hold.memo == "user cancelled"
    assert reply.hold.release_reason == pb.RELEASE_REASON_RUN_CANCELLED
    assert (reply.hold.cost_points, reply.hold.points_charged, reply.hold.qoints_charged) == (0, 0, 0)
    a = reply.account
    assert (a.points_used, a.points_held, a.qoints, a.qoints_held, a.exp) == (0, 300, 100, 0, 0)
    t = reply.transaction
    assert t.kind == pb.TRANSACTION_KIND_HOLD_RELEASED and t.release_reason == pb.RELEASE_REASON_RUN_CANCELLED
    assert (t.points_held_delta, t.qoints_held_delta, t.memo, t.run_id) == (-70, -30, "user cancelled", "run-7")

    before = await points.store()
    info, _ = await fails(points.capture(user, hold.hold_id, 5), PRECONDITION, "HOLD_ALREADY_SETTLED")
    assert (info.metadata["hold_id"], info.metadata["state"]) == (hold.hold_id, "RELEASED")
    assert await points.store() == before
    again = await points.release(user, hold.hold_id)  # a no-op on a RELEASED hold
    assert again.hold == reply.hold and not again.HasField("transaction")
    captured = (await points.reserve(user, 10)).hold
    await points.capture(user, captured.hold_id, 10)
    before = await points.store()
    info, _ = await fails(points.release(user, captured.hold_id), PRECONDITION, "HOLD_ALREADY_SETTLED")
    assert info.metadata["state"] == "CAPTURED"
    await fails(points.capture(user, captured.hold_id, 10), PRECONDITION, "HOLD_ALREADY_SETTLED")
    assert await points.store() == before
    check_ledger(await points.account(user), await points.txs(user))


async def test_unknown_hold_is_not_found(points):
    missing = uuid.uuid4().hex
    theirs = (await points.reserve("owner", 10)).hold.hold_id
    before = await points.store()
    for hold_id in (missing, theirs):
        for call in (
            points.hold("intruder", hold_id),
            points.capture("intruder", hold_id, 5),
            points.release("intruder", hold_id),
        ):
            info, _ = await fails(call, grpc.StatusCode.NOT_FOUND, "HOLD_NOT_FOUND")
            assert info.metadata["hold_id"] == hold_id
    assert await points.store() == before
    assert (await points.hold("owner", theirs)).state == pb.HOLD_STATE_OPEN


async def test_expired_holds_come_back(points):
    user = "u8"
    await points.credit(user, 1000)
    await points.reserve(user, 300)
    points.clock.advance(1)
    short = (await points.reserve(user, 200, ttl=seconds(60))).hold  # 70 points + 130 qoints
    assert short.expire_time.ToMilliseconds() == T0 + 1 + 60_000

    points.clock.advance(60_000 - 1)  # one millisecond before its expire_time
    a = await points.account(user)
    assert (a.points_held, a.qoints_held, len(a.open_holds)) == (370, 130, 2)

    points.clock.advance(1)  # expire_time is authoritative: a plain GetHold sees it EXPIRED
    assert (await points.hold(user, short.hold_id)).state == pb.HOLD_STATE_EXPIRED
    a = await points.account(user)
    assert (a.points_held, a.qoints_held, a.points_available, a.qoints_available) == (300, 0, 70, 1000)
    assert len(a.open_holds) == 1 and a.open_holds[0].hold_id != short.hold_id
    txs = await points.txs(user)
    assert [t.kind for t in txs].count(pb.TRANSACTION_KIND_HOLD_EXPIRED) == 1
    t = txs[0]
    assert t.kind == pb.TRANSACTION_KIND_HOLD_EXPIRED and t.hold_id == short.hold_id
    assert (t.points_held_delta, t.qoints_held_delta) == (-70, -130)
    check_ledger(a, txs)

    # ReleaseHold on an EXPIRED hold changes nothing; a late capture is charged as if nothing were held
    reply = await points.release(user, short.hold_id)
    assert reply.hold.state == pb.HOLD_STATE_EXPIRED and not reply.HasField("transaction")
    points.clock.advance(5)
    reply = await points.capture(user, short.hold_id, 100)
    assert reply.hold.state == pb.HOLD_STATE_CAPTURED and reply.hold.settle_time.ToMilliseconds() == points.clock.ms
    assert (reply.hold.points_charged, reply.hold.qoints_charged) == (70, 30)
    a = reply.account
    assert (a.points_used, a.points_held, a.qoints, a.qoints_held) == (70, 300, 970, 0)
    check_ledger(a, await points.txs(user))

    # the default TTL is an hour
    points.clock.advance(3600_000)
    a = await points.account(user)
    assert (a.points_held, len(a.open_holds)) == (0, 0)


# --- 3. idempotency -------------------------------------------------------------------------------


async def test_repeated_request_returns_the_first_response(points):
    user, other = "idem", "idem-2"
    key = rid()
    first = await points.credit(user, 500, ref="pay-idem", request_id=key)
    points.clock.advance(10)
    again = await points.credit(user, 500, ref="pay-idem", request_id=key)
    assert again.SerializeToString(deterministic=True) == first.SerializeToString(deterministic=True)

    calls = [
        lambda k: points.set_tokens(user, 5400, request_id=k),
        lambda k: points.reserve(user, 50, request_id=k, run_id="r"),
        lambda k: points.transfer(user, other, 7, request_id=k, memo="gift"),
    ]
    for make in calls:
        key = rid()
        first = await make(key)
        points.clock.advance(10)
        assert (await make(key)).SerializeToString(deterministic=True) == first.SerializeToString(deterministic=True)
    hold = (await points.reserve(user, 20)).hold.hold_id
    gone = (await points.reserve(user, 20)).hold.hold_id
    for make in (
        lambda k: points.capture(user, hold, 15, request_id=k),
        lambda k: points.release(user, gone, request_id=k, memo="m"),
    ):
        key = rid()
        first = await make(key)
        points.clock.advance(10)
        assert (await make(key)).SerializeToString(deterministic=True) == first.SerializeToString(deterministic=True)

    kinds = [t.kind for t in await points.txs(user)]
    assert kinds.count(pb.TRANSACTION_KIND_QOINTS_CREDITED) == 1
    assert kinds.count(pb.TRANSACTION_KIND_TOKEN_BALANCE_SET) == 1
    assert kinds.count(pb.TRANSACTION_KIND_HOLD_RESERVED) == 3
    assert kinds.count(pb.TRANSACTION_KIND_QOINTS_TRANSFERRED_OUT) == 1
    assert kinds.count(pb.TRANSACTION_KIND_HOLD_CAPTURED) == 1
    assert kinds.count(pb.TRANSACTION_KIND_HOLD_RELEASED) == 1
    assert len(kinds) == 8
    assert [t.kind for t in await points.txs(other)] == [pb.TRANSACTION_KIND_QOINTS_TRANSFERRED_IN]
    a = await points.account(user)
    assert (a.qoints, a.token_balance, a.exp) == (493, 5400, 15)
    check_ledger(a, await points.txs(user))


async def test_request_id_reused_with_other_parameters(points):
    user = "reuse"
    key = rid()
    await points.credit(user, 500, ref="pay-reuse", request_id=key)
    hold = (await points.reserve(user, 50, request_id=key)).hold.hold_id
    await points.set_tokens(user, 1, request_id=key)
    await points.transfer(user, "reuse-2", 5, request_id=key)
    await points.capture(user, hold, 10, request_id=key)
    other_hold = (await points.reserve(user, 20)).hold.hold_id
    await points.release(user, other_hold, request_id=key)
    before_txs, before_store = await points.txs(user), await points.store()
    for call in (
        points.credit(user, 501, ref="pay-reuse", request_id=key),
        points.reserve(user, 51, request_id=key),
        points.set_tokens(user, 2, request_id=key),
        points.transfer(user, "reuse-2", 6, request_id=key),
        points.transfer(user, "reuse-3", 5, request_id=key),
        points.capture(user, hold, 11, request_id=key),
        points.release(user, other_hold, request_id=key, memo="other"),
    ):
        info, _ = await fails(call, INVALID, "REQUEST_ID_REUSED")
        assert info.metadata["request_id"] == key
    assert await points.txs(user) == before_txs and await points.store() == before_store


async def test_failed_request_is_not_remembered(points):
    key = rid()
    await fails(points.reserve("retry", 400, request_id=key), PRECONDITION, "INSUFFICIENT_POINTS")
    await points.credit("retry", 30)
    reply = await points.reserve("retry", 400, request_id=key)
    assert (reply.hold.points_held, reply.hold.qoints_held) == (370, 30)


async def test_concurrent_identical_requests_apply_once(points):
    user = "burst"
    key = rid()
    credits = await asyncio.gather(*(points.credit(user, 1000, ref="pay-burst", request_id=key) for _ in range(50)))
    assert len({c.SerializeToString(deterministic=True) for c in credits}) == 1
    key = rid()
    holds = await asyncio.gather(*(points.reserve(user, 400, request_id=key) for _ in range(50)))
    assert len({h.SerializeToString(deterministic=True) for h in holds}) == 1
    key = rid()
    moves = await asyncio.gather(*(points.transfer(user, "burst-2", 100, request_id=key) for _ in range(50)))
    assert len({m.SerializeToString(deterministic=True) for m in moves}) == 1

    kinds = [t.kind for t in await points.txs(user)]
    assert sorted(kinds) == sorted(
        [
            pb.TRANSACTION_KIND_QOINTS_CREDITED,
            pb.TRANSACTION_KIND_HOLD_RESERVED,
            pb.TRANSACTION_KIND_QOINTS_TRANSFERRED_OUT,
        ]
    )
    a = await points.account(user)
    assert (a.qoints, a.qoints_held, a.points_held, len(a.open_holds)) == (900, 30, 370, 1)
    assert (await points.account("burst-2")).qoints == 100
    assert len(await points.txs("burst-2")) == 1


# --- 4. concurrency -------------------------------------------------------------------------------


async def test_200_concurrent_operations_never_overdraw(make_points):
    points = await make_points(POINTS_MAX_OPEN_HOLDS="250")
    user = "crowd"
    await points.credit(user, 3000)
    seen: list[pb.Account] = []
    outcomes: dict[str, int] = {"insufficient": 0, "captured": 0, "released": 0}
    captured_costs: list[int] = []
    # At most 64 RPCs in flight: more than 100 hit the connection pool bug of
    # test_more_than_100_concurrent_rpcs_are_served, whatever the ledger does.
    in_flight = asyncio.Semaphore(64)

    async def limited(call: Callable[[], Awaitable[Any]]) -> Any:
        async with in_flight:
            return await call()

    async def worker(i: int) -> None:
        rng = random.Random(i)
        try:
            reply = await limited(lambda: points.reserve(user, rng.randint(1, 60), run_id=f"run-{i}"))
        except grpc.aio.AioRpcError as error:
            assert error.code() == PRECONDITION and details(error)[0].reason == "INSUFFICIENT_POINTS"
            outcomes["insufficient"] += 1
            return
        check_account(reply.account)
        await asyncio.sleep(0)
        if rng.random() < 0.25:
            settled = await limited(lambda: points.release(user, reply.hold.hold_id))
            outcomes["released"] += 1
        else:
            cost = rng.randint(1, 120)
            settled = await limited(lambda: points.capture(user, reply.hold.hold_id, cost))
            assert settled.hold.cost_points == cost
            captured_costs.append(cost)
            outcomes["captured"] += 1
        seen.append(settled.account)

    await asyncio.gather(*(worker(i) for i in range(200)))
    assert outcomes["captured"] > 20 and outcomes["released"] > 5, outcomes
    for a in seen:
        check_account(a)
    a = await points.account(user)
    check_account(a)
    assert (a.points_held, a.qoints_held, len(a.open_holds)) == (0, 0, 0)
    assert a.exp == sum(captured_costs)
    txs = await points.txs(user, page_size=7)
    assert len(txs) == 1 + 2 * (outcomes["captured"] + outcomes["released"])
    check_ledger(a, txs)


async def test_capture_racing_release_settles_each_hold_once(make_points):
    points = await make_points(POINTS_MAX_OPEN_HOLDS="250")
    user = "racer"
    await points.credit(user, 5000)
    rng = random.Random(7)
    captured_total = 0
    for _round in range(4):  # 32 holds a round: 64 RPCs in flight (see test_200_concurrent_operations...)
        holds = [(await points.reserve(user, rng.randint(1, 40))).hold.hold_id for _ in range(32)]
        costs = [rng.randint(1, 60) for _ in holds]

        async def race(hold_id: str, cost: int) -> tuple[str, int]:
            pair = [points.capture(user, hold_id, cost), points.release(user, hold_id)]
            if rng.random() < 0.5:
                pair.reverse()
                results = list(reversed(await asyncio.gather(*pair, return_exceptions=True)))
            else:
                results = list(await asyncio.gather(*pair, return_exceptions=True))
            ok = [r for r in results if not isinstance(r, BaseException)]
            errors = [r for r in results if isinstance(r, BaseException)]
            assert len(ok) == 1 and len(errors) == 1, results
            error = errors[0]
            assert isinstance(error, grpc.aio.AioRpcError) and error.code() == PRECONDITION
            info, _ = details(error)
            assert info.reason == "HOLD_ALREADY_SETTLED"
            if isinstance(results[0], BaseException):  # release won
                assert info.metadata["state"] == "RELEASED"
                assert ok[0].hold.state == pb.HOLD_STATE_RELEASED
                return "released", 0
            assert info.metadata["state"] == "CAPTURED"
            assert ok[0].hold.state == pb.HOLD_STATE_CAPTURED
            return "captured", cost

        results = await asyncio.gather(*(race(h, c) for h, c in zip(holds, costs, strict=True)))
        captured_total += sum(cost for _, cost in results)
        for hold_id, (state, cost) in zip(holds, results, strict=True):
            hold = await points.hold(user, hold_id)
            assert hold.state == (pb.HOLD_STATE_CAPTURED if state == "captured" else pb.HOLD_STATE_RELEASED)
            assert hold.cost_points == cost
    a = await points.account(user)
    check_account(a)
    assert (a.points_held, a.qoints_held, a.exp) == (0, 0, captured_total)
    txs = await points.txs(user)
    assert len(txs) == 1 + 2 * 128
    check_ledger(a, txs)


# --- 5. credits and transfers ---------------------------------------------------------------------


async def test_credit_is_once_per_external_reference(points):
    first = await points.credit("alice", 250, ref="0xfeed", source=pb.QOINTS_SOURCE_BONUS, memo="wallet bonus")
    t = first.transaction
    assert t.kind == pb.TRANSACTION_KIND_QOINTS_CREDITED and t.qoints_delta == 250 and t.qoints_after == 250
    assert (t.external_reference, t.qoints_source, t.memo) == ("0xfeed", pb.QOINTS_SOURCE_BONUS, "wallet bonus")
    assert (first.account.qoints, first.account.qoints_available) == (250, 250)
    before = await points.store()
    info, _ = await fails(
        points.credit("alice", 250, ref="0xfeed"), grpc.StatusCode.ALREADY_EXISTS, "DUPLICATE_EXTERNAL_REFERENCE"
    )
    assert info.metadata["external_reference"] == "0xfeed"
    assert info.metadata["transaction_id"] == t.transaction_id
    info, _ = await fails(
        points.credit("bob", 9, ref="0xfeed"), grpc.StatusCode.ALREADY_EXISTS, "DUPLICATE_EXTERNAL_REFERENCE"
    )
    assert info.metadata["external_reference"] == "0xfeed"
    assert await points.store() == before
    assert (await points.account("alice")).qoints == 250 and (await points.account("bob")).qoints == 0


async def test_transfer_moves_qoints_all_or_nothing(points):
    await points.credit("alice", 100)
    points.clock.advance(1)
    reply = await points.transfer("alice", "bob", 60, memo="thanks")
    assert (reply.from_account.user_id, reply.from_account.qoints) == ("alice", 40)
    assert (reply.to_account.user_id, reply.to_account.qoints) == ("bob", 60)
    out, inc = reply.outgoing_transaction, reply.incoming_transaction
    assert (out.kind, out.user_id, out.qoints_delta, out.qoints_after) == (
        pb.TRANSACTION_KIND_QOINTS_TRANSFERRED_OUT,
        "alice",
        -60,
        40,
    )
    assert (inc.kind, inc.user_id, inc.qoints_delta, inc.qoints_after) == (
        pb.TRANSACTION_KIND_QOINTS_TRANSFERRED_IN,
        "bob",
        60,
        60,
    )
    assert (out.counterparty_user_id, inc.counterparty_user_id, out.memo, inc.memo) == (
        "bob",
        "alice",
        "thanks",
        "thanks",
    )
    assert (await points.txs("alice"))[0] == out and await points.txs("bob") == [inc]

    before = await points.store()
    info, _ = await fails(points.transfer("alice", "bob", 41), PRECONDITION, "INSUFFICIENT_QOINTS")
    assert (info.metadata["required"], info.metadata["qoints_available"]) == ("41", "40")
    assert await points.store() == before
    # qoints held by an open hold cannot be transferred
    await points.capture("alice", (await points.reserve("alice", 370)).hold.hold_id, 370)
    await points.reserve("alice", 30)
    before = await points.store()
    info, _ = await fails(points.transfer("alice", "bob", 11), PRECONDITION, "INSUFFICIENT_QOINTS")
    assert info.metadata["qoints_available"] == "10"
    assert await points.store() == before
    _, bad = await fails(points.transfer("alice", "alice", 1), INVALID, "INVALID_REQUEST")
    assert fields(bad) == {"to_user_id"}
    assert await points.store() == before


async def test_interrupted_transfer_is_finished_by_a_retry(points):
    """A failure between the two sides (here an exception at the test seam) is carried forward by a retry."""
    await points.credit("alice", 100)
    key = rid()
    error = await points.interrupted_transfer("alice", "bob", 30, request_id=key)
    assert error.code() == grpc.StatusCode.INTERNAL
    assert ((await points.account("alice")).qoints, (await points.account("bob")).qoints) == (70, 0)
    reply = await points.transfer("alice", "bob", 30, request_id=key)
    assert (reply.from_account.qoints, reply.to_account.qoints) == (70, 30)
    again = await points.transfer("alice", "bob", 30, request_id=key)
    assert again.SerializeToString(deterministic=True) == reply.SerializeToString(deterministic=True)
    assert ((await points.account("alice")).qoints, (await points.account("bob")).qoints) == (70, 30)
    assert len(await points.txs("alice")) == 2 and len(await points.txs("bob")) == 1


async def read_port(process: subprocess.Popen[str], timeout: float = 20.0) -> int:
    assert process.stderr is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = await asyncio.to_thread(process.stderr.readline)
        if not line:
            break
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("port"):
            return int(entry["port"])
    raise AssertionError(f"the crash server never said where it listens (exit {process.poll()})")


async def test_transfer_survives_a_crash_between_its_two_sides(redis_url, start_service):
    process = subprocess.Popen(
        [PYTHON, "-m", "tests.points_crash_server"],
        cwd=ROOT,
        env=python_env(REDIS_URL=redis_url, POINTS_LISTEN_ADDR="127.0.0.1:0"),
        stderr=subprocess.PIPE,
        text=True,
    )
    client = redis_client.connect(redis_url)
    try:
        port = await read_port(process)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = points_service_pb2_grpc.PointsServiceStub(channel)
            await stub.CreditQoints(
                rpc.CreditQointsRequest(
                    request_id=rid(),
                    user_id="sender",
                    qoints=1000,
                    external_reference="pay-crash",
                    source=pb.QOINTS_SOURCE_PURCHASE,
                ),
                timeout=10,
            )
            transfer = rpc.TransferQointsRequest(
                request_id="xfer-crash-1", from_user_id="sender", to_user_id="receiver", qoints=400, memo="m"
            )
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.TransferQoints(transfer, timeout=10)
        assert await asyncio.to_thread(process.wait, 10) == 17

        ledger = RedisLedger(client, LedgerSettings(), SystemClock())  # reads only: no recovery here
        assert (await ledger.account("sender")).qoints == 600
        assert (await ledger.account("receiver")).qoints == 0

        # The restarted service, with the default settings, finishes it within seconds, unasked.
        running = await start_service(build, PointsConfig, {"REDIS_URL": redis_url})
        await wait_serving(running)
        stub = points_service_pb2_grpc.PointsServiceStub(running.channel)

        async def qoints(user: str) -> int:
            return (await stub.GetAccount(rpc.GetAccountRequest(user_id=user), timeout=10)).account.qoints

        deadline = time.monotonic() + 5
        while await qoints("receiver") != 400:
            assert time.monotonic() < deadline, "the sweep did not finish the interrupted transfer within 5 s"
            await asyncio.sleep(0.1)
        assert (await qoints("sender"), await qoints("receiver")) == (600, 400)

        reply = await stub.TransferQoints(transfer, timeout=10)
        assert (reply.from_account.user_id, reply.to_account.user_id) == ("sender", "receiver")
        assert reply.outgoing_transaction.qoints_delta == -400 and reply.incoming_transaction.qoints_delta == 400
        assert (await qoints("sender"), await qoints("receiver")) == (600, 400)
        listed = await stub.ListTransactions(rpc.ListTransactionsRequest(user_id="receiver"), timeout=10)
        assert [t.kind for t in listed.transactions] == [pb.TRANSACTION_KIND_QOINTS_TRANSFERRED_IN]
        assert listed.transactions[0] == reply.incoming_transaction
        assert await client.zcard("pts:xfer:pending") == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()
        await client.aclose()


# --- 6. bad input ---------------------------------------------------------------------------------


async def test_bad_input_is_invalid_argument_naming_the_field(points):
    user = "bob"
    await points.credit(user, 100)
    hold = (await points.reserve(user, 10)).hold.hold_id
    s = points.stub
    long_id = "u" * 129
    cases: list[tuple[str, Callable[[], Awaitable[Any]], set[str]]] = [
        ("GetAccount empty", lambda: s.GetAccount(rpc.GetAccountRequest(user_id="")), {"user_id"}),
        ("GetAccount slash", lambda: s.GetAccount(rpc.GetAccountRequest(user_id="a/b")), {"user_id"}),
        ("GetAccount colon", lambda: s.GetAccount(rpc.GetAccountRequest(user_id="tg:1")), {"user_id"}),
        ("GetAccount long", lambda: s.GetAccount(rpc.GetAccountRequest(user_id=long_id)), {"user_id"}),
        ("GetHold user", lambda: s.GetHold(rpc.GetHoldRequest(user_id="", hold_id=hold)), {"user_id"}),
        ("GetHold hold", lambda: s.GetHold(rpc.GetHoldRequest(user_id=user, hold_id="not-a-hold")), {"hold_id"}),
        ("GetHold upper", lambda: s.GetHold(rpc.GetHoldRequest(user_id=user, hold_id=hold.upper())), {"hold_id"}),
        (
            "Reserve request_id",
            lambda: s.ReserveHold(rpc.ReserveHoldRequest(user_id=user, estimate_points=1)),
            {"request_id"},
        ),
        ("Reserve space id", lambda: points.reserve(user, 1, request_id="a b"), {"request_id"}),
        ("Reserve user", lambda: points.reserve("bad user", 1), {"user_id"}),
        ("Reserve negative", lambda: points.reserve(user, -1), {"estimate_points"}),
        ("Reserve ttl short", lambda: points.reserve(user, 1, ttl=seconds(59)), {"ttl"}),
        ("Reserve ttl long", lambda: points.reserve(user, 1, ttl=seconds(86_401)), {"ttl"}),
        (
            "Reserve all",
            lambda: s.ReserveHold(rpc.ReserveHoldRequest(estimate_points=-5)),
            {"request_id", "user_id", "estimate_points"},
        ),
        (
            "Capture request_id",
            lambda: s.CaptureHold(rpc.CaptureHoldRequest(user_id=user, hold_id=hold, cost_points=1)),
            {"request_id"},
        ),
        ("Capture user", lambda: points.capture("", hold, 1), {"user_id"}),
        ("Capture hold", lambda: points.capture(user, "123", 1), {"hold_id"}),
        ("Capture negative", lambda: points.capture(user, hold, -3), {"cost_points"}),
        ("Capture no cost", lambda: points.capture(user, hold), {"cost"}),
        (
            "Capture gpu",
            lambda: points.capture(user, hold, usage=pb.Usage(gpu=gpu_pb2.GPU_TYPE_UNSPECIFIED, gpu_time=seconds(1))),
            {"usage.gpu"},
        ),
        (
            "Capture gpu_time",
            lambda: points.capture(user, hold, usage=pb.Usage(gpu=A10G, gpu_time=seconds(-1))),
            {"usage.gpu_time"},
        ),
        (
            "Release request_id",
            lambda: s.ReleaseHold(rpc.ReleaseHoldRequest(user_id=user, hold_id=hold)),
            {"request_id"},
        ),
        ("Release user", lambda: points.release("a:b", hold), {"user_id"}),
        ("Release hold", lambda: points.release(user, ""), {"hold_id"}),
        (
            "Credit request_id",
            lambda: s.CreditQoints(rpc.CreditQointsRequest(user_id=user, qoints=1, external_reference="r", source=1)),
            {"request_id"},
        ),
        ("Credit user", lambda: points.credit("", 5), {"user_id"}),
        ("Credit zero", lambda: points.credit(user, 0), {"qoints"}),
        ("Credit negative", lambda: points.credit(user, -5), {"qoints"}),
        (
            "Credit reference",
            lambda: s.CreditQoints(rpc.CreditQointsRequest(request_id=rid(), user_id=user, qoints=5, source=1)),
            {"external_reference"},
        ),
        ("Credit source", lambda: points.credit(user, 5, source=pb.QOINTS_SOURCE_UNSPECIFIED), {"source"}),
        (
            "Transfer request_id",
            lambda: s.TransferQoints(rpc.TransferQointsRequest(from_user_id=user, to_user_id="x", qoints=1)),
            {"request_id"},
        ),
        ("Transfer from", lambda: points.transfer("", "x", 1), {"from_user_id"}),
        ("Transfer to", lambda: points.transfer(user, "x/y", 1), {"to_user_id"}),
        ("Transfer zero", lambda: points.transfer(user, "x", 0), {"qoints"}),
        ("Transfer negative", lambda: points.transfer(user, "x", -1), {"qoints"}),
        ("Transfer self", lambda: points.transfer(user, user, 1), {"to_user_id"}),
        (
            "Tokens request_id",
            lambda: s.SetTokenBalance(rpc.SetTokenBalanceRequest(user_id=user, token_balance=1)),
            {"request_id"},
        ),
        ("Tokens user", lambda: points.set_tokens("", 1), {"user_id"}),
        ("Tokens negative", lambda: points.set_tokens(user, -1), {"token_balance"}),
        (
            "Quote gpu",
            lambda: s.QuoteCost(rpc.QuoteCostRequest(gpu=gpu_pb2.GPU_TYPE_UNSPECIFIED, gpu_time=seconds(1))),
            {"gpu"},
        ),
        ("Quote unknown gpu", lambda: s.QuoteCost(rpc.QuoteCostRequest(gpu=99, gpu_time=seconds(1))), {"gpu"}),
        ("Quote negative", lambda: s.QuoteCost(rpc.QuoteCostRequest(gpu=A10G, gpu_time=seconds(-1))), {"gpu_time"}),
        ("List user", lambda: s.ListTransactions(rpc.ListTransactionsRequest(user_id="")), {"user_id"}),
        (
            "List page_size",
            lambda: s.ListTransactions(rpc.ListTransactionsRequest(user_id=user, page_size=-1)),
            {"page_size"},
        ),
    ]
    before_txs, before_store = await points.txs(user), await points.store()
    for name, call, expected in cases:
        _, bad = await fails(call(), INVALID, "INVALID_REQUEST")
        assert expected <= fields(bad), (name, fields(bad))
    for token in ("garbage", "!!!", base64.urlsafe_b64encode(b'{"u": "bob"}').decode(), "e30"):
        _, bad = await fails(
            s.ListTransactions(rpc.ListTransactionsRequest(user_id=user, page_token=token)),
            INVALID,
            "INVALID_PAGE_TOKEN",
        )
        assert fields(bad) == {"page_token"}
    assert await points.txs(user) == before_txs and await points.store() == before_store


# --- 7. pagination --------------------------------------------------------------------------------


async def test_list_transactions_pages_newest_first_with_stable_tokens(points):
    ids = []
    for i in range(5):
        ids.append((await points.credit("pager", i + 1)).transaction.transaction_id)
        points.clock.advance(1000)
    newest_first = list(reversed(ids))
    pages: list[list[str]] = []
    tokens = []
    token = ""
    while True:
        page = await points.stub.ListTransactions(
            rpc.ListTransactionsRequest(user_id="pager", page_size=2, page_token=token), timeout=10
        )
        pages.append([t.transaction_id for t in page.transactions])
        token = page.next_page_token
        if not token:
            break
        tokens.append(token)
        if len(pages) == 1:
            await points.credit("pager", 99)  # a new entry does not shift the pages already handed out
    assert pages == [newest_first[0:2], newest_first[2:4], newest_first[4:5]]
    again = await points.stub.ListTransactions(
        rpc.ListTransactionsRequest(user_id="pager", page_size=2, page_token=tokens[0]), timeout=10
    )
    assert [t.transaction_id for t in again.transactions] == newest_first[2:4] and again.next_page_token == tokens[1]
    times = [t.create_time.ToMilliseconds() for t in (await points.txs("pager"))]
    assert times == sorted(times, reverse=True)

    first = await points.stub.ListTransactions(rpc.ListTransactionsRequest(user_id="pager"), timeout=10)
    assert len(first.transactions) == 6 and first.next_page_token == ""
    await points.credit("other", 1)
    _, bad = await fails(
        points.stub.ListTransactions(rpc.ListTransactionsRequest(user_id="other", page_size=2, page_token=tokens[0])),
        INVALID,
        "INVALID_PAGE_TOKEN",
    )
    assert fields(bad) == {"page_token"}


async def test_page_size_defaults_and_cap(points):
    for start in range(0, 205, 41):
        await asyncio.gather(*(points.credit("many", 1) for _ in range(start, start + 41)))
    for size, expected in ((0, 50), (1, 1), (200, 200), (500, 200), (2**31 - 1, 200)):
        page = await points.stub.ListTransactions(
            rpc.ListTransactionsRequest(user_id="many", page_size=size), timeout=10
        )
        assert len(page.transactions) == expected and page.next_page_token, size
    page = await points.stub.ListTransactions(rpc.ListTransactionsRequest(user_id="many", page_size=205), timeout=10)
    assert len(page.transactions) == 200
    rest = await points.stub.ListTransactions(
        rpc.ListTransactionsRequest(user_id="many", page_size=205, page_token=page.next_page_token), timeout=10
    )
    assert len(rest.transactions) == 5 and rest.next_page_token == ""
    assert len(await points.txs("many", page_size=0)) == 205


# --- rules that were once broken (each test names the rule it keeps) -----------------------------


async def test_reserve_lists_the_new_hold_once(points):
    reply = await points.reserve("dup", 10)
    assert [h.hold_id for h in reply.account.open_holds] == [reply.hold.hold_id]


async def test_zero_gpu_time_costs_the_minimum(points):
    hold = (await points.reserve("zero", 10)).hold.hold_id
    reply = await points.capture("zero", hold, usage=pb.Usage(gpu=A10G, gpu_time=seconds(0)))
    assert reply.hold.cost_points == 3


async def test_capture_cost_zero_is_invalid(points):
    """Issue 4: zero or negative amounts are INVALID_ARGUMENT (a run that cost nothing is released)."""
    hold = (await points.reserve("free", 10)).hold.hold_id
    before = await points.store()
    _, bad = await fails(points.capture("free", hold, 0), INVALID, "INVALID_REQUEST")
    assert fields(bad) == {"cost_points"}
    assert await points.store() == before


async def test_reserve_zero_ttl_means_default(points):
    reply = await points.reserve("ttl", 10, ttl=seconds(0))
    assert reply.hold.expire_time.ToMilliseconds() == T0 + 3600_000


async def test_release_without_reason_is_invalid(points):
    hold = (await points.reserve("noreason", 10)).hold.hold_id
    _, bad = await fails(
        points.release("noreason", hold, reason=pb.RELEASE_REASON_UNSPECIFIED), INVALID, "INVALID_REQUEST"
    )
    assert fields(bad) == {"reason"}


async def test_documented_text_lengths_are_accepted(points):
    reply = await points.credit("texts", 10, ref="r" * 256, memo="m" * 500)
    assert reply.transaction.external_reference == "r" * 256
    await points.transfer("texts", "texts-2", 1, memo="m" * 500)
    hold = (await points.reserve("texts", 10)).hold.hold_id
    await points.release("texts", hold, memo="m" * 500)


async def test_insufficient_points_metadata_names_next_regeneration_time(points):
    info, _ = await fails(points.reserve("meta", 371), PRECONDITION, "INSUFFICIENT_POINTS")
    assert set(info.metadata) == {"required", "points_available", "qoints_available"}
    await points.capture("meta", (await points.reserve("meta", 100)).hold.hold_id, 100)
    info, _ = await fails(points.reserve("meta", 300), PRECONDITION, "INSUFFICIENT_POINTS")
    when = datetime.fromisoformat(info.metadata["next_regeneration_time"])
    assert int(when.timestamp() * 1000) == T0 + PERIOD_MS


async def test_expiry_transaction_has_no_request_id(points):
    await points.reserve("exp-rid", 10, ttl=seconds(60))
    points.clock.advance(60_000)
    await points.reserve("exp-rid", 10, request_id="trigger-1")
    expired = [t for t in await points.txs("exp-rid") if t.kind == pb.TRANSACTION_KIND_HOLD_EXPIRED]
    assert len(expired) == 1 and expired[0].request_id == ""


async def test_a_reference_is_bound_to_the_first_user_it_is_credited_to(points):
    """CreditQoints: a reference, once credited to a user, can only ever credit that user; a refused
    request binds nothing (it used to bind the reference for good)."""
    key = rid()
    await points.credit("claimer", 10, ref="pay-a", request_id=key)
    before = await points.store()
    await fails(points.credit("claimer", 10, ref="pay-b", request_id=key), INVALID, "REQUEST_ID_REUSED")
    assert await points.store() == before
    assert (await points.account("claimer")).qoints == 10
    assert (await points.credit("someone-else", 10, ref="pay-b")).account.qoints == 10
    info, _ = await fails(
        points.credit("claimer", 10, ref="pay-b"), grpc.StatusCode.ALREADY_EXISTS, "DUPLICATE_EXTERNAL_REFERENCE"
    )
    assert info.metadata["transaction_id"] == "someone-else/1"
    assert (await points.account("claimer")).qoints == 10
    # a reference bound to another user is ALREADY_EXISTS whatever the request_id
    await fails(
        points.credit("claimer", 10, ref="pay-b", request_id=key), grpc.StatusCode.ALREADY_EXISTS,
        "DUPLICATE_EXTERNAL_REFERENCE",
    )  # fmt: skip


async def test_duplicate_reference_of_another_user_names_the_credit(points):
    first = await points.credit("alice", 5, ref="pay-dup")
    info, _ = await fails(
        points.credit("bob", 5, ref="pay-dup"), grpc.StatusCode.ALREADY_EXISTS, "DUPLICATE_EXTERNAL_REFERENCE"
    )
    assert info.metadata["transaction_id"] == first.transaction.transaction_id


async def test_reused_request_id_keeps_an_interrupted_transfer_recoverable(points):
    await points.credit("alice", 100)
    key = rid()
    await points.interrupted_transfer("alice", "bob", 30, request_id=key)
    await fails(points.transfer("alice", "bob", 31, request_id=key), INVALID, "REQUEST_ID_REUSED")
    assert await points.app.ledger.recover_transfers(older_than_ms=0) == 1
    assert ((await points.account("alice")).qoints, (await points.account("bob")).qoints) == (70, 30)


async def test_transfer_to_a_full_receiver_gives_the_qoints_back(points):
    await asyncio.gather(*(points.credit("whale", 10**12) for _ in range(10)))  # exactly the 10^13 limit
    await points.credit("minnow", 5)
    await fails(points.transfer("minnow", "whale", 5), PRECONDITION, "BALANCE_LIMIT")
    assert (await points.account("minnow")).qoints == 5
    assert (await points.account("whale")).qoints == 10**13
    assert [t.kind for t in await points.txs("minnow")] == [
        pb.TRANSACTION_KIND_QOINTS_TRANSFER_REVERTED,
        pb.TRANSACTION_KIND_QOINTS_TRANSFERRED_OUT,
        pb.TRANSACTION_KIND_QOINTS_CREDITED,
    ]


async def test_forged_page_token_is_invalid(points):
    await points.credit("bob", 1)
    token = base64.urlsafe_b64encode(b'{"u":"bob","s":true}').decode().rstrip("=")
    await fails(
        points.stub.ListTransactions(rpc.ListTransactionsRequest(user_id="bob", page_token=token), timeout=10),
        INVALID,
        "INVALID_PAGE_TOKEN",
    )


async def test_more_than_100_concurrent_rpcs_are_served(points):
    # Redis holds every command for a second, so all the RPCs below are in flight together.
    assert await points.redis.execute_command("CLIENT", "PAUSE", "1000", "ALL")
    results = await asyncio.gather(*(points.account(f"many-{i}") for i in range(150)), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    assert not failed, f"{len(failed)} of 150 failed: {failed[0]}"


async def test_enum_values_the_contract_does_not_define_are_invalid(points):
    """Proto3 enums are open: an integer such as 99 arrives as is. Every enum field a points RPC takes is
    checked against the contract, and an unknown value is INVALID_ARGUMENT naming the field."""
    hold = (await points.reserve("enums", 10)).hold.hold_id
    before = await points.store()
    cases = [
        ("reason", points.release("enums", hold, reason=99)),
        ("source", points.credit("enums", 5, source=99)),
        ("usage.gpu", points.capture("enums", hold, usage=pb.Usage(gpu=99, gpu_time=seconds(1)))),
        ("gpu", points.stub.QuoteCost(rpc.QuoteCostRequest(gpu=99, gpu_time=seconds(1)), timeout=10)),
    ]
    for field, call in cases:
        _, bad = await fails(call, INVALID, "INVALID_REQUEST")
        assert bad is not None and [v.field for v in bad.field_violations] == [field]
        description = bad.field_violations[0].description
        assert description.startswith("must be ") and "Enum" not in description, description
    assert await points.store() == before
    assert (await points.hold("enums", hold)).state == pb.HOLD_STATE_OPEN


async def test_a_refused_credit_writes_nothing(points):
    """A credit refused for any reason leaves Redis as it was: no claim on its external reference."""
    key = rid()
    await points.credit("payer", 10, ref="pay-first", request_id=key)
    await asyncio.gather(*(points.credit("full", 10**12) for _ in range(10)))  # the 10^13 limit
    before = await points.store()
    await fails(points.credit("payer", 10, ref="pay-new", request_id=key), INVALID, "REQUEST_ID_REUSED")
    await fails(points.credit("full", 1, ref="pay-too-much"), PRECONDITION, "BALANCE_LIMIT")
    assert await points.store() == before
    # so both references are still free, for anyone
    assert (await points.credit("other", 7, ref="pay-new")).transaction.external_reference == "pay-new"
    assert (await points.credit("other", 7, ref="pay-too-much")).account.qoints == 14


async def test_a_refused_transfer_writes_nothing(points):
    """Nor does a refused transfer: not even an entry in the recovery index (pts:xfer:pending)."""
    await points.credit("giver", 100)
    key = rid()
    await points.transfer("giver", "taker", 10, request_id=key)
    points.clock.advance(1000)
    before = await points.store()
    await fails(points.transfer("giver", "taker", 11, request_id=key), INVALID, "REQUEST_ID_REUSED")
    await fails(points.transfer("giver", "taker", 91), PRECONDITION, "INSUFFICIENT_QOINTS")
    assert await points.store() == before

    # An interrupted transfer's index entry stays as it was (its score too) when its request id is reused.
    key = rid()
    await points.interrupted_transfer("giver", "taker", 20, request_id=key)
    points.clock.advance(1000)
    before = await points.store()
    await fails(points.transfer("giver", "taker", 21, request_id=key), INVALID, "REQUEST_ID_REUSED")
    assert await points.store() == before
    assert await points.app.ledger.recover_transfers(older_than_ms=0) == 1
    assert ((await points.account("giver")).qoints, (await points.account("taker")).qoints) == (70, 30)
    assert await points.redis.zcard("pts:xfer:pending") == 0


async def test_a_transfer_completes_when_its_caller_goes_away(points):
    """The caller's deadline passes right after the debit: the receiver is credited anyway, within
    moments and without a retry (the fake clock stands still, so the recovery sweep cannot be the one)."""
    await points.credit("leaver", 100)
    debited = asyncio.Event()
    go_on = asyncio.Event()

    async def stall() -> None:
        debited.set()
        await go_on.wait()

    points.app.ledger.after_transfer_debit = stall
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await points.stub.TransferQoints(
            rpc.TransferQointsRequest(request_id=rid(), from_user_id="leaver", to_user_id="stayer", qoints=30),
            timeout=0.5,
        )
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and debited.is_set()
    assert ((await points.account("leaver")).qoints, (await points.account("stayer")).qoints) == (70, 0)
    await asyncio.sleep(0.2)  # the server has seen the cancellation by now
    go_on.set()
    deadline = time.monotonic() + 2
    while (await points.account("stayer")).qoints != 30:
        assert time.monotonic() < deadline, "the receiver was not credited within 2 s of the caller leaving"
        await asyncio.sleep(0.05)
    assert (await points.account("leaver")).qoints == 70
    assert [t.kind for t in await points.txs("stayer")] == [pb.TRANSACTION_KIND_QOINTS_TRANSFERRED_IN]
    while await points.redis.zcard("pts:xfer:pending"):
        assert time.monotonic() < deadline, "the finished transfer is still in the recovery index"
        await asyncio.sleep(0.05)


async def test_unset_and_zero_durations_are_the_same_parameters(points):
    """ReserveHold: ttl unset and ttl 0s both mean the default, so under one request_id they are one
    request. Likewise usage.gpu_time unset and 0s in CaptureHold (both cost the minimum)."""
    key = rid()
    first = await points.reserve("durations", 10, request_id=key)
    again = await points.reserve("durations", 10, request_id=key, ttl=seconds(0))
    assert again.SerializeToString(deterministic=True) == first.SerializeToString(deterministic=True)
    key = rid()
    captured = await points.capture("durations", first.hold.hold_id, request_id=key, usage=pb.Usage(gpu=A10G))
    again_captured = await points.capture(
        "durations", first.hold.hold_id, request_id=key, usage=pb.Usage(gpu=A10G, gpu_time=seconds(0))
    )
    assert again_captured.SerializeToString(deterministic=True) == captured.SerializeToString(deterministic=True)
    kinds = [t.kind for t in await points.txs("durations")]
    assert kinds == [pb.TRANSACTION_KIND_HOLD_CAPTURED, pb.TRANSACTION_KIND_HOLD_RESERVED]


_SPANS = InMemorySpanExporter()
_TRACING: list[bool] = []


async def test_each_ledger_call_is_one_client_span(make_points):
    """One span per script call, named by operation, with the attributes of a Redis call; the Redis
    instrumentation adds no span of its own inside it (docs/decisions/0008, 0011)."""
    if not _TRACING:  # the process's tracer provider (as the service sets it up), once
        telemetry.setup("test", {}, extra=SimpleSpanProcessor(_SPANS))
        _TRACING.append(True)
    points = await make_points()  # its ledger gets its tracer from that provider
    trace_id = uuid.uuid4().hex
    held = await points.stub.ReserveHold(
        rpc.ReserveHoldRequest(request_id=rid(), user_id="traced", estimate_points=10),
        timeout=10,
        metadata=(("traceparent", f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"),),
    )
    assert held.hold.points_held == 10
    ours = [span for span in _SPANS.get_finished_spans() if format(span.context.trace_id, "032x") == trace_id]
    clients = [span for span in ours if span.kind == SpanKind.CLIENT]
    assert [span.name for span in clients] == ["ledger reserve"], [span.name for span in ours]
    assert dict(clients[0].attributes or {}) == {
        "db.system": "redis",
        "db.operation.name": "EVALSHA",
        "server.address": "127.0.0.1",
    }
    server = [span for span in ours if span.kind == SpanKind.SERVER]
    assert clients[0].parent is not None and clients[0].parent.span_id == server[0].context.span_id


# --- 7. records written before docs/decisions/0011 ------------------------------------------------

# What the ledger script before 0011 wrote (numbers as decimal strings, each reply stored as a JSON
# string inside {"fp", "result"}): user "legacy" credited 500 qoints at T0, a hold of 420 reserved at
# T0 + 1 s (370 points and 50 qoints), and a transfer of 30 qoints to "legacy-friend" at T0 + 2 s
# interrupted after its debit. A dump of a real run of that script.
LEGACY_HOLD = "4cddc1c2af094183aab6760eecc24565"
LEGACY_STORE: dict[str, Any] = {
    "pts:extref:{pay-legacy}": "legacy",
    "pts:xfer:pending": [
        ("legacy\n4fb243c26aab5715991bfdc8faa88330\nc89faf0481cc435397c69f3744c84a0d", 1700000102000),
    ],
    "pts:{legacy}:acct": {
        "tb": "0",
        "used": "0",
        "hp": "370",
        "q": "470",
        "hq": "50",
        "unpaid": "0",
        "exp": "0",
        "period": "1888889",
        "seq": "3",
        "updated": "1700000102000",
    },
    "pts:{legacy}:extref:pay-legacy": "legacy/1",
    "pts:{legacy}:hold:4cddc1c2af094183aab6760eecc24565": (
        '{"q":"50","unpaid":"0","settled":"0","user":"legacy","id":"4cddc1c2af094183aab67'
        '60eecc24565","created":"1700000101000","run":"run-legacy","reason":"","state":"O'
        'PEN","pc":"0","expires":"1700003701000","est":"420","cost":"0","qc":"0","p":"370'
        '","memo":""}'
    ),
    "pts:{legacy}:idem:CreditQoints:legacy-credit": (
        '{"fp":"bb41983af9cda19ea675ecdd23c9178f7a5f34f1089fcf2c6ca2f9da8827a109","result'
        '":"{\\"tx\\":{\\"d_hq\\":\\"0\\",\\"source\\":\\"PURCHASE\\",\\"exp\\":\\"0\\",\\"d_q\\":\\"500\\"'
        ',\\"request_id\\":\\"legacy-credit\\",\\"d_exp\\":\\"0\\",\\"d_used\\":\\"0\\",\\"maxp\\":\\"37'
        '0\\",\\"q\\":\\"500\\",\\"unpaid\\":\\"0\\",\\"id\\":\\"legacy\\\\\\/1\\",\\"memo\\":\\"\\",\\"at\\":\\'
        '"1700000100000\\",\\"d_hp\\":\\"0\\",\\"d_unpaid\\":\\"0\\",\\"used\\":\\"0\\",\\"tb\\":\\"0\\",\\'
        '"kind\\":\\"QOINTS_CREDITED\\",\\"seq\\":\\"1\\",\\"external_reference\\":\\"pay-legacy\\"}'
        ',\\"account\\":{\\"q\\":\\"500\\",\\"avail_p\\":\\"370\\",\\"used\\":\\"0\\",\\"exp\\":\\"0\\",\\"n'
        'ext_at\\":\\"0\\",\\"avail_q\\":\\"500\\",\\"hp\\":\\"0\\",\\"hq\\":\\"0\\",\\"updated\\":\\"17000'
        '00100000\\",\\"holds\\":{},\\"now\\":\\"1700000100000\\",\\"tb\\":\\"0\\",\\"next_points\\":\\'
        '"0\\",\\"unpaid\\":\\"0\\",\\"maxp\\":\\"370\\",\\"user\\":\\"legacy\\"}}"}'
    ),
    "pts:{legacy}:idem:ReserveHold:legacy-reserve": (
        '{"fp":"4129775ff9d030519e66e148646958dae05f3133eb9a869d451b9799c84da0d4","result'
        '":"{\\"tx\\":{\\"d_hq\\":\\"50\\",\\"exp\\":\\"0\\",\\"d_q\\":\\"0\\",\\"request_id\\":\\"legacy-'
        'reserve\\",\\"d_exp\\":\\"0\\",\\"hold_id\\":\\"4cddc1c2af094183aab6760eecc24565\\",\\"d_u'
        'sed\\":\\"0\\",\\"maxp\\":\\"370\\",\\"q\\":\\"500\\",\\"unpaid\\":\\"0\\",\\"id\\":\\"legacy\\\\\\/2'
        '\\",\\"at\\":\\"1700000101000\\",\\"d_hp\\":\\"370\\",\\"d_unpaid\\":\\"0\\",\\"used\\":\\"0\\",\\'
        '"tb\\":\\"0\\",\\"kind\\":\\"HOLD_RESERVED\\",\\"seq\\":\\"2\\",\\"run_id\\":\\"run-legacy\\"},'
        '\\"hold\\":{\\"q\\":\\"50\\",\\"unpaid\\":\\"0\\",\\"settled\\":\\"0\\",\\"user\\":\\"legacy\\",\\"'
        'id\\":\\"4cddc1c2af094183aab6760eecc24565\\",\\"created\\":\\"1700000101000\\",\\"run\\":'
        '\\"run-legacy\\",\\"reason\\":\\"\\",\\"state\\":\\"OPEN\\",\\"pc\\":\\"0\\",\\"expires\\":\\"170'
        '0003701000\\",\\"est\\":\\"420\\",\\"cost\\":\\"0\\",\\"qc\\":\\"0\\",\\"p\\":\\"370\\",\\"memo\\":'
        '\\"\\"},\\"account\\":{\\"q\\":\\"500\\",\\"avail_p\\":\\"0\\",\\"used\\":\\"0\\",\\"exp\\":\\"0\\",'
        '\\"next_at\\":\\"0\\",\\"avail_q\\":\\"450\\",\\"hp\\":\\"370\\",\\"hq\\":\\"50\\",\\"updated\\":\\'
        '"1700000101000\\",\\"holds\\":[{\\"q\\":\\"50\\",\\"unpaid\\":\\"0\\",\\"settled\\":\\"0\\",\\"u'
        'ser\\":\\"legacy\\",\\"id\\":\\"4cddc1c2af094183aab6760eecc24565\\",\\"created\\":\\"17000'
        '00101000\\",\\"run\\":\\"run-legacy\\",\\"reason\\":\\"\\",\\"state\\":\\"OPEN\\",\\"pc\\":\\"0\\'
        '",\\"expires\\":\\"1700003701000\\",\\"est\\":\\"420\\",\\"cost\\":\\"0\\",\\"qc\\":\\"0\\",\\"p\\'
        '":\\"370\\",\\"memo\\":\\"\\"}],\\"now\\":\\"1700000101000\\",\\"tb\\":\\"0\\",\\"next_points\\"'
        ':\\"0\\",\\"unpaid\\":\\"0\\",\\"maxp\\":\\"370\\",\\"user\\":\\"legacy\\"}}"}'
    ),
    "pts:{legacy}:open": [
        ("4cddc1c2af094183aab6760eecc24565", 1700003701000),
    ],
    "pts:{legacy}:tx": [
        (
            (
                '{"d_hq":"0","source":"PURCHASE","exp":"0","d_q":"500","request_id":"legacy-credi'
                't","d_exp":"0","d_used":"0","maxp":"370","q":"500","unpaid":"0","id":"legacy\\/1"'
                ',"memo":"","at":"1700000100000","d_hp":"0","d_unpaid":"0","used":"0","tb":"0","k'
                'ind":"QOINTS_CREDITED","seq":"1","external_reference":"pay-legacy"}'
            ),
            1,
        ),
        (
            (
                '{"d_hq":"50","exp":"0","d_q":"0","request_id":"legacy-reserve","d_exp":"0","hold'
                '_id":"4cddc1c2af094183aab6760eecc24565","d_used":"0","maxp":"370","q":"500","unp'
                'aid":"0","id":"legacy\\/2","at":"1700000101000","d_hp":"370","d_unpaid":"0","used'
                '":"0","tb":"0","kind":"HOLD_RESERVED","seq":"2","run_id":"run-legacy"}'
            ),
            2,
        ),
        (
            (
                '{"d_hq":"0","exp":"0","d_q":"-30","counterparty":"legacy-friend","request_id":"l'
                'egacy-transfer","d_exp":"0","d_unpaid":"0","maxp":"370","q":"470","transfer_id":'
                '"4fb243c26aab5715991bfdc8faa88330","id":"legacy\\/3","d_used":"0","at":"170000010'
                '2000","d_hp":"0","unpaid":"0","used":"0","tb":"0","kind":"QOINTS_TRANSFERRED_OUT'
                '","seq":"3","memo":"old"}'
            ),
            3,
        ),
    ],
    "pts:{legacy}:xfer:4fb243c26aab5715991bfdc8faa88330": (
        '{"created":"1700000102000","to":"legacy-friend","xfer_id":"4fb243c26aab5715991bf'
        'dc8faa88330","out_tx":{"d_hq":"0","exp":"0","d_q":"-30","counterparty":"legacy-f'
        'riend","request_id":"legacy-transfer","d_exp":"0","d_unpaid":"0","maxp":"370","q'
        '":"470","transfer_id":"4fb243c26aab5715991bfdc8faa88330","id":"legacy\\/3","d_use'
        'd":"0","at":"1700000102000","d_hp":"0","unpaid":"0","used":"0","tb":"0","kind":"'
        'QOINTS_TRANSFERRED_OUT","seq":"3","memo":"old"},"request_id":"legacy-transfer","'
        'state":"PENDING","from":"legacy","fp":"4b71cdfd54b727f2437c14f9482f2d793b872b646'
        'da9834873147b78dd9a1736","qoints":"30","memo":"old"}'
    ),
}


async def test_records_written_before_0011_are_read_and_replayed(make_points):
    points = await make_points(FakeClock(T0 + 3000), POINTS_TRANSFER_RECOVERY_SECONDS="3600")
    for key, value in LEGACY_STORE.items():
        if isinstance(value, dict):
            await points.redis.hset(key, mapping=value)
        elif isinstance(value, list):
            await points.redis.zadd(key, dict(value))
        elif ":idem:" in key:
            await points.redis.set(key, value, ex=86_400)
        else:
            await points.redis.set(key, value)
    user = "legacy"

    # Replies stored before 0011 replay as they were; other parameters under their ids are refused.
    replayed = await points.reserve(user, 420, request_id="legacy-reserve", run_id="run-legacy")
    assert (replayed.hold.hold_id, replayed.hold.state) == (LEGACY_HOLD, pb.HOLD_STATE_OPEN)
    assert (replayed.hold.points_held, replayed.hold.qoints_held, replayed.hold.estimate_points) == (370, 50, 420)
    assert [h.hold_id for h in replayed.account.open_holds] == [LEGACY_HOLD]
    assert (replayed.account.qoints, replayed.account.qoints_held) == (500, 50)
    assert replayed.transaction.transaction_id == "legacy/2"
    credited = await points.credit(user, 500, ref="pay-legacy", request_id="legacy-credit")
    assert (credited.account.qoints, credited.transaction.qoints_delta) == (500, 500)
    reused = points.reserve(user, 421, request_id="legacy-reserve", run_id="run-legacy")
    await fails(reused, INVALID, "REQUEST_ID_REUSED")

    # The hold, the account and the interrupted transfer as written then.
    a = await points.account(user)
    assert [h.hold_id for h in a.open_holds] == [LEGACY_HOLD]
    assert (a.points_held, a.qoints, a.qoints_held) == (370, 470, 50)
    check_account(a)
    moved = await points.transfer(user, "legacy-friend", 30, request_id="legacy-transfer", memo="old")
    assert (moved.from_account.qoints, moved.to_account.qoints) == (470, 30)
    assert moved.outgoing_transaction.transaction_id == "legacy/3"
    assert await points.app.ledger.recover_transfers(older_than_ms=0) == 0  # drops the first attempt's entry
    assert await points.redis.zcard("pts:xfer:pending") == 0

    # Written on by this script: a capture of the old hold continues the ledger.
    points.clock.advance(1000)
    captured = await points.capture(user, LEGACY_HOLD, 400)
    assert (captured.hold.state, captured.hold.points_charged, captured.hold.qoints_charged) == (
        pb.HOLD_STATE_CAPTURED,
        370,
        30,
    )
    assert captured.transaction.transaction_id == "legacy/4"
    a = await points.account(user)
    assert (a.points_used, a.points_held, a.qoints, a.qoints_held, a.exp, len(a.open_holds)) == (370, 0, 440, 0, 400, 0)
    txs = await points.txs(user)
    assert [t.transaction_id for t in txs] == ["legacy/4", "legacy/3", "legacy/2", "legacy/1"]
    check_ledger(a, txs)
    assert (await points.hold(user, LEGACY_HOLD)).state == pb.HOLD_STATE_CAPTURED
    again = await points.reserve(user, 420, request_id="legacy-reserve", run_id="run-legacy")
    assert again.SerializeToString(deterministic=True) == replayed.SerializeToString(deterministic=True)
