"""ComfyUI runs service configuration (environment variables)."""

from __future__ import annotations

from dataclasses import dataclass

from common.config import (
    ComfyDeploySettings,
    RedisSettings,
    env,
    listen_address,
    metrics_address,
    positive_int,
    service_address,
)


@dataclass(frozen=True)
class ComfyUIConfig(RedisSettings, ComfyDeploySettings):
    listen_addr: str = env(
        "COMFYUI_LISTEN_ADDR", default="127.0.0.1:50053", parse=listen_address, doc="gRPC listen address."
    )
    metrics_addr: str = metrics_address("COMFYUI_METRICS_ADDR", "127.0.0.1:9453")
    points_service_addr: str = env(
        "POINTS_SERVICE_ADDR", default="127.0.0.1:50051", parse=service_address, doc="Points service address."
    )
    workflows_service_addr: str = env(
        "WORKFLOWS_SERVICE_ADDR",
        default="127.0.0.1:50052",
        parse=service_address,
        doc="Workflow catalog service address.",
    )
    max_upload_bytes: int = env(
        "COMFYUI_MAX_UPLOAD_BYTES",
        default=262_144_000,
        parse=positive_int,
        doc="Largest file UploadFile accepts, in bytes (ComfyUI Deploy's own limit is 250 MB = 262144000).",
    )
