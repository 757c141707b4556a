"""Waiting before a retry: capped exponential backoff with full jitter, and the server's Retry-After.

One home for what the ComfyUI Deploy client, the background-task supervisor and the adapters'
client all do between two attempts.
"""

from __future__ import annotations

import math
import random as _random
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

Random = Callable[[], float]


def backoff_delay(retry: int, base: float, cap: float, random: Random = _random.random) -> float:
    """Seconds to wait before retry number ``retry`` (0 for the first retry): uniform(0, min(cap, base*2**retry))."""
    ceiling = min(cap, base * 2.0 ** min(retry, 62))
    return random() * ceiling


def parse_retry_after(value: str | None, now: Callable[[], datetime] | None = None) -> float | None:
    """Seconds from a Retry-After value (``"3"``, ``"1.5"`` or an HTTP date); None if absent or unreadable.

    A date in the past gives 0. Negative or non-finite numbers are unreadable.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = now() if now is not None else datetime.now(UTC)
    return max(0.0, (when - current).total_seconds())
