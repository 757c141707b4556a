"""Results pushed to the adapters: each status change of a run POSTed to its callback URL, signed as the
Standard Webhooks specification describes, at least once, in order per run, surviving restarts.

The outbox is the run's own event stream (written atomically with every change, store.py): a run
with a callback URL keeps a cursor (``cb_cursor``, the last event delivered) in its hash, and the
global index ``runs:callbacks:due`` says when to look at it next. Every status change marks the run
due; settlement marks it due again, so an index entry lost in a crash is restored when the run is
settled (which the reconciler guarantees). A dispatcher on every replica claims due runs (a claim
moves the entry into the future, so one replica delivers a run's callbacks at a time) and delivers
the next event after the cursor: 2xx advances the cursor; a failure retries with exponential backoff
and jitter; 410 Gone stops callbacks for that run; after ``max_attempts`` the event is given up (and
logged). Each message's ``webhook-id`` is stable across retries, so receivers can deduplicate.

Signing (https://www.standardwebhooks.com): ``webhook-signature: v1,<base64 HMAC-SHA256 of
"<id>.<timestamp>.<body>">``, one signature per configured secret (``whsec_<base64 key>``), space
separated, so a receiver holding either the old or the new key verifies during a rotation.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis.asyncio as aioredis
from google.protobuf import json_format

from common.errors import FieldViolation
from stationthis.comfyui.v1 import comfyui_service_pb2 as svc
from stationthis.comfyui.v1 import run_pb2

from .store import events_key, run_key

log = logging.getLogger("stationthis.comfyui.callbacks")
DUE = "runs:callbacks:due"
# Claim up to ARGV[2] runs due by ARGV[1] (ms), moving each to ARGV[3] (ms): returns the run ids.
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[3], id) end
return due
"""
STATUS_EVENTS = frozenset({svc.RUN_EVENT_TYPE_STATUS_CHANGED, svc.RUN_EVENT_TYPE_FINISHED})


def origin(url: str) -> str:
    """``scheme://host[:port]`` of a URL, lower-cased: what an adapter's allowed origins name."""
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{(parts.hostname or '').lower()}" + (f":{parts.port}" if parts.port else "")


def parse_secret(secret: str) -> bytes:
    """The key of a ``whsec_<base64>`` secret."""
    if not secret.startswith("whsec_"):
        raise ValueError("a callback secret starts with whsec_")
    try:
        return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except ValueError:
        raise ValueError("a callback secret is whsec_ followed by base64") from None


def sign(keys: Sequence[bytes], message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: ``v1,<signature>`` for each key, space separated."""
    content = f"{message_id}.{timestamp}.".encode() + body
    return " ".join("v1," + base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode() for key in keys)


@dataclass(frozen=True)
class Adapters:
    """Per adapter: the origins its callback URLs may use and its signing keys (newest first)."""

    origins: Mapping[str, frozenset[str]]
    keys: Mapping[str, tuple[bytes, ...]]

    def check(self, adapter: str, url: str) -> FieldViolation | None:
        """Why ``url`` may not be a callback URL of ``adapter``, or None."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or len(url) > 2048:
            return FieldViolation("callback_url", "must be an http(s) URL of at most 2048 characters")
        if not adapter or origin(url) not in self.origins.get(adapter, frozenset()):
            who = f"adapter {adapter}" if adapter else "callers without an adapter"
            return FieldViolation("callback_url", f"its origin is not allowed for {who}")
        if not self.keys.get(adapter):
            return FieldViolation("callback_url", f"adapter {adapter} has no callback secret configured")
        return None


def parse_adapters(origins: Sequence[tuple[str, str]], secrets: Sequence[tuple[str, str]]) -> Adapters:
    by_adapter: dict[str, set[str]] = {}
    for adapter, allowed in origins:
        by_adapter.setdefault(adapter, set()).add(origin(allowed))
    keys: dict[str, list[bytes]] = {}
    for adapter, secret in secrets:
        keys.setdefault(adapter, []).append(parse_secret(secret))
    return Adapters({a: frozenset(o) for a, o in by_adapter.items()}, {a: tuple(k) for a, k in keys.items()})


def payload(message: svc.WatchRunResponse, now_s: float) -> bytes:
    """The body: ``{"type", "timestamp", "data": {"run": <Run as proto3 JSON>}}`` (Standard Webhooks)."""
    kind = "run.finished" if message.event_type == svc.RUN_EVENT_TYPE_FINISHED else "run.status_changed"
    run = json_format.MessageToDict(message.run, preserving_proto_field_name=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now_s)) + "Z"
    return json.dumps({"type": kind, "timestamp": stamp, "data": {"run": run}}, separators=(",", ":")).encode()


@dataclass(frozen=True)
class CallbackSettings:
    batch: int = 100
    claim_seconds: float = 30.0  # a claimed run is someone's for this long
    first_retry_seconds: float = 1.0
    max_retry_seconds: float = 300.0
    max_attempts: int = 15  # about a day with the default backoff
    timeout_seconds: float = 10.0


class Dispatcher:
    def __init__(
        self,
        redis: aioredis.Redis,
        adapters: Adapters,
        settings: CallbackSettings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.adapters = adapters
        self.settings = settings or CallbackSettings()
        self.clock = clock
        self._claim = redis.register_script(_CLAIM)
        self._http = httpx.AsyncClient(timeout=self.settings.timeout_seconds, trust_env=False, follow_redirects=False)

    async def deliver_forever(self, interval: float = 0.2) -> None:
        """The dispatcher's loop (a background task of the service)."""
        while True:
            if not await self.pass_once():
                await asyncio.sleep(interval)

    async def mark_due(self, run_id: str, at_ms: int | None = None) -> None:
        await self.redis.zadd(DUE, {run_id: at_ms if at_ms is not None else int(self.clock() * 1000)})

    async def pass_once(self) -> int:
        """Deliver the next callback of every due run (those this replica claims); how many were due."""
        now_ms = int(self.clock() * 1000)
        claimed = await self._claim(
            keys=[DUE], args=[now_ms, self.settings.batch, now_ms + int(self.settings.claim_seconds * 1000)]
        )
        for raw in claimed:
            run_id = _bytes(raw).decode()
            try:
                await self.deliver_next(run_id)
            except Exception:  # one receiver's trouble must not stop the others
                log.exception("callback of run %s failed; retrying", run_id, extra={"run_id": run_id})
                await self.mark_due(run_id, now_ms + int(self.settings.first_retry_seconds * 1000))
        return len(claimed)

    async def deliver_next(self, run_id: str) -> None:
        fields = await self.redis.hmget(run_key(run_id), ["run", "cb_cursor", "cb_attempts", "cb_adapter", "cb_gone"])
        raw_run, cursor, attempts, adapter, gone = (_bytes(value) for value in fields)
        if not raw_run or gone:
            await self.redis.zrem(DUE, run_id)
            return
        run = run_pb2.Run.FromString(raw_run)
        cursor_id = cursor.decode()
        events = await self.redis.xrange(events_key(run_id), f"({cursor_id}" if cursor_id else "-", "+", count=50)
        pending: tuple[str, svc.WatchRunResponse] | None = None
        for event_id, data in events or []:
            message = svc.WatchRunResponse.FromString(_bytes((data or {}).get(b"e")))
            if message.event_type in STATUS_EVENTS:
                pending = (_bytes(event_id).decode(), message)
                break
            cursor_id = _bytes(event_id).decode()  # not a status change: nothing to push
        if pending is None:
            await self._advance(run_id, cursor_id, more=len(events or []) == 50)
            return
        event_id, message = pending
        keys = self.adapters.keys.get(adapter.decode(), ())
        status = await self._post(run.callback_url, run_id, event_id, message, keys)
        if status is not None and 200 <= status < 300:
            await self._advance(run_id, event_id, more=True)
        elif status == 410:
            log.info("callback receiver of run %s answered 410: no more callbacks", run_id, extra={"run_id": run_id})
            await self.redis.hset(run_key(run_id), "cb_gone", "1")
            await self.redis.zrem(DUE, run_id)
        else:
            await self._retry(run_id, int(attempts or b"0") + 1, event_id)

    async def _post(self, url: str, run_id: str, event_id: str, message: svc.WatchRunResponse,
                    keys: Sequence[bytes]) -> int | None:  # fmt: skip
        now = self.clock()
        body = payload(message, now)
        message_id = f"msg_{run_id}_{event_id}"
        timestamp = int(now)
        headers = {
            "content-type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(keys, message_id, timestamp, body),
            "user-agent": "stationthis-callbacks/1",
        }
        try:
            response = await self._http.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            log.warning("callback of run %s not delivered: %s", run_id, type(exc).__name__, extra={"run_id": run_id})
            return None
        return response.status_code

    async def _advance(self, run_id: str, cursor: str, more: bool) -> None:
        if cursor:
            await self.redis.hset(run_key(run_id), mapping={"cb_cursor": cursor, "cb_attempts": "0"})
        if more:
            await self.mark_due(run_id)
        else:
            await self.redis.zrem(DUE, run_id)

    async def _retry(self, run_id: str, attempts: int, event_id: str) -> None:
        settings = self.settings
        if attempts >= settings.max_attempts:
            log.error("callback %s of run %s given up after %d attempts", event_id, run_id, attempts,
                      extra={"run_id": run_id})  # fmt: skip
            await self._advance(run_id, event_id, more=True)
            return
        ceiling = min(settings.max_retry_seconds, settings.first_retry_seconds * 2 ** (attempts - 1))
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 (jitter)
        await self.redis.hset(run_key(run_id), "cb_attempts", str(attempts))
        await self.mark_due(run_id, int((self.clock() + delay) * 1000))

    async def close(self) -> None:
        await self._http.aclose()


def _bytes(value: Any) -> bytes:
    """A Redis reply as bytes (b"" for none)."""
    if value is None:
        return b""
    return value if isinstance(value, bytes) else str(value).encode()
