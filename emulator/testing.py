"""The emulator for tests: started in-process on a free loopback port with a fast clock, plus helpers.

The ids below are fixed in `fixtures/` so tests (and the client's tests) can name them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from .server import start
from .settings import EmulatorSettings

API_KEY = "emulator-test-key"
OTHER_API_KEY = "emulator-other-tenant-key"
TERMINAL = ("success", "failed", "timeout", "cancelled")

# Deployments (workflow, environment): see fixtures/deployments.json.
DEPLOYMENTS = {
    "text2img": "d4000000-0000-4000-8000-000000000001",
    "text2img-staging": "d4000000-0000-4000-8000-000000000002",  # concurrency_limit 1
    "img2img": "d4000000-0000-4000-8000-000000000003",
    "inpaint": "d4000000-0000-4000-8000-000000000004",
    "upscale": "d4000000-0000-4000-8000-000000000005",  # gpu A100-80GB (wins over the request's)
    "img2vid": "d4000000-0000-4000-8000-000000000006",  # fluid (modal_image_id): listed with is_fluid=true only
    "controlnet": "d4000000-0000-4000-8000-000000000007",
    "toon": "d4000000-0000-4000-8000-000000000008",
    "lora_train": "d4000000-0000-4000-8000-000000000009",  # gpu H100, concurrency_limit 1
    "img2img-staging": "d4000000-0000-4000-8000-000000000010",
    "img2vid-staging": "d4000000-0000-4000-8000-000000000011",
    "upscale-classic": "d4000000-0000-4000-8000-000000000012",  # classic machine: no Modal id, cancel -> 500
    "text2img-preview": "d4000000-0000-4000-8000-000000000013",
    "other-tenant": "d4000000-0000-4000-8000-000000000020",  # owned by the second tenant
    "deleted-workflow": "d4000000-0000-4000-8000-000000000021",  # its workflow is deleted: queue -> 404
}
WORKFLOWS = {
    "text2img": "b2000000-0000-4000-8000-000000000001",
    "img2img": "b2000000-0000-4000-8000-000000000002",
    "inpaint": "b2000000-0000-4000-8000-000000000003",
    "upscale": "b2000000-0000-4000-8000-000000000004",
    "img2vid": "b2000000-0000-4000-8000-000000000005",
    "controlnet": "b2000000-0000-4000-8000-000000000006",
    "toon": "b2000000-0000-4000-8000-000000000007",
    "lora_train": "b2000000-0000-4000-8000-000000000008",
}
MACHINES = {
    "StationthisHun": "a1000000-0000-4000-8000-000000000001",
    "inpainter": "a1000000-0000-4000-8000-000000000002",
    "fluxdev": "a1000000-0000-4000-8000-000000000003",
    "TRIPO": "a1000000-0000-4000-8000-000000000004",
    "building": "a1000000-0000-4000-8000-000000000005",
    "error": "a1000000-0000-4000-8000-000000000006",
    "deleted": "a1000000-0000-4000-8000-000000000007",
    "classic": "a1000000-0000-4000-8000-000000000008",
}


@dataclass
class RunningEmulator:
    base_url: str  # http://127.0.0.1:PORT/api
    root_url: str  # http://127.0.0.1:PORT
    api_key: str
    other_api_key: str
    _stop: Callable[[], Awaitable[None]]
    _control: httpx.AsyncClient = field(init=False)

    def __post_init__(self) -> None:
        self._control = httpx.AsyncClient(base_url=f"{self.root_url}/_emulator", timeout=10, trust_env=False)

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.api_key}"}

    def client(self, key: str | None = None, **kwargs: Any) -> httpx.AsyncClient:
        """An httpx client on the API base URL with the Bearer header set."""
        return httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers(key), timeout=10, trust_env=False, **kwargs
        )

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self._control.request(method, path, **kwargs)
        response.raise_for_status()
        return response.json()

    async def set_faults(self, **faults: Any) -> dict[str, Any]:
        """Replace the whole fault configuration (see emulator/faults.py); no argument clears it."""
        result: dict[str, Any] = await self._json("POST", "/faults", json=faults)
        return result

    async def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._json("GET", "/stats")
        return result

    async def reset_stats(self) -> None:
        await self._json("DELETE", "/stats")

    async def runs(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._json("GET", "/runs")
        return result

    async def webhooks(self, run_id: str | None = None) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._json("GET", "/webhooks", params={"run_id": run_id} if run_id else {})
        return result

    async def reset(self) -> None:
        await self._json("POST", "/reset")

    async def wait_run(self, run_id: str, statuses: tuple[str, ...] = TERMINAL, within: float = 15) -> dict[str, Any]:
        """Poll the control API until the run's status is one of ``statuses`` (AssertionError after ``within`` s)."""
        try:
            async with asyncio.timeout(within):
                while True:
                    for run in await self.runs():
                        if run["id"] == run_id and run["status"] in statuses:
                            return run
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise AssertionError(f"run {run_id} not in {statuses} within {within}s") from None

    async def close(self) -> None:
        await self._control.aclose()
        await self._stop()


async def start_for_tests(**overrides: Any) -> RunningEmulator:
    fields: dict[str, Any] = {
        "api_keys": (API_KEY,),
        "other_api_keys": (OTHER_API_KEY,),
        "listen_addr": "127.0.0.1:0",
        "step_seconds": 0.02,
        "webhook_backoff_scale": 0.05,
        "webhook_timeout_seconds": 5.0,
    }
    settings = EmulatorSettings(**{**fields, **overrides})
    base_url, stop = await start(settings)
    return RunningEmulator(base_url, base_url.removesuffix("/api"), API_KEY, OTHER_API_KEY, stop)
