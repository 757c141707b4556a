"""Control routes under /_emulator/ (no auth): faults, reset, webhook log, runs, request statistics."""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import views
from .api import Emulator
from .faults import FaultConfigError


def _emu(request: Request) -> Emulator:
    emulator: Emulator = request.app.state.emulator
    return emulator


async def get_faults(request: Request) -> Response:
    return JSONResponse(_emu(request).faults.as_dict())


async def set_faults(request: Request) -> Response:
    emu = _emu(request)
    try:
        raw = json.loads(await request.body() or b"{}")
        emu.faults.configure(raw)
    except (json.JSONDecodeError, FaultConfigError) as exc:
        return JSONResponse({"detail": str(exc)}, status_code=400)
    return JSONResponse(emu.faults.as_dict())


async def reset(request: Request) -> Response:
    """Back to the fixtures: runs, outputs, uploads, webhook log, faults and statistics are forgotten."""
    emu = _emu(request)
    await emu.engine.close()
    await emu.webhooks.reset()
    emu.store.load()
    emu.faults.reset()
    emu.stats.reset()
    return JSONResponse({"status": "ok"})


async def webhook_log(request: Request) -> Response:
    return JSONResponse(_emu(request).webhooks.log(request.query_params.get("run_id")))


async def all_runs(request: Request) -> Response:
    """Every run of every tenant, oldest first, with what the API hides (deployment_id, planned outcome)."""
    emu = _emu(request)
    runs = sorted(emu.store.runs.values(), key=lambda run: run.created_at)
    return JSONResponse(
        [
            {**views.run(run), "deployment_id": run.deployment_id, "outcome": run.outcome, "batch_id": run.batch_id}
            for run in runs
        ]
    )


async def get_stats(request: Request) -> Response:
    return JSONResponse(_emu(request).stats.as_dict())


async def reset_stats(request: Request) -> Response:
    _emu(request).stats.reset()
    return JSONResponse({"status": "ok"})


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


ROUTES = [
    Route("/_emulator/faults", get_faults, methods=["GET"]),
    Route("/_emulator/faults", set_faults, methods=["POST"]),
    Route("/_emulator/reset", reset, methods=["POST"]),
    Route("/_emulator/webhooks", webhook_log, methods=["GET"]),
    Route("/_emulator/runs", all_runs, methods=["GET"]),
    Route("/_emulator/stats", get_stats, methods=["GET"]),
    Route("/_emulator/stats", reset_stats, methods=["DELETE"]),
    Route("/_emulator/health", health, methods=["GET"]),
]
