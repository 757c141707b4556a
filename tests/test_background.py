"""Background tasks owned by a service: started with the server, restarted after a crash, stopped with it."""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health_pb2

from common.bootstrap import Background, GrpcServer, Probe, supervise
from tests.conftest import FAST
from tests.support import make_test_service

SERVING = health_pb2.HealthCheckResponse.SERVING


async def _until(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_a_crashing_task_is_logged_and_restarted_with_backoff(caplog) -> None:  # type: ignore[no-untyped-def]
    runs: list[float] = []
    loop = asyncio.get_running_loop()

    async def flaky() -> None:
        runs.append(loop.time())
        if len(runs) < 4:
            raise RuntimeError("boom")

    await asyncio.wait_for(supervise(Background("flaky", flaky, min_backoff=0.05, max_backoff=0.2)), 10)
    assert len(runs) == 4  # three crashes, then a run that returned: done for good
    assert sum("background task flaky crashed" in r.getMessage() for r in caplog.records) == 3


async def test_backoff_grows_and_is_capped() -> None:
    delays: list[float] = []

    async def record(delay: float) -> None:
        delays.append(delay)
        await asyncio.sleep(0)  # let the test run between restarts

    async def always_fails() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(supervise(Background("bad", always_fails, min_backoff=1, max_backoff=8), sleep=record))
    await _until(lambda: len(delays) >= 12)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert all(0 <= d <= 8 for d in delays)
    assert max(delays[:2]) <= 2  # 1 s, then 2 s ceilings: full jitter below them


async def test_tasks_start_with_the_server_and_stop_with_it() -> None:
    healthy = asyncio.Event()
    started: dict[str, float] = {}
    cancelled: list[str] = []
    loop = asyncio.get_running_loop()

    async def probe() -> None:
        if not healthy.is_set():
            raise RuntimeError("not yet")

    def forever(name: str):  # type: ignore[no-untyped-def]
        async def run() -> None:
            started[name] = loop.time()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(name)
                raise

        return run

    service = make_test_service([Probe("dep", probe)])
    service.background = [
        Background("early", forever("early"), after_serving=False),
        Background("sweep", forever("sweep")),
    ]
    server = GrpcServer(service, FAST)
    await server.start("127.0.0.1:0")
    try:
        await _until(lambda: "early" in started)
        await asyncio.sleep(0.3)
        assert "sweep" not in started  # waits for SERVING
        healthy.set()
        await _until(lambda: "sweep" in started)
        assert await _status(server) == SERVING
    finally:
        await server.stop(0)
    assert sorted(cancelled) == ["early", "sweep"]  # cancelled and awaited by stop()


async def _status(server: GrpcServer) -> int:
    reply = await server.health.Check(health_pb2.HealthCheckRequest(service=""), None)
    return int(reply.status)


async def test_a_task_that_swallows_its_cancel_is_cancelled_again(caplog) -> None:  # type: ignore[no-untyped-def]
    """What Python 3.11's wait_for does when a cancel lands as its inner call completes: the task runs
    on. The server's stop cancels it again instead of waiting for it forever."""
    swallowed: list[int] = []

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if not swallowed:
                    swallowed.append(1)
                    asyncio.current_task().uncancel()  # type: ignore[union-attr]
                    continue  # the first cancel is lost, as wait_for loses it
                raise

    service = make_test_service([])
    service.background = [Background("stubborn", stubborn, after_serving=False)]
    server = GrpcServer(service, FAST)
    await server.start("127.0.0.1:0")
    await asyncio.sleep(0.05)
    await asyncio.wait_for(server.stop(0), 10)
    assert swallowed == [1]
    assert any("stubborn ignored its cancel" in r.getMessage() for r in caplog.records)
