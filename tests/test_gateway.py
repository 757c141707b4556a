"""The HTTP gateway under a real uvicorn server, in front of real gRPC servers (in-process).

Every request goes over real HTTP to 127.0.0.1 and on over real gRPC; nothing is mocked. Two backends:

- the real services (the ``stack`` fixture). Whether a request reached a service, and which RPC, is
  read from the services' own per-RPC log lines (``stationthis.rpc``, with ``rpc`` and ``code``), so
  these tests hold whatever the services implement;
- "contract-only" servers (``tests.test_grpcurl.start_contract_only``): the shared bootstrap serving
  the generated servicer base classes, so every RPC answers UNIMPLEMENTED with its full name. They
  show each route reaching exactly its RPC, and the 501 and SSE error paths.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from google.api import annotations_pb2
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from common import telemetry
from common.config import load
from gateway.app import Gateway
from gateway.config import GatewayConfig
from gateway.server import uvicorn_server
from tests.conftest import Running, StartService
from tests.test_grpcurl import SERVICES, start_contract_only

KEYS = ("k1-test-key", "k2-test-key")
MAX_BODY = 4096
POINTS = "stationthis.points.v1.PointsService"
WORKFLOWS = "stationthis.workflows.v1.WorkflowsService"
COMFYUI = "stationthis.comfyui.v1.ComfyUIService"
GATEWAY_DOMAIN = "gateway.stationthis.dev"
ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
# gRPC code -> HTTP status, as CONVENTIONS.md §6 and decision 0003 have it.
HTTP_STATUS = {
    "OK": 200,
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INTERNAL": 500,
    "DATA_LOSS": 500,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


# --- running the gateway ---------------------------------------------------------------------------


@dataclass
class RunningGateway:
    port: int
    gateway: Gateway
    http: httpx.AsyncClient

    async def get(self, path: str, key: str | None = KEYS[0], **kwargs: Any) -> httpx.Response:
        return await self.http.request("GET", path, headers=_auth(key, kwargs.pop("headers", {})), **kwargs)

    async def post(
        self, path: str, body: bytes | str = b"{}", key: str | None = KEYS[0], **kwargs: Any
    ) -> httpx.Response:
        headers = _auth(key, {"Content-Type": "application/json", **kwargs.pop("headers", {})})
        return await self.http.request("POST", path, content=body, headers=headers, **kwargs)


def _auth(key: str | None, headers: dict[str, str]) -> dict[str, str]:
    return {"X-API-Key": key, **headers} if key is not None else headers


def redis_url_of(backends: dict[str, Running]) -> str | None:
    """The Redis the real points service uses (the gateway's rate limits share it), if there is one."""
    ledger = getattr(backends["points"].app, "ledger", None)
    if ledger is None:
        return None
    kwargs = ledger.redis.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"


def gateway_env(backends: dict[str, Running], **overrides: str) -> dict[str, str]:
    redis_url = redis_url_of(backends)
    return {
        **({"REDIS_URL": redis_url} if redis_url else {}),
        "GATEWAY_API_KEYS": ",".join(KEYS),
        "GATEWAY_LISTEN_ADDR": "127.0.0.1:0",
        "POINTS_SERVICE_ADDR": backends["points"].address,
        "WORKFLOWS_SERVICE_ADDR": backends["workflows"].address,
        "COMFYUI_SERVICE_ADDR": backends["comfyui"].address,
        "GATEWAY_MAX_BODY_BYTES": str(MAX_BODY),
        # Limits no test meets by accident (tests/test_gateway_limits.py sets its own).
        "GATEWAY_RATE_LIMIT": "10000",
        "GATEWAY_RATE_BURST": "10000",
        "GATEWAY_MUTATION_RATE_LIMIT": "10000",
        "GATEWAY_MUTATION_RATE_BURST": "10000",
        **overrides,
    }


@asynccontextmanager
async def serve_gateway(environ: dict[str, str], port: int = 0) -> AsyncIterator[RunningGateway]:
    """The gateway the way its process runs it (uvicorn, lifespan, tracing middleware), on ``port``
    (0: a free one)."""
    server: uvicorn.Server = uvicorn_server(load(GatewayConfig, environ), grace_seconds=5, port=port)
    task = asyncio.create_task(server.serve())
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not server.started:
            if task.done():
                raise AssertionError(f"uvicorn stopped during start-up: {task.exception()!r}")
            assert loop.time() < deadline, "uvicorn did not start within 30s"
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        gateway = server.config.app  # the ASGI app is the Gateway itself
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            yield RunningGateway(port, gateway, http)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


@pytest.fixture
async def gw(stack: dict[str, Running]) -> AsyncIterator[RunningGateway]:
    """The gateway in front of the real services."""
    async with serve_gateway(gateway_env(stack)) as running:
        yield running


@pytest.fixture
async def bare(start_service: StartService) -> AsyncIterator[RunningGateway]:
    """The gateway in front of contract-only servers (every RPC UNIMPLEMENTED)."""
    async with serve_gateway(gateway_env(await start_contract_only(start_service))) as running:
        yield running


class Calls:
    """``calls(full_method)``: the status code names of the RPCs the services ran since the last look.

    Read from the services' own log line per RPC; every record looked at is kept in ``seen``.
    """

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog
        self.seen: list[logging.LogRecord] = []

    def __call__(self, full_method: str) -> list[str]:
        records = list(self.caplog.records)
        self.caplog.clear()
        self.seen += records
        return [
            r.code  # type: ignore[attr-defined]
            for r in records
            if r.name == "stationthis.rpc" and getattr(r, "rpc", None) == full_method
        ]


@pytest.fixture
def calls(caplog: pytest.LogCaptureFixture) -> Calls:
    caplog.set_level(logging.INFO)  # the gateway's own lines
    caplog.set_level(logging.DEBUG, logger="stationthis.rpc")  # last: the handler takes this level
    return Calls(caplog)


# --- helpers ---------------------------------------------------------------------------------------


def error_of(response: httpx.Response, http_status: int, status: str) -> dict[str, Any]:
    """The error object of ``response``, after checking the one error shape every route uses."""
    assert response.status_code == http_status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "status", "details"}, error
    assert error["code"] == http_status and error["status"] == status, error
    assert isinstance(error["message"], str) and error["message"], error
    return error


def detail(error: dict[str, Any], type_url: str) -> dict[str, Any]:
    found = [d for d in error["details"] if d["@type"] == type_url]
    assert len(found) == 1, error
    return found[0]


def gateway_refused(response: httpx.Response, http_status: int, status: str) -> dict[str, Any]:
    """The gateway itself answered the error (its own ErrorInfo domain)."""
    error = error_of(response, http_status, status)
    assert detail(error, ERROR_INFO)["domain"] == GATEWAY_DOMAIN, error
    return error


def violations(error: dict[str, Any]) -> list[str]:
    return [v["field"] for v in detail(error, BAD_REQUEST)["field_violations"]]


def domain_of(full_method: str) -> str:
    return full_method.split(".")[1] + ".stationthis.dev"  # /stationthis.points.v1... -> points


async def forwarded(response: httpx.Response, full_method: str, calls: Calls) -> str:
    """The request reached ``full_method`` (once) and the HTTP answer is what the service said."""
    # A service sends an error status before its log line is written: wait a little for the line.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    codes = calls(full_method)
    while not codes and loop.time() < deadline:
        await asyncio.sleep(0.01)
        codes = calls(full_method)
    assert len(codes) == 1, (full_method, codes, response.text)
    code = codes[0]
    if code == "OK":
        assert response.status_code == 200, response.text
        assert isinstance(response.json(), dict)
    else:
        error = error_of(response, HTTP_STATUS[code], code)
        assert detail(error, ERROR_INFO)["domain"] == domain_of(full_method), error
    return code


def not_forwarded(calls: Calls, *full_methods: str) -> None:
    for full_method in full_methods:
        assert calls(full_method) == [], f"{full_method} was called"


def unimplemented(response: httpx.Response, full_method: str) -> None:
    """The request reached ``full_method`` on a contract-only server."""
    error = error_of(response, 501, "UNIMPLEMENTED")
    assert error["message"] == f"{full_method} is not implemented yet", error
    assert detail(error, ERROR_INFO) == {
        "@type": ERROR_INFO,
        "reason": "UNIMPLEMENTED",
        "domain": domain_of(full_method),
    }


def annotated_methods() -> set[tuple[str, str]]:
    return {
        (service.full_name, method.name)
        for service in SERVICES.values()
        for method in service.methods
        if method.GetOptions().HasExtension(annotations_pb2.http)
    }


def concrete(template: str) -> str:
    """A request path for a route template: each variable becomes a plain value (the webhook gets a token)."""
    path = re.sub(r"\{([\w.]+)(?:=[^}]*)?\}", lambda m: "v-" + m.group(1).replace(".", "-"), template)
    return path + "?token=t" if path == "/v1/webhooks/comfydeploy" else path


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


# --- the route table -------------------------------------------------------------------------------


async def test_route_table_is_exactly_the_annotated_methods(bare: RunningGateway) -> None:
    routed = {(route.service, route.method) for route in bare.gateway.routes}
    assert routed == annotated_methods()
    assert len(routed) == len(bare.gateway.routes)  # no method has two bindings today
    assert (COMFYUI, "UploadFile") not in routed  # client streaming: no HTTP route
    streaming = {route.method for route in bare.gateway.routes if route.server_streaming}
    assert streaming == {"WatchRun"}
    assert not any(route.client_streaming for route in bare.gateway.routes)


async def test_every_route_reaches_its_rpc(bare: RunningGateway) -> None:
    checked = set()
    for route in bare.gateway.routes:
        path = concrete(route.template)
        key = None if route.method == "HandleWebhook" else KEYS[0]
        if route.server_streaming:
            response = await bare.get(path, key=key)
            assert response.status_code == 200, response.text
            [(event, data)] = sse_events(response.text)
            assert event == "error" and data["error"]["message"] == f"{route.full_method} is not implemented yet"
        elif route.http_method == "GET":
            unimplemented(await bare.get(path, key=key), route.full_method)
        else:
            assert route.http_method == "POST", route
            unimplemented(await bare.post(path, b"{}", key=key), route.full_method)
        checked.add((route.service, route.method))
    assert checked == annotated_methods()


async def test_every_unary_route_reaches_the_real_service(gw: RunningGateway, calls: Calls) -> None:
    for route in gw.gateway.routes:
        if route.server_streaming:
            continue
        path = concrete(route.template)
        key = None if route.method == "HandleWebhook" else KEYS[1]
        if route.http_method == "GET":
            response = await gw.get(path, key=key)
        else:
            response = await gw.post(path, b"{}", key=key)
        await forwarded(response, route.full_method, calls)


async def test_unimplemented_rpc_is_501(bare: RunningGateway) -> None:
    unimplemented(await bare.get("/v1/accounts/alice"), f"/{POINTS}/GetAccount")
    unimplemented(await bare.get("/v1/workflows/wf-1"), f"/{WORKFLOWS}/GetWorkflow")


async def test_watch_run_is_server_sent_events(bare: RunningGateway) -> None:
    run_id = "0b7e3f5c-6c1d-4a57-9d7e-2f4b3c1a9e80"
    async with bare.http.stream("GET", f"/v1/runs/{run_id}:watch", headers={"X-API-Key": KEYS[1]}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream"), response.headers
        text = (await response.aread()).decode()
    [(event, data)] = sse_events(text)
    assert event == "error"
    assert set(data) == {"error"}
    assert data["error"]["status"] == "UNIMPLEMENTED" and data["error"]["code"] == 501, data
    assert data["error"]["message"] == f"/{COMFYUI}/WatchRun is not implemented yet", data
    assert detail(data["error"], ERROR_INFO)["domain"] == "comfyui.stationthis.dev"


# --- authentication --------------------------------------------------------------------------------


async def test_api_key_is_required(gw: RunningGateway, calls: Calls) -> None:
    error = gateway_refused(await gw.get("/v1/accounts/alice", key=None), 401, "UNAUTHENTICATED")
    assert detail(error, ERROR_INFO) == {"@type": ERROR_INFO, "reason": "API_KEY_INVALID", "domain": GATEWAY_DOMAIN}
    wrong = [
        {"X-API-Key": "nope"},
        {"Authorization": "Bearer nope"},
        {"Authorization": f"Bearer {KEYS[0]}x"},
        {"Authorization": f"Bearer {KEYS[0][:-1]}"},
        {"Authorization": f"Bearer {','.join(KEYS)}"},
        {"Authorization": f"Basic {KEYS[0]}"},
        {"Authorization": "Bearer"},
        {"X-API-Key": KEYS[0].upper()},
    ]
    for headers in wrong:
        response = await gw.http.get("/v1/accounts/alice", headers=headers)
        gateway_refused(response, 401, "UNAUTHENTICATED")
    # A POST without a key is refused before its body is even looked at.
    gateway_refused(await gw.post("/v1/accounts/alice/holds", "{not json", key=None), 401, "UNAUTHENTICATED")
    not_forwarded(calls, f"/{POINTS}/GetAccount", f"/{POINTS}/ReserveHold")


async def test_either_key_in_either_header_is_accepted(gw: RunningGateway, calls: Calls) -> None:
    for headers in (
        {"Authorization": f"Bearer {KEYS[1]}"},
        {"X-API-Key": KEYS[0]},
        {"Authorization": f"Bearer {KEYS[0]}"},
        {"X-API-Key": KEYS[1]},
        {"authorization": f"bearer {KEYS[1]}"},
    ):
        await forwarded(await gw.http.get("/v1/accounts/alice", headers=headers), f"/{POINTS}/GetAccount", calls)


# --- routing and request errors --------------------------------------------------------------------


async def test_unknown_path_and_wrong_method(gw: RunningGateway, calls: Calls) -> None:
    error = gateway_refused(await gw.get("/v1/no/such/thing"), 404, "NOT_FOUND")
    assert detail(error, ERROR_INFO)["reason"] == "ROUTE_NOT_FOUND"
    gateway_refused(await gw.post("/v2/accounts/alice/holds"), 404, "NOT_FOUND")

    for response in (
        await gw.http.delete("/v1/accounts/alice", headers={"X-API-Key": KEYS[0]}),
        await gw.get("/v1/accounts/alice/holds"),  # only POST is bound here
        await gw.http.put("/v1/runs", headers={"X-API-Key": KEYS[0]}, content=b"{}"),
    ):
        assert response.status_code == 405, response.text
        error = response.json()["error"]
        assert error["code"] == 405 and detail(error, ERROR_INFO)["reason"] == "METHOD_NOT_ALLOWED", error
        assert response.headers["allow"] in {"GET", "POST"}, response.headers
    # A custom verb is never read as part of a path value: GET on a POST-only verb is 405, not GetAccount.
    response = await gw.get("/v1/accounts/alice:creditQoints")
    assert response.status_code == 405 and response.headers["allow"] == "POST", response.text
    not_forwarded(calls, f"/{POINTS}/GetAccount", f"/{POINTS}/ReserveHold", f"/{COMFYUI}/CreateRun")


async def test_malformed_json_body(gw: RunningGateway, calls: Calls) -> None:
    path = "/v1/accounts/alice/holds"
    error = gateway_refused(await gw.post(path, "{not json"), 400, "INVALID_ARGUMENT")
    assert violations(error) == ["body"]
    assert detail(error, ERROR_INFO)["reason"] == "INVALID_ARGUMENT"
    error = gateway_refused(await gw.post(path, "[1, 2]"), 400, "INVALID_ARGUMENT")
    assert violations(error) == ["body"]
    error = gateway_refused(await gw.post(path, b"\xff\xfe{}"), 400, "INVALID_ARGUMENT")
    assert violations(error) == ["body"]
    # A field the request does not have is refused too, by name (only the webhook is lenient).
    error = gateway_refused(await gw.post(path, '{"no_such_field": 1}'), 400, "INVALID_ARGUMENT")
    assert violations(error) == ["no_such_field"] and "no_such_field" in error["message"]
    not_forwarded(calls, f"/{POINTS}/ReserveHold")
    # A well-formed body, in either spelling, gets through.
    body = '{"requestId": "r-1", "run_id": "run-1", "estimatePoints": "5"}'
    await forwarded(await gw.post(path, body), f"/{POINTS}/ReserveHold", calls)


async def test_query_parameters_are_checked(gw: RunningGateway, calls: Calls) -> None:
    for query, field in (
        ("/v1/accounts/alice?colour=red", "colour"),
        ("/v1/accounts/alice/transactions?page_size=abc", "page_size"),
        ("/v1/accounts/alice/transactions?page_size=1&page_size=2", "page_size"),
        ("/v1/accounts/alice?user_id=bob", "user_id"),  # already bound by the path
        ("/v1/comfyui/deployments?include_fluid=maybe", "include_fluid"),
    ):
        error = gateway_refused(await gw.get(query), 400, "INVALID_ARGUMENT")
        assert violations(error) == [field], (query, error)
    # On a route whose body is the whole request, a query parameter would be ignored: refused.
    error = gateway_refused(
        await gw.post("/v1/accounts/alice/holds?estimate_points=5", '{"request_id": "q-1"}'), 400, "INVALID_ARGUMENT"
    )
    assert violations(error) == ["estimate_points"], error
    not_forwarded(calls, f"/{POINTS}/GetAccount", f"/{POINTS}/ListTransactions", f"/{COMFYUI}/ListDeployments")
    # Good values get through.
    await forwarded(await gw.get("/v1/accounts/alice/transactions?page_size=10"), f"/{POINTS}/ListTransactions", calls)
    await forwarded(await gw.get("/v1/comfyui/deployments?include_fluid=true"), f"/{COMFYUI}/ListDeployments", calls)


async def test_body_size_limit(gw: RunningGateway, calls: Calls) -> None:
    path = "/v1/accounts/alice:creditQoints"
    frame = '{"memo": ""}'

    def body(size: int) -> str:
        return frame[:-2] + "x" * (size - len(frame)) + frame[-2:]

    assert len(body(MAX_BODY)) == MAX_BODY
    await forwarded(await gw.post(path, body(MAX_BODY)), f"/{POINTS}/CreditQoints", calls)
    for size in (MAX_BODY + 1, MAX_BODY * 50):
        error = gateway_refused(await gw.post(path, body(size)), 413, "INVALID_ARGUMENT")
        assert detail(error, ERROR_INFO)["reason"] == "BODY_TOO_LARGE"
    not_forwarded(calls, f"/{POINTS}/CreditQoints")


async def test_idempotency_key_conflicting_with_request_id(gw: RunningGateway, calls: Calls) -> None:
    path = "/v1/accounts/alice/holds"
    headers = {"Idempotency-Key": "idem-1"}
    for conflicting in ('{"request_id": "other"}', '{"requestId": "other"}'):
        error = gateway_refused(await gw.post(path, conflicting, headers=headers), 400, "INVALID_ARGUMENT")
        assert violations(error) == ["request_id"]
    not_forwarded(calls, f"/{POINTS}/ReserveHold")
    for agreeing in ('{"request_id": "idem-1"}', '{"requestId": "idem-1"}', "{}"):
        await forwarded(await gw.post(path, agreeing, headers=headers), f"/{POINTS}/ReserveHold", calls)


async def test_webhook_needs_no_key_and_tolerates_unknown_fields(gw: RunningGateway, calls: Calls) -> None:
    method = f"/{COMFYUI}/HandleWebhook"
    token = "tok-" + secrets.token_hex(8)
    payload = {
        "run_id": "0b7e3f5c-6c1d-4a57-9d7e-2f4b3c1a9e80",
        "status": "success",
        "progress": 1.0,
        "a_field_upstream_added_later": {"nested": [1, 2]},
    }
    response = await gw.post(f"/v1/webhooks/comfydeploy?token={token}", json.dumps(payload), key=None)
    await forwarded(response, method, calls)
    # An unknown query parameter is still refused: leniency is for the upstream's payload only.
    response = await gw.post(f"/v1/webhooks/comfydeploy?token={token}&bogus=1", json.dumps(payload), key=None)
    assert violations(gateway_refused(response, 400, "INVALID_ARGUMENT")) == ["bogus"]
    not_forwarded(calls, method)
    access = [r for r in calls.seen if r.name == "stationthis.gateway" and getattr(r, "status", None)]
    assert [getattr(r, "path", None) for r in access] == ["/v1/webhooks/comfydeploy"] * 2, access
    logged = [r for r in calls.seen if r.name != "httpx"]  # not this test's own HTTP client
    assert logged and all(token not in repr(vars(r)) for r in logged), "the webhook token was logged"


async def test_webhook_on_contract_only_server_is_501(bare: RunningGateway) -> None:
    payload = {"run_id": "r-1", "status": "running", "some_new_upstream_field": True}
    response = await bare.post("/v1/webhooks/comfydeploy?token=t", json.dumps(payload), key=None)
    unimplemented(response, f"/{COMFYUI}/HandleWebhook")


# --- health ----------------------------------------------------------------------------------------


async def test_healthz_and_readyz(gw: RunningGateway) -> None:
    response = await gw.http.get("/healthz")  # no key needed
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    response = await readyz_until(gw, lambda r: r.status_code == 200)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "ready": True,
        "services": {service.full_name: "SERVING" for service in SERVICES.values()},
    }


async def readyz_until(gw: RunningGateway, done: Callable[[httpx.Response], bool]) -> httpx.Response:
    """/readyz once ``done`` holds (the services' health follows probes that may miss a beat under load)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while True:
        response = await gw.http.get("/readyz")
        assert response.status_code in (200, 503), response.text
        if done(response) or loop.time() > deadline:
            return response
        await asyncio.sleep(0.1)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that is bound (so nobody else takes it) but not listening: connections are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def test_readyz_503_when_a_service_is_down(stack: dict[str, Running], closed_port: int, calls: Calls) -> None:
    env = gateway_env(stack, COMFYUI_SERVICE_ADDR=f"127.0.0.1:{closed_port}")
    async with serve_gateway(env) as broken:
        response = await readyz_until(
            broken, lambda r: set(r.json()["services"].values()) - {"SERVING"} == {"UNAVAILABLE"}
        )
        assert response.status_code == 503, response.text
        assert response.json()["ready"] is False
        services = response.json()["services"]
        assert services.pop(COMFYUI) == "UNAVAILABLE"
        assert services == {POINTS: "SERVING", WORKFLOWS: "SERVING"}
        assert (await broken.http.get("/healthz")).status_code == 200  # alive, just not ready
        error = error_of(await broken.get("/v1/runs/r1"), 503, "UNAVAILABLE")
        # In our words, never gRPC's ("failed to connect to all addresses; ... Connection refused").
        assert error["message"] == "the comfyui service is not available; retry", error
        assert error["details"][0]["reason"] == "DEPENDENCY_UNAVAILABLE", error
        await forwarded(await broken.get("/v1/accounts/alice"), f"/{POINTS}/GetAccount", calls)


# --- tracing ---------------------------------------------------------------------------------------

_EXPORTER = InMemorySpanExporter()
_TRACING: list[bool] = []


@pytest.fixture
def exported_spans() -> InMemorySpanExporter:
    """The process's tracer provider, with an in-memory exporter added once."""
    if not _TRACING:
        telemetry.setup("test", {}, extra=SimpleSpanProcessor(_EXPORTER))
        _TRACING.append(True)
    return _EXPORTER


async def raw_get(port: int, path: str, headers: dict[str, str]) -> int:
    """A plain HTTP/1.1 GET over a socket: no client instrumentation can touch its headers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
        await writer.wait_closed()
    return int(data.split(b" ", 2)[1])


async def test_trace_continues_from_http_to_the_grpc_server(
    exported_spans: InMemorySpanExporter, gw: RunningGateway
) -> None:
    trace_id = secrets.token_hex(16)
    parent_id = secrets.token_hex(8)
    method = f"/{POINTS}/GetAccount"
    status = await raw_get(
        gw.port,
        "/v1/accounts/alice",
        {"X-API-Key": KEYS[0], "traceparent": f"00-{trace_id}-{parent_id}-01"},
    )
    assert status != 401

    def ours() -> list[ReadableSpan]:
        return [s for s in exported_spans.get_finished_spans() if format(s.context.trace_id, "032x") == trace_id]

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while not any(s.name == method and s.kind == SpanKind.SERVER for s in ours()):
        assert loop.time() < deadline, f"no gRPC server span in trace {trace_id}: {[s.name for s in ours()]}"
        await asyncio.sleep(0.05)
    while True:  # the HTTP server span ends last, once the response is sent
        by_id = {s.context.span_id: s for s in ours()}
        [grpc_server] = [s for s in by_id.values() if s.name == method and s.kind == SpanKind.SERVER]
        http_server = by_id.get(grpc_server.parent.span_id) if grpc_server.parent else None
        if http_server is not None or loop.time() > deadline:
            break
        await asyncio.sleep(0.05)
    # The gateway's one span per request is the parent of the service's span: its context goes
    # straight into the call's metadata (no client span: docs/decisions/0012).
    assert http_server is not None and http_server.kind == SpanKind.SERVER, [s.name for s in ours()]
    assert http_server.name == "GET /v1/accounts/{user_id}"
    assert http_server.attributes["http.route"] == "/v1/accounts/{user_id}"
    assert http_server.attributes["http.response.status_code"] == 200
    assert http_server.attributes["stationthis.adapter"] == "default"
    assert http_server.parent is not None and format(http_server.parent.span_id, "016x") == parent_id
    assert http_server.parent.is_remote
    assert KEYS[0] not in repr(dict(http_server.attributes or {}))
    # Inside the service: one span for the ledger's script call, no span per Redis command.
    ledger = [s for s in by_id.values() if s.name.startswith("ledger ")]  # "ledger <op>"
    assert [s.parent.span_id if s.parent else None for s in ledger] == [grpc_server.context.span_id], by_id
    assert ledger[0].kind == SpanKind.CLIENT and ledger[0].attributes["db.system"] == "redis"
    # (The gateway's own rate limit script call is its child, not the service's.)
    service_spans = [s for s in by_id.values() if s.parent and s.parent.span_id == grpc_server.context.span_id]
    assert not any(s.name.startswith("EVAL") for s in service_spans), [s.name for s in service_spans]
