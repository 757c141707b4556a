"""The one way services open Redis: a pooled asyncio client with timeouts on every call."""

from __future__ import annotations

import redis.asyncio as aioredis


def connect(url: str, timeout: float = 2.0, max_connections: int = 64) -> aioredis.Redis:
    """A client whose pool makes callers wait (up to ``timeout``) for a free connection.

    redis-py's default pool fails at once when all its connections are busy; under a burst of
    concurrent RPCs that would turn load into errors. A blocking pool queues them instead.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=30,
    )
    return aioredis.Redis(connection_pool=pool)
