"""The points service in its own process, dying (exit 17) between the two sides of a transfer.

Used by tests/test_points.py (crash-safe transfers). Configured from the environment like the real
service (REDIS_URL, POINTS_LISTEN_ADDR, ...); logs JSON on stderr, the ``listening`` line carries
the port. Every TransferQoints debits the sender, then the process exits with status 17 before the
receiver is credited. Run: python -m tests.points_crash_server
"""

from __future__ import annotations

import asyncio
import os

from common import logs
from common.bootstrap import serve
from common.config import ServerConfig, load
from services.points.config import PointsConfig
from services.points.server import build

CRASH_EXIT_CODE = 17


async def _die() -> None:
    os._exit(CRASH_EXIT_CODE)


async def main() -> None:
    config = load(PointsConfig, os.environ)
    app = await build(config)
    app.ledger.after_transfer_debit = _die
    await serve(app.service, config.listen_addr, ServerConfig(grace_seconds=1.0, health_interval_seconds=0.05))


if __name__ == "__main__":
    logs.configure("points", "INFO")
    asyncio.run(main())
