"""Gateway configuration (environment variables)."""

from __future__ import annotations

from dataclasses import dataclass

from common.config import csv_list, env, listen_address, metrics_address, positive_float, positive_int, service_address


@dataclass(frozen=True)
class GatewayConfig:
    api_keys: tuple[str, ...] = env(
        "GATEWAY_API_KEYS",
        parse=csv_list,
        secret=True,
        doc="Required. Comma-separated API keys accepted as `Authorization: Bearer <key>` or `X-API-Key`.",
    )
    listen_addr: str = env(
        "GATEWAY_LISTEN_ADDR", default="127.0.0.1:8080", parse=listen_address, doc="HTTP listen address."
    )
    metrics_addr: str = metrics_address("GATEWAY_METRICS_ADDR", "127.0.0.1:9450")
    points_service_addr: str = env(
        "POINTS_SERVICE_ADDR", default="127.0.0.1:50051", parse=service_address, doc="Points service address."
    )
    workflows_service_addr: str = env(
        "WORKFLOWS_SERVICE_ADDR",
        default="127.0.0.1:50052",
        parse=service_address,
        doc="Workflow catalog service address.",
    )
    comfyui_service_addr: str = env(
        "COMFYUI_SERVICE_ADDR", default="127.0.0.1:50053", parse=service_address, doc="ComfyUI runs service address."
    )
    rpc_timeout_seconds: float = env(
        "GATEWAY_RPC_TIMEOUT_SECONDS",
        default=30.0,
        parse=positive_float,
        doc="Deadline given to each unary gRPC call (a shorter `grpc-timeout` header wins).",
    )
    max_body_bytes: int = env(
        "GATEWAY_MAX_BODY_BYTES", default=1048576, parse=positive_int, doc="Largest accepted request body."
    )
