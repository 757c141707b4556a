"""``HttpClient``: the same methods as ``AsyncClient``, over the gateway's HTTP JSON API (httpx).

For callers that cannot reach the gRPC services (a web back end outside the cluster, say). Each
method builds the same request message as the gRPC client and sends it on the route its
``google.api.http`` annotation declares (read from the descriptors, never written by hand): path
fields in the path, the rest as the JSON body (POST) or the query (GET), in the proto3 JSON mapping.
Replies are parsed into the same protobuf messages with ``json_format``; errors, from the gateway's
``{"error": {...}}`` shape, into the same exception classes.

* The API key goes as ``Authorization: Bearer <key>``.
* Deadline: ``timeout`` seconds per call, retries included, also sent as ``grpc-timeout`` so the
  gateway gives its gRPC call no longer.
* Retries: a connection that failed or broke, a 503, and a 429 that says when to come back
  (``Retry-After``, honoured); capped exponential backoff with full jitter for up to
  ``retry_window`` seconds. A mutation's body, with its ``request_id``, is the same on every attempt.
* WatchRun is read as Server-Sent Events from ``GET /v1/runs/{run_id}:watch``: ``event: result``
  carries ``{"result": <WatchRunResponse>}``, ``event: error`` the error shape. A broken stream is
  re-opened with ``?after_event_id=`` (``RunWatch``); a stream silent for ``stream_idle_seconds``
  is re-opened too, since nothing else would notice a dead connection.
* Uploads: ``POST /v1/uploads`` with the raw file as the body (``Content-Length``, its
  ``Content-Type``, ``user_id`` and ``filename`` in the query, ``Idempotency-Key``), streamed.
"""

from __future__ import annotations

import asyncio
import json
import types
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from google.api import annotations_pb2
from google.protobuf import descriptor, json_format
from google.protobuf.message import Message

from common.backoff import parse_retry_after
from stationthis.comfyui.v1 import comfyui_service_pb2 as svc
from stationthis.points.v1 import points_service_pb2 as pts
from stationthis.workflows.v1 import workflows_service_pb2 as wfs

from ._common import (
    CHUNK_BYTES,
    COMFYUI,
    DEFAULT_RESUME_WINDOW,
    DEFAULT_RETRY_WINDOW,
    DEFAULT_TIMEOUT,
    POINTS,
    WORKFLOWS,
    M,
    StreamIdle,
    Surface,
    backoff,
    log,
)
from .endpoints import Endpoints
from .errors import DeadlineExceeded, RateLimited, StationThisError, Unavailable, from_error_body

UPLOAD_PATH = "/v1/uploads"
_SERVICES: dict[str, descriptor.ServiceDescriptor] = {
    POINTS: pts.DESCRIPTOR.services_by_name["PointsService"],
    WORKFLOWS: wfs.DESCRIPTOR.services_by_name["WorkflowsService"],
    COMFYUI: svc.DESCRIPTOR.services_by_name["ComfyUIService"],
}


def route_of(service: str, method: str) -> tuple[str, str, str]:
    """(HTTP method, path template, body) of a method's ``google.api.http`` annotation."""
    options = _SERVICES[service].methods_by_name[method].GetOptions()
    rule = options.Extensions[annotations_pb2.http]
    kind = rule.WhichOneof("pattern")
    if kind is None:
        raise LookupError(f"{service}.{method} has no HTTP route")
    if kind == "custom":
        return rule.custom.kind.upper(), rule.custom.path, rule.body
    return kind.upper(), str(getattr(rule, kind)), rule.body


def _path(template: str, values: dict[str, Any]) -> tuple[str, set[str]]:
    """The template with each ``{field}`` filled (URL-encoded) from ``values``; the fields used."""
    used: set[str] = set()
    out: list[str] = []
    rest = template
    while "{" in rest:
        before, _, tail = rest.partition("{")
        name, _, rest = tail.partition("}")
        name = name.partition("=")[0]
        used.add(name)
        out.append(before)
        out.append(quote(str(values.get(name, "")), safe=""))
    out.append(rest)
    return "".join(out), used


def _query(values: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Query parameters for a GET: nested fields as ``a.b``, repeated ones repeated."""
    params: list[tuple[str, str]] = []
    for name, value in values.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            params.extend(_query(value, f"{key}."))
        elif isinstance(value, list):
            params.extend((key, _text(item)) for item in value)
        else:
            params.append((key, _text(value)))
    return params


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _retry_after(response: httpx.Response) -> float | None:
    return parse_retry_after(response.headers.get("retry-after"))


def _error_of(response: httpx.Response, body: bytes) -> StationThisError:
    try:
        parsed: Any = json.loads(body) if body else None
    except ValueError:
        parsed = None
    return from_error_body(parsed, response.status_code, _retry_after(response))


def _retryable(error: StationThisError) -> bool:
    if isinstance(error, Unavailable):
        return True
    return isinstance(error, RateLimited) and error.retry_after is not None


class HttpClient(Surface):
    """The services through the HTTP gateway. ``async with HttpClient() as client:`` (or
    ``await client.close()``); ``endpoints`` defaults to ``Endpoints.discover()``. ``transport``
    (an httpx transport) and ``trust_env`` are passed to ``httpx.AsyncClient``."""

    stream_idle_seconds = 60.0

    def __init__(
        self,
        endpoints: Endpoints | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retry_window: float = DEFAULT_RETRY_WINDOW,
        resume_window: float = DEFAULT_RESUME_WINDOW,
        transport: httpx.AsyncBaseTransport | None = None,
        trust_env: bool = True,
    ) -> None:
        self.endpoints = endpoints if endpoints is not None else Endpoints.discover()
        self.timeout = timeout
        self.retry_window = retry_window
        self.resume_window = resume_window
        headers = {"Accept": "application/json"}
        if self.endpoints.api_key:
            headers["Authorization"] = f"Bearer {self.endpoints.api_key}"
        self._http = httpx.AsyncClient(
            base_url=self.endpoints.gateway_url,
            headers=headers,
            timeout=timeout,
            transport=transport,
            trust_env=trust_env,
        )

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: types.TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    # --- the transport -----------------------------------------------------------------------------

    async def _unary(self, service: str, method: str, request: Message, response_type: type[M]) -> M:
        http_method, template, body_field = route_of(service, method)
        values = json_format.MessageToDict(request, preserving_proto_field_name=True)
        path, used = _path(template, values)
        rest = {k: v for k, v in values.items() if k not in used}
        params: list[tuple[str, str]] = []
        content: bytes | None = None
        headers: dict[str, str] = {}
        if body_field == "*":
            content = json.dumps(rest).encode()
        elif body_field:
            content = json.dumps(rest.pop(body_field, {})).encode()
            params = _query(rest)
        else:
            params = _query(rest)
        if content is not None:
            headers["Content-Type"] = "application/json"
        data = await self._send(http_method, path, params=params, content=content, headers=headers)
        return json_format.ParseDict(data, response_type(), ignore_unknown_fields=True)

    async def _send(
        self,
        method: str,
        path: str,
        *,
        params: list[tuple[str, str]] | None = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        budget: float | None = None,
        body_of: Any = None,
    ) -> Any:
        """One call with its deadline and retries; the reply's JSON. ``body_of()`` makes a fresh
        (streamed) body for each attempt instead of ``content``."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + (budget if budget is not None else self.timeout)
        attempt = 0
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise DeadlineExceeded("DEADLINE_EXCEEDED", f"the gateway did not answer within {self.timeout:g} s")
            sent = {**(headers or {}), "grpc-timeout": f"{max(1, int(left * 1000))}m"}
            try:
                response = await self._http.request(
                    method,
                    path,
                    params=httpx.QueryParams(tuple(params)) if params else None,
                    content=body_of() if body_of is not None else content,
                    headers=sent,
                    timeout=left,
                )
            except httpx.TimeoutException:
                raise DeadlineExceeded(
                    "DEADLINE_EXCEEDED", f"the gateway did not answer within {self.timeout:g} s"
                ) from None
            except httpx.TransportError:
                error: StationThisError = Unavailable(
                    "UNAVAILABLE", f"the gateway at {self.endpoints.gateway_url} is not reachable; retry"
                )
            else:
                if response.status_code == 200:
                    try:
                        return response.json()
                    except ValueError:
                        error = Unavailable("UNAVAILABLE", "the gateway's answer was not JSON; retry")
                else:
                    error = _error_of(response, response.content)
            if not _retryable(error):
                raise error
            delay = backoff(attempt)
            if isinstance(error, RateLimited) and error.retry_after is not None:
                delay = max(delay, error.retry_after)
            if loop.time() + delay > min(deadline, start + max(self.retry_window, 0.0)):
                raise error
            log.info("%s %s: %s; retrying (attempt %d)", method, path, error.message, attempt + 2)
            await asyncio.sleep(delay)
            attempt += 1

    async def _open_watch(self, request: svc.WatchRunRequest) -> AsyncGenerator[svc.WatchRunResponse, None]:
        params = {"after_event_id": request.after_event_id} if request.after_event_id else None
        path = f"/v1/runs/{quote(request.run_id, safe='')}:watch"
        idle = httpx.Timeout(self.timeout, read=self.stream_idle_seconds)
        try:
            async with self._http.stream(
                "GET", path, params=params, headers={"Accept": "text/event-stream"}, timeout=idle
            ) as response:
                if response.status_code != 200:
                    raise _error_of(response, await response.aread())
                async for kind, data in _events(response):
                    if kind == "result":
                        result = json.loads(data).get("result", {})
                        yield json_format.ParseDict(result, svc.WatchRunResponse(), ignore_unknown_fields=True)
                    elif kind == "error":
                        raise from_error_body(json.loads(data), 200)
        except httpx.ReadTimeout:
            raise StreamIdle from None
        except httpx.TimeoutException:
            raise Unavailable("UNAVAILABLE", "the gateway did not answer in time; retry") from None
        except httpx.TransportError:
            raise Unavailable("UNAVAILABLE", "the connection to the gateway broke; retry") from None
        except ValueError:  # a JSON line cut short by a dying connection
            raise Unavailable("UNAVAILABLE", "the gateway's event stream was cut; retry") from None

    async def _upload(self, metadata: svc.UploadFileMetadata, path: Path) -> svc.UploadFileResponse:
        headers = {
            "Content-Type": metadata.content_type,
            "Content-Length": str(metadata.size_bytes),
            "Idempotency-Key": metadata.request_id,
        }
        params = [("user_id", metadata.user_id), ("filename", metadata.filename)]
        data = await self._send(
            "POST",
            UPLOAD_PATH,
            params=params,
            headers=headers,
            budget=self.upload_timeout(metadata.size_bytes),
            body_of=lambda: _file_chunks(path),
        )
        return json_format.ParseDict(data, svc.UploadFileResponse(), ignore_unknown_fields=True)


async def _events(response: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    """Server-Sent Events as (event, data) pairs (comments and ``id:``/``retry:`` lines skipped)."""
    kind, data = "message", list[str]()
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield kind, "\n".join(data)
            kind, data = "message", list[str]()
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            kind = value
        elif name == "data":
            data.append(value)


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    handle = await asyncio.to_thread(path.open, "rb")
    try:
        while True:
            chunk = await asyncio.to_thread(handle.read, CHUNK_BYTES)
            if not chunk:
                return
            yield chunk
    finally:
        handle.close()


__all__ = ["HttpClient", "route_of"]
