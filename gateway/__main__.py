"""`python -m gateway`: run the HTTP gateway until SIGTERM."""

from __future__ import annotations

import os
import sys

from common import logs, telemetry
from common.config import ConfigError, ServerConfig, load, secrets_of

from .config import GatewayConfig
from .server import uvicorn_server


def main() -> None:
    try:
        config = load(GatewayConfig, os.environ)
        server_config = load(ServerConfig, os.environ)
    except ConfigError as exc:
        print(f"stationthis-gateway: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    logs.configure("gateway", server_config.log_level, secrets_of(config))
    telemetry.setup("stationthis-gateway")
    uvicorn_server(config, server_config.grace_seconds).run()  # uvicorn stops gracefully on SIGTERM/SIGINT
    telemetry.shutdown()


if __name__ == "__main__":
    main()
