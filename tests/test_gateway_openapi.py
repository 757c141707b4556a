"""The gateway describes itself: /openapi.json (OpenAPI 3.1, from the same descriptors as the routes),
/docs (a page rendering it, from a package, no CDN), and each workflow's inputs as a JSON Schema that
agrees with ValidateInputs.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import openapi_ui_bundles.swagger_ui as swagger_ui
import pytest
from google.protobuf import descriptor
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from gateway import openapi
from tests.conftest import Running
from tests.test_gateway import KEYS, RunningGateway, error_of, gateway_env, serve_gateway

WORKFLOWS = "stationthis.workflows.v1.WorkflowsService"


@pytest.fixture
async def gw(stack: dict[str, Running]) -> AsyncIterator[RunningGateway]:
    async with serve_gateway(gateway_env(stack)) as running:
        yield running


def _path_of(template: str) -> str:
    return re.sub(r"\{([\w.]+)(?:=[^}]*)?\}", r"{\1}", template)


def _resolver(document: dict[str, Any]) -> Registry:  # type: ignore[type-arg]
    resource = Resource.from_contents(
        {**document, "$schema": "https://json-schema.org/draft/2020-12/schema"}, default_specification=DRAFT202012
    )
    return Registry().with_resource("urn:openapi", resource)


def validator(document: dict[str, Any], schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    """A validator of ``schema`` whose ``#/components/...`` references resolve in ``document``."""
    rebased = json.loads(json.dumps(schema).replace('"#/components/', '"urn:openapi#/components/'))
    return jsonschema.Draft202012Validator(
        rebased,
        registry=_resolver(json.loads(json.dumps(document).replace('"#/components/', '"urn:openapi#/components/'))),
    )


# --- the document ----------------------------------------------------------------------------------


async def test_openapi_document_has_every_route_and_needs_no_key(gw: RunningGateway) -> None:
    response = await gw.http.get("/openapi.json")  # no key: the document is public
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    document = response.json()
    assert document["openapi"] == "3.1.0"
    operations = {(method.upper(), path) for path, ops in document["paths"].items() for method in ops}
    routes = {(route.http_method, _path_of(route.template)) for route in gw.gateway.routes}
    assert routes <= operations
    assert operations - routes == {("POST", "/v1/uploads"), ("GET", "/v1/workflows/{workflow_id}/inputs.schema.json")}
    ids = [op["operationId"] for ops in document["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))
    # Every schema is a valid JSON Schema (2020-12, OpenAPI 3.1's dialect) and every reference resolves.
    for schema in document["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    text = json.dumps(document)
    for ref in set(re.findall(r'"\$ref": "#/components/(\w+)/([\w.]+)"', text)):
        assert ref[1] in document["components"][ref[0]], ref
    # Authentication: bearer or X-API-Key everywhere, the webhook's own token on the webhook.
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {**schemes["bearerAuth"], "type": "http", "scheme": "bearer"}
    assert schemes["apiKeyHeader"]["name"] == "X-API-Key" and schemes["webhookToken"]["in"] == "query"
    assert document["security"] == [{"bearerAuth": []}, {"apiKeyHeader": []}]
    assert document["paths"]["/v1/webhooks/comfydeploy"]["post"]["security"] == [{"webhookToken": []}]


async def test_openapi_parameters_bodies_and_replies_follow_the_json_mapping(gw: RunningGateway) -> None:
    document = (await gw.http.get("/openapi.json")).json()
    paths, schemas = document["paths"], document["components"]["schemas"]
    get_account = paths["/v1/accounts/{user_id}"]["get"]
    assert get_account["operationId"] == "GetAccount"
    # Proto comments are the descriptions.
    assert get_account["summary"].startswith("Returns a user's account")
    [user_id] = [p for p in get_account["parameters"] if p["in"] == "path"]
    assert user_id["name"] == "user_id" and user_id["required"] is True and user_id["schema"]["type"] == "string"
    assert "user" in user_id["description"].lower()
    reply = get_account["responses"]["200"]["content"]["application/json"]["schema"]
    assert reply == {"$ref": "#/components/schemas/stationthis.points.v1.GetAccountResponse"}
    assert get_account["responses"]["default"] == {"$ref": "#/components/responses/Error"}
    retry = document["components"]["responses"]["RateLimited"]["headers"]["Retry-After"]
    assert retry["schema"]["type"] == "integer"
    # Query parameters of a GET: the fields the path does not bind, typed as the mapping reads them.
    listing = paths["/v1/accounts/{user_id}/transactions"]["get"]
    query = {p["name"]: p for p in listing["parameters"] if p["in"] == "query"}
    assert {"page_size", "page_token"} <= set(query) and "user_id" not in query
    assert query["page_size"]["schema"]["type"] == "integer" and query["page_size"]["schema"]["format"] == "int32"
    # A body "*" route: the body is the request without the fields the path binds.
    holds = paths["/v1/accounts/{user_id}/holds"]["post"]
    body = holds["requestBody"]["content"]["application/json"]["schema"]
    assert "user_id" not in body["properties"] and "request_id" in body["properties"]
    assert body["additionalProperties"] is False
    assert any(p["name"] == "Idempotency-Key" and p["in"] == "header" for p in holds["parameters"])
    assert holds["responses"]["200"]["links"]["GetHold"]["parameters"] == {
        "user_id": "$response.body#/hold/user_id",
        "hold_id": "$response.body#/hold/hold_id",
    }
    # 64-bit integers are strings, enums their names, timestamps and durations strings.
    account = schemas["stationthis.points.v1.Account"]["properties"]
    int64_fields = [
        name
        for name, field in _fields("stationthis.points.v1.Account").items()
        if field.cpp_type == descriptor.FieldDescriptor.CPPTYPE_INT64
    ]
    assert int64_fields and all(account[name]["type"] == "string" for name in int64_fields)
    gpu = schemas["stationthis.type.v1.GpuType"]
    assert gpu["type"] == "string" and "GPU_TYPE_A10G" in gpu["enum"]
    quote = paths["/v1/costs:quote"]["get"]
    gpu_time = next(p for p in quote["parameters"] if p["name"] == "gpu_time")
    assert gpu_time["schema"]["type"] == "string" and gpu_time["schema"]["pattern"].endswith("s$")
    # The webhook: its payload is the body, its token is the security scheme (not a parameter).
    webhook = paths["/v1/webhooks/comfydeploy"]["post"]
    assert "token" not in {p["name"] for p in webhook["parameters"]}
    payload = webhook["requestBody"]["content"]["application/json"]["schema"]
    assert payload["allOf"] == [{"$ref": "#/components/schemas/stationthis.comfyui.v1.ComfyDeployWebhook"}]
    # The error shape is documented once and used everywhere.
    assert schemas["Error"]["properties"]["error"]["required"] == ["code", "message", "status", "details"]
    # WatchRun is an event stream.
    watch = paths["/v1/runs/{run_id}:watch"]["get"]["responses"]["200"]
    assert set(watch["content"]) == {"text/event-stream"}


def _fields(full_name: str) -> dict[str, Any]:
    from google.protobuf import descriptor_pool

    return dict(descriptor_pool.Default().FindMessageTypeByName(full_name).fields_by_name)


async def test_real_replies_and_errors_match_the_document(gw: RunningGateway) -> None:
    document = (await gw.http.get("/openapi.json")).json()
    checks = [
        ("/v1/accounts/alice", "/v1/accounts/{user_id}"),
        ("/v1/workflows", "/v1/workflows"),
        ("/v1/costs:quote?gpu=GPU_TYPE_A10G&gpu_time=30s", "/v1/costs:quote"),
        ("/v1/catalog/stats", "/v1/catalog/stats"),
    ]
    for url, path in checks:
        response = await gw.get(url)
        assert response.status_code == 200, response.text
        schema = document["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        validator(document, schema).validate(response.json())
    error = await gw.get("/v1/runs/0b7e3f5c-6c1d-4a57-9d7e-2f4b3c1a9e80")
    error_of(error, 404, "NOT_FOUND")
    validator(document, {"$ref": "#/components/schemas/Error"}).validate(error.json())


async def test_descriptions_come_from_the_proto_comments() -> None:
    from tests.test_grpcurl import SERVICES  # noqa: F401  (the generated modules, imported)

    found = openapi._descriptor_set()
    assert found is not None, "no descriptor set with source info: make protos, or protos/ missing"
    notes = openapi.comments(found.file)
    assert notes[f"{WORKFLOWS}.ResolveWorkflow"]
    assert notes["stationthis.workflows.v1.InputType.INPUT_TYPE_COLOR"].startswith("ComfyUIDeployExternalColor")
    assert notes["stationthis.points.v1.GetAccountRequest.user_id"].startswith("Required.")


# --- the docs page ---------------------------------------------------------------------------------


async def test_docs_page_renders_the_document_from_the_package(gw: RunningGateway) -> None:
    page = await gw.http.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/openapi.json" in page.text and "petstore" not in page.text
    # Everything the page loads is served by the gateway itself: no other host is named.
    assert not re.search(r'(src|href)="(https?:)?//', page.text), page.text
    for asset in re.findall(r'(?:src|href)="(/docs/[^"]+)"', page.text):
        response = await gw.http.get(asset)
        assert response.status_code == 200, asset
        assert response.content == (Path(swagger_ui.static_path) / asset.rsplit("/", 1)[1]).read_bytes()
    assert (await gw.http.get("/docs/../../etc/passwd")).status_code == 404


# --- a workflow's inputs as a JSON Schema ----------------------------------------------------------

URL = "https://example.com/a.png"


def candidates(spec: dict[str, Any]) -> list[Any]:
    """Values to try for one input: good ones and bad ones of every kind."""
    values: list[Any] = [
        None,
        "",
        "text",
        "#A1b2C3",
        "#abc",
        "#a1b2c3\n",
        True,
        False,
        0,
        1,
        -1,
        2.5,
        7.0,
        -3,
        1e12,
        2147483648,
        URL,
        "HTTP://Host/x",
        "ftp://example.com/a",
        "http://",
        [URL],
        [],
        ["not a url"],
        json.dumps([URL]),
        {"a": 1},
    ]
    for key in ("minimum", "maximum"):
        for found in _find(spec, key):
            values += [found, found - 1, found + 1, found + 0.5]
    for found in _find(spec, "enum"):
        values += [*found, found[0] + "x" if found else "x"]
    if "default" in spec:
        values.append(spec["default"])
    return values


def _find(schema: Any, key: str) -> list[Any]:
    if isinstance(schema, dict):
        return ([schema[key]] if key in schema else []) + [v for item in schema.values() for v in _find(item, key)]
    if isinstance(schema, list):
        return [v for item in schema for v in _find(item, key)]
    return []


def good_value(name: str, spec: dict[str, Any]) -> Any:
    if "default" in spec and spec["default"] is not None:
        return spec["default"]
    for value in candidates(spec):
        if value is not None and jsonschema.Draft202012Validator(spec).is_valid(value):
            return value
    raise AssertionError(f"no good value for {name}: {spec}")


async def test_inputs_schema_agrees_with_validate_inputs(gw: RunningGateway) -> None:
    listing = (await gw.get("/v1/workflows?page_size=200")).json()
    workflows = listing["workflows"]
    kinds: set[str] = set()
    checked = 0
    for workflow in workflows:
        workflow_id = workflow["workflow_id"]
        response = await gw.get(f"/v1/workflows/{workflow_id}/inputs.schema.json")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/schema+json"
        schema = response.json()
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        typed = {i["input_id"]: i for i in workflow.get("inputs", [])}
        assert set(schema["properties"]) == set(typed)
        assert set(schema["required"]) == {name for name, i in typed.items() if i.get("required")}
        for name, spec in schema["properties"].items():
            kinds.add(spec["x-input-type"])
            assert spec["title"] == typed[name].get("display_name", name)
            if typed[name].get("description"):
                assert spec["description"] == typed[name]["description"]
        check = jsonschema.Draft202012Validator(schema)
        base = {name: good_value(name, schema["properties"][name]) for name in schema["required"]}
        assert check.is_valid(base), list(check.iter_errors(base))
        trials = [base, {**base, "no_such_input": 1}] + [
            {**base, name: value} for name, spec in schema["properties"].items() for value in candidates(spec)
        ]
        trials += [{k: v for k, v in base.items() if k != name} for name in base]  # each required one missing
        for inputs in trials:
            if any(_json_array_text(schema, name, value) for name, value in inputs.items()):
                continue  # the one documented gap: a string holding a JSON array of URLs
            verdict = await gw.post(f"/v1/workflows/{workflow_id}:validateInputs", json.dumps({"inputs": inputs}))
            assert verdict.status_code in (200, 400), verdict.text
            assert check.is_valid(inputs) == (verdict.status_code == 200), (workflow["name"], inputs, verdict.text)
            checked += 1
    assert checked > 100
    assert {
        "INPUT_TYPE_TEXT",
        "INPUT_TYPE_NUMBER",
        "INPUT_TYPE_INTEGER",
        "INPUT_TYPE_ENUM",
        "INPUT_TYPE_IMAGE",
        "INPUT_TYPE_SEED",
        "INPUT_TYPE_BOOLEAN",
    } <= kinds, kinds


def _json_array_text(schema: dict[str, Any], name: str, value: Any) -> bool:
    spec = schema["properties"].get(name, {})
    return spec.get("x-input-type") == "INPUT_TYPE_IMAGE_BATCH" and isinstance(value, str)


async def test_inputs_schema_errors(gw: RunningGateway) -> None:
    error = error_of(await gw.get("/v1/workflows/no-such-workflow/inputs.schema.json"), 404, "NOT_FOUND")
    assert error["details"]
    error_of(await gw.get("/v1/workflows/x/inputs.schema.json", key=None), 401, "UNAUTHENTICATED")
    error_of(await gw.get("/v1/workflows/x/inputs.schema.json?environment=MARS"), 400, "INVALID_ARGUMENT")
    response = await gw.post("/v1/workflows/x/inputs.schema.json")
    assert response.status_code == 405 and response.headers["allow"] == "GET"
    assert KEYS
