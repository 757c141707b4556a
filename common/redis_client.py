"""The one way services open Redis: pooled asyncio clients with timeouts on every call.

``connect`` is for ordinary commands: every read times out after ``timeout`` (2 s), so a stuck
Redis turns into UNAVAILABLE instead of a hung RPC. ``connect_for_blocking_reads`` is for commands
that wait on purpose (``XREAD BLOCK``, used by WatchRun): their reads may take up to the blocking
time plus a margin, so they need their own pool with a longer socket timeout. Callers pass a block
time below ``block_seconds``.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

import redis.asyncio as aioredis
import redis.exceptions

from .errors import Unavailable

T = TypeVar("T")
# What Redis not answering raises: down, restarting or timed out (redis-py's errors are not OSErrors).
UNANSWERED = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


async def answered(call: Awaitable[T], message: str) -> T:
    """The reply of a Redis call, or UNAVAILABLE ``STORE_UNAVAILABLE`` with ``message`` when Redis
    does not answer (the caller retries with the same request id)."""
    try:
        return await call
    except UNANSWERED as exc:
        raise Unavailable(message, reason="STORE_UNAVAILABLE") from exc


def connect(url: str, timeout: float = 2.0, max_connections: int = 64) -> aioredis.Redis:
    """A client whose pool makes callers wait (up to ``timeout``) for a free connection.

    redis-py's default pool fails at once when all its connections are busy; under a burst of
    concurrent RPCs that would turn load into errors. A blocking pool queues them instead.
    """
    return _client(url, timeout, timeout, max_connections)


def connect_for_blocking_reads(
    url: str, block_seconds: float = 30.0, timeout: float = 2.0, max_connections: int = 256
) -> aioredis.Redis:
    """A client for blocking reads of up to ``block_seconds`` (each read may wait that long, plus
    ``timeout`` for the answer to arrive); connecting and waiting for a pooled connection still
    time out after ``timeout``."""
    return _client(url, block_seconds + timeout, timeout, max_connections)


def _client(url: str, read_timeout: float, timeout: float, max_connections: int) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=read_timeout,
        socket_connect_timeout=timeout,
        health_check_interval=30,
    )
    return aioredis.Redis(connection_pool=pool)
