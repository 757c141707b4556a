"""Assembles the workflow catalog service for the shared bootstrap."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from comfydeploy.client import ComfyDeployClient
from common import redis_client
from common.bootstrap import Background, Probe, Service, redis_probe
from common.idempotency import RequestIds
from stationthis.workflows.v1 import workflows_service_pb2, workflows_service_pb2_grpc

from .cache import CacheSettings, CatalogCache
from .catalog import Routing
from .config import WorkflowsConfig
from .servicer import WorkflowsServicer

SERVICE_NAME = workflows_service_pb2.DESCRIPTOR.services_by_name["WorkflowsService"].full_name
DOMAIN = "workflows.stationthis.dev"


@dataclass(frozen=True)
class WorkflowsApp:
    service: Service
    cache: CatalogCache


async def build(
    config: WorkflowsConfig,
    clock: Callable[[], float] = time.time,
    upstream: ComfyDeployClient | None = None,
) -> WorkflowsApp:
    redis = redis_client.connect(config.redis_url)
    client = upstream or ComfyDeployClient(
        config.comfydeploy_api_url,
        config.comfydeploy_api_key,
        rate_limit_per_second=config.comfydeploy_rate_per_process,
    )
    cache = CatalogCache(
        redis,
        client,
        config.aliases,
        Routing(rules=config.machine_routing, default_machine=config.default_machine),
        CacheSettings(
            ttl_seconds=config.cache_ttl_seconds,
            max_stale_seconds=config.max_stale_seconds,
            local_seconds=config.local_cache_seconds,
        ),
        clock=clock,
    )
    servicer = WorkflowsServicer(cache, RequestIds(redis, "wf"))

    async def close() -> None:
        await cache.stop()
        if upstream is None:
            await client.aclose()
        await redis.aclose()

    service = Service(
        name="workflows",
        domain=DOMAIN,
        service_names=[SERVICE_NAME],
        register=lambda server: workflows_service_pb2_grpc.add_WorkflowsServiceServicer_to_server(servicer, server),
        # Not ready before a catalog has loaded once (here or by another replica): until then every
        # lookup would answer UNAVAILABLE.
        probes=[redis_probe(redis), Probe("catalog", cache.loaded)],
        on_stop=[close],
        # Load the catalog at start-up; a failure is retried (after the cache's shared backoff) by
        # the bootstrap's restart and by the first lookups.
        background=[Background("catalog-warm-up", cache.warm_up, after_serving=False)],
    )
    return WorkflowsApp(service, cache)
