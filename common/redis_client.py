"""The one way services open Redis: a pooled asyncio client with timeouts on every call."""

from __future__ import annotations

import redis.asyncio as aioredis


def connect(url: str, timeout: float = 2.0) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=30,
        retry_on_timeout=False,
    )
