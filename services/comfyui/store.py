"""The run store: every run's state in Redis, so any replica serves any run and a restart loses nothing.

Key layout (Redis Cluster ready: a run's keys share the hash tag ``{<run_id>}``; each index is its
own key, written apart from the run and repaired by the reconciler if a crash falls in between):

  run:{<id>}               hash: ``run`` (the Run message), ``rev`` (revision), ``token`` (webhook
                           secret), ``submit`` (none|sent|unknown|done), ``submit_ms``, ``news_ms``
                           (last webhook or poll), ``settled``, ``finished``, ``duration`` (upstream
                           when upstream's own run_duration was read), ``ev`` (last event id)
  run:{<id>}:ev            stream of WatchRunResponse messages (capped), one per change
  runs:user:{<user>}       zset: run id -> create time (ms), for ListRuns
  runs:active              zset: run id -> when the reconciler should look at it next (ms)
  runs:upstream:{<uuid>}   the run id of an upstream run id (for runs adopted after a lost response)

Every change of a run is one compare-and-set script call: it checks the revision, writes the new
state, appends the event to the stream and publishes the event id on ``run:{<id>}:ch``, atomically.
A writer that lost a race reads the run again and re-applies its change (``RedisRunStore.update``).
Runs and their events expire ``retention`` after they are terminal and settled.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import redis.asyncio as aioredis
from opentelemetry import trace
from opentelemetry.instrumentation.utils import suppress_instrumentation

from common.errors import NotFound, Unavailable
from common.redis_client import answered
from stationthis.comfyui.v1 import run_pb2

ACTIVE = "runs:active"
LEASE = "runs:reconciler:lease"
EVENTS_KEPT = 500  # per run; a watcher further behind gets the latest state (every event carries the whole run)

# KEYS: run hash, events stream. ARGV: expected rev (0: must not exist), event bytes ('' none), channel,
# ttl seconds (0: keep), stream cap, then field/value pairs. Returns {1, rev, event id} or {0, rev}.
_CAS = """
local rev = tonumber(redis.call('HGET', KEYS[1], 'rev') or '0')
if rev ~= tonumber(ARGV[1]) then return {0, rev} end
local id = ''
if ARGV[2] ~= '' then
  id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'e', ARGV[2])
  redis.call('HSET', KEYS[1], 'ev', id)
end
redis.call('HSET', KEYS[1], 'rev', rev + 1, unpack(ARGV, 6))
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
if id ~= '' then redis.call('PUBLISH', ARGV[3], id) end
return {1, rev + 1, id}
"""
# KEYS: lease. ARGV: owner, ttl ms. Take the lease if free, renew it if ours. Returns 1 if held.
_LEASE = """
local owner = redis.call('GET', KEYS[1])
if owner == false or owner == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
  return 1
end
return 0
"""


def run_key(run_id: str) -> str:
    return f"run:{{{run_id}}}"


def events_key(run_id: str) -> str:
    return f"run:{{{run_id}}}:ev"


def channel(run_id: str) -> str:
    return f"run:{{{run_id}}}:ch"


def user_key(user_id: str) -> str:
    return f"runs:user:{{{user_id}}}"


def upstream_key(upstream_run_id: str) -> str:
    return f"runs:upstream:{{{upstream_run_id}}}"


@dataclass
class Record:
    """A stored run with what only the service needs to know about it."""

    run: run_pb2.Run
    rev: int = 0
    token: str = ""
    submit: str = "none"  # none: not sent; sent: in flight; unknown: sent, no answer; done: upstream has it
    submit_ms: int = 0
    news_ms: int = 0
    settled: bool = False
    finished: bool = False  # the FINISHED event was written
    upstream_duration: bool = False
    event_id: str = ""
    gpu_override: int = 0  # the GPU CreateRun asked for, sent with the queue request
    adapter: str = ""  # the caller's adapter: whose secrets sign the run's callbacks
    stop: str = ""  # why we asked upstream to cancel it: cancel_run | cancel_after | deadline

    def fields(self) -> dict[str, str | bytes]:
        return {
            "run": self.run.SerializeToString(),
            "token": self.token,
            "submit": self.submit,
            "submit_ms": str(self.submit_ms),
            "news_ms": str(self.news_ms),
            "settled": "1" if self.settled else "0",
            "finished": "1" if self.finished else "0",
            "duration": "upstream" if self.upstream_duration else "",
            "gpu_req": str(self.gpu_override),
            "cb_adapter": self.adapter,
            "stop": self.stop,
        }

    @classmethod
    def parse(cls, raw: Mapping[bytes, bytes]) -> Record:
        def text(name: str) -> str:
            return raw.get(name.encode(), b"").decode()

        return cls(
            run=run_pb2.Run.FromString(raw[b"run"]),
            rev=int(text("rev") or 0),
            token=text("token"),
            submit=text("submit") or "none",
            submit_ms=int(text("submit_ms") or 0),
            news_ms=int(text("news_ms") or 0),
            settled=text("settled") == "1",
            finished=text("finished") == "1",
            upstream_duration=text("duration") == "upstream",
            event_id=text("ev"),
            gpu_override=int(text("gpu_req") or 0),
            adapter=text("cb_adapter"),
            stop=text("stop"),
        )

    def copy(self) -> Record:
        run = run_pb2.Run()
        run.CopyFrom(self.run)
        return Record(
            run, self.rev, self.token, self.submit, self.submit_ms, self.news_ms, self.settled, self.finished,
            self.upstream_duration, self.event_id, self.gpu_override, self.adapter, self.stop,
        )  # fmt: skip


@dataclass
class Write:
    """A change to write: the new record, and the event (WatchRunResponse bytes) it appends, if any."""

    record: Record
    event: bytes = b""
    ttl_seconds: int = 0
    extra: dict[str, str] = field(default_factory=dict)


class Conflict(Exception):
    """The run changed since it was read (another writer won the race)."""


class RunStore(Protocol):
    """What the run orchestration needs from storage."""

    async def get(self, run_id: str) -> Record | None: ...
    async def create(self, record: Record, look_at_ms: int) -> Record: ...
    async def write(self, write: Write) -> Record: ...
    async def update(self, run_id: str, change: Callable[[Record], Write | None]) -> tuple[Record, bool]: ...
    async def delete(self, record: Record) -> None: ...
    async def schedule(self, run_id: str, look_at_ms: int) -> None: ...
    async def unschedule(self, run_id: str) -> None: ...
    async def due(self, now_ms: int, limit: int) -> list[str]: ...
    async def list_user(self, user_id: str, before: tuple[int, str] | None, limit: int) -> list[tuple[int, str]]: ...
    async def get_many(self, run_ids: Sequence[str]) -> list[Record | None]: ...
    async def events_after(self, run_id: str, after: str, count: int) -> list[tuple[str, bytes]]: ...
    async def kept_after(self, run_id: str, after: str, newest: str) -> bool: ...
    async def adopt(self, upstream_run_id: str, run_id: str, ttl_seconds: int) -> str: ...
    async def adopted(self, upstream_run_id: str) -> str | None: ...
    async def lease(self, owner: str, ttl_ms: int) -> bool: ...


class RedisRunStore:
    def __init__(self, client: aioredis.Redis, retention_seconds: int, clock: Callable[[], float] = time.time) -> None:
        self.redis = client
        self.retention_seconds = retention_seconds
        self.clock = clock
        self._cas = client.register_script(_CAS)
        self._lease = client.register_script(_LEASE)
        self._tracer = trace.get_tracer("stationthis.comfyui.store")

    async def _guard(self, call: Awaitable[object]) -> object:
        return await answered(call, "the run store did not answer; retry")

    # --- one run ----------------------------------------------------------------------------------

    async def get(self, run_id: str) -> Record | None:
        raw = await self._guard(self.redis.hgetall(run_key(run_id)))
        assert isinstance(raw, dict)
        return Record.parse(raw) if raw.get(b"run") else None

    async def require(self, run_id: str) -> Record:
        record = await self.get(run_id)
        if record is None:
            raise NotFound(f"no run {run_id!r}", reason="RUN_NOT_FOUND", metadata={"run_id": run_id})
        return record

    async def _write(self, write: Write, expected_rev: int) -> Record:
        record = write.record
        fields: list[str | bytes] = []
        for name, value in {**record.fields(), **write.extra}.items():
            fields.extend((name, value))
        args = [expected_rev, write.event, channel(record.run.run_id), write.ttl_seconds, EVENTS_KEPT, *fields]
        with self._tracer.start_as_current_span("runs write", kind=trace.SpanKind.CLIENT,
                                                attributes={"db.system": "redis"}):  # fmt: skip
            with suppress_instrumentation():
                result = await self._guard(
                    self._cas(keys=[run_key(record.run.run_id), events_key(record.run.run_id)], args=args)
                )
        assert isinstance(result, list)
        if int(result[0]) != 1:
            raise Conflict(record.run.run_id)
        written = record.copy()
        written.rev = int(result[1])
        event_id = result[2].decode() if isinstance(result[2], bytes) else str(result[2])
        written.event_id = event_id or record.event_id
        return written

    async def create(self, record: Record, look_at_ms: int) -> Record:
        """Store a new run (and index it: the reconciler looks at it at ``look_at_ms``)."""
        run = record.run
        cutoff = int((self.clock() - self.retention_seconds) * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(ACTIVE, {run.run_id: look_at_ms})
            pipe.zadd(user_key(run.user_id), {run.run_id: run.create_time.ToMilliseconds()})
            pipe.zremrangebyscore(user_key(run.user_id), "-inf", cutoff)  # runs past retention are gone
            await self._guard(pipe.execute())
        from . import state

        return await self._write(Write(record, state.event(run, state.E.RUN_EVENT_TYPE_SNAPSHOT)), 0)

    async def write(self, write: Write) -> Record:
        """Write ``write.record`` if nobody changed the run since it was read; else ``Conflict``."""
        return await self._write(write, write.record.rev)

    async def update(self, run_id: str, change: Callable[[Record], Write | None]) -> tuple[Record, bool]:
        """Apply ``change`` to the current record until it is written without a race; returns the
        record and whether anything was written (``change`` returns None for no change)."""
        for _ in range(50):
            record = await self.require(run_id)
            write = change(record.copy())
            if write is None:
                return record, False
            write.record.rev = record.rev
            try:
                return await self.write(write), True
            except Conflict:
                continue
        raise Unavailable("the run is changing too fast to update; retry", reason="STORE_UNAVAILABLE")

    async def delete(self, record: Record) -> None:
        run = record.run
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(run_key(run.run_id), events_key(run.run_id))
            pipe.zrem(user_key(run.user_id), run.run_id)
            pipe.zrem(ACTIVE, run.run_id)
            await self._guard(pipe.execute())

    # --- the reconciler's index -------------------------------------------------------------------

    async def schedule(self, run_id: str, look_at_ms: int) -> None:
        await self._guard(self.redis.zadd(ACTIVE, {run_id: look_at_ms}))

    async def unschedule(self, run_id: str) -> None:
        await self._guard(self.redis.zrem(ACTIVE, run_id))

    async def due(self, now_ms: int, limit: int) -> list[str]:
        found = await self._guard(self.redis.zrangebyscore(ACTIVE, "-inf", now_ms, start=0, num=limit))
        assert isinstance(found, list)
        return [item.decode() for item in found]

    async def lease(self, owner: str, ttl_ms: int) -> bool:
        return bool(await self._guard(self._lease(keys=[LEASE], args=[owner, ttl_ms])))

    # --- listing ----------------------------------------------------------------------------------

    async def list_user(self, user_id: str, before: tuple[int, str] | None, limit: int) -> list[tuple[int, str]]:
        """(create ms, run id) newest first, strictly after ``before`` in that order."""
        high: float | str = "+inf" if before is None else before[0]
        rows = await self._guard(
            self.redis.zrevrangebyscore(user_key(user_id), high, "-inf", start=0, num=limit + 64, withscores=True)
        )
        assert isinstance(rows, list)
        found: list[tuple[int, str]] = []
        for member, score in rows:
            item = (int(score), member.decode())
            if before is not None and item[0] == before[0] and item[1] >= before[1]:
                continue  # same millisecond: order by run id, descending, like the index does
            found.append(item)
        found.sort(key=lambda row: (row[0], row[1]), reverse=True)
        return found[:limit]

    async def get_many(self, run_ids: Sequence[str]) -> list[Record | None]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for run_id in run_ids:
                pipe.hgetall(run_key(run_id))
            rows = await self._guard(pipe.execute())
        assert isinstance(rows, list)
        return [Record.parse(raw) if raw.get(b"run") else None for raw in rows]

    # --- events -----------------------------------------------------------------------------------

    async def events_after(self, run_id: str, after: str, count: int) -> list[tuple[str, bytes]]:
        rows = await self._guard(self.redis.xrange(events_key(run_id), f"({after}" if after else "-", "+", count))
        assert isinstance(rows, list)
        return [(event_id.decode(), fields[b"e"]) for event_id, fields in rows]

    async def kept_after(self, run_id: str, after: str, newest: str) -> bool:
        """Whether every event of the run after ``after`` is still in its (capped) stream: ``after`` is
        no later than ``newest`` (the run's last event) and no earlier than the oldest event kept."""
        if not newest or _stream_id(after) > _stream_id(newest):
            return False
        rows = await self._guard(self.redis.xrange(events_key(run_id), "-", "+", 1))
        assert isinstance(rows, list)
        return bool(rows) and _stream_id(rows[0][0].decode()) <= _stream_id(after)

    # --- upstream ids -----------------------------------------------------------------------------

    async def adopt(self, upstream_run_id: str, run_id: str, ttl_seconds: int) -> str:
        """Bind an upstream run to ``run_id`` unless another run has it; returns the run that has it."""
        key = upstream_key(upstream_run_id)
        await self._guard(self.redis.set(key, run_id, nx=True, ex=ttl_seconds))
        owner = await self._guard(self.redis.get(key))
        return owner.decode() if isinstance(owner, bytes) else run_id

    async def adopted(self, upstream_run_id: str) -> str | None:
        owner = await self._guard(self.redis.get(upstream_key(upstream_run_id)))
        return owner.decode() if isinstance(owner, bytes) else None


def _stream_id(event_id: str) -> tuple[int, int]:
    milliseconds, _, sequence = event_id.partition("-")
    return int(milliseconds), int(sequence or 0)
