"""``Client``: the same methods as ``AsyncClient``, blocking, for scripts and synchronous bots.

It runs an ``AsyncClient`` on a private event loop in a daemon thread of its own; each method hands
the coroutine to that loop and waits for its result (an interrupt, such as Ctrl-C, cancels the call).
``generate`` returns a ``SyncGeneration``, iterable with a plain ``for``.
"""

from __future__ import annotations

import asyncio
import threading
import types
from collections.abc import AsyncIterator, Coroutine, Iterator, Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

from stationthis.comfyui.v1 import comfyui_service_pb2 as svc
from stationthis.comfyui.v1 import run_pb2
from stationthis.points.v1 import points_pb2
from stationthis.points.v1 import points_service_pb2 as pts
from stationthis.workflows.v1 import workflow_pb2

from ._common import DEFAULT_RESUME_WINDOW, DEFAULT_RETRY_WINDOW, DEFAULT_TIMEOUT, Generation, RunWatch
from .aio import AsyncClient
from .endpoints import Endpoints

T = TypeVar("T")


class _Loop:
    """An event loop running in a daemon thread; ``run(coro)`` blocks for the coroutine's result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="stationthis-client", daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self.thread:
            coroutine.close()
            raise RuntimeError("a Client method was called from its own event loop; use AsyncClient there")
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # interrupted (KeyboardInterrupt...): the call stops too
            raise

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        try:  # close what was left half-iterated (a watch given up early), as asyncio.run does
            asyncio.run_coroutine_threadsafe(self.loop.shutdown_asyncgens(), self.loop).result(timeout=5)
        except Exception:  # noqa: S110 - best effort while closing; the loop stops regardless
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


async def _next(iterator: AsyncIterator[T]) -> T:
    return await iterator.__anext__()


async def _build(endpoints: Endpoints | None, **options: Any) -> AsyncClient:
    return AsyncClient(endpoints, **options)  # made on its loop, where its channels will live


E = TypeVar("E", RunWatch, Generation)


class _SyncEvents(Generic[E]):
    """An async run-event iterator (``RunWatch`` or ``Generation``) iterated synchronously on the
    client's loop: ``for event in it``; ``resumes`` and ``finished`` as there; ``close()`` stops it."""

    def __init__(self, loop: _Loop, events: E) -> None:
        self._loop = loop
        self._events: E = events

    @property
    def resumes(self) -> int:
        return self._events.resumes

    @property
    def finished(self) -> bool:
        return self._events.finished

    def __iter__(self) -> Iterator[svc.WatchRunResponse]:
        return self

    def __next__(self) -> svc.WatchRunResponse:
        try:
            return self._loop.run(_next(self._events))
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        self._loop.run(self._events.aclose())


class SyncWatch(_SyncEvents[RunWatch]):
    """A ``RunWatch`` iterated synchronously; ``run`` and ``last_event_id`` as there."""

    @property
    def run(self) -> run_pb2.Run | None:
        return self._events.run

    @property
    def last_event_id(self) -> str:
        return self._events.last_event_id


class SyncGeneration(_SyncEvents[Generation]):
    """A ``Generation`` iterated synchronously: ``run`` is the latest run, ``wait()`` drains the
    events and returns the final run."""

    @property
    def run(self) -> run_pb2.Run:
        return self._events.run

    @property
    def run_id(self) -> str:
        return self._events.run_id

    def wait(self) -> run_pb2.Run:
        return self._loop.run(self._events.wait())


class Client:
    """The points, workflows and comfyui services over gRPC, blocking. ``with Client() as client:``
    (or ``client.close()``). Arguments as ``AsyncClient``'s."""

    def __init__(
        self,
        endpoints: Endpoints | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retry_window: float = DEFAULT_RETRY_WINDOW,
        resume_window: float = DEFAULT_RESUME_WINDOW,
    ) -> None:
        endpoints = endpoints if endpoints is not None else Endpoints.discover()
        self._loop = _Loop()
        try:
            self._client = self._loop.run(
                _build(endpoints, timeout=timeout, retry_window=retry_window, resume_window=resume_window)
            )
        except BaseException:
            self._loop.stop()
            raise

    @property
    def endpoints(self) -> Endpoints:
        return self._client.endpoints

    @property
    def timeout(self) -> float:
        return self._client.timeout

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: types.TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.loop.is_closed():
            return
        try:
            self._loop.run(self._client.close())
        finally:
            self._loop.stop()

    # --- the methods, as AsyncClient's ------------------------------------------------------------

    def workflows(self) -> list[workflow_pb2.Workflow]:
        return self._loop.run(self._client.workflows())

    def workflow(self, name: str) -> workflow_pb2.Workflow:
        return self._loop.run(self._client.workflow(name))

    def account(self, user: str) -> points_pb2.Account:
        return self._loop.run(self._client.account(user))

    def credit(
        self,
        user: str,
        qoints: int,
        reference: str,
        *,
        memo: str = "",
        source: int = points_pb2.QOINTS_SOURCE_PURCHASE,
        request_id: str | None = None,
    ) -> pts.CreditQointsResponse:
        return self._loop.run(
            self._client.credit(user, qoints, reference, memo=memo, source=source, request_id=request_id)
        )

    def history(self, user: str, limit: int = 20) -> list[points_pb2.Transaction]:
        return self._loop.run(self._client.history(user, limit))

    def quote(self, user: str, workflow: str, inputs: Mapping[str, Any] | None = None) -> svc.QuoteRunResponse:
        return self._loop.run(self._client.quote(user, workflow, inputs))

    def create(
        self,
        user: str,
        workflow: str,
        inputs: Mapping[str, Any] | None = None,
        *,
        cancel_after: float | None = None,
        callback_url: str | None = None,
        request_id: str | None = None,
    ) -> run_pb2.Run:
        return self._loop.run(
            self._client.create(
                user, workflow, inputs, cancel_after=cancel_after, callback_url=callback_url, request_id=request_id
            )
        )

    def generate(
        self,
        user: str,
        workflow: str,
        inputs: Mapping[str, Any] | None = None,
        *,
        cancel_after: float | None = None,
        callback_url: str | None = None,
        request_id: str | None = None,
    ) -> SyncGeneration:
        generation = self._loop.run(
            self._client.generate(
                user, workflow, inputs, cancel_after=cancel_after, callback_url=callback_url, request_id=request_id
            )
        )
        return SyncGeneration(self._loop, generation)

    def watch(self, run_id: str, after_event_id: str | None = None) -> SyncWatch:
        return SyncWatch(self._loop, self._client.watch(run_id, after_event_id))

    def run(self, run_id: str) -> run_pb2.Run:
        return self._loop.run(self._client.run(run_id))

    def runs(self, user: str, limit: int = 20) -> list[run_pb2.Run]:
        return self._loop.run(self._client.runs(user, limit))

    def cancel(self, run_id: str, *, request_id: str | None = None) -> run_pb2.Run:
        return self._loop.run(self._client.cancel(run_id, request_id=request_id))

    def regenerate(
        self,
        run_id: str,
        *,
        same_seed: bool = False,
        overrides: Mapping[str, Any] | None = None,
        cancel_after: float | None = None,
        callback_url: str | None = None,
        request_id: str | None = None,
    ) -> run_pb2.Run:
        return self._loop.run(
            self._client.regenerate(
                run_id,
                same_seed=same_seed,
                overrides=overrides,
                cancel_after=cancel_after,
                callback_url=callback_url,
                request_id=request_id,
            )
        )

    def upload(
        self,
        path: str | Path,
        *,
        user: str,
        content_type: str | None = None,
        filename: str | None = None,
        request_id: str | None = None,
    ) -> svc.UploadFileResponse:
        return self._loop.run(
            self._client.upload(path, user=user, content_type=content_type, filename=filename, request_id=request_id)
        )


__all__ = ["Client", "SyncGeneration", "SyncWatch"]
