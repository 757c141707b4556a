"""Unit tests of the client's resilience parts, with a fake clock (no network)."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta

import pytest

from comfydeploy.resilience import (
    BreakerOpen,
    BreakerState,
    CircuitBreaker,
    RateLimiter,
    RateLimitWaitTooLong,
    RetryBudget,
    backoff_delay,
    parse_retry_after,
)


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


# --------------------------------------------------------------------------- backoff


def test_backoff_is_full_jitter_between_zero_and_the_exponential_ceiling() -> None:
    for retry, ceiling in [(0, 0.2), (1, 0.4), (2, 0.8), (3, 1.6)]:
        assert backoff_delay(retry, 0.2, 5.0, random=lambda: 0.0) == 0.0
        assert backoff_delay(retry, 0.2, 5.0, random=lambda: 0.5) == pytest.approx(ceiling / 2)
        assert backoff_delay(retry, 0.2, 5.0, random=lambda: 0.999999) == pytest.approx(ceiling, rel=1e-5)


def test_backoff_is_capped_even_for_huge_retry_numbers() -> None:
    assert backoff_delay(10, 0.2, 5.0, random=lambda: 0.999999) == pytest.approx(5.0, rel=1e-5)
    assert backoff_delay(10_000, 0.2, 5.0, random=lambda: 1.0) == 5.0


def test_backoff_samples_spread_over_the_whole_interval() -> None:
    rng = random.Random(7)
    samples = [backoff_delay(3, 0.2, 5.0, random=rng.random) for _ in range(2000)]
    assert all(0.0 <= s <= 1.6 for s in samples)
    assert min(samples) < 0.1 and max(samples) > 1.5  # full jitter, not "ceiling +- 10%"
    assert sum(samples) / len(samples) == pytest.approx(0.8, abs=0.05)


# --------------------------------------------------------------------------- Retry-After


@pytest.mark.parametrize(
    ("value", "expected"),
    [("3", 3.0), (" 1.5 ", 1.5), ("0", 0.0), (None, None), ("", None), ("-1", None), ("soon", None), ("inf", None)],
)
def test_retry_after_seconds(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_retry_after_http_date() -> None:
    now = datetime(2025, 11, 2, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("Sun, 02 Nov 2025 12:00:07 GMT", now=lambda: now) == pytest.approx(7.0)
    assert parse_retry_after("Sun, 02 Nov 2025 11:59:00 GMT", now=lambda: now) == 0.0  # in the past
    later = datetime.now(UTC) + timedelta(seconds=30)
    header = later.strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert 28 <= (parse_retry_after(header) or 0) <= 30


# --------------------------------------------------------------------------- retry budget


def test_retry_budget_starts_at_the_minimum_and_runs_out() -> None:
    clock = FakeClock()
    budget = RetryBudget(0.2, minimum=5.0, min_per_second=1.0, capacity=20.0, clock=clock)
    assert [budget.try_withdraw() for _ in range(6)] == [True] * 5 + [False]


def test_retry_budget_allows_retries_as_a_fraction_of_first_attempts() -> None:
    clock = FakeClock()
    budget = RetryBudget(0.2, minimum=0.0, min_per_second=0.0, capacity=100.0, clock=clock)
    for _ in range(100):
        budget.deposit()
    granted = sum(budget.try_withdraw() for _ in range(100))
    assert granted == 20


def test_retry_budget_is_capped_so_a_long_healthy_period_cannot_fund_a_storm() -> None:
    clock = FakeClock()
    budget = RetryBudget(0.2, minimum=5.0, capacity=20.0, clock=clock)
    for _ in range(10_000):
        budget.deposit()
    assert budget.balance == 20.0


def test_retry_budget_refills_to_the_minimum_over_time_only() -> None:
    clock = FakeClock()
    budget = RetryBudget(0.2, minimum=5.0, min_per_second=1.0, capacity=20.0, clock=clock)
    while budget.try_withdraw():
        pass
    clock.advance(2.0)
    assert budget.balance == pytest.approx(2.0)
    clock.advance(60.0)
    assert budget.balance == pytest.approx(5.0)  # the time refill stops at the minimum


def test_retry_budget_under_a_failing_upstream_limits_total_retries() -> None:
    """64 calls that all fail, each wanting 3 retries: the budget grants about minimum + 20%."""
    budget = RetryBudget(0.2, minimum=5.0, min_per_second=1.0, capacity=20.0, clock=FakeClock())
    granted = 0
    for _ in range(64):
        budget.deposit()
        granted += sum(budget.try_withdraw() for _ in range(3))
    assert granted <= 5 + 64 * 0.2 + 1
    assert granted < 64 * 3 / 5


# --------------------------------------------------------------------------- circuit breaker


def test_breaker_opens_after_consecutive_failures_only() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(3, 10.0, clock=clock)
    for _ in range(2):
        breaker.acquire().failure()
    breaker.acquire().success()  # resets the count
    for _ in range(2):
        breaker.acquire().failure()
    assert breaker.state is BreakerState.CLOSED
    breaker.acquire().failure()
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(BreakerOpen) as raised:
        breaker.acquire()
    assert raised.value.retry_in == pytest.approx(10.0)


def test_breaker_half_open_lets_one_trial_through_and_closes_on_success() -> None:
    clock = FakeClock()
    changes: list[tuple[BreakerState, BreakerState]] = []
    breaker = CircuitBreaker(2, 10.0, clock=clock, on_change=lambda a, b: changes.append((a, b)))
    breaker.acquire().failure()
    breaker.acquire().failure()
    clock.advance(9.9)
    assert breaker.state is BreakerState.OPEN
    clock.advance(0.1)
    assert breaker.state is BreakerState.HALF_OPEN
    trial = breaker.acquire()
    assert trial.trial
    with pytest.raises(BreakerOpen):
        breaker.acquire()  # only one trial at a time
    trial.success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.consecutive_failures == 0
    breaker.acquire().success()
    assert changes == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]


def test_breaker_half_open_trial_failure_reopens_for_a_full_period() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(1, 5.0, clock=clock)
    breaker.acquire().failure()
    clock.advance(5.0)
    breaker.acquire().failure()  # the trial
    assert breaker.state is BreakerState.OPEN
    clock.advance(4.9)
    with pytest.raises(BreakerOpen):
        breaker.acquire()
    clock.advance(0.1)
    assert breaker.state is BreakerState.HALF_OPEN


def test_breaker_released_trial_frees_the_slot() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(1, 5.0, clock=clock)
    breaker.acquire().failure()
    clock.advance(5.0)
    breaker.acquire().release()  # e.g. the trial was cancelled
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.acquire().success()
    assert breaker.state is BreakerState.CLOSED


def test_breaker_ignores_stragglers_admitted_before_a_state_change() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(2, 5.0, clock=clock)
    old = [breaker.acquire() for _ in range(4)]
    old[0].failure()
    old[1].failure()
    assert breaker.state is BreakerState.OPEN
    old[2].success()  # admitted while closed: cannot close an open breaker
    assert breaker.state is BreakerState.OPEN
    clock.advance(5.0)
    trial = breaker.acquire()
    old[3].failure()  # a straggler cannot re-open a half-open one either
    assert breaker.state is BreakerState.HALF_OPEN
    trial.success()
    assert breaker.state is BreakerState.CLOSED


def test_breaker_permit_reports_once() -> None:
    breaker = CircuitBreaker(2, 5.0, clock=FakeClock())
    permit = breaker.acquire()
    permit.failure()
    permit.failure()
    assert breaker.state is BreakerState.CLOSED


# --------------------------------------------------------------------------- rate limiter


async def test_rate_limiter_allows_a_burst_then_paces_at_the_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10.0, clock=clock, sleep=clock.sleep)
    start = clock.now
    for _ in range(10):
        assert await limiter.acquire() == 0.0  # burst = rate
    for _ in range(20):
        await limiter.acquire()
    assert clock.now - start == pytest.approx(2.0)  # 20 more at 10/s
    assert all(s == pytest.approx(0.1) for s in clock.sleeps)


async def test_rate_limiter_refills_while_idle_up_to_the_burst() -> None:
    clock = FakeClock()
    limiter = RateLimiter(5.0, clock=clock, sleep=clock.sleep)
    for _ in range(5):
        await limiter.acquire()
    clock.advance(100.0)
    waits = [limiter.reserve() for _ in range(6)]
    assert waits[:5] == [0.0] * 5 and waits[5] == pytest.approx(0.2)


async def test_rate_limiter_serves_concurrent_waiters_in_order_at_the_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(4.0, burst=1.0, clock=clock, sleep=clock.sleep)
    waits = [limiter.reserve() for _ in range(5)]
    assert waits == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])


async def test_rate_limiter_refuses_a_wait_past_the_deadline_without_taking_a_token() -> None:
    clock = FakeClock()
    limiter = RateLimiter(2.0, burst=1.0, clock=clock, sleep=clock.sleep)
    await limiter.acquire()
    with pytest.raises(RateLimitWaitTooLong):
        await limiter.acquire(deadline=clock.now + 0.3)  # next token due in 0.5 s
    assert await limiter.acquire(deadline=clock.now + 0.6) == pytest.approx(0.5)


async def test_rate_limiter_cancelled_waiter_returns_its_token() -> None:
    limiter = RateLimiter(1.0, burst=1.0)
    limiter.reserve()
    waiter = asyncio.ensure_future(limiter.acquire())
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert limiter.reserve() < 1.0  # not pushed back by the cancelled waiter's reservation


def test_rate_limiter_disabled() -> None:
    for rate in (None, 0.0, float("inf")):
        limiter = RateLimiter(rate)
        assert not limiter.enabled
        assert all(limiter.reserve() == 0.0 for _ in range(1000))
