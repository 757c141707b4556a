"""Assembles the points service for the shared bootstrap."""

from __future__ import annotations

from common import redis_client
from common.bootstrap import Service, redis_probe
from stationthis.points.v1 import points_service_pb2, points_service_pb2_grpc

from .config import PointsConfig
from .servicer import PointsServicer

SERVICE_NAME = points_service_pb2.DESCRIPTOR.services_by_name["PointsService"].full_name
DOMAIN = "points.stationthis.dev"


async def build(config: PointsConfig) -> Service:
    redis = redis_client.connect(config.redis_url)
    servicer = PointsServicer()
    return Service(
        name="points",
        domain=DOMAIN,
        service_names=[SERVICE_NAME],
        register=lambda server: points_service_pb2_grpc.add_PointsServiceServicer_to_server(servicer, server),
        probes=[redis_probe(redis)],
        on_stop=[redis.aclose],
    )
