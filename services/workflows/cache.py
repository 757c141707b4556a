"""The catalog cache: Redis shared by all replicas, a short in-process layer, stale-while-revalidate,
and one refresh at a time across every replica.

- Redis holds the built catalog (``wf:catalog``, JSON) and when it was built (``wf:catalog:built``).
  A replica keeps the parsed catalog in memory and re-checks the stamp (one small GET) only after
  ``local_seconds``, so a hot lookup costs no network round trip.
- Fresh (younger than the TTL): answered. Stale: answered, and one background refresh is started.
  Older than ``max_stale_seconds``: not served; the caller waits for a refresh like a cold start.
- Refreshes are single-flight inside a process (one task) and across replicas (a Redis lock with an
  expiry, ``wf:catalog:lock``). Whoever holds the lock re-reads the stamp first: if another replica
  refreshed meanwhile, it does not call ComfyUI Deploy again. The others wait for the new stamp.
- A refresh that fails (ComfyUI Deploy down, a malformed listing) keeps the previous catalog. A
  cold start with nothing to serve is UNAVAILABLE (``CATALOG_UNAVAILABLE``), never an empty list.
- After a failed refresh no lazy refresh (stale or cold lookup, warm-up) calls ComfyUI Deploy again
  before a backoff has passed: ``wf:catalog:backoff`` exists for that long (a Redis expiry, so every
  replica honours one deadline without comparing clocks). It doubles with each failure in a row, up
  to ``max_backoff_seconds``, with jitter; a successful refresh clears it. RefreshCatalog (an
  operator asking) always tries at once. A replica remembers the deadline it read, so lookups during
  a backoff cost no Redis call.
- ``upstream_errors`` counts the upstream attempts that failed; calls the client's circuit breaker
  refused never reached ComfyUI Deploy and are counted apart (``Counters.refused``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from opentelemetry import metrics

from comfydeploy.client import ComfyDeployClient
from comfydeploy.errors import CircuitOpen, ComfyDeployError
from comfydeploy.models import Deployment, Machine
from comfydeploy.resilience import BreakerState
from common.errors import Unavailable

from .catalog import CatalogIndex, MalformedListing, Routing, build
from .store import Counters

log = logging.getLogger("stationthis.workflows")

CATALOG_KEY = "wf:catalog"
STAMP_KEY = "wf:catalog:built"
LOCK_KEY = "wf:catalog:lock"
STATS_KEY = "wf:catalog:stats"
BACKOFF_KEY = "wf:catalog:backoff"  # exists while lazy refreshes wait; holds the last error
NOTHING_TO_SERVE = "no workflow catalog is loaded and ComfyUI Deploy cannot be reached"
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class CacheSettings:
    ttl_seconds: float = 300.0
    max_stale_seconds: float = 86_400.0
    local_seconds: float = 2.0
    lock_seconds: float = 60.0
    upstream_timeout_seconds: float = 20.0
    backoff_seconds: float = 1.0  # after one failed refresh; doubled for each further failure in a row
    max_backoff_seconds: float = 60.0

    def backoff(self, failures_in_a_row: int) -> float:
        """Seconds before the next lazy refresh: exponential, capped, with jitter. Half the delay is
        fixed so that a run of failures cannot draw near-zero waits (full jitter could); the other
        half is random so that the replicas and retries do not fall into step."""
        ceiling = min(self.max_backoff_seconds, self.backoff_seconds * 2.0 ** min(failures_in_a_row - 1, 30))
        return ceiling * (0.5 + random.random() / 2)  # noqa: S311 (jitter)


_meter = metrics.get_meter("stationthis.workflows")
_refreshes = _meter.create_counter("catalog.refreshes", description="Catalog refreshes by outcome")
_refresh_seconds = _meter.create_histogram("catalog.refresh.duration", unit="s", description="Refresh latency")


class CatalogCache:
    """The Redis ``CatalogStore``: one catalog shared by every replica (see the module docstring)."""

    def __init__(
        self,
        redis_client: aioredis.Redis,
        upstream: ComfyDeployClient,
        aliases: Mapping[str, str],
        routing: Routing,
        settings: CacheSettings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis_client
        self.upstream = upstream
        self.aliases = aliases
        self.routing = routing
        self.settings = settings or CacheSettings()
        self.clock = clock
        self.counters = Counters()
        self._index: CatalogIndex | None = None
        self._checked_at = float("-inf")  # monotonic time of the last stamp check
        self._refreshing: asyncio.Task[CatalogIndex] | None = None
        self._backoff_until = float("-inf")  # monotonic time the shared backoff was last seen to end
        self._last_error = ""
        self._release = redis_client.register_script(_RELEASE)
        # Lookups are counted in plain ints (a hot path) and reported to the meter when it reads them.
        _meter.create_observable_counter(
            "catalog.lookups", callbacks=[self._observe_lookups], description="Catalog lookups by cache result"
        )

    def _observe_lookups(self, _options: metrics.CallbackOptions) -> list[metrics.Observation]:
        return [
            metrics.Observation(self.counters.hits, {"result": "hit"}),
            metrics.Observation(self.counters.misses, {"result": "miss"}),
        ]

    # --- reading ----------------------------------------------------------------------------------

    @property
    def ttl_seconds(self) -> float:
        return self.settings.ttl_seconds

    def now(self) -> float:
        return self.clock()

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _age(self, index: CatalogIndex) -> float:
        return (self._now_ms() - index.built_ms) / 1000

    async def _load_shared(self) -> CatalogIndex | None:
        """The catalog in Redis (re-parsed only when its stamp changed)."""
        stamp = await self.redis.get(STAMP_KEY)
        if stamp is None:
            return None
        if self._index is not None and int(stamp) == self._index.built_ms:
            return self._index
        raw = await self.redis.get(CATALOG_KEY)
        if raw is None:
            return None
        self._index = CatalogIndex(json.loads(raw), self.aliases, self.routing)
        return self._index

    def current(self) -> CatalogIndex | None:
        """The in-memory catalog when it needs no check at all (within the local layer's time and
        the TTL), else None: the hot path of a lookup, with no await."""
        index = self._index
        if (
            index is None
            or time.monotonic() - self._checked_at >= self.settings.local_seconds
            or self._age(index) > self.settings.ttl_seconds
        ):
            return None
        return index

    async def index(self, count: bool = True) -> CatalogIndex:
        """The catalog to answer a lookup from (see the module docstring); ``count``: a lookup."""
        try:
            index = self._index
            if time.monotonic() - self._checked_at >= self.settings.local_seconds or index is None:
                index = await self._load_shared()
                self._checked_at = time.monotonic()
            age = self._age(index) if index is not None else 0.0
            if index is not None and age <= self.settings.max_stale_seconds:
                if count:
                    self.counters.hits += 1
                if age > self.settings.ttl_seconds and not self._backing_off():
                    self._start_refresh()  # stale-while-revalidate
                return index
            if count:
                self.counters.misses += 1
            if self._backing_off():
                raise self._unavailable()
            return await asyncio.shield(self._start_refresh())
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise Unavailable("the catalog store did not answer", reason="STORE_UNAVAILABLE") from exc

    async def loaded(self) -> None:
        """Returns once a catalog has been loaded, by this process or found in Redis; raises before
        (the health probe: a replica with no catalog answers every lookup UNAVAILABLE)."""
        if self._index is None and await self._load_shared() is None:
            raise self._unavailable("no workflow catalog has been loaded yet")

    def _unavailable(self, message: str = NOTHING_TO_SERVE) -> Unavailable:
        metadata = {"last_error": self._last_error[:200]} if self._last_error else {}
        return Unavailable(message, reason="CATALOG_UNAVAILABLE", metadata=metadata)

    def _servable(self, current: CatalogIndex | None) -> CatalogIndex:
        """What a lazy refresh that got nothing from upstream answers: the catalog still servable."""
        if current is not None and self._age(current) <= self.settings.max_stale_seconds:
            return current
        raise self._unavailable()

    # --- backing off ------------------------------------------------------------------------------

    def _backing_off(self) -> bool:
        """Inside a backoff this replica has already seen (no I/O)."""
        return time.monotonic() < self._backoff_until

    async def _shared_backoff(self) -> bool:
        """Inside a backoff, as every replica sees it (the first look goes to Redis, later ones not)."""
        if self._backing_off():
            return True
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.pttl(BACKOFF_KEY)
            pipe.get(BACKOFF_KEY)
            left_ms, error = await pipe.execute()
        if left_ms <= 0:  # -2: no backoff (-1, no expiry: never written so)
            return False
        self._backoff_until = time.monotonic() + left_ms / 1000
        self._last_error = _text(error or "")
        return True

    # --- refreshing -------------------------------------------------------------------------------

    def _start_refresh(self, force: bool = False) -> asyncio.Task[CatalogIndex]:
        """The one refresh task of this process (joined if one is running)."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._refresh(force), name="catalog-refresh")
            self._refreshing.add_done_callback(_consume)
        return self._refreshing

    async def warm_up(self) -> None:
        """Load the catalog now, unless a fresh one is shared already (a background task at start-up)."""
        await asyncio.shield(self._start_refresh())

    async def refresh(self) -> CatalogIndex:
        """RefreshCatalog: reload from ComfyUI Deploy now, backoff or not (joining a refresh already
        running)."""
        started = self._now_ms()
        joined = self._refreshing is not None and not self._refreshing.done()
        index: CatalogIndex | None = None
        try:
            index = await asyncio.shield(self._start_refresh(force=True))
        except Unavailable as error:
            if not joined or error.reason != "CATALOG_UNAVAILABLE":
                raise  # this refresh's own failure (CATALOG_REFRESH_FAILED)
        if index is None or index.built_ms < started:
            # Joined a lazy refresh that found the catalog fresh, waited out a backoff or failed.
            index = await asyncio.shield(self._start_refresh(force=True))
        return index

    async def _refresh(self, force: bool) -> CatalogIndex:
        token = secrets.token_hex(8)
        deadline = time.monotonic() + self.settings.lock_seconds
        started_ms = self._now_ms()
        while True:
            if await self.redis.set(LOCK_KEY, token, nx=True, px=int(self.settings.lock_seconds * 1000)):
                try:
                    return await self._refresh_locked(force, started_ms)
                finally:
                    await self._release(keys=[LOCK_KEY], args=[token])
            # Another replica is refreshing: wait for its result rather than call upstream too.
            await asyncio.sleep(0.05)
            current = await self._load_shared()
            if current is not None and current.built_ms >= started_ms:
                return current
            if time.monotonic() > deadline:
                break
        current = await self._load_shared()
        if current is not None:
            return current
        raise Unavailable("no workflow catalog could be loaded yet", reason="CATALOG_UNAVAILABLE")

    async def _refresh_locked(self, force: bool, started_ms: int) -> CatalogIndex:
        current = await self._load_shared()
        fresh = current is not None and self._age(current) <= self.settings.ttl_seconds
        if current is not None and (current.built_ms >= started_ms or (fresh and not force)):
            return current  # someone refreshed while we waited for the lock
        if not force and await self._shared_backoff():
            return self._servable(current)  # a refresh failed lately: not yet again
        began = time.monotonic()
        deadline = began + self.settings.upstream_timeout_seconds
        try:
            deployments, machines = await self._listings(deadline)
            catalog = build(deployments, machines, self._now_ms())
        except (ComfyDeployError, MalformedListing) as exc:
            if isinstance(exc, ComfyDeployError):  # a malformed listing: upstream answered, badly
                self.counters.upstream_healthy = False
            message = f"{type(exc).__name__}: {exc}"
            await self._failed(message, "refused" if isinstance(exc, CircuitOpen) else "failure")
            if force:
                raise Unavailable(
                    "the catalog could not be refreshed from ComfyUI Deploy; the previous one is kept",
                    reason="CATALOG_REFRESH_FAILED",
                    metadata={"last_error": message[:200]},
                ) from exc
            return self._servable(current)
        self.counters.upstream_healthy = True
        duration = time.monotonic() - began
        encoded = json.dumps(catalog, separators=(",", ":"))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(CATALOG_KEY, encoded)
            pipe.set(STAMP_KEY, catalog["built_ms"])
            pipe.hincrby(STATS_KEY, "refreshes", 1)
            pipe.hset(
                STATS_KEY,
                mapping={
                    "last_refresh_ms": catalog["built_ms"],
                    "last_duration_ms": int(duration * 1000),
                    "last_error": "",
                    "failures_in_a_row": 0,
                },
            )
            pipe.delete(BACKOFF_KEY)
            await pipe.execute()
        self._backoff_until = float("-inf")
        self._last_error = ""
        _refreshes.add(1, {"outcome": "success"})
        _refresh_seconds.record(duration)
        self._index = CatalogIndex(catalog, self.aliases, self.routing)
        self._checked_at = time.monotonic()
        if self._index.collisions:
            log.warning("workflow names collide", extra={"collisions": self._index.collisions})
        log.info("catalog refreshed", extra={"workflows": len(self._index), "duration_ms": int(duration * 1000)})
        return self._index

    async def _listings(self, deadline: float) -> tuple[list[Deployment], list[Machine]]:
        """Deployments and machines from ComfyUI Deploy, counting the calls the breaker refuses.

        While the client's circuit breaker is not closed it lets one trial call through and refuses
        the others: the small machine listing goes first, alone, and the deployments follow only
        if it passed (three concurrent calls would see two refused and the trial cancelled)."""
        try:
            if self.upstream.breaker_state is not BreakerState.CLOSED:
                machines = await self.upstream.list_machines(deadline=deadline)
                return await self.upstream.list_all_deployments(deadline=deadline), machines
        except CircuitOpen:
            self.counters.refused += 1
            raise
        listed, found = await asyncio.gather(
            self.upstream.list_all_deployments(deadline=deadline),
            self.upstream.list_machines(deadline=deadline),
            return_exceptions=True,
        )
        self.counters.refused += sum(isinstance(r, CircuitOpen) for r in (listed, found))
        if isinstance(listed, BaseException):
            raise listed
        if isinstance(found, BaseException):
            raise found
        return listed, found

    async def _failed(self, message: str, outcome: str) -> None:
        """Record a failed refresh and start (or lengthen) the backoff every replica honours."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(STATS_KEY, mapping={"last_error": message[:500]})
            pipe.hincrby(STATS_KEY, "refresh_failures", 1)
            pipe.hincrby(STATS_KEY, "failures_in_a_row", 1)
            *_, in_a_row = await pipe.execute()
        delay = self.settings.backoff(int(in_a_row))
        await self.redis.set(BACKOFF_KEY, message[:200], px=max(1, int(delay * 1000)))
        self._backoff_until = time.monotonic() + delay
        self._last_error = message
        _refreshes.add(1, {"outcome": outcome})
        log.warning(
            "catalog refresh failed; keeping the previous catalog",
            extra={"error": message, "failures_in_a_row": int(in_a_row), "backoff_seconds": round(delay, 3)},
        )

    def upstream_errors(self) -> int:
        """Failed upstream HTTP attempts: calls that failed plus the attempts retried after a failure,
        less the calls the circuit breaker refused (they never reached ComfyUI Deploy).

        The client's snapshot counts a refused call as an error and does not say which were refused,
        so the refusals are counted here, where the calls are made. One can escape: when both halves
        of ``list_all_deployments`` are refused at once the client raises only the first."""
        endpoints = self.upstream.snapshot().get("endpoints", {})
        failed = sum(int(e.get("errors", 0)) + int(e.get("retries", 0)) for e in endpoints.values())
        return failed - self.counters.refused

    async def shared_stats(self) -> dict[str, str]:
        raw = await self.redis.hgetall(STATS_KEY)
        return {_text(k): _text(v) for k, v in raw.items()}

    async def stop(self) -> None:
        if self._refreshing is not None and not self._refreshing.done():
            self._refreshing.cancel()


def _consume(task: asyncio.Task[Any]) -> None:
    """A background refresh's failure is logged where it happens; do not warn about it again."""
    if not task.cancelled():
        task.exception()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
