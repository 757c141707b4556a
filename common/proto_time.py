"""Protobuf time values from the integers the stores keep (epoch milliseconds, seconds)."""

from __future__ import annotations

from google.protobuf import duration_pb2, timestamp_pb2


def timestamp_from_ms(ms: int) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


def duration_from_seconds(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromMilliseconds(int(seconds * 1000))
    return duration
