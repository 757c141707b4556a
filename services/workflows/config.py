"""Workflow catalog service configuration (environment variables)."""

from __future__ import annotations

from dataclasses import dataclass

from common.config import ComfyDeploySettings, RedisSettings, env, listen_address, metrics_address, positive_float


def parse_pairs(raw: str) -> dict[str, str]:
    """``a=b,c=d`` -> {"a": "b", "c": "d"} (for the alias and routing tables)."""
    out = {}
    for item in raw.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError("expected name=value pairs separated by commas")
        out[key.strip()] = value.strip()
    return out


LEGACY_ROUTING = (
    "text2img=StationthisHun,lora_train=StationthisHun,inpaint=inpainter,controlnet=fluxdev,"
    "img2img=fluxdev,upscale=fluxdev,img2vid=TRIPO,toon=TRIPO"
)
LEGACY_ALIASES = "make=text2img,makeimage=text2img,train=lora_train,tooncraft=toon,video=img2vid"


@dataclass(frozen=True)
class WorkflowsConfig(RedisSettings, ComfyDeploySettings):
    listen_addr: str = env(
        "WORKFLOWS_LISTEN_ADDR", default="127.0.0.1:50052", parse=listen_address, doc="gRPC listen address."
    )
    metrics_addr: str = metrics_address("WORKFLOWS_METRICS_ADDR", "127.0.0.1:9452")
    cache_ttl_seconds: float = env(
        "WORKFLOWS_CACHE_TTL_SECONDS", default=300.0, parse=positive_float, doc="Catalog time to live (then refreshed)."
    )
    max_stale_seconds: float = env(
        "WORKFLOWS_MAX_STALE_SECONDS",
        default=86400.0,
        parse=positive_float,
        doc="How long a stale catalog is still served while ComfyUI Deploy fails.",
    )
    local_cache_seconds: float = env(
        "WORKFLOWS_LOCAL_CACHE_SECONDS",
        default=2.0,
        parse=positive_float,
        doc="How long a replica answers from memory before re-checking Redis.",
    )
    aliases: dict[str, str] = env(
        "WORKFLOWS_ALIASES", default=LEGACY_ALIASES, parse=parse_pairs, doc="alias=workflow_name pairs."
    )
    machine_routing: dict[str, str] = env(
        "WORKFLOWS_MACHINE_ROUTING",
        default=LEGACY_ROUTING,
        parse=parse_pairs,
        doc="workflow_name=machine_name pairs: a workflow's deployment on that machine is preferred when it is ready.",
    )
    default_machine: str = env(
        "WORKFLOWS_DEFAULT_MACHINE",
        default="StationthisHun",
        doc="Machine whose deployment is preferred when a workflow's own machine is not ready.",
    )
