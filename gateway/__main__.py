"""`python -m gateway`: run the HTTP gateway until SIGTERM."""

from __future__ import annotations

from common import telemetry
from common.main import prepare

from .config import GatewayConfig
from .server import uvicorn_server


def main() -> None:
    config, server_config = prepare("gateway", GatewayConfig)
    uvicorn_server(config, server_config.grace_seconds).run()  # uvicorn stops gracefully on SIGTERM/SIGINT
    telemetry.shutdown()


if __name__ == "__main__":
    main()
