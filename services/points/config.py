"""Points service configuration (environment variables)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from common.config import RedisSettings, env, listen_address, metrics_address, positive_int

from .economy import DEFAULT_GPU_PRICES, Economy


def positive_decimal(raw: str) -> Decimal:
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise ValueError("expected a decimal number") from None
    if not value.is_finite() or value <= 0:
        raise ValueError("must be a positive number")
    return value


def gpu_prices(raw: str) -> tuple[tuple[str, Decimal], ...]:
    """``A10G=0.000337,H100=0.002338``: USD per second overrides for some GPUs."""
    out = []
    for item in raw.split(","):
        name, sep, price = item.strip().partition("=")
        if not sep or name.strip() not in DEFAULT_GPU_PRICES:
            raise ValueError(f"expected GPU=USD_PER_SECOND pairs with GPU one of {', '.join(DEFAULT_GPU_PRICES)}")
        out.append((name.strip(), positive_decimal(price.strip())))
    return tuple(out)


@dataclass(frozen=True)
class PointsConfig(RedisSettings):
    listen_addr: str = env(
        "POINTS_LISTEN_ADDR", default="127.0.0.1:50051", parse=listen_address, doc="gRPC listen address."
    )
    metrics_addr: str = metrics_address("POINTS_METRICS_ADDR", "127.0.0.1:9451")
    hold_estimate: int = env(
        "POINTS_HOLD_ESTIMATE", default=100, parse=positive_int, doc="Points a ReserveHold holds when asked for 0."
    )
    hold_ttl_seconds: int = env(
        "POINTS_HOLD_TTL_SECONDS", default=3600, parse=positive_int, doc="A hold not settled by then expires."
    )
    max_open_holds: int = env(
        "POINTS_MAX_OPEN_HOLDS", default=3, parse=positive_int, doc="Open holds per user (the legacy queue cap)."
    )
    usd_per_point: Decimal = env(
        "POINTS_USD_PER_POINT", default=Decimal("0.000337"), parse=positive_decimal, doc="USD value of one point."
    )
    multiplier: Decimal = env(
        "POINTS_MULTIPLIER", default=Decimal(2), parse=positive_decimal, doc="Platform multiplier on GPU cost."
    )
    minimum_charge: int = env(
        "POINTS_MINIMUM_CHARGE", default=3, parse=positive_int, doc="Smallest cost of a run, in points."
    )
    gpu_price_overrides: tuple[tuple[str, Decimal], ...] = env(
        "POINTS_GPU_PRICES",
        default=(),
        parse=gpu_prices,
        doc="USD per second overrides, e.g. `A10G=0.000337,H100=0.002338` (defaults: the legacy price table).",
    )
    regen_period_seconds: int = env(
        "POINTS_REGEN_PERIOD_SECONDS", default=900, parse=positive_int, doc="Length of a regeneration period."
    )
    regen_periods: int = env(
        "POINTS_REGEN_PERIODS", default=18, parse=positive_int, doc="Periods for a full allowance to come back."
    )
    token_offset: int = env(
        "POINTS_TOKEN_OFFSET", default=199800, parse=positive_int, doc="max_points = floor((tokens + this) / divisor)."
    )
    token_divisor: int = env(
        "POINTS_TOKEN_DIVISOR", default=540, parse=positive_int, doc="max_points = floor((tokens + offset) / this)."
    )
    transfer_recovery_seconds: int = env(
        "POINTS_TRANSFER_RECOVERY_SECONDS",
        default=2,
        parse=positive_int,
        doc="A transfer still half-done this long after its debit (its process died) is finished by the "
        "recovery sweep, which runs every half of this.",
    )

    def economy(self) -> Economy:
        return Economy(
            token_offset=self.token_offset,
            token_divisor=self.token_divisor,
            regen_period_seconds=self.regen_period_seconds,
            regen_periods=self.regen_periods,
            usd_per_point=self.usd_per_point,
            multiplier=self.multiplier,
            minimum_charge=self.minimum_charge,
            gpu_prices={**DEFAULT_GPU_PRICES, **dict(self.gpu_price_overrides)},
        )
