"""The shared bootstrap's ``serve`` running the test service in its own process (SIGTERM drain test).

Logs JSON on stderr; the ``listening`` line carries the port. Run: python -m tests.slow_server
"""

from __future__ import annotations

import asyncio

from common import logs
from common.bootstrap import serve
from common.config import ServerConfig
from tests.support import make_test_service

if __name__ == "__main__":
    logs.configure("slow", "INFO")
    asyncio.run(
        serve(make_test_service(), "127.0.0.1:0", ServerConfig(grace_seconds=10.0, health_interval_seconds=0.05))
    )
