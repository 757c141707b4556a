"""The gateway's ASGI application: authenticate, limit, transcode, call gRPC, answer JSON (or SSE).

Every API route comes from the contracts (``routes.build_routes``); a few belong to the gateway
itself: ``/healthz``, ``/readyz``, ``/openapi.json``, ``/docs``, ``POST /v1/uploads`` (UploadFile,
which no annotation can describe) and ``GET /v1/workflows/{workflow_id}/inputs.schema.json``.

Callers authenticate with an API key (``Authorization: Bearer <key>`` or ``X-API-Key``), compared in
constant time; each key belongs to a named adapter, and the adapter's name (never the key) is what
logs, traces and the rate limit see. The ComfyUI Deploy webhook route takes no key (upstream cannot
send one): it must carry the per-run ``token`` the ComfyUI service checks, and has a budget of its
own. Unknown paths (404) and methods (405) are answered before the key is looked at, so they answer
the same with and without one.

Each request: one SERVER span (continuing a ``traceparent`` if the caller sent one) whose context is
written straight into the gRPC call's metadata, so the service's span is its child; an
``X-Request-Id`` (the caller's when it is valid, else a new one) logged, passed to the service as
metadata and returned, with the trace id (``X-Trace-Id`` and W3C ``traceresponse``); one access log
line (never the query string: it may carry a webhook token).

This is a bare ASGI callable rather than a Starlette app, and it records its span itself rather
than through the OpenTelemetry ASGI middleware: measured under load those layers cost more CPU than
the gRPC call they front (docs/decisions/0012).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
from pathlib import Path
from typing import Any

import grpc
import openapi_ui_bundles.swagger_ui as swagger_ui
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from common import redis_client
from common.channels import TracedChannel, open_channel
from common.errors import FieldViolation, internal_status
from stationthis.comfyui.v1 import comfyui_service_pb2
from stationthis.points.v1 import points_service_pb2
from stationthis.workflows.v1 import workflows_service_pb2

from . import inputs_schema, jsonmap, openapi, transcode, uploads
from .config import GatewayConfig
from .exchange import (
    WEBHOOK_ADAPTER,
    Exchange,
    Receive,
    Refused,
    Scope,
    Send,
    new_request_id,
    refusal,
    status_of,
)
from .ratelimit import Budget, RateLimiter, retry_after
from .routes import Route, Router, build_routes

log = logging.getLogger("stationthis.gateway")
_tracer = trace.get_tracer("stationthis.gateway")
_meter = metrics.get_meter("stationthis.gateway")
_durations = _meter.create_histogram(
    "http.server.request.duration", unit="s", description="HTTP requests served, by route and status"
)

SERVICES = (
    (points_service_pb2, "PointsService"),
    (workflows_service_pb2, "WorkflowsService"),
    (comfyui_service_pb2, "ComfyUIService"),
)
WEBHOOK_METHOD = "/stationthis.comfyui.v1.ComfyUIService/HandleWebhook"
# Methods reachable without an API key; they authenticate themselves (see module docstring).
PUBLIC_METHODS = frozenset({WEBHOOK_METHOD})
# Upstream may add fields to its callbacks at any time; those are ignored rather than refused.
LENIENT_METHODS = PUBLIC_METHODS
REQUEST_ID = re.compile(r"[A-Za-z0-9._:@+=/-]{1,128}")
INPUTS_SCHEMA = re.compile(r"/v1/workflows/([^/:]+)/inputs\.schema\.json")
DOCS_ASSETS = (
    "swagger-ui.css",
    "index.css",
    "swagger-ui-bundle.js",
    "swagger-ui-standalone-preset.js",
    "favicon-32x32.png",
    "favicon-16x16.png",
)
READY_CACHE_SECONDS = 0.5

_GRPC_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def _event(name: str, data: Any, event_id: str = "") -> bytes:
    head = b"id: " + event_id.encode() + b"\n" if event_id else b""
    return head + b"event: " + name.encode() + b"\ndata: " + jsonmap.dumps(data) + b"\n\n"


_EVENT_ID = re.compile(r"\d{1,20}-\d{1,20}")  # a run event's id (a Redis stream id)


def _resume_from(exchange: Exchange, message: Any) -> None:
    """An EventSource reconnecting sends Last-Event-ID: resume after it, as after_event_id would."""
    last = exchange.header(b"last-event-id")
    if last is None or "after_event_id" not in message.DESCRIPTOR.fields_by_name or message.after_event_id:
        return
    if not _EVENT_ID.fullmatch(last):
        raise Refused(transcode.invalid([FieldViolation("Last-Event-ID", "must be the id of an event of this stream")]))
    message.after_event_id = last


def _docs_page() -> bytes:
    page = (Path(swagger_ui.static_path) / "index.html").read_text()
    page = (
        page.replace('href="./', 'href="/docs/')
        .replace('src="./', 'src="/docs/')
        .replace('href="index.css"', 'href="/docs/index.css"')
    )
    page = page.replace("https://petstore.swagger.io/v2/swagger.json", "/openapi.json")
    page = page.replace("<title>Swagger UI</title>", "<title>StationThis API</title>")
    return page.encode()


class Gateway:
    """The ASGI application (``await gateway(scope, receive, send)``)."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.routes = build_routes(SERVICES)
        self.router = Router(self.routes)
        self.by_method = {route.full_method: route for route in self.routes}
        self.addresses = {
            "stationthis.points.v1.PointsService": config.points_service_addr,
            "stationthis.workflows.v1.WorkflowsService": config.workflows_service_addr,
            "stationthis.comfyui.v1.ComfyUIService": config.comfyui_service_addr,
        }
        self._keys = [(key.encode(), key.adapter) for key in config.api_keys]
        self.budgets = {
            "GET": (Budget("all", config.rate_limit, config.rate_burst),),
            "POST": (
                Budget("all", config.rate_limit, config.rate_burst),
                Budget("mutations", config.mutation_rate_limit, config.mutation_rate_burst),
            ),
        }
        self.webhook_budget = Budget("webhook", config.webhook_rate_limit, config.webhook_rate_burst)
        self.channels: dict[str, TracedChannel] = {}
        self.calls: dict[str, Any] = {}  # full method -> grpc.aio multicallable, made once
        self.limiter: RateLimiter | None = None
        self._ready: tuple[float, bool, dict[str, str]] = (0.0, False, {})
        # Built at start-up from the same descriptors as the routes.
        self.openapi = openapi.build(self.routes, extra=openapi.gateway_operations(config))
        self.openapi_json = jsonmap.dumps(self.openapi)
        self.docs_page = _docs_page()
        self.state = self  # where tests and tools find the gateway from the ASGI app (it is the app)

    # --- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        by_address: dict[str, TracedChannel] = {}
        for service, address in self.addresses.items():
            if address not in by_address:
                by_address[address] = open_channel(address, self.config.rpc_timeout_seconds)
            self.channels[service] = by_address[address]
        for route in self.routes:
            raw = self.channels[route.service].channel  # the span is the gateway's own: no client wrapper
            make = raw.unary_stream if route.server_streaming else raw.unary_unary
            self.calls[route.full_method] = make(
                route.full_method,
                request_serializer=route.input_type.SerializeToString,
                response_deserializer=route.output_type.FromString,
            )
        comfyui = self.channels["stationthis.comfyui.v1.ComfyUIService"].channel
        self.calls[uploads.METHOD] = comfyui.stream_unary(
            uploads.METHOD,
            request_serializer=comfyui_service_pb2.UploadFileRequest.SerializeToString,
            response_deserializer=comfyui_service_pb2.UploadFileResponse.FromString,
        )
        self.limiter = RateLimiter(redis_client.connect(self.config.redis_url, timeout=0.5))

    async def close(self) -> None:
        for channel in set(self.channels.values()):
            await channel.close()
        if self.limiter is not None:
            await self.limiter.close()

    # --- ASGI ------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.lifespan(receive, send)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.open()
                except Exception as exc:
                    log.exception("the gateway could not start")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        exchange = Exchange(scope, receive, send, dict(scope["headers"]))
        path = exchange.path
        if path in ("/healthz", "/readyz", "/openapi.json") or path.startswith("/docs"):
            try:
                await self.operational(exchange)  # untraced and unlogged: probes and documentation
            except Exception:
                log.exception("unexpected error answering %s %s", exchange.method, path)
                if not exchange.started:
                    await exchange.error(Refused(internal_status(transcode.DOMAIN)))
            return
        given = exchange.headers.get(b"x-request-id")
        exchange.request_id = (
            given.decode() if given is not None and REQUEST_ID.fullmatch(given.decode("latin-1")) else new_request_id()
        )
        parent = None
        if b"traceparent" in exchange.headers:
            parent = propagate.extract(
                {
                    "traceparent": exchange.header(b"traceparent") or "",
                    "tracestate": exchange.header(b"tracestate") or "",
                }
            )
        exchange.span = span = _tracer.start_span(
            exchange.method,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": exchange.method,
                "url.path": path,
                "http.request.header.x_request_id": exchange.request_id,
            },
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            try:
                await self.dispatch(exchange)
            except Refused as refused:
                if not exchange.started:
                    await exchange.error(refused)
            except Exception:
                # Last resort: whatever went wrong is logged, and the client gets the one error shape.
                log.exception(
                    "unexpected error answering %s %s", exchange.method, path, extra={"request_id": exchange.request_id}
                )
                if not exchange.started:
                    await exchange.error(Refused(internal_status(transcode.DOMAIN)))
            status = exchange.status
            if exchange.route:
                span.update_name(f"{exchange.method} {exchange.route}")
                span.set_attribute("http.route", exchange.route)
            span.set_attribute("http.response.status_code", status)
            if exchange.adapter:
                span.set_attribute("stationthis.adapter", exchange.adapter)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            seconds = time.perf_counter() - start
            _durations.record(seconds, _attributes(exchange.method, exchange.route, status))
            if log.isEnabledFor(logging.INFO):
                log.info(
                    "%s %s %d",
                    exchange.method,
                    path,
                    status,
                    extra={
                        "http_method": exchange.method,
                        "path": path,  # never the query: it may carry a webhook token
                        "route": exchange.route,
                        "status": status,
                        "adapter": exchange.adapter,
                        "request_id": exchange.request_id,
                        "duration_ms": round(seconds * 1000, 3),
                    },
                )
        finally:
            otel_context.detach(token)
            span.end()

    # --- routing ---------------------------------------------------------------------------------

    async def dispatch(self, exchange: Exchange) -> None:
        method, path = exchange.method, exchange.path
        if path == uploads.PATH:
            exchange.route = uploads.PATH
            if method != "POST":
                raise self.not_allowed(method, ["POST"])
            await self.authorize(exchange, "POST")
            await uploads.handle(self, exchange)
            return
        schema_of = INPUTS_SCHEMA.fullmatch(path)
        if schema_of is not None:
            exchange.route = "/v1/workflows/{workflow_id}/inputs.schema.json"
            if method != "GET":
                raise self.not_allowed(method, ["GET"])
            await self.authorize(exchange, "GET")
            await self.inputs_schema(exchange, schema_of.group(1))
            return
        route, params, allowed = self.router.find(method, path)
        if route is None:
            if allowed:
                raise self.not_allowed(method, allowed)
            raise refusal(grpc.StatusCode.NOT_FOUND, "no such route", "ROUTE_NOT_FOUND")
        exchange.route = route.template
        if route.full_method in PUBLIC_METHODS:
            await self.authorize_webhook(exchange)
        else:
            await self.authorize(exchange, route.http_method)
        await self.unary_or_stream(exchange, route, params)

    @staticmethod
    def not_allowed(method: str, allowed: list[str]) -> Refused:
        return refusal(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{method} is not allowed here",
            "METHOD_NOT_ALLOWED",
            405,
            [(b"allow", ", ".join(sorted(set(allowed))).encode())],
        )

    # --- who may call, and how much --------------------------------------------------------------

    def adapter_of(self, headers: dict[bytes, bytes]) -> str | None:
        """The adapter whose key the request carries, or None."""
        header = headers.get(b"authorization", b"")
        given = header[7:].strip() if header[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
        if not given:
            return None
        found = None
        for key, adapter in self._keys:  # compare with every key, in constant time each
            if hmac.compare_digest(given, key):
                found = adapter
        return found

    async def authorize(self, exchange: Exchange, http_method: str) -> None:
        adapter = self.adapter_of(exchange.headers)
        if adapter is None:
            raise refusal(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key", "API_KEY_INVALID")
        exchange.adapter = adapter
        for budget in self.budgets.get(http_method, self.budgets["POST"]):
            await self.limit(adapter, budget)

    async def authorize_webhook(self, exchange: Exchange) -> None:
        exchange.adapter = WEBHOOK_ADAPTER
        if not any(name == "token" and value for name, value in exchange.query()):
            raise refusal(
                grpc.StatusCode.UNAUTHENTICATED, "the webhook URL's token is missing", "WEBHOOK_TOKEN_MISSING"
            )
        await self.limit(WEBHOOK_ADAPTER, self.webhook_budget)

    async def limit(self, adapter: str, budget: Budget) -> None:
        assert self.limiter is not None
        wait = await self.limiter.take(adapter, budget)
        if wait > 0:
            after = retry_after(wait)
            raise refusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"rate limit of adapter {adapter} exceeded ({budget.name}: {budget.rate:g}/s, burst "
                f"{budget.burst}); retry after {after} s",
                "RATE_LIMITED",
                429,
                [(b"retry-after", after.encode())],
            )

    # --- calling the services --------------------------------------------------------------------

    def timeout(self, exchange: Exchange) -> float:
        timeout = self.config.rpc_timeout_seconds
        header = exchange.header(b"grpc-timeout")
        if header and header[:-1].isdigit():
            unit = _GRPC_TIMEOUT_UNITS.get(header[-1])
            if unit:
                timeout = min(timeout, int(header[:-1]) * unit)
        return timeout

    async def read_json_body(self, exchange: Exchange, route: Route) -> bytes:
        if (
            not route.body
            and b"content-length" not in exchange.headers
            and b"transfer-encoding" not in exchange.headers
        ):
            return b""
        return await exchange.read_body(self.config.max_body_bytes, self.config.body_timeout_seconds)

    def request_for(self, exchange: Exchange, route: Route, params: dict[str, str], body: bytes) -> Any:
        try:
            return transcode.build_request(
                route,
                params,
                exchange.query(),
                body,
                exchange.header(b"idempotency-key"),
                ignore_unknown_fields=route.full_method in LENIENT_METHODS,
            )
        except transcode.BadRequest as exc:
            raise Refused(transcode.invalid(exc.violations)) from None

    async def call(self, exchange: Exchange, route: Route, message: Any) -> Any:
        """The unary RPC's reply; its error as ``Refused``."""
        try:
            return await self.calls[route.full_method](
                message, timeout=self.timeout(exchange), metadata=exchange.metadata()
            )
        except grpc.aio.AioRpcError as exc:
            exchange.span.set_attribute("rpc.grpc.status_code", exc.code().value[0])
            raise Refused(status_of(exc, route.full_method)) from None

    async def unary_or_stream(self, exchange: Exchange, route: Route, params: dict[str, str]) -> None:
        body = await self.read_json_body(exchange, route)
        message = self.request_for(exchange, route, params, body)
        if route.server_streaming:
            _resume_from(exchange, message)
            await self.stream(exchange, route, message)
            return
        reply = await self.call(exchange, route, message)
        await exchange.answer(200, jsonmap.dumps(jsonmap.to_dict(reply)))

    async def stream(self, exchange: Exchange, route: Route, message: Any) -> None:
        """Server-Sent Events: ``result`` per message, a last ``error`` on failure. The gRPC stream is
        cancelled when the client goes away."""
        call = self.calls[route.full_method](message, metadata=exchange.metadata())
        exchange.status = 200
        exchange.started = True
        headers = exchange.response_headers(b"text/event-stream", None)
        headers += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
        await exchange.send({"type": "http.response.start", "status": 200, "headers": headers})

        async def watch() -> None:
            while (await exchange.receive())["type"] != "http.disconnect":
                pass
            call.cancel()

        watcher = asyncio.create_task(watch())
        try:
            async for item in call:
                event = _event("result", {"result": jsonmap.to_dict(item)}, getattr(item, "event_id", ""))
                await exchange.send({"type": "http.response.body", "body": event, "more_body": True})
        except grpc.aio.AioRpcError as exc:
            await exchange.send(
                {
                    "type": "http.response.body",
                    "body": _event("error", transcode.error_body(status_of(exc, route.full_method))),
                    "more_body": True,
                }
            )
        except asyncio.CancelledError:
            if not watcher.done():
                raise
        except Exception:
            log.exception("unexpected error in an event stream", extra={"request_id": exchange.request_id})
            error = transcode.error_body(internal_status(transcode.DOMAIN))
            await exchange.send({"type": "http.response.body", "body": _event("error", error), "more_body": True})
        finally:
            watcher.cancel()
        await exchange.send({"type": "http.response.body", "body": b""})

    async def inputs_schema(self, exchange: Exchange, workflow_id: str) -> None:
        route = self.by_method["/stationthis.workflows.v1.WorkflowsService/GetWorkflow"]
        message = self.request_for(exchange, route, {"workflow_id": workflow_id}, b"")
        reply = await self.call(exchange, route, message)
        schema = inputs_schema.for_workflow(reply.workflow)
        await exchange.answer(200, jsonmap.dumps(schema), b"application/schema+json")

    # --- health and documentation ----------------------------------------------------------------

    async def operational(self, exchange: Exchange) -> None:
        path = exchange.path
        exchange.request_id = new_request_id()
        if exchange.method not in ("GET", "HEAD"):
            await exchange.error(self.not_allowed(exchange.method, ["GET"]))
        elif path == "/healthz":
            await exchange.answer(200, b'{"status":"ok"}')
        elif path == "/readyz":
            ok, states = await self.ready()
            await exchange.answer(200 if ok else 503, jsonmap.dumps({"ready": ok, "services": states}))
        elif path == "/openapi.json":
            await exchange.answer(200, self.openapi_json)
        elif path in ("/docs", "/docs/"):
            await exchange.answer(200, self.docs_page, b"text/html; charset=utf-8")
        elif path.startswith("/docs/") and path[6:] in DOCS_ASSETS:
            asset = Path(swagger_ui.static_path) / path[6:]
            kind = {".css": b"text/css", ".js": b"text/javascript", ".png": b"image/png"}[asset.suffix]
            await exchange.answer(200, asset.read_bytes(), kind, [(b"cache-control", b"max-age=86400")])
        else:
            await exchange.error(refusal(grpc.StatusCode.NOT_FOUND, "no such route", "ROUTE_NOT_FOUND"))

    async def ready(self) -> tuple[bool, dict[str, str]]:
        """Every service SERVING? Probed at most every READY_CACHE_SECONDS, however often asked."""
        checked, ok, states = self._ready
        if time.monotonic() - checked < READY_CACHE_SECONDS:
            return ok, states
        states = {}
        for service, channel in self.channels.items():
            try:
                reply = await health_pb2_grpc.HealthStub(channel.channel).Check(  # bare: probes stay untraced
                    health_pb2.HealthCheckRequest(service=service), timeout=1.0
                )
                states[service] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.aio.AioRpcError as exc:
                states[service] = exc.code().name
        ok = all(s == "SERVING" for s in states.values())
        self._ready = (time.monotonic(), ok, states)
        return ok, states


_attribute_sets: dict[tuple[str, str, int], dict[str, Any]] = {}


def _attributes(method: str, route: str, status: int) -> dict[str, Any]:
    """The metric attributes of a request, built once per (method, route, status)."""
    key = (method, route, status)
    found = _attribute_sets.get(key)
    if found is None:
        found = {"http.request.method": method, "http.route": route or "unknown", "http.response.status_code": status}
        if len(_attribute_sets) < 4096:
            _attribute_sets[key] = found
    return found


def create_app(config: GatewayConfig) -> Gateway:
    return Gateway(config)
