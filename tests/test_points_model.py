"""The points service against the in-memory model of points.proto, on random operation sequences.

Hypothesis generates sequences of operations (3 users; reserve, capture, release, credit, transfer,
set token balance, repeat an earlier request, advance a fake clock) and applies each to
``tests/points_model.py`` and to the real service (in-process, over gRPC, on a real Redis). After
every step it compares the outcome (success or the ErrorInfo reason), the holds and accounts in the
response and every user's account (all balances, level, next regeneration, open holds); after the
last step, every user's ledger (kinds, deltas, balances after, request ids, times, in order).

The service runs on an event loop in a background thread; the test thread drives it through a
synchronous channel, so hypothesis (which cannot run async tests) runs in the plain test thread.

"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import grpc
import pytest
import redis
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from common.bootstrap import GrpcServer
from common.config import load
from services.points.config import PointsConfig
from services.points.server import build
from stationthis.points.v1 import points_pb2, points_service_pb2, points_service_pb2_grpc
from stationthis.type.v1 import gpu_pb2
from tests.conftest import FAST
from tests.points_model import PERIOD_MS, Model, ModelError

USERS = ("alice", "bob", "carol.3")
START_MS = 1_767_225_600_000 + 7 * 60_000 + 12_345  # 2026-01-01 00:07:12.345 UTC, between two boundaries
MAX_ELAPSED_MS = 23 * 3600 * 1000  # stay within the 24 h the server promises to remember request ids
EXAMPLES = int(os.environ.get("POINTS_MODEL_EXAMPLES", "100"))
STEPS = int(os.environ.get("POINTS_MODEL_STEPS", "30"))


class FakeClock:
    def __init__(self) -> None:
        self.ms = START_MS

    def now_ms(self) -> int:
        return self.ms


class ServiceThread:
    """The points service on its own event loop in a daemon thread."""

    def __init__(self, redis_url: str, clock: FakeClock) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="points-service", daemon=True)
        self.thread.start()
        env = {"REDIS_URL": redis_url, "POINTS_TRANSFER_RECOVERY_SECONDS": "3600"}

        async def start() -> tuple[GrpcServer, int]:
            server = GrpcServer((await build(load(PointsConfig, env), clock=clock)).service, FAST)
            return server, await server.start("127.0.0.1:0")

        self.server, self.port = self.run(start())

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def stop(self) -> None:
        self.run(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def points_service(redis_url: str) -> Iterator[tuple[points_service_pb2_grpc.PointsServiceStub, FakeClock, str]]:
    clock = FakeClock()
    service = ServiceThread(redis_url, clock)
    channel = grpc.insecure_channel(f"127.0.0.1:{service.port}")
    try:
        yield points_service_pb2_grpc.PointsServiceStub(channel), clock, redis_url
    finally:
        channel.close()
        service.stop()


def reason_of(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return f"no ErrorInfo: {error.code()} {error.details()}"  # type: ignore[attr-defined]


def ms(stamp: Any) -> int:
    return int(stamp.ToMilliseconds())


def sort_expiry_runs(entries: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Entries in order, except that each run of consecutive HOLD_EXPIRED entries is sorted."""
    result: list[tuple[Any, ...]] = []
    run: list[tuple[Any, ...]] = []
    for entry in [*entries, ("END",)]:
        if entry[0] == "HOLD_EXPIRED":
            run.append(entry)
            continue
        result += sorted(run, key=repr)
        run = []
        if entry[0] != "END":
            result.append(entry)
    return result


# --- operations ------------------------------------------------------------------------------------
# Each operation is (name, arguments). Indexes pick among earlier things (holds, request ids) and
# shrink towards the most recent one.

users = st.sampled_from((USERS[0], *USERS))  # the first user twice as often: more holds per user
# None (3 times in 4): a fresh request_id; an int: reuse an earlier request_id, of whatever RPC.
request_ids = st.integers(0, 3).flatmap(lambda k: st.none() if k < 3 else st.integers(0, 10**6))
# Symbolic amounts ("all" ...) are resolved against the model's account when the step runs.
estimates = st.one_of(
    st.sampled_from([0, 0, 1, 10, 50, 100, 150, 370, 371, "all points", "all", "all + 1"]), st.integers(0, 400)
)
ttls = st.sampled_from([None, None, 0, 60, 600, 3600, 7200])
cost_points = st.one_of(st.sampled_from([0, 3, 100, 370, 1000]), st.integers(0, 900))
usages = st.tuples(
    st.sampled_from([v.number for v in gpu_pb2.GpuType.DESCRIPTOR.values if v.number]),
    st.integers(0, 300),
    st.sampled_from([0, 0, 1, 500_000_000, 999_999_999]),
)
costs = st.one_of(cost_points.map(lambda c: ("points", c)), usages.map(lambda u: ("usage", u)))
# (index from the newest hold, whose): mostly one of the newest holds, of its owner.
holds = st.tuples(
    st.one_of(st.integers(0, 2), st.integers(0, 10**6)), st.sampled_from(["owner"] * 6 + ["other user", "unknown"])
)
qoints = st.one_of(st.sampled_from([1, 100, 370]), st.integers(1, 600))
transfer_amounts = st.one_of(st.sampled_from(["all", "all + 1"]), qoints)
references = st.one_of(st.just(None), st.integers(0, 5).map(lambda i: f"ref-{i}"))  # None: a fresh one
token_balances = st.one_of(st.sampled_from([0, 539, 540, 100_000, 300_000]), st.integers(0, 600_000))
advances = st.one_of(
    st.sampled_from(["to boundary", "before boundary", "to expiry", "before expiry"]),
    st.integers(0, 60_000),  # seconds
    st.integers(60_000, 20 * 60_000),  # minutes: crosses a boundary or not
    st.integers(20 * 60_000, 3 * 3600_000),  # hours: several boundaries, past hold TTLs
)


def operation(name: str, **arguments: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[str, dict[str, Any]]]:
    return st.tuples(st.just(name), st.fixed_dictionaries(arguments))


reserve_op = operation("reserve", user=users, estimate=estimates, ttl=ttls, pick=request_ids)
capture_op = operation("capture", user=users, hold=holds, cost=costs, pick=request_ids)
release_op = operation(
    "release", user=users, hold=holds, reason=st.sampled_from([1, 2, 3, 4, 5, 0, 99]), memo=st.sampled_from(["", "x"]),
    pick=request_ids,
)  # fmt: skip
credit_op = operation("credit", user=users, amount=qoints, reference=references, pick=request_ids)
receivers = st.sampled_from([1, 1, 1, 2, 2, 2, 0])  # offset from the sender in USERS; 0 is the sender
transfer_op = operation("transfer", sender=users, receiver=receivers, amount=transfer_amounts, pick=request_ids)
tokens_op = operation("set_token_balance", user=users, tokens=token_balances, pick=request_ids)
repeat_op = operation("repeat", index=st.integers(0, 10**6))
advance_op = operation("advance_clock", advance=advances)
# Weighted by repetition. "skip" comes first: examples have a fixed length, and shrinking turns the
# steps a failure does not need into skips (the shrinker prefers earlier elements).
KINDS = {
    "skip": operation("skip"), "reserve": reserve_op, "capture": capture_op, "release": release_op,
    "credit": credit_op, "transfer": transfer_op, "tokens": tokens_op, "repeat": repeat_op, "advance": advance_op,
}  # fmt: skip
WEIGHTS = {"skip": 1, "reserve": 6, "capture": 3, "release": 2, "credit": 2, "transfer": 2, "tokens": 1, "repeat": 2,
           "advance": 4}  # fmt: skip
operations = st.sampled_from([kind for kind, weight in WEIGHTS.items() for _ in range(weight)]).flatmap(
    KINDS.__getitem__
)


def _op(name: str, **arguments: Any) -> tuple[str, dict[str, Any]]:
    defaults: dict[str, dict[str, Any]] = {
        "reserve": {"ttl": None, "pick": None},
        "capture": {"hold": (0, "owner"), "pick": None},
        "release": {"hold": (0, "owner"), "reason": 1, "memo": "", "pick": None},
        "credit": {"reference": None, "pick": None},
        "transfer": {"pick": None},
        "set_token_balance": {"pick": None},
    }
    return name, {**defaults.get(name, {}), **arguments}


# Hand-written sequences run before the random ones, so each rule is exercised on every run.
SCENARIOS = [
    [  # a hold paid by qoints only, captured for more than it holds: qoints to zero, the rest unpaid
        _op("credit", user="alice", amount=100),
        _op("reserve", user="alice", estimate="all points"),
        _op("reserve", user="alice", estimate=100),
        _op("capture", user="alice", cost=("points", 900)),
        _op("capture", user="alice", cost=("usage", (4, 30, 0))),  # the allowance hold: 30 s of A10G
        _op("advance_clock", advance="to boundary"),
    ],
    [  # the room a capture may use excludes what the user's other open holds keep
        _op("credit", user="carol.3", amount=50),
        _op("reserve", user="carol.3", estimate=300),
        _op("reserve", user="carol.3", estimate=100),
        _op("capture", user="carol.3", cost=("points", 200)),
        _op("capture", user="carol.3", cost=("points", 10)),
    ],
    [  # a hold on the allowance captured for far more: allowance debt, paid off by regeneration
        _op("reserve", user="bob", estimate=100),
        _op("capture", user="bob", cost=("points", 1000)),
        _op("reserve", user="bob", estimate=1),
        _op("advance_clock", advance="before boundary"),
        _op("advance_clock", advance="to boundary"),
        _op("advance_clock", advance=3 * 3600_000),
        _op("reserve", user="bob", estimate="all"),
    ],
    [  # expiry at exactly expire_time; release of an expired hold is a no-op; a late capture charges
        _op("reserve", user="carol.3", estimate=200, ttl=60),
        _op("reserve", user="carol.3", estimate=100, ttl=600),
        _op("advance_clock", advance="before expiry"),
        _op("advance_clock", advance="to expiry"),
        _op("release", user="carol.3", hold=(1, "owner")),
        _op("capture", user="carol.3", hold=(1, "owner"), cost=("points", 150)),
        _op("release", user="carol.3", hold=(1, "owner")),
        _op("capture", user="carol.3", hold=(1, "owner"), cost=("points", 150)),
        _op("advance_clock", advance="to expiry"),
        _op("capture", user="carol.3", cost=("points", 20)),
    ],
    [  # max_points falls below what is used and held; regeneration at the new rate
        _op("set_token_balance", user="alice", tokens=300_000),
        _op("reserve", user="alice", estimate=500),
        _op("reserve", user="alice", estimate=400),
        _op("capture", user="alice", hold=(1, "owner"), cost=("points", 500)),
        _op("set_token_balance", user="alice", tokens=0),
        _op("capture", user="alice", cost=("points", 400)),
        _op("advance_clock", advance=2 * 3600_000),
        _op("set_token_balance", user="alice", tokens=540),
        _op("advance_clock", advance=3600_000),
    ],
    [  # the 3-hold cap, replays after the state moved on, reuse with other parameters or another RPC
        _op("reserve", user="bob", estimate=10),
        _op("reserve", user="bob", estimate=10),
        _op("reserve", user="bob", estimate=10),
        _op("reserve", user="bob", estimate=10),
        _op("release", user="bob", reason=2),
        _op("repeat", index=4),
        _op("repeat", index=1),
        _op("reserve", user="bob", estimate=11, pick=2),
        _op("capture", user="bob", cost=("points", 5), pick=0),
        _op("set_token_balance", user="bob", tokens=7, pick=0),
    ],
    [  # ttl unset and 0 are the same parameters under one request_id; a reason the contract lacks
        _op("reserve", user="alice", estimate=10),
        _op("reserve", user="alice", estimate=10, ttl=0, pick=0),
        _op("reserve", user="alice", estimate=10, ttl=60, pick=1),
        _op("release", user="alice", reason=99),
    ],
    [  # external references once ever (across users); transfers of everything and one more
        _op("credit", user="alice", amount=300, reference="ref-1"),
        _op("credit", user="bob", amount=300, reference="ref-1"),
        _op("credit", user="alice", amount=300, reference="ref-1"),
        _op("repeat", index=2),
        # a refused request (here REQUEST_ID_REUSED) binds nothing: a reference is bound to the first
        # user it is credited to
        _op("credit", user="alice", amount=5, reference="ref-2", pick=0),
        _op("credit", user="bob", amount=5, reference="ref-2"),
        _op("credit", user="alice", amount=5, reference="ref-2"),
        _op("credit", user="bob", amount=5, reference="ref-1", pick=1),
        _op("reserve", user="alice", estimate="all"),
        _op("transfer", sender="alice", receiver="bob", amount="all + 1"),
        _op("release", user="alice"),
        _op("transfer", sender="alice", receiver="bob", amount="all"),
        _op("repeat", index=0),
        _op("transfer", sender="bob", receiver="bob", amount=1),
    ],
]


class Harness:
    """One example: a fresh Redis, the model, and the mapping of the service's hold ids to the model's."""

    def __init__(self, stub: points_service_pb2_grpc.PointsServiceStub, clock: FakeClock, redis_url: str) -> None:
        client = redis.Redis.from_url(redis_url)
        client.flushall()
        client.close()
        self.stub = stub
        self.clock = clock
        self.clock.ms = START_MS
        self.model = Model(now_ms=START_MS)
        self.hold_ids: dict[str, str] = {}  # server hold id -> model hold id
        self.model_holds: list[str] = []  # model hold ids, in creation order
        self.sent: list[tuple[str, str, str, dict[str, Any]]] = []  # (rpc, request_id, key user, params)

    def apply(self, name: str, arguments: dict[str, Any]) -> None:
        if name != "skip":
            getattr(self, name)(**arguments)

    # --- plumbing -------------------------------------------------------------------------------------

    def request_id(self, rpc: str, pick: int | None, key_user: str) -> str:
        if pick is not None and self.sent:
            earlier = self.sent[-1 - pick % len(self.sent)][1]
            return earlier
        return uuid.uuid4().hex

    def server_hold_id(self, model_id: str) -> str:
        for server_id, known in self.hold_ids.items():
            if known == model_id:
                return server_id
        return model_id  # a hold the server never made: an unknown id

    def hold_view(self, hold: points_pb2.Hold) -> dict[str, Any]:
        return {
            "hold_id": self.hold_ids.get(hold.hold_id, f"unmapped {hold.hold_id}"),
            "state": points_pb2.HoldState.Name(hold.state).removeprefix("HOLD_STATE_"),
            "estimate": hold.estimate_points,
            "p": hold.points_held,
            "q": hold.qoints_held,
            "created": ms(hold.create_time),
            "expires": ms(hold.expire_time),
            "settled": ms(hold.settle_time) if hold.HasField("settle_time") else 0,
            "cost": hold.cost_points,
            "points_charged": hold.points_charged,
            "qoints_charged": hold.qoints_charged,
            "unpaid": hold.unpaid_points,
        }

    def account_view(self, account: points_pb2.Account) -> dict[str, Any]:
        open_holds = list(account.open_holds)
        created = [ms(h.create_time) for h in open_holds]
        assert created == sorted(created), "open_holds are not oldest first"
        return {
            "token_balance": account.token_balance,
            "max_points": account.max_points,
            "points_used": account.points_used,
            "points_held": account.points_held,
            "points_available": account.points_available,
            "qoints": account.qoints,
            "qoints_held": account.qoints_held,
            "qoints_available": account.qoints_available,
            "unpaid_points": account.unpaid_points,
            "exp": account.exp,
            "level": account.level,
            "next_regeneration_time": ms(account.next_regeneration_time)
            if account.HasField("next_regeneration_time")
            else 0,
            "next_regeneration_points": account.next_regeneration_points,
            "open_holds": sorted(
                (
                    self.hold_ids.get(h.hold_id, f"unmapped {h.hold_id}"),
                    h.points_held,
                    h.qoints_held,
                    h.estimate_points,
                    ms(h.expire_time),
                )
                for h in open_holds
            ),
        }

    def step(
        self,
        rpc: str,
        request_id: str,
        key_user: str,
        params: dict[str, Any],
        model_call: Callable[[], Any],
        server_call: Callable[[], Any],
        compare: Callable[[Any, Any], None],
    ) -> None:
        """Send one operation to both sides and compare the outcomes."""
        self.sent.append((rpc, request_id, key_user, params))
        try:
            expected: Any = model_call()
            expected_reason = "OK"
        except ModelError as exc:
            expected, expected_reason = None, exc.reason
        try:
            actual: Any = server_call()
            actual_reason = "OK"
        except grpc.RpcError as exc:
            actual, actual_reason = None, reason_of(exc)
        assert actual_reason == expected_reason, f"{rpc} {params}: service {actual_reason}, model {expected_reason}"
        if expected is not None:
            compare(expected, actual)
        self.check_state()

    def check_state(self) -> None:
        """Every user's account, as the service reports it, against the model."""
        for user in USERS:
            got = self.stub.GetAccount(points_service_pb2.GetAccountRequest(user_id=user), timeout=10).account
            assert self.account_view(got) == self.model.view(user), f"account of {user}"

    def check_ledgers(self) -> None:
        """Every user's ledger, oldest first (expiries written together have no defined order: sorted)."""
        for user in USERS:
            entries, token = [], ""
            while True:
                page = self.stub.ListTransactions(
                    points_service_pb2.ListTransactionsRequest(user_id=user, page_size=200, page_token=token),
                    timeout=10,
                )
                entries += page.transactions
                token = page.next_page_token
                if not token:
                    break
            actual = [
                (points_pb2.TransactionKind.Name(t.kind).removeprefix("TRANSACTION_KIND_"),
                 self.hold_ids.get(t.hold_id, t.hold_id), t.points_used_delta, t.points_held_delta,
                 t.qoints_delta, t.qoints_held_delta, t.exp_delta, t.unpaid_delta, t.points_used_after,
                 t.qoints_after, t.exp_after, t.unpaid_after, t.token_balance_after, t.max_points_after,
                 t.request_id, ms(t.create_time))
                for t in reversed(entries)
            ]  # fmt: skip
            expected = self.model.ledger.get(user, [])
            assert sort_expiry_runs(actual) == sort_expiry_runs(expected), f"ledger of {user}"

    def compare_hold_response(self, expected: Any, actual: Any) -> None:
        assert self.hold_view(actual.hold) == expected["hold"]
        assert self.account_view(actual.account) == expected["account"]

    # --- operations (each sends one request to both sides) -------------------------------------------

    def do_reserve(self, rid: str, user: str, estimate: int, ttl: int | None) -> None:
        request = points_service_pb2.ReserveHoldRequest(request_id=rid, user_id=user, estimate_points=estimate)
        if ttl is not None:
            request.ttl.CopyFrom(duration_pb2.Duration(seconds=ttl))

        def compare(expected: Any, actual: Any) -> None:
            model_id, server_id = expected["hold"]["hold_id"], actual.hold.hold_id
            if server_id not in self.hold_ids and model_id not in self.hold_ids.values():
                self.hold_ids[server_id] = model_id
                self.model_holds.append(model_id)
            self.compare_hold_response(expected, actual)

        self.step(
            "ReserveHold", rid, user, {"user": user, "estimate": estimate, "ttl": ttl},
            lambda: self.model.reserve(rid, user, estimate, ttl),
            lambda: self.stub.ReserveHold(request, timeout=10),
            compare,
        )  # fmt: skip

    def do_capture(self, rid: str, user: str, hold: str, cost: tuple[str, Any]) -> None:
        kind, value = cost
        request = points_service_pb2.CaptureHoldRequest(request_id=rid, user_id=user, hold_id=self.server_hold_id(hold))
        if kind == "points":
            request.cost_points = value
        else:
            request.usage.gpu = value[0]
            request.usage.gpu_time.CopyFrom(duration_pb2.Duration(seconds=value[1], nanos=value[2]))
        self.step(
            "CaptureHold", rid, user, {"user": user, "hold": hold, "cost": cost},
            lambda: self.model.capture(
                rid, user, hold, cost_points=value if kind == "points" else None,
                usage=value if kind == "usage" else None,
            ),
            lambda: self.stub.CaptureHold(request, timeout=10),
            self.compare_hold_response,
        )  # fmt: skip

    def do_release(self, rid: str, user: str, hold: str, reason: int, memo: str) -> None:
        request = points_service_pb2.ReleaseHoldRequest(
            request_id=rid,
            user_id=user,
            hold_id=self.server_hold_id(hold),
            reason=reason,
            memo=memo,  # type: ignore[arg-type]
        )

        def compare(expected: Any, actual: Any) -> None:
            self.compare_hold_response(expected, actual)
            assert actual.HasField("transaction") == expected["transaction"], "release transaction"

        self.step(
            "ReleaseHold", rid, user, {"user": user, "hold": hold, "reason": reason, "memo": memo},
            lambda: self.model.release(rid, user, hold, reason, memo),
            lambda: self.stub.ReleaseHold(request, timeout=10),
            compare,
        )  # fmt: skip

    def do_credit(self, rid: str, user: str, qoints: int, ref: str) -> None:
        request = points_service_pb2.CreditQointsRequest(
            request_id=rid,
            user_id=user,
            qoints=qoints,
            external_reference=ref,
            source=points_pb2.QOINTS_SOURCE_PURCHASE,
        )
        self.step(
            "CreditQoints", rid, user, {"user": user, "qoints": qoints, "ref": ref},
            lambda: self.model.credit(rid, user, qoints, ref),
            lambda: self.stub.CreditQoints(request, timeout=10),
            lambda expected, actual: self.compare_accounts(expected, actual, "account"),
        )  # fmt: skip

    def do_transfer(self, rid: str, sender: str, receiver: str, qoints: int) -> None:
        request = points_service_pb2.TransferQointsRequest(
            request_id=rid, from_user_id=sender, to_user_id=receiver, qoints=qoints
        )
        self.step(
            "TransferQoints", rid, sender, {"sender": sender, "receiver": receiver, "qoints": qoints},
            lambda: self.model.transfer(rid, sender, receiver, qoints),
            lambda: self.stub.TransferQoints(request, timeout=10),
            lambda expected, actual: self.compare_accounts(expected, actual, "from_account", "to_account"),
        )  # fmt: skip

    def do_set_token_balance(self, rid: str, user: str, tokens: int) -> None:
        request = points_service_pb2.SetTokenBalanceRequest(request_id=rid, user_id=user, token_balance=tokens)
        self.step(
            "SetTokenBalance", rid, user, {"user": user, "tokens": tokens},
            lambda: self.model.set_token_balance(rid, user, tokens),
            lambda: self.stub.SetTokenBalance(request, timeout=10),
            lambda expected, actual: self.compare_accounts(expected, actual, "account"),
        )  # fmt: skip

    def compare_accounts(self, expected: Any, actual: Any, *names: str) -> None:
        for name in names:
            assert self.account_view(getattr(actual, name)) == expected[name], name

    # --- the operations as generated -------------------------------------------------------------------

    def resolve(self, amount: int | str, user: str, points: bool) -> int:
        if isinstance(amount, int):
            return amount
        account = self.model.view(user)
        total = account["qoints_available"] + (account["points_available"] if points else 0)
        return {"all points": account["points_available"], "all": total, "all + 1": total + 1}[amount]

    def reserve(self, user: str, estimate: int | str, ttl: int | None, pick: int | None) -> None:
        estimate = self.resolve(estimate, user, points=True)
        self.do_reserve(self.request_id("ReserveHold", pick, user), user, estimate, ttl)

    def pick_hold(self, hold: tuple[int, str], user: str) -> tuple[str, str]:
        """(user, model hold id) for a hold pick: its owner, another user, or a hold that does not exist."""
        index, whose = hold
        if whose == "unknown" or not self.model_holds:
            return user, uuid.uuid4().hex
        # Counted from the newest OPEN hold back, then the settled ones: small indexes hit open holds.
        ordered = sorted(self.model_holds, key=lambda h: self.model.holds[h].state == "OPEN")
        model_id = ordered[-1 - index % len(ordered)]
        owner = self.model.holds[model_id].user
        if whose == "other user":
            owner = USERS[(USERS.index(owner) + 1) % len(USERS)]
        return owner, model_id

    def capture(self, user: str, hold: tuple[int, str], cost: tuple[str, Any], pick: int | None) -> None:
        user, model_id = self.pick_hold(hold, user)
        self.do_capture(self.request_id("CaptureHold", pick, user), user, model_id, cost)

    def release(self, user: str, hold: tuple[int, str], reason: int, memo: str, pick: int | None) -> None:
        user, model_id = self.pick_hold(hold, user)
        self.do_release(self.request_id("ReleaseHold", pick, user), user, model_id, reason, memo)

    def credit(self, user: str, amount: int, reference: str | None, pick: int | None) -> None:
        ref = reference or f"fresh-{uuid.uuid4().hex}"
        self.do_credit(self.request_id("CreditQoints", pick, user), user, amount, ref)

    def transfer(self, sender: str, receiver: str | int, amount: int | str, pick: int | None) -> None:
        if isinstance(receiver, int):
            receiver = USERS[(USERS.index(sender) + receiver) % len(USERS)]
        amount = max(1, self.resolve(amount, sender, points=False))
        self.do_transfer(self.request_id("TransferQoints", pick, sender), sender, receiver, amount)

    def set_token_balance(self, user: str, tokens: int, pick: int | None) -> None:
        self.do_set_token_balance(self.request_id("SetTokenBalance", pick, user), user, tokens)

    def repeat(self, index: int) -> None:
        """Send an earlier request again, unchanged (a client retry)."""
        if not self.sent:
            return
        rpc, rid, _, params = self.sent[-1 - index % len(self.sent)]
        operation = {
            "ReserveHold": self.do_reserve,
            "CaptureHold": self.do_capture,
            "ReleaseHold": self.do_release,
            "CreditQoints": self.do_credit,
            "TransferQoints": self.do_transfer,
            "SetTokenBalance": self.do_set_token_balance,
        }[rpc]
        operation(rid, **params)

    def advance_clock(self, advance: int | str) -> None:
        now = self.clock.ms
        if isinstance(advance, int):
            target = now + advance
        elif advance in ("to boundary", "before boundary"):
            target = (now // PERIOD_MS + 1) * PERIOD_MS - (advance == "before boundary")
        else:
            pending = sorted(h.expires for h in self.model.holds.values() if h.state == "OPEN" and h.expires > now)
            target = (pending[0] - (advance == "before expiry")) if pending else now
        target = max(now, min(target, START_MS + MAX_ELAPSED_MS))
        self.clock.ms = self.model.now_ms = target
        self.check_state()


@pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")
# The service thread creates OpenTelemetry spans (when another test installed a tracer provider) and
# span ids come from the `random` module; hypothesis notices that global random use and warns.
@pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")
def test_service_agrees_with_the_model(
    points_service: tuple[points_service_pb2_grpc.PointsServiceStub, FakeClock, str],
) -> None:
    stub, clock, redis_url = points_service

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(steps=st.lists(operations, min_size=STEPS, max_size=STEPS))
    def run(steps: list[tuple[str, dict[str, Any]]]) -> None:
        harness = Harness(stub, clock, redis_url)
        for name, arguments in steps:
            harness.apply(name, arguments)
        harness.check_ledgers()

    for scenario in SCENARIOS:
        run = example(steps=scenario)(run)
    run()


def test_request_ids_are_scoped_per_user(
    points_service: tuple[points_service_pb2_grpc.PointsServiceStub, FakeClock, str],
) -> None:
    stub, _, _ = points_service
    stub.SetTokenBalance(
        points_service_pb2.SetTokenBalanceRequest(request_id="same-id", user_id="alice", token_balance=1), timeout=10
    )
    # Another user's request with the same id is a request of its own (ids are scoped per user)...
    reply = stub.SetTokenBalance(
        points_service_pb2.SetTokenBalanceRequest(request_id="same-id", user_id="bob", token_balance=2), timeout=10
    )
    assert reply.account.token_balance == 2
    # ...while the same user reusing it with other parameters is refused.
    with pytest.raises(grpc.RpcError) as refused:
        stub.SetTokenBalance(
            points_service_pb2.SetTokenBalanceRequest(request_id="same-id", user_id="alice", token_balance=3),
            timeout=10,
        )
    assert reason_of(refused.value) == "REQUEST_ID_REUSED"
