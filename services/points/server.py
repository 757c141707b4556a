"""Assembles the points service for the shared bootstrap."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from common import redis_client
from common.bootstrap import Background, Service, redis_probe
from common.errors import DomainError
from stationthis.points.v1 import points_service_pb2, points_service_pb2_grpc

from .config import PointsConfig
from .ledger import Clock, LedgerSettings, RedisLedger
from .servicer import PointsServicer

SERVICE_NAME = points_service_pb2.DESCRIPTOR.services_by_name["PointsService"].full_name
DOMAIN = "points.stationthis.dev"
log = logging.getLogger("stationthis.points")


async def sweep_transfers(ledger: RedisLedger, grace_seconds: int) -> None:
    """Finish the transfers left between their two sides for over ``grace_seconds`` (their process
    died after the debit, or Redis failed between the steps), checking every ``grace_seconds / 2``,
    until cancelled. A transfer whose caller merely went away is finished by its own task, at once."""
    while True:
        try:
            finished = await ledger.recover_transfers(older_than_ms=grace_seconds * 1000)
            if finished:
                log.warning("finished %d interrupted transfer(s)", finished)
        except DomainError as exc:  # Redis does not answer: next time (anything else: the supervisor)
            log.warning("transfer recovery deferred: %s", exc.message)
        await asyncio.sleep(grace_seconds / 2)


@dataclass(frozen=True)
class PointsApp:
    service: Service
    ledger: RedisLedger


async def build(config: PointsConfig, clock: Clock | None = None) -> PointsApp:
    redis = redis_client.connect(config.redis_url)
    economy = config.economy()
    ledger = RedisLedger(redis, LedgerSettings(economy=economy, max_open_holds=config.max_open_holds), clock)
    servicer = PointsServicer(ledger, economy, config.hold_estimate, config.hold_ttl_seconds)

    async def close() -> None:
        await ledger.drain()  # transfers whose callers went away
        await redis.aclose()

    service = Service(
        name="points",
        domain=DOMAIN,
        service_names=[SERVICE_NAME],
        register=lambda server: points_service_pb2_grpc.add_PointsServiceServicer_to_server(servicer, server),
        probes=[redis_probe(redis)],
        on_stop=[close],
        background=[
            Background("transfer-sweep", lambda: sweep_transfers(ledger, config.transfer_recovery_seconds)),
        ],
    )
    return PointsApp(service, ledger)
