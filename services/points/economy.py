"""The StationThis economy, as pure functions of integers and exact decimals (no I/O, no floats).

The rules are those of stationthis.points.v1 (points.proto) and of the legacy bot
(shared/reference/stationthis-legacy.md §4); docs/decisions/0005-points-economy.md records the
choices. Pricing (``Economy.quote``) and ``level`` are computed here; the allowance, regeneration
and hold rules are applied by the Redis ledger inside its Lua script, from the constants of
``Economy``. ``tests/test_points_model.py`` checks both against a model of points.proto.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal
from types import MappingProxyType

from common.gpu import GPU_NAMES

# USD per second of GPU time, by upstream GPU name (reference §4.4 and §4.5).
DEFAULT_GPU_PRICES: Mapping[str, Decimal] = MappingProxyType(
    {
        "CPU": Decimal("0.000042"),
        "T4": Decimal("0.000181"),
        "L4": Decimal("0.000321"),
        "A10G": Decimal("0.000337"),
        "L40S": Decimal("0.000596"),
        "A100": Decimal("0.00114"),
        "A100-80GB": Decimal("0.001709"),
        "H100": Decimal("0.002338"),
        "H200": Decimal("0.001891"),
        "B200": Decimal("0.002604"),
    }
)


@dataclass(frozen=True)
class Economy:
    """The tunable constants; defaults are today's StationThis economy."""

    token_offset: int = 199_800  # NOCOINERSTARTER
    token_divisor: int = 540  # POINTMULTI
    regen_period_seconds: int = 900  # 15 minutes
    regen_periods: int = 18  # a full allowance comes back in 18 periods (4.5 h)
    usd_per_point: Decimal = Decimal("0.000337")
    multiplier: Decimal = Decimal(2)
    minimum_charge: int = 3
    gpu_prices: Mapping[str, Decimal] = field(default_factory=lambda: DEFAULT_GPU_PRICES)

    def price(self, gpu: int) -> Decimal:
        """USD per second for a GpuType value; KeyError for UNSPECIFIED or an unknown value."""
        return self.gpu_prices[GPU_NAMES[gpu]]

    def quote(self, gpu: int, seconds: int, nanos: int) -> Quote:
        """cost_points = max(minimum, ceil(gpu_seconds * usd_per_second / usd_per_point * multiplier))."""
        usd_per_second = self.price(gpu)
        gpu_seconds = Decimal(seconds) + Decimal(nanos) / Decimal(1_000_000_000)
        usd = gpu_seconds * usd_per_second
        raw = (usd / self.usd_per_point * self.multiplier).to_integral_value(rounding=ROUND_CEILING)
        cost = max(self.minimum_charge, int(raw))
        return Quote(cost_points=cost, usd_per_second=usd_per_second, usd_cost=usd, minimum_applied=cost > raw)


@dataclass(frozen=True)
class Quote:
    cost_points: int
    usd_per_second: Decimal
    usd_cost: Decimal
    minimum_applied: bool


def level(exp: int) -> int:
    """floor(cbrt(exp)), exactly: the largest L with L**3 <= exp."""
    if exp <= 0:
        return 0
    guess = int(exp ** (1 / 3) + 0.5)
    while guess**3 > exp:
        guess -= 1
    while (guess + 1) ** 3 <= exp:
        guess += 1
    return guess
