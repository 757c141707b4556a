"""The gateway's ASGI application: authenticate, transcode, call gRPC, answer JSON (or SSE).

Every route comes from the contracts (``routes.build_routes``). Callers authenticate with an API key
(``Authorization: Bearer <key>`` or ``X-API-Key``), compared in constant time. The ComfyUI Deploy
webhook route is the one exception: ComfyUI Deploy cannot send our key, so that route carries its
own per-run token, which the ComfyUI service verifies. Server-streaming RPCs are served as
Server-Sent Events, each event ``{"result": ...}`` or, last, ``{"error": ...}``.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import grpc
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route as StarletteRoute

from common.channels import TracedChannel, open_channel
from common.errors import internal_status
from stationthis.comfyui.v1 import comfyui_service_pb2
from stationthis.points.v1 import points_service_pb2
from stationthis.workflows.v1 import workflows_service_pb2

from . import transcode
from .config import GatewayConfig
from .routes import Route, build_routes

log = logging.getLogger("stationthis.gateway")

SERVICES = (
    (points_service_pb2, "PointsService"),
    (workflows_service_pb2, "WorkflowsService"),
    (comfyui_service_pb2, "ComfyUIService"),
)
# Methods reachable without an API key; they authenticate themselves (see module docstring).
PUBLIC_METHODS = frozenset({"/stationthis.comfyui.v1.ComfyUIService/HandleWebhook"})
# Upstream may add fields to its callbacks at any time; those are ignored rather than refused.
LENIENT_METHODS = PUBLIC_METHODS


def _error(
    status: status_pb2.Status, http_status: int | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The one error shape; ``http_status`` when HTTP says more than the gRPC code (405, 413)."""
    body = transcode.error_body(status)
    if http_status is not None:
        body["error"]["code"] = http_status
    return JSONResponse(body, status_code=body["error"]["code"], headers=headers)


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.routes = build_routes(SERVICES)
        self.addresses = {
            "stationthis.points.v1.PointsService": config.points_service_addr,
            "stationthis.workflows.v1.WorkflowsService": config.workflows_service_addr,
            "stationthis.comfyui.v1.ComfyUIService": config.comfyui_service_addr,
        }
        self._keys = [key.encode() for key in config.api_keys]
        self.channels: dict[str, TracedChannel] = {}

    # --- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        by_address: dict[str, TracedChannel] = {}
        for service, address in self.addresses.items():
            if address not in by_address:
                by_address[address] = open_channel(address, self.config.rpc_timeout_seconds)
            self.channels[service] = by_address[address]

    async def close(self) -> None:
        for channel in set(self.channels.values()):
            await channel.close()

    # --- auth --------------------------------------------------------------------------------------

    def authenticated(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not given:
            return False
        candidate = given.encode()
        matched = False
        for key in self._keys:  # compare with every key, in constant time each
            matched |= hmac.compare_digest(candidate, key)
        return matched

    # --- dispatch ----------------------------------------------------------------------------------

    def find(self, method: str, path: str) -> tuple[Route | None, dict[str, str], list[str]]:
        """The route for ``method path`` and its path values; else the methods the path allows."""
        allowed: list[str] = []
        for route in self.routes:
            params = route.match(path)
            if params is None:
                continue
            if route.http_method == method:
                return route, params, [method]
            allowed.append(route.http_method)
        return None, {}, allowed

    def _timeout(self, request: Request) -> float:
        timeout = self.config.rpc_timeout_seconds
        header = request.headers.get("grpc-timeout")
        if header and header[:-1].isdigit():
            unit = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}.get(header[-1])
            if unit:
                timeout = min(timeout, int(header[:-1]) * unit)
        return timeout

    async def handle(self, request: Request) -> Response:
        start = time.perf_counter()
        try:
            response = await self._handle(request)
        except ClientDisconnect:
            status = transcode.simple_status(grpc.StatusCode.CANCELLED, "the client went away", "CLIENT_CLOSED_REQUEST")
            response = _error(status)
        except Exception:
            # Last resort: whatever went wrong is logged, and the client gets the one error shape.
            log.exception("unexpected error answering %s %s", request.method, request.url.path)
            response = _error(internal_status(transcode.DOMAIN))
        log.info(
            "%s %s %d",
            request.method,
            request.url.path,
            response.status_code,
            extra={
                "http_method": request.method,
                "path": request.url.path,  # never the query: it may carry a webhook token
                "status": response.status_code,
                "duration_ms": round((time.perf_counter() - start) * 1000, 3),
            },
        )
        return response

    async def _handle(self, request: Request) -> Response:
        route, params, allowed = self.find(request.method, request.url.path)
        if route is None:
            if allowed:
                status = transcode.simple_status(
                    grpc.StatusCode.UNIMPLEMENTED, f"{request.method} is not allowed here", "METHOD_NOT_ALLOWED"
                )
                return _error(status, 405, {"Allow": ", ".join(sorted(set(allowed)))})
            return _error(transcode.simple_status(grpc.StatusCode.NOT_FOUND, "no such route", "ROUTE_NOT_FOUND"))
        if route.full_method not in PUBLIC_METHODS and not self.authenticated(request):
            return _error(
                transcode.simple_status(
                    grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key", "API_KEY_INVALID"
                )
            )
        body = await self._read_body(request)
        if body is None:
            status = transcode.simple_status(
                grpc.StatusCode.INVALID_ARGUMENT, "request body too large", "BODY_TOO_LARGE"
            )
            return _error(status, 413)
        try:
            message = transcode.build_request(
                route,
                params,
                list(request.query_params.multi_items()),
                body,
                request.headers.get("idempotency-key"),
                ignore_unknown_fields=route.full_method in LENIENT_METHODS,
            )
        except transcode.BadRequest as exc:
            return _error(transcode.invalid(exc.violations))
        channel = self.channels[route.service]
        serialize = route.input_type.SerializeToString
        deserialize = route.output_type.FromString
        if route.server_streaming:
            stream = channel.unary_stream(
                route.full_method, request_serializer=serialize, response_deserializer=deserialize
            )
            return StreamingResponse(
                self._sse(stream(message)),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        call = channel.unary_unary(route.full_method, request_serializer=serialize, response_deserializer=deserialize)
        try:
            reply = await call(message, timeout=self._timeout(request))
        except grpc.aio.AioRpcError as exc:
            return _error(_status_of(exc))
        return JSONResponse(transcode.to_json(reply))

    async def _read_body(self, request: Request) -> bytes | None:
        """The body, or None once it is larger than the limit (checked before and while reading)."""
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return None
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def _sse(self, call: Any) -> AsyncIterator[bytes]:
        try:
            async for item in call:
                yield _event("result", {"result": transcode.to_json(item)})
        except grpc.aio.AioRpcError as exc:
            yield _event("error", transcode.error_body(_status_of(exc)))
        except Exception:
            log.exception("unexpected error in an event stream")
            yield _event("error", transcode.error_body(internal_status(transcode.DOMAIN)))

    async def ready(self) -> tuple[bool, dict[str, str]]:
        states: dict[str, str] = {}
        for service, channel in self.channels.items():
            try:
                reply = await health_pb2_grpc.HealthStub(channel.channel).Check(  # bare: probes stay untraced
                    health_pb2.HealthCheckRequest(service=service), timeout=1.0
                )
                states[service] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.aio.AioRpcError as exc:
                states[service] = exc.code().name
        return all(s == "SERVING" for s in states.values()), states


def _status_of(exc: grpc.aio.AioRpcError) -> status_pb2.Status:
    try:
        rich = rpc_status.from_call(exc)  # type: ignore[arg-type]
    except ValueError:  # a rich status that contradicts the call's own code: use the call's
        log.warning("inconsistent rich status from %s", exc.code().name, exc_info=True)
        rich = None
    if rich is not None:
        return rich
    return status_pb2.Status(code=exc.code().value[0], message=exc.details() or exc.code().name)


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def create_app(config: GatewayConfig) -> Starlette:
    gateway = Gateway(config)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await gateway.open()
        try:
            yield
        finally:
            await gateway.close()

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_: Request) -> Response:
        ok, states = await gateway.ready()
        return JSONResponse({"ready": ok, "services": states}, status_code=200 if ok else 503)

    async def internal_error(request: Request, exc: Exception) -> Response:
        # Gateway.handle answers its own errors; this covers everything else (e.g. /readyz).
        log.error("unexpected error answering %s %s", request.method, request.url.path, exc_info=exc)
        return _error(internal_status(transcode.DOMAIN))

    methods: Sequence[str] = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    app = Starlette(
        exception_handlers={Exception: internal_error},
        routes=[
            StarletteRoute("/healthz", healthz, methods=["GET"]),
            StarletteRoute("/readyz", readyz, methods=["GET"]),
            StarletteRoute("/{path:path}", gateway.handle, methods=list(methods)),
        ],
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return app
