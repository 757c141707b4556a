"""Gateway configuration (environment variables)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from common.config import (
    env,
    listen_address,
    metrics_address,
    positive_float,
    positive_int,
    redis_url,
    service_address,
)

# An adapter name: what logs, traces and rate limits call a caller. Never the key.
ADAPTER_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
DEFAULT_ADAPTER = "default"


class AdapterKey(str):
    """An API key (the string itself, so the log redaction registers the key) and its adapter's name."""

    adapter: str

    def __new__(cls, key: str, adapter: str) -> AdapterKey:
        made = super().__new__(cls, key)
        made.adapter = adapter
        return made


def api_keys(raw: str) -> tuple[AdapterKey, ...]:
    """``GATEWAY_API_KEYS``: comma-separated ``adapter=key`` pairs, or bare keys (adapter ``default``).

    Several keys may name one adapter (key rotation); a key may appear once only. An entry is read as
    ``adapter=key`` when the part before the first ``=`` is an adapter name; a bare key that itself
    contains ``=`` must therefore be written with its adapter (``default=ab==``).
    """
    pairs: list[AdapterKey] = []
    seen: set[str] = set()
    for index, item in enumerate(part.strip() for part in raw.split(",")):
        if not item:
            continue
        name, sep, key = item.partition("=")
        if sep and ADAPTER_NAME.fullmatch(name.strip()):
            name, key = name.strip(), key.strip()
        else:
            name, key = DEFAULT_ADAPTER, item
        if not key:
            raise ValueError(f"entry {index + 1} has an adapter name but no key")
        if key in seen:
            raise ValueError(f"entry {index + 1}: the same key is listed twice")
        seen.add(key)
        pairs.append(AdapterKey(key, name))
    if not pairs:
        raise ValueError("no API key given")
    return tuple(pairs)


@dataclass(frozen=True)
class GatewayConfig:
    api_keys: tuple[AdapterKey, ...] = env(
        "GATEWAY_API_KEYS",
        parse=api_keys,
        secret=True,
        doc="Required. Comma-separated `adapter=key` pairs (e.g. `telegram=k1,discord=k2`), or bare keys "
        "(adapter `default`), accepted as `Authorization: Bearer <key>` or `X-API-Key`.",
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
    redis_url: str = env(
        "REDIS_URL",
        default="redis://127.0.0.1:6379/0",
        parse=redis_url,
        doc="Redis holding the rate limit buckets shared by every gateway replica.",
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
    max_upload_bytes: int = env(
        "GATEWAY_MAX_UPLOAD_BYTES",
        default=262144000,
        parse=positive_int,
        doc="Largest file `POST /v1/uploads` accepts (larger: 413 before the rest is read).",
    )
    max_header_bytes: int = env(
        "GATEWAY_MAX_HEADER_BYTES",
        default=16384,
        parse=positive_int,
        doc="Largest request line plus headers (larger: 431 and the connection is closed).",
    )
    header_timeout_seconds: float = env(
        "GATEWAY_HEADER_TIMEOUT_SECONDS",
        default=10.0,
        parse=positive_float,
        doc="Time a client has to send a request's headers once it started it, or to start one on a new "
        "connection (then 408, or the connection is closed).",
    )
    body_timeout_seconds: float = env(
        "GATEWAY_BODY_TIMEOUT_SECONDS",
        default=30.0,
        parse=positive_float,
        doc="Time a client has to send a JSON body, and the longest pause between two parts of an upload "
        "(then 408 and the connection is closed).",
    )
    rate_limit: float = env(
        "GATEWAY_RATE_LIMIT",
        default=50.0,
        parse=positive_float,
        doc="Requests per second each adapter may make (token bucket in Redis, shared by every replica).",
    )
    rate_burst: int = env(
        "GATEWAY_RATE_BURST", default=100, parse=positive_int, doc="Bucket size of GATEWAY_RATE_LIMIT."
    )
    mutation_rate_limit: float = env(
        "GATEWAY_MUTATION_RATE_LIMIT",
        default=10.0,
        parse=positive_float,
        doc="Mutations (POST) per second each adapter may make, a budget of their own besides GATEWAY_RATE_LIMIT.",
    )
    mutation_rate_burst: int = env(
        "GATEWAY_MUTATION_RATE_BURST", default=20, parse=positive_int, doc="Bucket size of GATEWAY_MUTATION_RATE_LIMIT."
    )
    webhook_rate_limit: float = env(
        "GATEWAY_WEBHOOK_RATE_LIMIT",
        default=1000.0,
        parse=positive_float,
        doc="Callbacks per second the webhook route accepts from all callers together.",
    )
    webhook_rate_burst: int = env(
        "GATEWAY_WEBHOOK_RATE_BURST", default=2000, parse=positive_int, doc="Bucket size of GATEWAY_WEBHOOK_RATE_LIMIT."
    )

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(key.adapter for key in self.api_keys))
