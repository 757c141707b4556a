"""Idempotent mutations: one rule for every service (CONVENTIONS.md §5, AIP-155).

A mutation carries a ``request_id``. The first request under an id is remembered with a
*fingerprint* of its parameters; a repeat with the same parameters gets the first answer and changes
nothing; the same id with other parameters is INVALID_ARGUMENT ``REQUEST_ID_REUSED``.

* ``fingerprint`` hashes a request without its ``request_id`` (and with whatever a caller's
  ``normalize`` makes equal, e.g. an unset and a zero duration).
* ``request_id_reused`` is the one error for a reuse.
* ``RequestIds`` keeps the record in Redis for services whose state is not already in a Lua script
  (the points ledger checks fingerprints inside its own script, atomically with the mutation).
  ``claim`` binds an id to a value in one atomic step (first writer wins, the others read the
  winner's value), so two concurrent requests with one id can never both act. Redis not answering
  is UNAVAILABLE (``STORE_UNAVAILABLE``: retry with the same request_id), never an INTERNAL error.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from google.protobuf.message import Message

from .errors import FieldViolation, InvalidArgument
from .redis_client import answered

M = TypeVar("M", bound=Message)
DEFAULT_TTL_SECONDS = 86_400

# KEYS[1] = the record; ARGV = fingerprint, value, ttl (s). Returns nil if claimed now, else the
# stored record ("<fingerprint>\n<value>").
_CLAIM = """
local stored = redis.call('GET', KEYS[1])
if stored then return stored end
redis.call('SET', KEYS[1], ARGV[1] .. '\\n' .. ARGV[2], 'EX', tonumber(ARGV[3]))
return false
"""


def fingerprint(request: Message, normalize: Callable[[Any], None] | None = None) -> str:
    """The request's parameters without its ``request_id``, for telling a replay from a reuse.

    ``normalize`` may edit the copy (never the request) so that equivalent requests hash alike.
    """
    copy = type(request)()
    copy.CopyFrom(request)
    if "request_id" in copy.DESCRIPTOR.fields_by_name:
        copy.ClearField("request_id")
    if normalize is not None:
        normalize(copy)
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


def clear_if_zero(message: Any, field: str) -> None:
    """For ``normalize``: an unset message field and one holding its zero value mean the same."""
    if message.HasField(field) and getattr(message, field).ByteSize() == 0:
        message.ClearField(field)


def request_id_reused(request_id: str) -> InvalidArgument:
    return InvalidArgument(
        "request_id was already used with different parameters",
        reason="REQUEST_ID_REUSED",
        metadata={"request_id": request_id},
        violations=[FieldViolation("request_id", "already used with different parameters")],
    )


class RequestIds:
    """Request ids remembered in Redis under ``<namespace>:idem:<rpc>:<request_id>`` for ``ttl``."""

    def __init__(self, redis: aioredis.Redis, namespace: str, ttl_seconds: int = DEFAULT_TTL_SECONDS) -> None:
        self.redis = redis
        self.namespace = namespace
        self.ttl_seconds = ttl_seconds
        self._claim = redis.register_script(_CLAIM)

    def key(self, rpc: str, request_id: str) -> str:
        return f"{self.namespace}:idem:{rpc}:{request_id}"

    async def claim(self, rpc: str, request_id: str, fp: str, value: bytes) -> bytes | None:
        """Bind ``request_id`` to ``value``: None when this call bound it, else the value bound
        first by a request with the same parameters; REQUEST_ID_REUSED for other parameters."""
        stored = await _answered(self._claim(keys=[self.key(rpc, request_id)], args=[fp, value, self.ttl_seconds]))
        if stored is None:
            return None
        return self._check(request_id, fp, stored)

    async def lookup(self, rpc: str, request_id: str, fp: str) -> bytes | None:
        """The value bound to ``request_id`` (same parameters), None if unbound."""
        stored = await _answered(self.redis.get(self.key(rpc, request_id)))
        return None if stored is None else self._check(request_id, fp, stored)

    async def release(self, rpc: str, request_id: str) -> None:
        """Forget a claim whose request failed, so the caller may retry with the same id."""
        await _answered(self.redis.delete(self.key(rpc, request_id)))

    async def once(self, rpc: str, request_id: str, fp: str, response: M) -> M:
        """Remember ``response`` as the answer to ``request_id`` unless one is remembered already;
        return the remembered one (the first writer's, when two raced)."""
        stored = await self.claim(rpc, request_id, fp, response.SerializeToString())
        return response if stored is None else type(response).FromString(stored)

    async def replay(self, rpc: str, request_id: str, fp: str, response_type: type[M]) -> M | None:
        """The remembered answer to ``request_id``, or None."""
        stored = await self.lookup(rpc, request_id, fp)
        return None if stored is None else response_type.FromString(stored)

    @staticmethod
    def _check(request_id: str, fp: str, stored: bytes | str) -> bytes:
        raw = stored.encode() if isinstance(stored, str) else stored
        given, _, value = raw.partition(b"\n")
        if given.decode() != fp:
            raise request_id_reused(request_id)
        return value


async def _answered(call: Awaitable[Any]) -> Any:
    return await answered(call, "the request id store did not answer; retry with the same request_id")
