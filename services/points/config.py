"""Points service configuration (environment variables)."""

from __future__ import annotations

from dataclasses import dataclass

from common.config import RedisSettings, env, listen_address


@dataclass(frozen=True)
class PointsConfig(RedisSettings):
    listen_addr: str = env(
        "POINTS_LISTEN_ADDR", default="127.0.0.1:50051", parse=listen_address, doc="gRPC listen address."
    )
