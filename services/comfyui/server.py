"""Assembles the ComfyUI runs service for the shared bootstrap."""

from __future__ import annotations

from dataclasses import dataclass

from comfydeploy.client import ComfyDeployClient
from common import redis_client
from common.bootstrap import Background, Service, grpc_health_probe, redis_probe
from common.channels import open_channel
from common.idempotency import RequestIds
from stationthis.comfyui.v1 import comfyui_service_pb2, comfyui_service_pb2_grpc
from stationthis.points.v1 import points_service_pb2_grpc
from stationthis.workflows.v1 import workflows_service_pb2_grpc

from .admin import Upstream
from .callbacks import Dispatcher
from .config import ComfyUIConfig
from .history import History
from .hub import EventHub
from .quotes import Quotes
from .runs import Extras, Runs
from .servicer import ComfyUIServicer
from .store import RedisRunStore

SERVICE_NAME = comfyui_service_pb2.DESCRIPTOR.services_by_name["ComfyUIService"].full_name
DOMAIN = "comfyui.stationthis.dev"
POINTS_SERVICE = "stationthis.points.v1.PointsService"
WORKFLOWS_SERVICE = "stationthis.workflows.v1.WorkflowsService"


@dataclass(frozen=True)
class ComfyUIApp:
    service: Service
    runs: Runs


async def build(config: ComfyUIConfig) -> ComfyUIApp:
    redis = redis_client.connect(config.redis_url)
    listening = redis_client.connect_for_blocking_reads(config.redis_url)  # the watch hub's Pub/Sub
    points = open_channel(config.points_service_addr)
    workflows = open_channel(config.workflows_service_addr)
    client = ComfyDeployClient(
        config.comfydeploy_api_url,
        config.comfydeploy_api_key,
        rate_limit_per_second=config.comfydeploy_rate_per_process,
    )
    upstream = Upstream(
        client,
        RequestIds(redis, "cui"),
        workflows_service_pb2_grpc.WorkflowsServiceStub(workflows),
        config.max_upload_bytes,
    )
    ids = RequestIds(redis, "cui")
    history = History(redis)
    dispatcher = Dispatcher(redis, config.adapters())
    extras = Extras(
        history=history,
        quotes=Quotes(history, points_service_pb2_grpc.PointsServiceStub(points), config.quote_settings()),
        adapters=dispatcher.adapters,
        callbacks=dispatcher,
    )
    runs = Runs(
        RedisRunStore(redis, config.run_retention_seconds),
        ids,
        EventHub(listening),
        workflows,
        points,
        client,
        extras,
        config.run_settings(),
    )
    servicer = ComfyUIServicer(upstream, runs)

    async def close() -> None:
        await runs.close()
        await dispatcher.close()
        await runs.hub.close()
        await listening.aclose()
        await client.aclose()
        await points.close()
        await workflows.close()
        await redis.aclose()

    service = Service(
        name="comfyui",
        domain=DOMAIN,
        service_names=[SERVICE_NAME],
        register=lambda server: comfyui_service_pb2_grpc.add_ComfyUIServiceServicer_to_server(servicer, server),
        probes=[  # health checks on the bare channels: probes stay out of traces
            redis_probe(redis),
            grpc_health_probe("points", points.channel, POINTS_SERVICE),
            grpc_health_probe("workflows", workflows.channel, WORKFLOWS_SERVICE),
        ],
        on_stop=[close],
        background=[
            Background("reconciler", runs.reconcile_forever),
            Background("callbacks", dispatcher.deliver_forever),
        ],
    )
    return ComfyUIApp(service, runs)
