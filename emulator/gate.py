"""The ASGI layer in front of the routes: request statistics, injected latency and faults, Bearer auth."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .faults import Action, Faults
from .state import Tenant

TRANSPORT_KEY = "emulator.transport"
TENANT_KEY = "emulator.tenant"


class Stats:
    def __init__(self) -> None:
        self.by_route: Counter[str] = Counter()
        self.by_group: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": sum(self.by_route.values()),
            "routes": dict(self.by_route),
            "groups": dict(self.by_group),
            "faults": dict(self.faults),
        }

    def reset(self) -> None:
        self.by_route.clear()
        self.by_group.clear()
        self.faults.clear()


async def send_json(send: Send, status: int, body: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    raw = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
            + (headers or []),
        }
    )
    await send({"type": "http.response.body", "body": raw})


async def send_text(send: Send, status: int, text: str) -> None:
    raw = text.encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(raw)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": raw})


async def drop_connection(scope: Scope, send: Send) -> None:
    """Close the connection without any response (a reset, as a crashed proxy would)."""
    transport = scope.get(TRANSPORT_KEY)
    if transport is not None:
        transport.abort()
        for _ in range(3):  # let the server see the connection is gone before the app returns
            await asyncio.sleep(0)
        return
    # Not served by uvicorn: start a response and break it off, which closes the connection too.
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"1024")]})
    raise ConnectionAbortedError("emulator fault: connection dropped")


async def send_fault(scope: Scope, send: Send, action: Action) -> None:
    status = action.status or 500
    retry_after = [(b"retry-after", str(action.retry_after).encode())] if action.retry_after is not None else []
    if status == 429:
        await send_json(send, 429, {"detail": "Too Many Requests"}, retry_after or [(b"retry-after", b"1")])
    elif status == 503:
        await send_json(send, 503, {"detail": "Service Unavailable"}, retry_after)
    else:
        texts = {500: "Internal Server Error", 502: "Bad Gateway", 504: "Gateway Timeout"}
        await send_text(send, status, texts.get(status, "Error"))


class Gate:
    """Counts every request per route, then (for /api and /files) applies latency and faults, then
    (for /api) checks the Bearer token and records the caller's tenant in the scope."""

    def __init__(
        self,
        app: ASGIApp,
        routes: list[Route],
        groups: dict[str, str],
        faults: Faults,
        stats: Stats,
        keys: dict[str, Tenant],
    ) -> None:
        self.app = app
        self.routes = routes
        self.groups = groups
        self.faults = faults
        self.stats = stats
        self.keys = keys

    def _route(self, scope: Scope) -> Route | None:
        partial = None
        for route in self.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return route
            if match == Match.PARTIAL and partial is None:
                partial = route
        return partial

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path.startswith("/api") or path.startswith("/files")):
            await self.app(scope, receive, send)
            return
        route = self._route(scope)
        template = route.path if route is not None else path
        group = self.groups.get(route.name) if route is not None else None
        self.stats.by_route[f"{scope['method']} {template}"] += 1
        if group:
            self.stats.by_group[group] += 1

        latency = self.faults.config.latency_ms
        if latency > 0:
            await asyncio.sleep(latency / 1000)
        action = self.faults.for_request(group)
        if action is not None:
            self.stats.faults[f"{action.kind}:{action.status or ''}:{group}"] += 1
            if action.kind == "drop":
                await drop_connection(scope, send)
                return
            if action.kind == "error":
                await send_fault(scope, send, action)
                return

        if path.startswith("/api"):
            tenant = self._authenticate(scope)
            if isinstance(tenant, str):
                await send_json(send, 401, {"detail": tenant})
                return
            scope[TENANT_KEY] = tenant

        if action is not None and action.kind == "lose_response":
            await self.app(scope, receive, _swallow)  # the request takes effect; its answer is lost
            if action.status is None:
                await drop_connection(scope, send)
            else:
                await send_fault(scope, send, action)
            return
        await self.app(scope, receive, send)

    def _authenticate(self, scope: Scope) -> Tenant | str:
        header = ""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return "Invalid or missing token"
        tenant = self.keys.get(token)
        return tenant if tenant is not None else "Invalid or expired token"


async def _swallow(message: Message) -> None:
    return None
