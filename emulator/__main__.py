"""`python -m emulator`: the ComfyUI Deploy emulator until SIGTERM or Ctrl-C.

Reads EMULATOR_API_KEYS (required), EMULATOR_OTHER_API_KEYS, EMULATOR_LISTEN_ADDR (loopback only,
default 127.0.0.1:8188), EMULATOR_STEP_SECONDS (default 0.5), EMULATOR_PUBLIC_URL and LOG_LEVEL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Mapping

from common import logs
from common.config import ConfigError, load, secrets_of

from .server import start
from .settings import EmulatorSettings

log = logging.getLogger("emulator")


async def serve(settings: EmulatorSettings) -> None:
    base_url, stop = await start(settings)
    log.info("ComfyUI Deploy emulator serving", extra={"api_url": base_url, "step_seconds": settings.step_seconds})
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("stopping")
    await stop()


def main(environ: Mapping[str, str] | None = None) -> None:
    try:
        settings = load(EmulatorSettings, os.environ if environ is None else environ)
    except ConfigError as exc:
        print(f"emulator: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    logs.configure("emulator", settings.log_level, secrets_of(settings))
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
