"""Assembles the workflows service for the shared bootstrap."""

from __future__ import annotations

from common import redis_client
from common.bootstrap import Service, redis_probe
from stationthis.workflows.v1 import workflows_service_pb2, workflows_service_pb2_grpc

from .config import WorkflowsConfig
from .servicer import WorkflowsServicer

SERVICE_NAME = workflows_service_pb2.DESCRIPTOR.services_by_name["WorkflowsService"].full_name
DOMAIN = "workflows.stationthis.dev"


async def build(config: WorkflowsConfig) -> Service:
    redis = redis_client.connect(config.redis_url)
    servicer = WorkflowsServicer()
    return Service(
        name="workflows",
        domain=DOMAIN,
        service_names=[SERVICE_NAME],
        register=lambda server: workflows_service_pb2_grpc.add_WorkflowsServiceServicer_to_server(servicer, server),
        probes=[redis_probe(redis)],
        on_stop=[redis.aclose],
    )
