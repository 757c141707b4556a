"""Run the emulator in-process with uvicorn: `start(settings)` for tests and `python -m emulator`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Literal

import uvicorn
from starlette.types import ASGIApp

from .app import create_app
from .settings import EmulatorSettings


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the embedding process owns its signals
        yield


def bind(listen_addr: str) -> socket.socket:
    host, _, port = listen_addr.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only for proto TCP, and
    # without it every keep-alive response waits ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def serve_asgi(
    make_app: Callable[[str], ASGIApp], listen_addr: str, *, lifespan: Literal["auto", "on", "off"] = "on"
) -> tuple[str, Callable[[], Awaitable[None]]]:
    """Serve ``make_app(root_url)`` with uvicorn in this event loop; return the root URL and a stop function."""
    sock = bind(listen_addr)
    host, port = sock.getsockname()[:2]
    root = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    config = uvicorn.Config(
        make_app(root), http="h11", lifespan=lifespan, log_config=None, log_level="warning", access_log=False
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name=f"uvicorn-{root}")
    while not server.started:
        if task.done():
            sock.close()
            await task  # raises what made start-up fail
            raise RuntimeError(f"server on {root} stopped during start-up")
        await asyncio.sleep(0.01)

    async def stop() -> None:
        server.should_exit = True
        await task
        sock.close()

    return root, stop


async def start(settings: EmulatorSettings) -> tuple[str, Callable[[], Awaitable[None]]]:
    """Serve the emulator on ``settings.listen_addr`` (port 0 = a free one); return the API base URL
    (``http://host:port/api``) and a stop function. File URLs use ``settings.public_url``, else the root URL."""

    def make_app(root: str) -> ASGIApp:
        return create_app(dataclasses.replace(settings, public_url=settings.public_url or root))

    root, stop = await serve_asgi(make_app, settings.listen_addr)
    return f"{root}/api", stop
