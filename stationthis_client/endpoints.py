"""Where the services are: three gRPC addresses, the gateway's URL and its API key.

``Endpoints.discover()`` finds the local system ``make run`` starts (no flags needed): each address
from the variable the services themselves use to find each other (``POINTS_SERVICE_ADDR``...), else
from the service's own ``*_LISTEN_ADDR``, else that variable's default as the service's config class
declares it (so the numbers live in one place); the API key from ``GATEWAY_API_KEY``, else the
gateway's own ``GATEWAY_API_KEYS`` (its first key), else the file ``make run`` wrote.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
KEY_FILE = "gateway-api-key"  # what devtools/launcher.py writes into the data directory


@dataclass(frozen=True)
class Endpoints:
    """``points``, ``workflows``, ``comfyui``: gRPC ``host:port``; ``gateway_url``: ``http://host:port``;
    ``api_key``: the gateway's API key (None: send none)."""

    points: str
    workflows: str
    comfyui: str
    gateway_url: str
    api_key: str | None = None

    @classmethod
    def discover(cls, environ: Mapping[str, str] = os.environ) -> Endpoints:
        """The endpoints of the system ``make run`` started, as ``environ`` describes it."""
        from gateway.config import GatewayConfig
        from services.comfyui.config import ComfyUIConfig
        from services.points.config import PointsConfig
        from services.workflows.config import WorkflowsConfig

        def address(peer_variable: str, config: type[Any], listen_variable: str) -> str:
            given = environ.get(peer_variable, "").strip()
            if given:
                return given
            return _dialable(environ.get(listen_variable, "").strip() or _default(config, listen_variable))

        gateway_url = environ.get("GATEWAY_URL", "").strip()
        if not gateway_url:
            listen = environ.get("GATEWAY_LISTEN_ADDR", "").strip() or _default(GatewayConfig, "GATEWAY_LISTEN_ADDR")
            gateway_url = f"http://{_dialable(listen)}"
        return cls(
            points=address("POINTS_SERVICE_ADDR", PointsConfig, "POINTS_LISTEN_ADDR"),
            workflows=address("WORKFLOWS_SERVICE_ADDR", WorkflowsConfig, "WORKFLOWS_LISTEN_ADDR"),
            comfyui=address("COMFYUI_SERVICE_ADDR", ComfyUIConfig, "COMFYUI_LISTEN_ADDR"),
            gateway_url=gateway_url.rstrip("/"),
            api_key=_api_key(environ),
        )


def _default(config: type[Any], variable: str) -> str:
    """The default a config class declares for ``variable`` (its ``env(...)`` field)."""
    for field in dataclasses.fields(config):
        if field.metadata.get("env") == variable and isinstance(field.default, str):
            return field.default
    raise LookupError(f"{config.__name__} declares no default for {variable}")


def _dialable(listen: str) -> str:
    """A listen address as a client dials it: a wildcard host becomes the loopback address."""
    host, _, port = listen.rpartition(":")
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host in ("[::]", "::"):
        host = "[::1]"
    return f"{host}:{port}"


def _api_key(environ: Mapping[str, str]) -> str | None:
    given = environ.get("GATEWAY_API_KEY", "").strip()
    if given:
        return given
    served = environ.get("GATEWAY_API_KEYS", "").strip()
    if served:  # what `make run` hands the gateway when it is set: its first key
        from gateway.config import api_keys

        try:
            return str(api_keys(served)[0])
        except ValueError:
            pass
    places = []
    data_dir = environ.get("STATIONTHIS_DATA_DIR", "").strip()
    if data_dir:
        places.append(Path(data_dir) / KEY_FILE)
    places.append(ROOT / ".data" / KEY_FILE)
    for path in places:
        try:
            key = path.read_text().strip()
        except OSError:
            continue
        if key:
            return key
    return None


__all__ = ["Endpoints"]
