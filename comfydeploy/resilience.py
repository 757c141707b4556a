"""The client's resilience parts, each small and testable with a fake clock.

* ``backoff_delay``: capped exponential backoff with full jitter.
* ``parse_retry_after``: a Retry-After header in seconds or as an HTTP date.
* ``RetryBudget``: a token bucket that caps retries at a fraction of first attempts (no retry storms).
* ``CircuitBreaker``: CLOSED -> OPEN -> HALF_OPEN with one trial call.
* ``RateLimiter``: a client-side token bucket; callers wait for a token, bounded by their deadline.

Time is ``clock()`` (seconds, monotonic) and waiting is ``await sleep(seconds)``, both injectable.
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
from collections.abc import Awaitable, Callable

# Shared with the other retrying parts of the system; still importable from here.
from common.backoff import backoff_delay as backoff_delay
from common.backoff import parse_retry_after as parse_retry_after

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
Random = Callable[[], float]


class RetryBudget:
    """Retries allowed as a fraction of first attempts, so a failing upstream is not hit N times harder.

    Each first attempt deposits ``ratio`` tokens and each retry withdraws one. The balance is capped at
    ``capacity`` (the size of a retry burst) and, so that a quiet client can still retry now and then,
    refills by ``min_per_second`` tokens per second up to ``minimum`` on its own. It starts at ``minimum``.
    """

    def __init__(
        self,
        ratio: float = 0.2,
        *,
        minimum: float = 5.0,
        min_per_second: float = 1.0,
        capacity: float = 20.0,
        clock: Clock = time.monotonic,
    ) -> None:
        if ratio < 0:
            raise ValueError("ratio must be >= 0")
        self.ratio = ratio
        self.minimum = minimum
        self.min_per_second = min_per_second
        self.capacity = max(capacity, minimum)
        self._clock = clock
        self._balance = minimum
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        elapsed = now - self._updated
        self._updated = now
        if elapsed > 0 and self._balance < self.minimum:
            self._balance = min(self.minimum, self._balance + elapsed * self.min_per_second)

    @property
    def balance(self) -> float:
        self._refill()
        return self._balance

    def deposit(self) -> None:
        """Record a first attempt."""
        self._balance = min(self.capacity, self._balance + self.ratio)

    def try_withdraw(self) -> bool:
        """Take one token for a retry; False (and no retry) when the budget is spent."""
        self._refill()
        if self._balance >= 1.0 - 1e-9:  # tolerate float sums such as 5 x 0.2
            self._balance = max(0.0, self._balance - 1.0)
            return True
        return False


class BreakerState(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class BreakerOpen(Exception):
    """The breaker refused the call; ``retry_in`` is the time until it lets a trial through."""

    def __init__(self, retry_in: float) -> None:
        super().__init__(f"circuit open, next trial in {retry_in:.2f}s")
        self.retry_in = retry_in


class Permit:
    """One call's admission by the breaker; report its outcome exactly once (extra reports are ignored)."""

    __slots__ = ("_breaker", "_done", "generation", "trial")

    def __init__(self, breaker: CircuitBreaker, trial: bool, generation: int) -> None:
        self._breaker = breaker
        self.trial = trial
        self.generation = generation
        self._done = False

    def success(self) -> None:
        if not self._done:
            self._done = True
            self._breaker._on_success(self)

    def failure(self) -> None:
        if not self._done:
            self._done = True
            self._breaker._on_failure(self)

    def release(self) -> None:
        """The call ended with no verdict on the upstream (cancelled, or a neutral error)."""
        if not self._done:
            self._done = True
            self._breaker._on_release(self)


class CircuitBreaker:
    """Consecutive-failure breaker for one upstream.

    CLOSED: calls pass; ``failure_threshold`` consecutive failures open it. OPEN: calls fail fast for
    ``reset_seconds``. HALF_OPEN: exactly one trial call passes (others fail fast); its success closes
    the breaker, its failure reopens it for another ``reset_seconds``. Outcomes of calls admitted
    before the latest state change are ignored, so stragglers cannot close or re-open it.
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        reset_seconds: float = 10.0,
        *,
        clock: Clock = time.monotonic,
        on_change: Callable[[BreakerState, BreakerState], None] | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        self.failure_threshold = failure_threshold
        self.reset_seconds = reset_seconds
        self._clock = clock
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial_out = False
        self._generation = 0

    @property
    def state(self) -> BreakerState:
        """The current state; an OPEN breaker whose reset time has passed reads HALF_OPEN."""
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.reset_seconds:
            self._set(BreakerState.HALF_OPEN)
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def _set(self, state: BreakerState) -> None:
        previous = self._state
        if previous is state:
            return
        self._state = state
        self._generation += 1
        self._trial_out = False
        if state is BreakerState.OPEN:
            self._opened_at = self._clock()
        if state is BreakerState.CLOSED:
            self._failures = 0
        if self._on_change is not None:
            self._on_change(previous, state)

    def acquire(self) -> Permit:
        """Admit a call or raise ``BreakerOpen``."""
        state = self.state
        if state is BreakerState.CLOSED:
            return Permit(self, False, self._generation)
        if state is BreakerState.HALF_OPEN and not self._trial_out:
            self._trial_out = True
            return Permit(self, True, self._generation)
        if state is BreakerState.OPEN:
            raise BreakerOpen(max(0.0, self._opened_at + self.reset_seconds - self._clock()))
        raise BreakerOpen(0.0)

    def _current(self, permit: Permit) -> bool:
        return permit.generation == self._generation

    def _on_success(self, permit: Permit) -> None:
        if not self._current(permit):
            return
        if self._state is BreakerState.HALF_OPEN and permit.trial:
            self._set(BreakerState.CLOSED)
        elif self._state is BreakerState.CLOSED:
            self._failures = 0

    def _on_failure(self, permit: Permit) -> None:
        if not self._current(permit):
            return
        if self._state is BreakerState.HALF_OPEN and permit.trial:
            self._set(BreakerState.OPEN)
        elif self._state is BreakerState.CLOSED:
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._set(BreakerState.OPEN)

    def _on_release(self, permit: Permit) -> None:
        if self._current(permit) and self._state is BreakerState.HALF_OPEN and permit.trial:
            self._trial_out = False


class RateLimitWaitTooLong(Exception):
    """The wait for a token would end after the caller's deadline."""

    def __init__(self, wait: float) -> None:
        super().__init__(f"rate limiter wait {wait:.3f}s exceeds the deadline")
        self.wait = wait


class RateLimiter:
    """Token bucket: ``rate`` tokens per second, ``burst`` (default ``rate``) at most.

    ``acquire`` reserves a token at once (the balance may go negative, so waiters are served in
    arrival order) and sleeps until it is due. If that time is after ``deadline`` it reserves nothing
    and raises ``RateLimitWaitTooLong``. A rate of None, 0 or infinity disables the limiter.
    """

    def __init__(
        self,
        rate: float | None,
        burst: float | None = None,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.enabled = rate is not None and 0 < rate < math.inf
        self.rate = float(rate) if self.enabled and rate is not None else math.inf
        self.burst = max(1.0, float(burst if burst is not None else (self.rate if self.enabled else 1.0)))
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now

    def reserve(self, deadline: float | None = None) -> float:
        """Take a token; the seconds to wait before using it."""
        if not self.enabled:
            return 0.0
        self._refill()
        wait = 0.0 if self._tokens >= 1.0 else (1.0 - self._tokens) / self.rate
        if deadline is not None and self._clock() + wait > deadline:
            raise RateLimitWaitTooLong(wait)
        self._tokens -= 1.0
        return wait

    async def acquire(self, deadline: float | None = None) -> float:
        """Wait for a token; returns the seconds waited."""
        wait = self.reserve(deadline)
        if wait > 0:
            try:
                await self._sleep(wait)
            except asyncio.CancelledError:
                self._tokens = min(self.burst, self._tokens + 1.0)  # give the unused token back
                raise
        return wait
