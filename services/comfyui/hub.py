"""Wake-ups for WatchRun: one Redis Pub/Sub connection per process, fanned out to local watchers.

A run's events are in its Redis stream (the truth, read with XRANGE); every write also publishes
the new event id on the run's channel. The hub subscribes to a run's channel while at least one
local watcher follows that run and sets the watchers' flags when a message arrives, so a watcher
costs an entry in a dict, not a connection. A notification lost (a reconnect) delays a watcher by at
most its wait timeout, after which it reads the stream anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
import redis.exceptions

from .store import channel

log = logging.getLogger("stationthis.comfyui.hub")


class Wake:
    """One watcher's flag: set when its run has a new event."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), seconds)
        self._event.clear()


class EventHub:
    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)
        self._watchers: dict[str, set[Wake]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def subscribe(self, run_id: str) -> AsyncIterator[Wake]:
        wake = Wake()
        name = channel(run_id)
        async with self._lock:
            first = name not in self._watchers
            self._watchers.setdefault(name, set()).add(wake)
            if first:
                await self._pubsub.subscribe(name)
            if self._listener is None or self._listener.done():
                self._listener = asyncio.create_task(self._listen(), name="watch-hub")
        try:
            yield wake
        finally:
            async with self._lock:
                watchers = self._watchers.get(name)
                if watchers is not None:
                    watchers.discard(wake)
                    if not watchers:
                        del self._watchers[name]
                        with contextlib.suppress(redis.exceptions.RedisError, OSError):
                            await self._pubsub.unsubscribe(name)

    async def _listen(self) -> None:
        while self._watchers:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
                log.warning("watch hub lost its connection (%s); resubscribing", type(exc).__name__)
                self._wake_all()  # every watcher reads its stream now, in case it missed something
                await asyncio.sleep(0.5)
                with contextlib.suppress(redis.exceptions.RedisError, OSError):
                    async with self._lock:
                        if self._watchers:
                            await self._pubsub.subscribe(*self._watchers)
                continue
            if message is None or message.get("type") != "message":
                continue
            name = message["channel"]
            for wake in self._watchers.get(name.decode() if isinstance(name, bytes) else name, ()):
                wake.set()

    def _wake_all(self) -> None:
        for watchers in self._watchers.values():
            for wake in watchers:
                wake.set()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            await self._pubsub.aclose()
