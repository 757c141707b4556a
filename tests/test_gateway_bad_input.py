"""Bad input through the real gateway: always a 400 in the one error shape, naming the field.

The gateway runs under uvicorn in front of contract-only servers (``tests.test_gateway``), with a
1 MiB body limit so that large nested bodies reach the JSON reader. A request the gateway refuses
answers 400 with the gateway's own ErrorInfo; one it lets through reaches its RPC, which answers 501.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gateway import transcode
from gateway.transcode import MAX_JSON_DEPTH
from tests.conftest import StartService
from tests.test_gateway import (
    BAD_REQUEST,
    COMFYUI,
    ERROR_INFO,
    GATEWAY_DOMAIN,
    POINTS,
    RunningGateway,
    detail,
    gateway_env,
    gateway_refused,
    serve_gateway,
    unimplemented,
    violations,
)
from tests.test_grpcurl import start_contract_only

# Words of Python, protobuf or the JSON parser that must never reach a client.
LEAKS = (
    "Traceback",
    "ParseError",
    "Available Fields",
    "invalid literal",
    "codec",
    "json_format",
    "Message type",
    "RecursionError",
    "recursion",
    "Exception",
    "surrogates not allowed",
    ".v1.",  # a full message or enum name
)
WEBHOOK = "/v1/webhooks/comfydeploy?token=t"
HOLDS = "/v1/accounts/bob/holds"


@pytest.fixture
async def gw(start_service: StartService) -> AsyncIterator[RunningGateway]:
    env = gateway_env(await start_contract_only(start_service), GATEWAY_MAX_BODY_BYTES=str(1 << 20))
    async with serve_gateway(env) as running:
        yield running


def refused(response: httpx.Response) -> dict[str, Any]:
    """The gateway answered 400 INVALID_ARGUMENT in the documented shape, in its own words."""
    error = gateway_refused(response, 400, "INVALID_ARGUMENT")
    assert detail(error, ERROR_INFO)["reason"] == "INVALID_ARGUMENT", error
    for leak in LEAKS:
        assert leak not in response.text, (leak, response.text)
    return error


def violation(error: dict[str, Any]) -> tuple[str, str]:
    """The one field violation of ``error``: its field and description."""
    [found] = detail(error, BAD_REQUEST)["field_violations"]
    assert found["description"] in error["message"], error
    return found["field"], found["description"]


async def send(gw: RunningGateway, method: str, path: str, body: bytes | str | None = None) -> httpx.Response:
    key = None if path.startswith("/v1/webhooks/") else "k1-test-key"
    if method == "GET":
        return await gw.get(path, key=key)
    return await gw.post(path, b"" if body is None else body, key=key)


def nested(depth: int, kind: str = "object", leaf: str = "1") -> str:
    """JSON ``depth`` levels deep: ``{"a":{"a":...}}`` or ``[[...]]``."""
    if kind == "object":
        return '{"a":' * depth + leaf + "}" * depth
    return "[" * depth + leaf + "]" * depth


# --- nesting ---------------------------------------------------------------------------------------

DEEP = 100_000  # 200 KB of brackets: far past Python's recursion limit, well under the body limit


@pytest.mark.parametrize(
    ("path", "body"),
    [
        pytest.param(HOLDS, nested(DEEP, "list"), id="array-holds"),
        pytest.param(HOLDS, nested(DEEP // 3), id="object-holds"),
        pytest.param("/v1/runs", '{"inputs": ' + nested(DEEP // 3) + "}", id="object-in-struct"),
        pytest.param("/v1/runs", '{"inputs": {"a": ' + nested(DEEP, "list") + "}}", id="array-in-struct"),
        pytest.param(WEBHOOK, nested(DEEP, "list"), id="array-webhook"),
        pytest.param(WEBHOOK, nested(DEEP // 3), id="object-webhook"),
        pytest.param(WEBHOOK, '{"outputs": [' + nested(DEEP // 3) + "]}", id="outputs-webhook"),
        pytest.param(WEBHOOK, '{"upstream_added": ' + nested(DEEP, "list") + "}", id="unknown-field-webhook"),
        pytest.param(HOLDS, nested(DEEP, "list", leaf="") + "junk", id="invalid-and-deep"),
    ],
)
async def test_deeply_nested_body_is_a_400(gw: RunningGateway, path: str, body: str) -> None:
    assert 190_000 < len(body) < 1 << 20
    error = refused(await send(gw, "POST", path, body))
    field, description = violation(error)
    assert field == "body" and f"at most {MAX_JSON_DEPTH} levels" in description, error


async def test_nesting_up_to_the_limit_reaches_the_service(gw: RunningGateway) -> None:
    """The documented depth is one the services' protobuf decoder accepts; one more is refused."""
    create_run = f"/{COMFYUI}/CreateRun"
    for kind in ("object", "list"):
        # {"inputs": <MAX - 1 levels>} is MAX levels deep in all.
        at_limit = '{"inputs": {"a": ' + nested(MAX_JSON_DEPTH - 2, kind) + "}}"
        unimplemented(await send(gw, "POST", "/v1/runs", at_limit), create_run)
        over = '{"inputs": {"a": ' + nested(MAX_JSON_DEPTH - 1, kind) + "}}"
        assert violation(refused(await send(gw, "POST", "/v1/runs", over)))[0] == "body"
    webhook = '{"outputs": [' + nested(MAX_JSON_DEPTH - 2) + "]}"
    unimplemented(await send(gw, "POST", WEBHOOK, webhook), f"/{COMFYUI}/HandleWebhook")


# --- naming the field ------------------------------------------------------------------------------

ENUM_GPU = "must be one of GPU_TYPE_CPU, GPU_TYPE_T4"
DURATION = 'must be a duration in seconds such as "30s"'
BIG = "1" + "0" * 400  # a JSON number no float can hold

BAD_INPUT = [
    # (id, method, path, body, field, words the description has)
    ("unknown-field", "POST", HOLDS, '{"no_such_field": 1}', "no_such_field", "unknown field"),
    ("unknown-nested", "POST", "/v1/accounts/bob/holds/h1:capture", '{"usage": {"gpuu": 1}}', "usage.gpuu", "unknown"),
    ("int-word", "POST", HOLDS, '{"estimate_points": "abc"}', "estimate_points", "must be an integer"),
    ("int-fraction", "POST", HOLDS, '{"estimatePoints": 1.5}', "estimate_points", "must be an integer"),
    ("int-bool", "POST", HOLDS, '{"estimate_points": true}', "estimate_points", "must be an integer"),
    ("int-object", "POST", HOLDS, '{"estimate_points": {}}', "estimate_points", "must be an integer"),
    ("int64-range", "POST", HOLDS, '{"estimate_points": "9223372036854775808"}', "estimate_points", "out of range"),
    ("int64-huge", "POST", HOLDS, '{"estimate_points": ' + BIG + "}", "estimate_points", "out of range"),
    ("string-number", "POST", HOLDS, '{"run_id": 5}', "run_id", "must be a string"),
    ("surrogate", "POST", HOLDS, '{"run_id": "\\ud800"}', "run_id", "unpaired surrogate"),
    ("duration-word", "POST", HOLDS, '{"ttl": "soon"}', "ttl", DURATION),
    ("duration-number", "POST", HOLDS, '{"ttl": 30}', "ttl", DURATION),
    ("duration-range", "POST", HOLDS, '{"ttl": "999999999999s"}', "ttl", DURATION),
    ("both-spellings", "POST", HOLDS, '{"run_id": "a", "runId": "b"}', "run_id", "given twice"),
    ("duplicate-key", "POST", HOLDS, '{"run_id": "a", "run_id": "b"}', "run_id", "more than once"),
    ("enum-name", "POST", "/v1/runs", '{"gpu": "A10G"}', "gpu", ENUM_GPU),
    ("enum-bool", "POST", "/v1/runs", '{"gpu": true}', "gpu", ENUM_GPU),
    ("struct-array", "POST", "/v1/runs", '{"inputs": [1, 2]}', "inputs", "must be a JSON object"),
    ("struct-infinite", "POST", "/v1/runs", '{"inputs": {"width": 1e999}}', "inputs.width", "too large"),
    ("struct-bigint", "POST", "/v1/runs", '{"inputs": {"width": ' + BIG + "}}", "inputs.width", "too large"),
    ("struct-deep-key", "POST", "/v1/runs", '{"inputs": {"a": [0, {"b": 1e999}]}}', "inputs.a[1].b", "too large"),
    ("map-value", "POST", "/v1/runs", '{"labels": {"team": 5}}', "labels.team", "must be a string"),
    ("map-array", "POST", "/v1/runs", '{"labels": ["team"]}', "labels", "must be a JSON object"),
    ("oneof", "POST", "/v1/runs", '{"workflow_id": "a", "workflowName": "b"}', "workflow_name", "workflow_id"),
    ("nested-enum", "POST", "/v1/accounts/bob/holds/h1:capture", '{"usage": {"gpu": "X"}}', "usage.gpu", ENUM_GPU),
    (
        "nested-duration",
        "POST",
        "/v1/accounts/bob/holds/h1:capture",
        '{"usage": {"gpuTime": "5"}}',
        "usage.gpu_time",
        DURATION,
    ),
    ("nested-type", "POST", "/v1/accounts/bob/holds/h1:capture", '{"usage": "gpu"}', "usage", "must be a JSON object"),
    ("qoints-enum", "POST", "/v1/accounts/bob:creditQoints", '{"source": 1.5}', "source", "must be one of"),
    ("query-int", "GET", "/v1/accounts/bob/transactions?page_size=abc", None, "page_size", "must be an integer"),
    (
        "query-int-range",
        "GET",
        "/v1/accounts/bob/transactions?page_size=99999999999",
        None,
        "page_size",
        "out of range",
    ),
    ("query-camel", "GET", "/v1/accounts/bob/transactions?pageSize=1.5", None, "page_size", "must be an integer"),
    ("query-enum", "GET", "/v1/costs:quote?gpu=GPU_TYPE_NOPE&gpu_time=3s", None, "gpu", ENUM_GPU),
    ("query-duration", "GET", "/v1/costs:quote?gpu=GPU_TYPE_T4&gpuTime=3", None, "gpu_time", DURATION),
    ("query-repeated-enum", "GET", "/v1/users/bob/runs?statuses=RUN_STATUS_NOPE", None, "statuses", "must be one of"),
    ("query-bool", "GET", "/v1/comfyui/deployments?include_fluid=maybe", None, "include_fluid", "true or false"),
    ("query-unknown", "GET", "/v1/accounts/alice?colour=red", None, "colour", "unknown field"),
    ("not-json", "POST", HOLDS, "{not json", "body", "is not valid JSON"),
    ("not-utf8", "POST", HOLDS, b"\xff\xfe{}", "body", "is not valid UTF-8 JSON"),
    ("nan-literal", "POST", HOLDS, '{"estimate_points": NaN}', "body", "is not valid JSON"),
    ("not-object", "POST", HOLDS, "[1, 2]", "body", "must be a JSON object"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "field", "words"), [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUT]
)
async def test_bad_input_names_the_field(
    gw: RunningGateway, method: str, path: str, body: str | bytes | None, field: str, words: str
) -> None:
    error = refused(await send(gw, method, path, body))
    named, description = violation(error)
    assert named == field and words in description, error


async def test_violations_are_all_reported_at_once(gw: RunningGateway) -> None:
    body = {"estimate_points": "x", "ttl": 1, "colour": "red", "run_id": 7}
    error = refused(await send(gw, "POST", HOLDS, json.dumps(body)))
    assert sorted(violations(error)) == ["colour", "estimate_points", "run_id", "ttl"], error
    many = json.dumps({f"unknown_{i}": i for i in range(500)})
    assert len(violations(refused(await send(gw, "POST", HOLDS, many)))) == transcode.MAX_VIOLATIONS


async def test_good_input_in_every_spelling_reaches_the_service(gw: RunningGateway) -> None:
    """The proto3 JSON mapping still holds: both spellings, quoted int64, durations, Struct, enums."""
    for method, path, body, rpc in [
        ("POST", HOLDS, '{"runId": "r", "estimate_points": "5", "ttl": "1.5s"}', "ReserveHold"),
        ("POST", HOLDS, '{"run_id": "r", "estimatePoints": 5.0, "ttl": null}', "ReserveHold"),
        (
            "POST",
            "/v1/runs",
            json.dumps(
                {
                    "workflowName": "txt2img",
                    "inputs": {"prompt": "a cat", "width": 512, "ratio": 1.5, "seed": None, "tags": [True, [], {}]},
                    "gpu": "GPU_TYPE_A10G",
                    "labels": {"team": "x"},
                }
            ),
            "CreateRun",
        ),
        ("POST", "/v1/runs", '{"gpu": 4, "workflow_id": "w", "workflow_name": null}', "CreateRun"),
        (
            "POST",
            "/v1/accounts/bob/holds/h1:capture",
            '{"usage": {"gpu": "GPU_TYPE_T4", "gpuTime": "0.5s"}}',
            "CaptureHold",
        ),
        ("GET", "/v1/costs:quote?gpu=GPU_TYPE_A10G&gpu_time=30s", None, "QuoteCost"),
        ("GET", "/v1/costs:quote?gpu=4&gpuTime=1.25s", None, "QuoteCost"),
        (
            "GET",
            "/v1/users/bob/runs?statuses=RUN_STATUS_RUNNING&statuses=RUN_STATUS_QUEUED&pageSize=5",
            None,
            "ListRuns",
        ),
        ("GET", "/v1/comfyui/deployments?include_fluid=true", None, "ListDeployments"),
    ]:
        service = COMFYUI if rpc in {"CreateRun", "ListRuns", "ListDeployments"} else POINTS
        unimplemented(await send(gw, method, path, body), f"/{service}/{rpc}")


# --- the path and the body -------------------------------------------------------------------------


async def test_a_path_field_the_body_contradicts_is_refused(gw: RunningGateway) -> None:
    for body in ('{"user_id": "mallory"}', '{"userId": "mallory"}', '{"user_id": "BOB"}'):
        error = refused(await send(gw, "POST", HOLDS, body))
        assert violation(error) == ("user_id", "differs from the value in the path"), error
    capture = "/v1/accounts/bob/holds/h1:capture"
    error = refused(await send(gw, "POST", capture, '{"user_id": "bob", "hold_id": "h2"}'))
    assert violation(error) == ("hold_id", "differs from the value in the path"), error
    # The same value repeated is fine, as is a null.
    for body in ('{"user_id": "bob"}', '{"userId": "bob"}', '{"user_id": null}'):
        unimplemented(await send(gw, "POST", HOLDS, body), f"/{POINTS}/ReserveHold")
    unimplemented(await send(gw, "POST", capture, '{"hold_id": "h1"}'), f"/{POINTS}/CaptureHold")


# --- the webhook -----------------------------------------------------------------------------------

WEBHOOK_GARBAGE = [
    # (id, body, field)
    ("not-json", "status=success", "body"),
    ("not-utf8", b'{"status": "\xc3\x28"}', "body"),
    ("truncated", '{"status": "succ', "body"),
    ("array", "[1, 2, 3]", "payload"),
    ("string", '"success"', "payload"),
    ("progress-word", '{"progress": "fast"}', "payload.progress"),
    ("progress-bool", '{"progress": false}', "payload.progress"),
    ("progress-infinite", '{"progress": 1e999}', "payload.progress"),
    ("run-id-number", '{"run_id": 12}', "payload.run_id"),
    ("status-list", '{"status": ["success"]}', "payload.status"),
    ("outputs-object", '{"outputs": {"a": 1}}', "payload.outputs"),
    ("outputs-number", '{"outputs": [1]}', "payload.outputs[0]"),
    ("outputs-null", '{"outputs": [null]}', "payload.outputs[0]"),
    ("outputs-bigint", '{"outputs": [{"size": ' + BIG + "}]}", "payload.outputs[0].size"),
    ("outputs-surrogate", '{"outputs": [{"\\udc00": 1}]}', "payload.outputs[0].\ufffd"),
    ("duplicate", '{"status": "a", "status": "b"}', "payload.status"),
    ("nested-junk", '{"outputs": [' + nested(MAX_JSON_DEPTH + 5) + "]}", "body"),
    ("nested-junk-lists", '{"outputs": [{"a": ' + nested(MAX_JSON_DEPTH + 5, "list") + "}]}", "body"),
]


@pytest.mark.parametrize(("body", "field"), [pytest.param(*case[1:], id=case[0]) for case in WEBHOOK_GARBAGE])
async def test_webhook_garbage_is_a_400(gw: RunningGateway, body: str | bytes, field: str) -> None:
    error = refused(await send(gw, "POST", WEBHOOK, body))
    assert violation(error)[0] == field, error


async def test_webhook_still_ignores_what_it_does_not_know(gw: RunningGateway) -> None:
    method = f"/{COMFYUI}/HandleWebhook"
    for body in (
        '{"status": "running", "new_field": {"deep": [1, {"x": null}]}, "new_field": 2}',
        '{"status": "running", "event_type": "run.updated", "progress": "0.5", "liveStatus": "ok"}',
        "",
        "null",
    ):
        unimplemented(await send(gw, "POST", WEBHOOK, body), method)


# --- the last resort -------------------------------------------------------------------------------


async def test_an_unexpected_error_is_a_json_500_and_is_logged(
    gw: RunningGateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(transcode, "build_request", broken)
    caplog.set_level(logging.INFO, logger="stationthis.gateway")
    for path in (HOLDS, WEBHOOK):
        response = await send(gw, "POST", path, "{}")
        error = gateway_refused(response, 500, "INTERNAL")
        assert error["message"] == "internal error", error
        assert detail(error, ERROR_INFO) == {"@type": ERROR_INFO, "reason": "INTERNAL", "domain": GATEWAY_DOMAIN}
        assert "secret" not in response.text and "Traceback" not in response.text

    async def not_ready() -> tuple[bool, dict[str, str]]:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(gw.gateway, "ready", not_ready)  # outside the gateway's own routes
    response = await gw.http.get("/readyz")
    error = gateway_refused(response, 500, "INTERNAL")
    assert error["message"] == "internal error" and "secret" not in response.text, error

    logged = [r.exc_info for r in caplog.records if r.name == "stationthis.gateway" and r.levelno == logging.ERROR]
    assert len(logged) == 3, caplog.records
    assert all(info and str(info[1]) == "secret internals" for info in logged), logged
