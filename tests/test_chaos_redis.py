"""Redis killed (SIGKILL of the redis-server process) while runs and ledger mutations are in flight,
then brought back on the same port and data dir, as operators' chaos tests do: the AOF restores every
write Redis acknowledged, and callers that got errors meanwhile retry with the same request_id.

Afterwards every run has ended and its hold was reserved once and settled once (as the ledger's own
transactions show), no payment was credited twice, every transfer happened on both sides or on
neither, every balance is the sum of its ledger, nothing is negative, and every service is SERVING
again."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from common.errors import Unavailable
from common.idempotency import RequestIds
from devtools.redis_server import RedisServer, free_port
from services.comfyui.history import History
from stationthis.comfyui.v1 import comfyui_service_pb2 as svc
from stationthis.comfyui.v1 import run_pb2 as R
from stationthis.points.v1 import points_pb2 as pt
from stationthis.points.v1 import points_service_pb2 as pts
from tests.runs_helpers import System, eventually, open_system

USERS = [f"chaos-{i}" for i in range(4)]
RUNS_PER_USER = 5  # 20 runs
CREDITS = 12  # payments, each with its own external reference, credited while Redis dies
TRANSFERS = 12
SEEDED = 5_000  # qoints each user starts with
PAID = pt.QOINTS_SOURCE_PURCHASE
RETRIED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
SETTLING = {pt.TRANSACTION_KIND_HOLD_CAPTURED, pt.TRANSACTION_KIND_HOLD_RELEASED, pt.TRANSACTION_KIND_HOLD_EXPIRED}
ENDED = (R.RUN_STATUS_SUCCESS, R.RUN_STATUS_FAILED, R.RUN_STATUS_TIMEOUT, R.RUN_STATUS_CANCELLED)
UPSTREAM_ENDED = ("success", "failed", "timeout", "cancelled")


class ChaosRedis:
    """A redis-server of its own (AOF, everysec) that can be SIGKILLed and started again on the same
    port and data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.server = RedisServer(data_dir).start()
        self.url = self.server.url

    def kill(self) -> None:
        process = self.server.process
        assert process is not None and process.poll() is None
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        if process.stderr is not None:
            process.stderr.close()

    def restart(self) -> None:
        self.server = RedisServer(self.server.data_dir, port=self.server.port).start()

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def chaos_redis(tmp_path: Path) -> Iterator[ChaosRedis]:
    redis = ChaosRedis(tmp_path / "redis")
    yield redis
    redis.stop()


@pytest.fixture
async def slow_emulator() -> AsyncIterator[Any]:
    """Runs that take about a second (0.05 s a step), two at a time per deployment: when Redis dies,
    some are running upstream and more are waiting there."""
    from emulator.testing import start_for_tests

    running = await start_for_tests(step_seconds=0.05)
    yield running
    await running.close()


class Caller:
    """A client that does what a client must: an error that leaves the outcome open (UNAVAILABLE, a
    deadline) is retried with the same request, until a definite answer. An INTERNAL error (an
    exception the service did not expect escaped) is noted, and retried too."""

    def __init__(self, within: float) -> None:
        self.deadline = asyncio.get_running_loop().time() + within
        self.retries: Counter[str] = Counter()
        self.internal: list[str] = []

    async def call(self, method: Callable[..., Awaitable[Any]], request: Any) -> Any:
        """The reply to ``request``, or the AioRpcError that answered it definitely."""
        loop, what = asyncio.get_running_loop(), request.request_id
        while True:
            try:
                return await method(request, timeout=5)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.INTERNAL:
                    self.internal.append(f"{what}: {exc.details()}")
                elif exc.code() not in RETRIED:
                    return exc
                self.retries[exc.code().name] += 1
                assert loop.time() < self.deadline, f"{what}: no definite answer, last {exc.code().name}"
                await asyncio.sleep(0.1)


async def serving(system: System) -> bool:
    for running in (system.points, system.workflows, system.comfyui[0]):
        with contextlib.suppress(grpc.aio.AioRpcError):
            if await running.health() == health_pb2.HealthCheckResponse.SERVING:
                continue
        return False
    return True


async def all_transactions(system: System, user: str) -> list[pt.Transaction]:
    """Every ledger entry of ``user``, oldest first."""
    found: list[pt.Transaction] = []
    token = ""
    while True:
        reply = await system.ledger.ListTransactions(
            pts.ListTransactionsRequest(user_id=user, page_size=100, page_token=token), timeout=10
        )
        found.extend(reply.transactions)
        token = reply.next_page_token
        if not token:
            return sorted(found, key=lambda tx: int(tx.transaction_id.rpartition("/")[2]))


async def test_redis_killed_mid_load_loses_nothing_and_charges_nothing_twice(
    chaos_redis: ChaosRedis, start_service: Any, slow_emulator: Any
) -> None:
    async with open_system(
        chaos_redis.url,
        start_service,
        slow_emulator,
        points_env={"POINTS_MAX_OPEN_HOLDS": str(RUNS_PER_USER + 1), "POINTS_TRANSFER_RECOVERY_SECONDS": "1"},
        COMFYUI_POLL_AFTER_SECONDS="0.5",
        COMFYUI_SUBMIT_UNKNOWN_SECONDS="6",
        COMFYUI_PENDING_GRACE_SECONDS="2",
    ) as system:
        ledger, runs = system.ledger, system.runs
        for user in USERS:
            await ledger.CreditQoints(
                pts.CreditQointsRequest(request_id=f"seed-{user}", user_id=user, qoints=SEEDED,
                                        external_reference=f"seed-{user}", source=PAID),
                timeout=10,
            )  # fmt: skip
        await slow_emulator.set_faults(next_run_outcomes=["success", "failed", "success"] * 10)
        caller = Caller(within=30)
        created: dict[str, R.Run] = {}  # CreateRun request_id -> the run it answered
        refused: dict[str, Any] = {}  # request_id -> the definite error of a refused mutation
        credited: dict[str, tuple[str, int]] = {}  # external reference -> (user, qoints)
        transfers: dict[str, tuple[str, str, int]] = {}  # request_id -> (from, to, qoints)
        done = Counter[str]()

        async def create_runs(user: str) -> None:
            for n in range(RUNS_PER_USER):
                request = svc.CreateRunRequest(request_id=f"{user}-run-{n}", user_id=user, workflow_name="text2img")
                request.inputs.update({"input_prompt": f"chaos {user} {n}"})
                reply = await caller.call(runs.CreateRun, request)
                if isinstance(reply, grpc.aio.AioRpcError):
                    refused[request.request_id] = reply
                else:
                    created[request.request_id] = reply.run
                await asyncio.sleep(0.3)

        async def credit_payments() -> None:
            for i in range(CREDITS):
                user, qoints, reference = USERS[i % len(USERS)], 100 + i, f"payment-{i}"
                request = pts.CreditQointsRequest(request_id=f"credit-{i}", user_id=user, qoints=qoints,
                                                  external_reference=reference, source=PAID)  # fmt: skip
                reply = await caller.call(ledger.CreditQoints, request)
                if isinstance(reply, grpc.aio.AioRpcError):
                    refused[request.request_id] = reply
                else:
                    credited[reference] = (user, qoints)
                if i % 3 == 0:  # the same payment again, under another request id (another user's)
                    other = USERS[(i + 1) % len(USERS)]
                    again = pts.CreditQointsRequest(request_id=f"again-{i}", user_id=other, qoints=qoints,
                                                    external_reference=reference, source=PAID)  # fmt: skip
                    reply = await caller.call(ledger.CreditQoints, again)
                    refused[again.request_id] = reply
                done["credits"] += 1
                await asyncio.sleep(0.15)

        async def transfer_qoints() -> None:
            for i in range(TRANSFERS):
                sender, receiver = USERS[i % len(USERS)], USERS[(i + 1) % len(USERS)]
                request = pts.TransferQointsRequest(request_id=f"xfer-{i}", from_user_id=sender, to_user_id=receiver,
                                                    qoints=10 + i, memo=f"xfer-{i}")  # fmt: skip
                reply = await caller.call(ledger.TransferQoints, request)
                if isinstance(reply, grpc.aio.AioRpcError):
                    refused[request.request_id] = reply
                else:
                    transfers[request.request_id] = (sender, receiver, request.qoints)
                done["transfers"] += 1
                await asyncio.sleep(0.15)

        load = [asyncio.create_task(create_runs(user)) for user in USERS]
        load += [asyncio.create_task(credit_payments()), asyncio.create_task(transfer_qoints())]
        try:
            # Kill Redis in the middle: some runs created (several upstream), more to come, ledger
            # mutations before and after.
            async def under_way() -> bool:
                return len(created) >= 6 and done["credits"] >= 3 and done["transfers"] >= 3

            await eventually(under_way, "the load under way")
            upstream = [r for r in await slow_emulator.runs() if r["status"] not in UPSTREAM_ENDED]
            chaos_redis.kill()
            killed_at = asyncio.get_running_loop().time()
            await eventually(partial(_not_serving, system), "the points service NOT_SERVING without Redis", 3)
            await asyncio.sleep(max(0.0, killed_at + 1.5 - asyncio.get_running_loop().time()))  # the outage
            await asyncio.to_thread(chaos_redis.restart)
            await asyncio.wait_for(asyncio.gather(*load), 30)
        finally:
            for task in load:
                task.cancel()
            await asyncio.gather(*load, return_exceptions=True)
        assert upstream, "no run was upstream when Redis died"
        assert caller.retries, "no caller saw the outage: Redis died before or after the load"
        assert not caller.internal, f"errors escaped as INTERNAL: {caller.internal}"
        await eventually(partial(serving, system), "every service SERVING again after Redis returned", 10)

        # Every run ends and is settled.
        async def all_settled() -> list[R.Run] | None:
            listed: list[R.Run] = []
            for user in USERS:
                reply = await runs.ListRuns(svc.ListRunsRequest(user_id=user, page_size=50), timeout=10)
                listed.extend(reply.runs)
            return listed if all(r.status in ENDED and r.HasField("settle_time") for r in listed) else None

        listed = await eventually(all_settled, "every run terminal and settled", 30)

        # The checks, with nothing in flight any more. --------------------------------------------
        assert not {k: e.code() for k, e in refused.items() if not k.startswith("again-")}
        again = {k: e.code() for k, e in refused.items() if k.startswith("again-")}
        assert set(again.values()) == {grpc.StatusCode.ALREADY_EXISTS}, again  # a payment credited once
        # One run per CreateRun request, each listed; each queued upstream at most once.
        answered = {run.run_id: run for run in created.values()}
        assert len(answered) == len(created) == len(USERS) * RUNS_PER_USER, created
        by_id = {run.run_id: run for run in listed}
        assert set(answered) <= set(by_id), "a run CreateRun answered was lost"
        tokens = Counter(r["webhook"].split("token=")[1].split(".")[0]
                         for r in await slow_emulator.runs() if r.get("webhook"))  # fmt: skip
        assert set(tokens.values()) == {1} and set(tokens) <= set(by_id), tokens
        for run_id, run in by_id.items():
            ran = run.status in (R.RUN_STATUS_SUCCESS, R.RUN_STATUS_FAILED) and run.error.reason in ("", "RUN_FAILED")
            if ran:  # queued upstream once, and it ran there
                assert tokens[run_id] == 1 and run.upstream_run_id, run
            # CreateRun answered SUBMITTING: the run ran. Else (a retry found the run a CreateRun cut
            # by the outage left PENDING, or that CreateRun left it and its retry made another): the
            # reconciler ended it, never queued, and the ledger checks below that any hold it took
            # was given back (ADR 0010: runs interrupted while PENDING).
            if run_id not in answered or answered[run_id].status == R.RUN_STATUS_PENDING:
                interrupted = run.status == R.RUN_STATUS_FAILED and run.error.reason == "INTERRUPTED"
                assert (interrupted and run_id not in tokens) or (ran and run_id in answered), run
            else:
                assert ran, run
        statuses = Counter(R.RunStatus.Name(r.status) for r in listed)
        assert statuses["RUN_STATUS_SUCCESS"] >= 8 and statuses["RUN_STATUS_FAILED"] >= 3, statuses
        accounts = {user: await system.account(user) for user in USERS}
        ledgers = {user: await all_transactions(system, user) for user in USERS}
        check_ledgers(listed, accounts, ledgers, credited, transfers)


async def _not_serving(system: System) -> bool:
    with contextlib.suppress(grpc.aio.AioRpcError):
        return bool(await system.points.health() == health_pb2.HealthCheckResponse.NOT_SERVING)
    return False


def check_ledgers(
    runs: list[R.Run],
    accounts: dict[str, pt.Account],
    ledgers: dict[str, list[pt.Transaction]],
    credited: dict[str, tuple[str, int]],
    transfers: dict[str, tuple[str, str, int]],
) -> None:
    """The ledger is exact: each run's hold reserved once and settled once as its status says, each
    payment credited once, each transfer on both sides once, each balance the sum of its ledger."""
    everything = [tx for user in sorted(ledgers) for tx in ledgers[user]]
    # Holds: reserved once and settled once, each (by hold) and for each run (by run).
    by_hold: dict[str, Counter[int]] = defaultdict(Counter)
    by_run: dict[str, Counter[int]] = defaultdict(Counter)
    for tx in everything:
        if tx.hold_id:
            by_hold[tx.hold_id][tx.kind] += 1
            by_run[tx.run_id][tx.kind] += 1
    for hold_id, kinds in by_hold.items():
        settled = sum(kinds[k] for k in SETTLING)
        assert kinds[pt.TRANSACTION_KIND_HOLD_RESERVED] == 1 and settled == 1, (hold_id, _names(kinds))
    for run in runs:
        kinds = by_run.pop(run.run_id, Counter())
        expected = pt.TRANSACTION_KIND_HOLD_CAPTURED if run.status == R.RUN_STATUS_SUCCESS else (
            pt.TRANSACTION_KIND_HOLD_RELEASED)  # fmt: skip
        assert kinds == Counter({pt.TRANSACTION_KIND_HOLD_RESERVED: 1, expected: 1}), (
            run.run_id, R.RunStatus.Name(run.status), run.error.reason, _names(kinds))  # fmt: skip
    assert not by_run, f"holds of runs nobody knows: {dict(by_run)}"
    # Payments: each external reference credited once, to its user, with its amount.
    credits = [tx for tx in everything if tx.kind == pt.TRANSACTION_KIND_QOINTS_CREDITED]
    references = Counter(tx.external_reference for tx in credits)
    assert all(count == 1 for count in references.values()), references
    for reference, (user, qoints) in credited.items():
        [tx] = [tx for tx in credits if tx.external_reference == reference]
        assert (tx.user_id, tx.qoints_delta) == (user, qoints), tx
    # Transfers: both sides once for each answered transfer, nothing else, nothing given back.
    outgoing = {tx.memo: tx for tx in everything if tx.kind == pt.TRANSACTION_KIND_QOINTS_TRANSFERRED_OUT}
    incoming = {tx.memo: tx for tx in everything if tx.kind == pt.TRANSACTION_KIND_QOINTS_TRANSFERRED_IN}
    sides = Counter((tx.kind, tx.memo) for tx in everything if tx.counterparty_user_id)
    assert all(count == 1 for count in sides.values()), sides
    assert set(outgoing) == set(incoming) == set(transfers), (sorted(outgoing), sorted(incoming), sorted(transfers))
    for request_id, (sender, receiver, qoints) in transfers.items():
        out, into = outgoing[request_id], incoming[request_id]
        assert (out.user_id, out.counterparty_user_id, out.qoints_delta) == (sender, receiver, -qoints), out
        assert (into.user_id, into.counterparty_user_id, into.qoints_delta) == (receiver, sender, qoints), into
    assert not any(tx.kind == pt.TRANSACTION_KIND_QOINTS_TRANSFER_REVERTED for tx in everything)
    # Balances: each the sum of its ledger (numbered 1..n, no gap, no repeat); nothing negative.
    for user, account in accounts.items():
        txs = ledgers[user]
        assert [int(tx.transaction_id.rpartition("/")[2]) for tx in txs] == list(range(1, len(txs) + 1)), user
        qoints = 0
        for tx in txs:
            qoints += tx.qoints_delta
            assert tx.qoints_after == qoints >= 0, (user, tx)
            assert tx.points_used_after >= 0 and tx.exp_after >= 0 and tx.unpaid_after >= 0, (user, tx)
        assert account.qoints == qoints and account.qoints_available == qoints, (user, account)
        assert account.qoints_held == sum(tx.qoints_held_delta for tx in txs) == 0, (user, account)
        assert account.points_held == sum(tx.points_held_delta for tx in txs) == 0, (user, account)
        assert not account.open_holds, (user, account)
        assert account.exp == sum(tx.exp_delta for tx in txs), (user, account)
        # points_used falls by regeneration, which is not a transaction.
        assert 0 <= account.points_used <= sum(tx.points_used_delta for tx in txs), (user, account)
        assert account.points_available >= 0 and account.unpaid_points >= 0, (user, account)


def _names(kinds: Counter[int]) -> dict[str, int]:
    return {pt.TransactionKind.Name(kind): count for kind, count in kinds.items()}


# --- what the chaos test found, one case each ----------------------------------------------------


async def test_request_ids_and_run_history_answer_unavailable_when_redis_does_not() -> None:
    """Not a bare redis ConnectionError, which the error interceptor can only answer INTERNAL: a
    client retries UNAVAILABLE with the same request_id, not INTERNAL."""
    client = aioredis.Redis(host="127.0.0.1", port=free_port(), retry=Retry(NoBackoff(), 0))
    ids = RequestIds(client, "chaos")
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: ids.claim("CreateRun", "r-1", "fp", b"run"),
        lambda: ids.lookup("CreateRun", "r-1", "fp"),
        lambda: ids.release("CreateRun", "r-1"),
        lambda: History(client).durations("w", 1),
        lambda: History(client).record("w", 1, 1.0),
    ]
    try:
        for call in calls:
            with pytest.raises(Unavailable) as caught:
                await call()
            assert caught.value.reason == "STORE_UNAVAILABLE"
    finally:
        await client.aclose()


def _comfyui(system: System) -> Any:
    return system.comfyui[0].app.runs  # services.comfyui.runs.Runs


async def _created_once_and_captured_once(system: System, run_id: str) -> None:
    """``run_id`` is the user's only run, queued upstream once, its hold reserved and captured once."""
    run = await system.wait(run_id, within=15)
    assert run.status == R.RUN_STATUS_SUCCESS, run
    listed = (await system.runs.ListRuns(svc.ListRunsRequest(user_id="alice"), timeout=10)).runs
    assert [r.run_id for r in listed] == [run_id], listed
    [upstream] = await system.emulator.runs()
    assert upstream["id"] == run.upstream_run_id, upstream
    assert sorted(pt.TransactionKind.Name(tx.kind) for tx in await system.transactions() if tx.hold_id) == [
        "TRANSACTION_KIND_HOLD_CAPTURED", "TRANSACTION_KIND_HOLD_RESERVED"]  # fmt: skip


async def test_a_run_marked_sent_goes_out_though_redis_fails_right_after(
    redis_url: str, start_service: Any, emulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis failing between marking the queue request sent and sending it used to stop the request:
    the run, never sent, could then only end SUBMIT_OUTCOME_UNKNOWN (after COMFYUI_SUBMIT_UNKNOWN_SECONDS)."""
    async with open_system(redis_url, start_service, emulator) as system:
        store = _comfyui(system).store
        update, schedule = store.update, store.schedule
        marked: list[str] = []

        async def noting_update(run_id: str, change: Any) -> Any:
            record, written = await update(run_id, change)
            if written and record.submit == "sent" and not marked:
                marked.append(run_id)
            return record, written

        async def failing_once(run_id: str, at_ms: int) -> None:
            if marked == [run_id]:
                marked.append("failed")
                raise Unavailable("the run store did not answer; retry", reason="STORE_UNAVAILABLE")
            await schedule(run_id, at_ms)

        monkeypatch.setattr(store, "update", noting_update)
        monkeypatch.setattr(store, "schedule", failing_once)
        run = await system.create()
        await _created_once_and_captured_once(system, run.run_id)
        assert marked == [run.run_id, "failed"]


async def test_a_submission_redis_kept_from_starting_is_sent_again_within_seconds(
    redis_url: str, start_service: Any, emulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CreateRun's own task could not even mark the run sent (Redis failed): the reconciler sends it
    a few seconds later, not after the 30 s a request in flight is given."""
    async with open_system(redis_url, start_service, emulator) as system:
        runs = _comfyui(system)
        submit, failed = runs.submit, list[str]()

        async def failing_once(run_id: str) -> None:
            if not failed:
                failed.append(run_id)
                raise Unavailable("the run store did not answer; retry", reason="STORE_UNAVAILABLE")
            await submit(run_id)

        monkeypatch.setattr(runs, "submit", failing_once)
        run = await system.create()
        await _created_once_and_captured_once(system, run.run_id)
        assert failed == [run.run_id]


async def test_create_run_failing_after_its_hold_is_retried_into_the_same_run(
    redis_url: str, start_service: Any, emulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's last write is applied but its answer lost (Redis dies then), after the hold was taken:
    CreateRun answers UNAVAILABLE and the client retries with the same request_id. The retry gets that
    run, which the reconciler submits; it used to release the request_id and make a second run, so one
    request was queued, held and charged twice."""
    async with open_system(redis_url, start_service, emulator, COMFYUI_PENDING_GRACE_SECONDS="1") as system:
        store = _comfyui(system).store
        write, lost = store.write, list[str]()

        async def losing_the_answer_once(change: Any) -> Any:
            written = await write(change)
            if lost or written.run.status != R.RUN_STATUS_SUBMITTING:
                return written
            lost.append(written.run.run_id)
            raise Unavailable("the run store did not answer; retry", reason="STORE_UNAVAILABLE")

        monkeypatch.setattr(store, "write", losing_the_answer_once)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await system.create(request_id="make-1")
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        again = await system.create(request_id="make-1")
        assert [again.run_id] == lost
        await _created_once_and_captured_once(system, again.run_id)


def test_the_ledger_checks_catch_a_double_settlement_a_double_credit_and_a_half_transfer() -> None:
    """check_ledgers passes an exact ledger and fails each way of being inexact the chaos test is for."""
    K = pt.TransactionKind

    def tx(user: str, seq: int, kind: int, after: int, **fields: Any) -> pt.Transaction:
        return pt.Transaction(transaction_id=f"{user}/{seq}", user_id=user, kind=kind, qoints_after=after, **fields)  # type: ignore[arg-type]

    def world() -> tuple[list[R.Run], dict[str, pt.Account], dict[str, list[pt.Transaction]]]:
        hold = {"hold_id": "h1", "run_id": "r1"}
        ledgers = {
            "a": [
                tx("a", 1, K.TRANSACTION_KIND_QOINTS_CREDITED, 5000, qoints_delta=5000, external_reference="seed-a"),
                tx("a", 2, K.TRANSACTION_KIND_HOLD_RESERVED, 5000, points_held_delta=100, qoints_held_delta=20, **hold),
                tx("a", 3, K.TRANSACTION_KIND_HOLD_CAPTURED, 5000, points_held_delta=-100, qoints_held_delta=-20,
                   points_used_delta=60, exp_delta=60, **hold),
                tx("a", 4, K.TRANSACTION_KIND_QOINTS_CREDITED, 5100, qoints_delta=100, external_reference="payment-0"),
                tx("a", 5, K.TRANSACTION_KIND_QOINTS_TRANSFERRED_OUT, 5090, qoints_delta=-10, counterparty_user_id="b",
                   memo="xfer-0"),
            ],
            "b": [tx("b", 1, K.TRANSACTION_KIND_QOINTS_TRANSFERRED_IN, 10, qoints_delta=10, counterparty_user_id="a",
                     memo="xfer-0")],
        }  # fmt: skip
        accounts = {
            "a": pt.Account(user_id="a", qoints=5090, qoints_available=5090, points_used=60, exp=60),
            "b": pt.Account(user_id="b", qoints=10, qoints_available=10),
        }
        return [R.Run(run_id="r1", status=R.RUN_STATUS_SUCCESS)], accounts, ledgers

    credited, transfers = {"payment-0": ("a", 100)}, {"xfer-0": ("a", "b", 10)}
    check_ledgers(*world(), credited, transfers)

    runs, accounts, ledgers = world()  # the hold settled twice
    ledgers["a"].append(tx("a", 6, K.TRANSACTION_KIND_HOLD_RELEASED, 5090, hold_id="h1", run_id="r1"))
    with pytest.raises(AssertionError, match="h1"):
        check_ledgers(runs, accounts, ledgers, credited, transfers)
    runs, accounts, ledgers = world()  # the payment credited again, to another user
    ledgers["b"].append(tx("b", 2, K.TRANSACTION_KIND_QOINTS_CREDITED, 110, qoints_delta=100,
                           external_reference="payment-0"))  # fmt: skip
    accounts["b"].qoints = accounts["b"].qoints_available = 110
    with pytest.raises(AssertionError, match="payment-0"):
        check_ledgers(runs, accounts, ledgers, credited, transfers)
    runs, accounts, ledgers = world()  # the transfer debited but never credited
    ledgers["b"], accounts["b"].qoints, accounts["b"].qoints_available = [], 0, 0
    with pytest.raises(AssertionError, match="xfer-0"):
        check_ledgers(runs, accounts, ledgers, credited, transfers)
    runs, accounts, ledgers = world()  # a balance that is not the sum of its ledger
    accounts["a"].qoints += 100
    with pytest.raises(AssertionError, match="qoints: 5190"):
        check_ledgers(runs, accounts, ledgers, credited, transfers)
    runs, accounts, ledgers = world()  # the run captured though it failed
    runs[0].status = R.RUN_STATUS_FAILED
    with pytest.raises(AssertionError, match="r1"):
        check_ledgers(runs, accounts, ledgers, credited, transfers)
