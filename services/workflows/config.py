"""Workflow catalog service configuration (environment variables)."""

from __future__ import annotations

from dataclasses import dataclass

from common.config import ComfyDeploySettings, RedisSettings, env, listen_address


@dataclass(frozen=True)
class WorkflowsConfig(RedisSettings, ComfyDeploySettings):
    listen_addr: str = env(
        "WORKFLOWS_LISTEN_ADDR", default="127.0.0.1:50052", parse=listen_address, doc="gRPC listen address."
    )
