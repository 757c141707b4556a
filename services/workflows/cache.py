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
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from opentelemetry import metrics

from comfydeploy.client import ComfyDeployClient
from comfydeploy.errors import ComfyDeployError
from common.errors import Unavailable

from .catalog import CatalogIndex, MalformedListing, Routing, build

log = logging.getLogger("stationthis.workflows")

CATALOG_KEY = "wf:catalog"
STAMP_KEY = "wf:catalog:built"
LOCK_KEY = "wf:catalog:lock"
STATS_KEY = "wf:catalog:stats"
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
    cold_wait_seconds: float = 30.0
    upstream_timeout_seconds: float = 20.0


@dataclass
class Counters:
    hits: int = 0
    misses: int = 0
    upstream_healthy: bool = True


_meter = metrics.get_meter("stationthis.workflows")
_refreshes = _meter.create_counter("catalog.refreshes", description="Catalog refreshes by outcome")
_refresh_seconds = _meter.create_histogram("catalog.refresh.duration", unit="s", description="Refresh latency")


class CatalogCache:
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
                if age > self.settings.ttl_seconds:
                    self._start_refresh()  # stale-while-revalidate
                return index
            if count:
                self.counters.misses += 1
            return await asyncio.shield(self._start_refresh())
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise Unavailable("the catalog store did not answer", reason="STORE_UNAVAILABLE") from exc

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
        """RefreshCatalog: reload from ComfyUI Deploy now (joining a refresh already running)."""
        started = self._now_ms()
        index = await asyncio.shield(self._start_refresh(force=True))
        if index.built_ms < started:  # joined a lazy refresh that found the catalog fresh
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
        began = time.monotonic()
        deadline = began + self.settings.upstream_timeout_seconds
        try:
            deployments, machines = await asyncio.gather(
                self.upstream.list_all_deployments(deadline=deadline),
                self.upstream.list_machines(deadline=deadline),
            )
            catalog = build(deployments, machines, self._now_ms())
        except (ComfyDeployError, MalformedListing) as exc:
            if isinstance(exc, ComfyDeployError):  # a malformed listing: upstream answered, badly
                self.counters.upstream_healthy = False
            message = f"{type(exc).__name__}: {exc}"
            await self.redis.hset(STATS_KEY, mapping={"last_error": message[:500]})
            await self.redis.hincrby(STATS_KEY, "refresh_failures", 1)
            _refreshes.add(1, {"outcome": "failure"})
            log.warning("catalog refresh failed; keeping the previous catalog", extra={"error": message})
            if force:
                raise Unavailable(
                    "the catalog could not be refreshed from ComfyUI Deploy; the previous one is kept",
                    reason="CATALOG_REFRESH_FAILED",
                    metadata={"last_error": message[:200]},
                ) from exc
            if current is not None and self._age(current) <= self.settings.max_stale_seconds:
                return current
            raise Unavailable(
                "no workflow catalog is loaded and ComfyUI Deploy cannot be reached",
                reason="CATALOG_UNAVAILABLE",
                metadata={"last_error": message[:200]},
            ) from exc
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
                },
            )
            await pipe.execute()
        _refreshes.add(1, {"outcome": "success"})
        _refresh_seconds.record(duration)
        self._index = CatalogIndex(catalog, self.aliases, self.routing)
        self._checked_at = time.monotonic()
        if self._index.collisions:
            log.warning("workflow names collide", extra={"collisions": self._index.collisions})
        log.info("catalog refreshed", extra={"workflows": len(self._index), "duration_ms": int(duration * 1000)})
        return self._index

    def upstream_errors(self) -> int:
        """Failed upstream HTTP attempts: calls that failed plus the attempts retried after a failure."""
        endpoints = self.upstream.snapshot().get("endpoints", {})
        return sum(int(e.get("errors", 0)) + int(e.get("retries", 0)) for e in endpoints.values())

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
