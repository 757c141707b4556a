"""`create_app(settings)`: the emulator as a Starlette application."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from . import api, control
from .faults import Faults
from .gate import TRANSPORT_KEY, Gate, Stats
from .lifecycle import Engine
from .settings import EmulatorSettings
from .state import Store
from .validation import ValidationFailed
from .webhooks import WebhookSender


class EmulatorApp(Starlette):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            # uvicorn's `send` is a method of its request cycle, which holds the connection's transport:
            # the "drop the connection" faults need it.
            transport = getattr(getattr(send, "__self__", None), "transport", None)
            if transport is not None:
                scope[TRANSPORT_KEY] = transport
        await super().__call__(scope, receive, send)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, api.ApiError)
    return JSONResponse(exc.body, status_code=exc.status)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ValidationFailed)
    return JSONResponse({"detail": exc.errors}, status_code=422)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def create_app(settings: EmulatorSettings) -> Starlette:
    public_url = settings.public_url or f"http://{settings.listen_addr}"
    store = Store(settings.fixtures_dir, public_url)
    faults = Faults(settings.fault_seed)
    webhooks = WebhookSender(settings, faults)
    engine = Engine(store, settings, webhooks, faults)
    stats = Stats()
    keys = {key: store.tenants["default"] for key in settings.api_keys}
    keys.update({key: store.tenants["other"] for key in settings.other_api_keys})
    emulator = api.Emulator(settings, store, faults, webhooks, engine, stats)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await engine.close()
        await webhooks.close()

    routes = [*api.ROUTES, *control.ROUTES]
    app = EmulatorApp(
        routes=routes,
        middleware=[
            Middleware(Gate, routes=routes, groups=api.GROUPS, faults=faults, stats=stats, keys=keys),
        ],
        exception_handlers={
            api.ApiError: _api_error,
            ValidationFailed: _validation_error,
            HTTPException: _http_error,
        },
        lifespan=lifespan,
    )
    app.state.emulator = emulator
    return app
