"""Rate limits per adapter: token buckets in Redis, shared by every gateway replica.

Each bucket is one Redis hash (``gw:rl:{<adapter>}:<budget>``: tokens and the time they were
counted) changed only by one Lua script, so a take is atomic across replicas; the time is Redis's
own (``TIME``), so replicas with skewed clocks agree. A bucket refills at ``rate`` tokens a second up
to ``burst``. Budgets: ``all`` (every request of the adapter) and, separately, ``mutations`` (POST);
a POST takes from both. The webhook route has one bucket for all its callers.

To keep a Redis round trip off most requests, a replica takes tokens in leases: up to
``rate * LEASE_SECONDS`` at once (at least 1, at most the burst), spent locally and forgotten after
``LEASE_SECONDS``. An adapter therefore never gets more than its rate across all replicas; it may
get a little less when a replica forgets an unspent lease (at most ``LEASE_SECONDS`` of its rate
per replica). A slow adapter (rate 50/s) leases 2 tokens at a time; a fast one, thousands.

When the bucket is empty the script says how long until the next token: the request is answered 429
with ``Retry-After`` (whole seconds, at least 1), and the replica stops asking Redis for that bucket
until then. If Redis cannot be reached the limit is not enforced (fail open: a Redis outage must not
take the API down), a warning is logged at most every ``WARN_EVERY`` seconds, and Redis is tried
again after ``RETRY_REDIS_SECONDS``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from opentelemetry import metrics
from redis.exceptions import RedisError

log = logging.getLogger("stationthis.gateway")
_meter = metrics.get_meter("stationthis.gateway")
_refused = _meter.create_counter(
    "gateway.rate_limit.refused", unit="{request}", description="Requests answered 429 by the rate limit, by adapter"
)

LEASE_SECONDS = 0.05
RETRY_REDIS_SECONDS = 1.0
WARN_EVERY = 10.0

# KEYS[1]: the bucket. ARGV: rate (tokens/s), burst, tokens wanted. Returns {granted, seconds until
# the next token (as text: Lua numbers become integers in a reply)}.
TAKE = """
redis.replicate_commands()
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local saved = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(saved[1])
local at = tonumber(saved[2])
if tokens == nil or at == nil then
  tokens = burst
  at = now
end
if now > at then
  tokens = math.min(burst, tokens + (now - at) * rate)
end
local granted = math.min(want, math.floor(tokens))
local wait = 0
if granted < 1 then
  granted = 0
  wait = (1 - tokens) / rate
end
tokens = tokens - granted
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {granted, tostring(wait)}
"""


@dataclass(frozen=True)
class Budget:
    name: str  # all, mutations, webhook
    rate: float  # tokens a second
    burst: int

    @property
    def lease(self) -> int:
        return max(1, min(self.burst, int(self.rate * LEASE_SECONDS)))


class _Bucket:
    """One adapter's budget as this replica sees it: its current lease, or when to ask again."""

    __slots__ = ("budget", "denied_until", "key", "lock", "tokens", "until")

    def __init__(self, key: str, budget: Budget) -> None:
        self.key = key
        self.budget = budget
        self.tokens = 0
        self.until = 0.0  # when the lease expires
        self.denied_until = 0.0  # Redis said no: no need to ask again before this
        self.lock = asyncio.Lock()


class RateLimiter:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._take = redis.register_script(TAKE)
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._redis_down_until = 0.0
        self._warned = 0.0

    def _bucket(self, adapter: str, budget: Budget) -> _Bucket:
        bucket = self._buckets.get((adapter, budget.name))
        if bucket is None:
            bucket = _Bucket(f"gw:rl:{{{adapter}}}:{budget.name}", budget)
            self._buckets[(adapter, budget.name)] = bucket
        return bucket

    async def take(self, adapter: str, budget: Budget) -> float:
        """0 when ``adapter`` may make one more request from ``budget``; else seconds to wait."""
        bucket = self._bucket(adapter, budget)
        now = time.monotonic()
        if bucket.tokens > 0 and now < bucket.until:
            bucket.tokens -= 1
            return 0.0
        if now < bucket.denied_until:
            _refused.add(1, {"adapter": adapter, "budget": budget.name})
            return bucket.denied_until - now
        async with bucket.lock:  # one lease request in flight per bucket; the others wait for it
            now = time.monotonic()
            if bucket.tokens > 0 and now < bucket.until:
                bucket.tokens -= 1
                return 0.0
            if now < bucket.denied_until:
                _refused.add(1, {"adapter": adapter, "budget": budget.name})
                return bucket.denied_until - now
            if now < self._redis_down_until:
                return 0.0
            try:
                granted, wait = await self._take(keys=[bucket.key], args=[budget.rate, budget.burst, budget.lease])
            except (TimeoutError, RedisError, OSError) as exc:
                self._redis_failed(exc)
                return 0.0
            now = time.monotonic()
            granted = int(granted)
            if granted >= 1:
                bucket.tokens = granted - 1
                bucket.until = now + LEASE_SECONDS
                return 0.0
            seconds = max(float(wait), 0.001)
            bucket.tokens = 0
            bucket.denied_until = now + seconds
        _refused.add(1, {"adapter": adapter, "budget": budget.name})
        return seconds

    def _redis_failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        self._redis_down_until = now + RETRY_REDIS_SECONDS
        if now - self._warned >= WARN_EVERY:
            self._warned = now
            log.warning("rate limit not enforced: Redis is not reachable (%s)", type(exc).__name__)

    async def close(self) -> None:
        await self.redis.aclose()


def retry_after(seconds: float) -> str:
    """The ``Retry-After`` value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
