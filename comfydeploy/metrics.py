"""OpenTelemetry metrics for the ComfyUI Deploy client, plus a plain in-process snapshot.

Instruments (meter ``comfydeploy``):

* ``comfydeploy.client.calls`` counter {endpoint, outcome}: one per client method call, after retries.
* ``comfydeploy.client.duration`` histogram, seconds {endpoint}: the whole call, retries included.
* ``comfydeploy.client.retries`` counter {endpoint, reason}: one per retry.
* ``comfydeploy.client.breaker_state`` observable gauge {upstream}: 0 closed, 1 half-open, 2 open.

With no MeterProvider installed these are the API's no-ops; ``snapshot()`` works regardless.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry import metrics

METER_NAME = "comfydeploy"


class _Instruments:
    def __init__(self, meter: metrics.Meter) -> None:
        self.calls = meter.create_counter(
            "comfydeploy.client.calls", unit="{call}", description="ComfyUI Deploy client calls by outcome"
        )
        self.duration = meter.create_histogram(
            "comfydeploy.client.duration", unit="s", description="ComfyUI Deploy client call duration, retries included"
        )
        self.retries = meter.create_counter(
            "comfydeploy.client.retries", unit="{retry}", description="ComfyUI Deploy client retries by reason"
        )
        self.clients: weakref.WeakSet[ClientMetrics] = weakref.WeakSet()
        meter.create_observable_gauge(
            "comfydeploy.client.breaker_state",
            callbacks=[self._observe_breakers],
            unit="1",
            description="Circuit breaker state per upstream: 0 closed, 1 half-open, 2 open",
        )

    def _observe_breakers(self, _options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        return [metrics.Observation(client.breaker_state(), {"upstream": client.upstream}) for client in self.clients]


_lock = threading.Lock()
_by_meter: dict[int, tuple[metrics.Meter, _Instruments]] = {}


def _instruments(meter: metrics.Meter | None) -> _Instruments:
    meter = meter or metrics.get_meter(METER_NAME)
    with _lock:
        found = _by_meter.get(id(meter))
        if found is None or found[0] is not meter:
            found = (meter, _Instruments(meter))
            _by_meter[id(meter)] = found
        return found[1]


_global_meter: metrics.Meter | None = None


def _default_meter() -> metrics.Meter:
    global _global_meter
    if _global_meter is None:
        _global_meter = metrics.get_meter(METER_NAME)
    return _global_meter


class _Counts:
    __slots__ = ("calls", "errors", "retries")

    def __init__(self) -> None:
        self.calls = 0
        self.errors = 0
        self.retries = 0


class ClientMetrics:
    """One client's metrics: recorded to OpenTelemetry and counted in-process for ``snapshot()``."""

    def __init__(
        self,
        upstream: str,
        breaker_state: Callable[[], int],
        *,
        meter: metrics.Meter | None = None,
        extra: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.upstream = upstream
        self.breaker_state = breaker_state
        self._extra = extra
        self._instruments = _instruments(meter or _default_meter())
        self._instruments.clients.add(self)
        self._counts: dict[str, _Counts] = {}
        self._call_attrs: dict[tuple[str, str], dict[str, str]] = {}
        self._endpoint_attrs: dict[str, dict[str, str]] = {}

    def _count(self, endpoint: str) -> _Counts:
        counts = self._counts.get(endpoint)
        if counts is None:
            counts = self._counts[endpoint] = _Counts()
        return counts

    def call(self, endpoint: str, outcome: str, seconds: float) -> None:
        counts = self._count(endpoint)
        counts.calls += 1
        if outcome != "ok":
            counts.errors += 1
        attrs = self._call_attrs.get((endpoint, outcome))
        if attrs is None:
            attrs = self._call_attrs[(endpoint, outcome)] = {"endpoint": endpoint, "outcome": outcome}
        self._instruments.calls.add(1, attrs)
        endpoint_attrs = self._endpoint_attrs.get(endpoint)
        if endpoint_attrs is None:
            endpoint_attrs = self._endpoint_attrs[endpoint] = {"endpoint": endpoint}
        self._instruments.duration.record(seconds, endpoint_attrs)

    def retry(self, endpoint: str, reason: str) -> None:
        self._count(endpoint).retries += 1
        self._instruments.retries.add(1, {"endpoint": endpoint, "reason": reason})

    def snapshot(self) -> dict[str, Any]:
        """Plain counts since start: ``{"upstream", "breaker_state", "endpoints": {endpoint: {...}}, ...}``."""
        state = self.breaker_state()
        result: dict[str, Any] = {
            "upstream": self.upstream,
            "breaker_state": {0: "closed", 1: "half_open", 2: "open"}.get(state, str(state)),
            "endpoints": {
                endpoint: {"calls": c.calls, "errors": c.errors, "retries": c.retries}
                for endpoint, c in sorted(self._counts.items())
            },
        }
        if self._extra is not None:
            result.update(self._extra())
        return result
