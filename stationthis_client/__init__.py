"""The StationThis client: one typed library for the bots (Telegram, Discord, web) to call the services.

    from stationthis_client import AsyncClient, InsufficientPoints

    async with AsyncClient() as client:            # finds the system `make run` started
        generation = await client.generate("alice", "/make", {"input_prompt": "a cat astronaut"})
        async for event in generation:             # queue place, ETA, progress, outputs
            ...
        run = generation.run                       # SUCCESS, with outputs and a receipt

``AsyncClient`` (gRPC, asyncio), ``Client`` (gRPC, blocking) and ``HttpClient`` (the HTTP gateway,
asyncio) have the same methods. They set up channels, deadlines, retries, idempotency keys and
stream resumption, and raise every failure as a ``StationThisError`` subclass.
"""

from __future__ import annotations

from . import _generated  # noqa: F401  (first: makes gen/ importable as stationthis.*)
from ._common import Generation, RunWatch
from .aio import AsyncClient
from .endpoints import Endpoints
from .errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InsufficientPoints,
    Internal,
    InvalidInputs,
    NotFound,
    PermissionDenied,
    RateLimited,
    StationThisError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Violation,
)
from .http import HttpClient
from .sync import Client, SyncGeneration, SyncWatch

__all__ = [
    "Aborted",
    "AlreadyExists",
    "AsyncClient",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "Endpoints",
    "FailedPrecondition",
    "Generation",
    "HttpClient",
    "InsufficientPoints",
    "Internal",
    "InvalidInputs",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "RunWatch",
    "StationThisError",
    "SyncGeneration",
    "SyncWatch",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Violation",
]
