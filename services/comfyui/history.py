"""Recent run durations per workflow and GPU: the basis of the ETA a user sees and of the quote.

``runs:durations:{<workflow_id>}:<gpu>`` is a Redis list of the GPU seconds of the last ``window``
successful runs (newest first, trimmed on every push). Nothing is invented: with no history there
is no ETA, and the quote falls back to the configured default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis

from common.errors import Unavailable
from common.redis_client import UNANSWERED, answered

UNANSWERED_HISTORY = "the run history did not answer"


def durations_key(workflow_id: str, gpu: int) -> str:
    return f"runs:durations:{{{workflow_id}}}:{gpu}"


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile: the smallest value with at least ``fraction`` of values at or below."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Durations:
    """What the history says about one workflow on one GPU."""

    seconds: tuple[float, ...]  # newest first

    @property
    def known(self) -> bool:
        return bool(self.seconds)

    @property
    def median(self) -> float:
        return percentile(self.seconds, 0.5)

    def high(self, fraction: float) -> float:
        return percentile(self.seconds, fraction)


class History:
    def __init__(self, redis: aioredis.Redis, window: int = 50) -> None:
        self.redis = redis
        self.window = window

    async def record(self, workflow_id: str, gpu: int, seconds: float) -> None:
        key = durations_key(workflow_id, gpu)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.lpush(key, f"{seconds:.3f}")
                pipe.ltrim(key, 0, self.window - 1)
                await pipe.execute()
        except UNANSWERED as exc:  # the history is a hint: losing one sample is not an error
            raise Unavailable(UNANSWERED_HISTORY, reason="STORE_UNAVAILABLE") from exc

    async def durations(self, workflow_id: str, gpu: int) -> Durations:
        raw = await answered(self.redis.lrange(durations_key(workflow_id, gpu), 0, self.window - 1), UNANSWERED_HISTORY)
        return Durations(tuple(float(value) for value in raw))
