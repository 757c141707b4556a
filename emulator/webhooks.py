"""Webhook delivery exactly as §3: `run.updated` on every status change (with all outputs so far),
intermediate progress updates only with `webhook_intermediate_status`, `run.output` per output only when
the URL's query has `target_events=run.output`; at most 3 attempts with 0.5 s then 1 s backoff.

Events of one run are delivered in order by one worker per run (faults may drop, duplicate or reorder
them: a reordered event is held back until the next event of its run has been sent, or, if it is terminal,
until the run's events stop). Every delivery is recorded, with its attempts, for `GET /_emulator/webhooks`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

from . import views
from .faults import Faults
from .settings import EmulatorSettings
from .state import TERMINAL, Output, Run, iso, now

log = logging.getLogger("emulator.webhooks")

ATTEMPTS = 3
BACKOFF_SECONDS = (0.5, 1.0)
# Deliveries in flight at once, below the HTTP pool's size: requests waiting inside httpcore's pool
# cost time quadratic in their number (measured: one core saturated at 1000 runs in flight).
IN_FLIGHT = 64


def target_events(url: str) -> set[str]:
    values = parse_qs(urlsplit(url).query).get("target_events", [])
    return {event.strip() for value in values for event in value.split(",") if event.strip()}


@dataclass
class Delivery:
    id: int
    run_id: str
    event_type: str
    status: str
    url: str
    payload: dict[str, Any]
    created_at: str
    state: str = "pending"  # pending | delivered | failed | dropped
    attempts: list[dict[str, Any]] = field(default_factory=list)
    duplicate: bool = False
    reordered: bool = False
    hold: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "run_id": self.run_id,
            "event_type": self.event_type,
            "status": self.status,
            "url": self.url,
            "payload": self.payload,
            "created_at": self.created_at,
            "state": self.state,
            "attempts": self.attempts,
            "duplicate": self.duplicate,
            "reordered": self.reordered,
        }


class WebhookSender:
    def __init__(self, settings: EmulatorSettings, faults: Faults) -> None:
        self.settings = settings
        self.faults = faults
        self.deliveries: list[Delivery] = []
        self._ids = itertools.count(1)
        self._queues: dict[str, asyncio.Queue[Delivery]] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._client: httpx.AsyncClient | None = None
        self._in_flight = asyncio.Semaphore(IN_FLIGHT)

    # --- events -----------------------------------------------------------------------------------

    def status_changed(self, run: Run) -> None:
        """A status change (or a cancel): `run.updated` with every output so far."""
        self._emit(run, "run.updated", views.outputs(run))

    def progress(self, run: Run) -> None:
        if run.webhook_intermediate_status:
            self._emit(run, "run.updated", [])

    def output(self, run: Run, record: Output) -> None:
        if run.webhook and "run.output" in target_events(run.webhook) and views.valid_output_data(record.data):
            self._emit(run, "run.output", [views.output(record)])

    def _emit(self, run: Run, event_type: str, outputs: list[dict[str, Any]]) -> None:
        if not run.webhook:
            return
        payload = {
            "event_type": event_type,
            "status": run.status,
            "live_status": run.live_status,
            "progress": run.progress,
            "run_id": run.id,
            "outputs": outputs,
        }
        faults = self.faults.config
        if self.faults.chance(faults.webhook_drop):
            self.deliveries.append(self._delivery(run, event_type, payload, state="dropped"))
            return
        copies = 2 if self.faults.chance(faults.webhook_duplicate) else 1
        hold = self.faults.chance(faults.webhook_reorder)
        queue = self._queues.setdefault(run.id, asyncio.Queue())
        for copy in range(copies):
            delivery = self._delivery(run, event_type, payload, duplicate=copy > 0)
            delivery.hold = hold and copy == 0
            self.deliveries.append(delivery)
            queue.put_nowait(delivery)
        if run.id not in self._workers:
            self._workers[run.id] = asyncio.create_task(self._worker(run.id), name=f"webhooks-{run.id}")

    def _delivery(self, run: Run, event_type: str, payload: dict[str, Any], **extra: Any) -> Delivery:
        return Delivery(
            id=next(self._ids),
            run_id=run.id,
            event_type=event_type,
            status=run.status,
            url=run.webhook or "",
            payload=payload,
            created_at=iso(now()) or "",
            **extra,
        )

    # --- delivery ---------------------------------------------------------------------------------

    async def _worker(self, run_id: str) -> None:
        queue = self._queues[run_id]
        idle = max(4 * self.settings.step_seconds, 0.05)
        held: Delivery | None = None
        while True:
            try:
                delivery = await asyncio.wait_for(queue.get(), timeout=idle)
            except TimeoutError:
                if held is not None and held.status in TERMINAL:  # nothing follows a terminal event
                    await self._deliver(held)
                    held = None
                    continue
                if held is None and queue.empty():
                    del self._queues[run_id]
                    del self._workers[run_id]
                    return
                continue
            if delivery.hold and held is None:
                delivery.reordered = True
                held = delivery
                continue
            await self._deliver(delivery)
            if held is not None:
                await self._deliver(held)
                held = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self.settings.webhook_timeout_seconds,
                trust_env=False,
                limits=httpx.Limits(max_connections=IN_FLIGHT * 2, max_keepalive_connections=IN_FLIGHT * 2),
            )
        return self._client

    async def _deliver(self, delivery: Delivery) -> None:
        for attempt in range(ATTEMPTS):
            record: dict[str, Any] = {"at": iso(now()), "status_code": None, "error": None}
            delivery.attempts.append(record)
            try:
                async with self._in_flight:
                    response = await self._http().post(delivery.url, json=delivery.payload)
                record["status_code"] = response.status_code
                if response.is_success:
                    delivery.state = "delivered"
                    return
            except httpx.HTTPError as exc:
                record["error"] = f"{type(exc).__name__}: {exc}"
            if attempt < ATTEMPTS - 1:
                delay = BACKOFF_SECONDS[attempt] * self.settings.webhook_backoff_scale
                await asyncio.sleep(delay * (1 + 0.1 * self.faults.rng.random()))
        delivery.state = "failed"
        log.warning(
            "webhook not delivered after %d attempts",
            ATTEMPTS,
            extra={"run_id": delivery.run_id, "event_type": delivery.event_type, "status": delivery.status},
        )

    # --- inspection and shutdown ------------------------------------------------------------------

    def log(self, run_id: str | None = None) -> list[dict[str, Any]]:
        return [d.as_dict() for d in self.deliveries if run_id is None or d.run_id == run_id]

    async def reset(self) -> None:
        await self._stop_workers()
        self.deliveries = []

    async def _stop_workers(self) -> None:
        workers = list(self._workers.values())
        for task in workers:
            task.cancel()
        for task in workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._workers.clear()
        self._queues.clear()

    async def close(self) -> None:
        await self._stop_workers()
        if self._client is not None:
            await self._client.aclose()
            self._client = None
