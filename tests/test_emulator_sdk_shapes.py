"""What the official ``comfydeploy`` SDK (PyPI 0.7.0, Speakeasy-generated) needs from the emulator.

The SDK cannot be installed in this venv (its package name collides with our ``comfydeploy/``), so these
tests check with plain httpx the exact shapes its pydantic models parse, the status codes and content
types it branches on, and the request bodies it sends. docs/sdk-check.md drives the real SDK.

SDK 0.7.0 surface: ``run.deployment.queue`` (POST /run/deployment/queue), ``run.get`` (GET /run/{run_id})
and ``run.cancel`` (POST /run/{run_id}/cancel), plus the webhook model ``WorkflowRunWebhookBody``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from emulator.testing import DEPLOYMENTS, TERMINAL, RunningEmulator

SDK_AGENT = "speakeasy-sdk/python 0.7.0 2.560.1 V2 comfydeploy"  # what comfydeploy 0.7.0 sends
SDK_HEADERS = {"user-agent": SDK_AGENT, "accept": "application/json"}
WORKFLOW_RUN_STATUS = {
    "not-started", "running", "uploading", "success", "failed", "started", "queued", "timeout", "cancelled",
}  # fmt: skip
# WorkflowRunModel fields with no default in the SDK: parsing fails when one is absent.
RUN_REQUIRED = {
    "id", "workflow_version_id", "workflow_inputs", "workflow_id", "workflow_api", "machine_id", "origin", "status",
    "created_at", "updated_at", "gpu_event_id", "gpu", "machine_version", "machine_type", "modal_function_call_id",
    "user_id", "org_id", "live_status", "webhook", "webhook_status", "number", "duration", "cold_start_duration",
    "cold_start_duration_total", "run_duration",
}  # fmt: skip
RUN_NULLABLE_STR = (
    "workflow_version_id", "machine_id", "gpu_event_id", "gpu", "machine_version", "machine_type",
    "modal_function_call_id", "user_id", "org_id", "live_status", "webhook", "webhook_status",
)  # fmt: skip
RUN_NULLABLE_FLOAT = ("duration", "cold_start_duration", "cold_start_duration_total", "run_duration")
OUTPUT_REQUIRED = {"id", "run_id", "data", "node_meta", "created_at", "updated_at"}


# --- the SDK's models, as checks ----------------------------------------------------------------------


def is_aware_datetime(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        return datetime.fromisoformat(value).tzinfo is not None
    except ValueError:
        return False


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_media_item(item: Any) -> None:
    """``Union[MediaItem, str, bool]``; MediaItem needs url, type and filename strings."""
    if isinstance(item, (str, bool)):
        return
    assert isinstance(item, dict), item
    assert all(isinstance(item.get(key), str) for key in ("url", "type", "filename")), item
    assert item.get("is_public") is None or isinstance(item["is_public"], bool), item
    assert item.get("subfolder") is None or isinstance(item["subfolder"], str), item
    assert item.get("upload_duration") is None or is_number(item["upload_duration"]), item


def check_output(output: Any) -> None:
    """SDK ``WorkflowRunOutputModel``."""
    assert isinstance(output, dict) and OUTPUT_REQUIRED <= output.keys(), output
    assert isinstance(output["id"], str) and isinstance(output["run_id"], str)
    assert is_aware_datetime(output["created_at"]) and is_aware_datetime(output["updated_at"]), output
    assert isinstance(output["data"], dict), output
    for key, items in output["data"].items():
        assert isinstance(key, str) and isinstance(items, list), output
        for item in items:
            check_media_item(item)
    for key in ("type", "node_id"):
        assert output.get(key) is None or isinstance(output[key], str), output


def check_run(run: Any) -> None:
    """SDK ``WorkflowRunModel`` (every field, required or not, with its type and nullability)."""
    assert isinstance(run, dict)
    assert not RUN_REQUIRED - run.keys(), f"missing for the SDK: {sorted(RUN_REQUIRED - run.keys())}"
    assert all(isinstance(run[key], str) for key in ("id", "workflow_id", "origin", "status")), run
    assert run["status"] in WORKFLOW_RUN_STATUS, run["status"]
    for key in RUN_NULLABLE_STR:
        assert run[key] is None or isinstance(run[key], str), (key, run[key])
    for key in RUN_NULLABLE_FLOAT:
        assert run[key] is None or is_number(run[key]), (key, run[key])
    assert is_aware_datetime(run["created_at"]) and is_aware_datetime(run["updated_at"])
    for key in ("ended_at", "queued_at", "started_at"):
        assert run.get(key) is None or is_aware_datetime(run[key]), (key, run[key])
    assert isinstance(run["number"], int) and not isinstance(run["number"], bool)
    assert is_number(run.get("progress", 0))
    assert isinstance(run.get("is_realtime", False), bool)
    assert isinstance(run.get("webhook_intermediate_status", False), bool)
    assert isinstance(run.get("outputs", []), list)
    for output in run.get("outputs") or []:
        check_output(output)


def check_validation_error(response: httpx.Response) -> None:
    """422 ``application/json`` parsed by the SDK as ``HTTPValidationErrorData`` (then raised)."""
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail
    for item in detail:
        assert isinstance(item["loc"], list) and all(isinstance(part, (str, int)) for part in item["loc"])
        assert isinstance(item["msg"], str) and isinstance(item["type"], str)


# --- fixtures and helpers ------------------------------------------------------------------------------


@pytest.fixture
async def sdk(emulator: RunningEmulator) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client that sends what the SDK sends: its user agent, Accept and the Bearer key."""
    headers = {**emulator.headers(), **SDK_HEADERS}
    async with httpx.AsyncClient(base_url=emulator.base_url, headers=headers, timeout=10, trust_env=False) as client:
        yield client


async def sdk_queue(sdk: httpx.AsyncClient, deployment: str, **fields: Any) -> str:
    # The SDK serialises DeploymentRunRequest without its None fields but always with
    # webhook_intermediate_status (default false).
    body = {"deployment_id": DEPLOYMENTS[deployment], "webhook_intermediate_status": False, **fields}
    response = await sdk.post("/run/deployment/queue", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert set(response.json()) == {"run_id"} and isinstance(response.json()["run_id"], str)  # CreateRunResponse
    run_id: str = response.json()["run_id"]
    return run_id


async def sdk_poll(sdk: httpx.AsyncClient, run_id: str, within: float = 15) -> list[dict[str, Any]]:
    """Every distinct state seen until the run ends, each checked against the SDK's model."""
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(within):
        while True:
            response = await sdk.get(f"/run/{run_id}")
            assert response.status_code == 200, response.text
            assert response.headers["content-type"].startswith("application/json")
            run = response.json()
            check_run(run)
            if not seen or seen[-1]["status"] != run["status"]:
                seen.append(run)
            if run["status"] in TERMINAL:
                return seen
            await asyncio.sleep(0.01)


# --- tests ---------------------------------------------------------------------------------------------


async def test_sdk_parses_every_state_of_a_run(sdk):
    run_id = await sdk_queue(
        sdk,
        "text2img",
        inputs={"input_prompt": "a red fox", "input_seed": 7, "input_bool": True, "input_list": ["a", 1]},
        webhook="http://127.0.0.1:9/hook",
        gpu="A10G",
    )
    seen = await sdk_poll(sdk, run_id)
    assert [run["status"] for run in seen][-1] == "success"
    assert {"not-started", "queued", "started", "running"} & {run["status"] for run in seen}
    final = seen[-1]
    assert final["outputs"] and final["workflow_api"] is None and final["ended_at"] is not None


async def test_sdk_parses_the_outputs_of_every_deployment(sdk, emulator):
    names = [name for name in DEPLOYMENTS if name not in ("other-tenant", "deleted-workflow")]
    run_ids = [await sdk_queue(sdk, name) for name in names]
    finals = await asyncio.gather(*(sdk_poll(sdk, run_id, within=30) for run_id in run_ids))
    kinds = set()
    for name, seen in zip(names, finals, strict=True):
        assert seen[-1]["status"] == "success" and seen[-1]["outputs"], name
        kinds |= {key for output in seen[-1]["outputs"] for key in output["data"]}
    assert {"images", "gifs", "text", "files"} <= kinds


async def test_workflow_api_is_sent_to_the_sdk_only(sdk, emulator):
    """V2 no longer returns workflow_api (reference §2.2); SDK 0.7.0 requires the key. The emulator sends
    it, null, to Speakeasy user agents only: everyone else keeps the documented shape."""
    run_id = await sdk_queue(sdk, "inpaint")
    assert (await sdk.get(f"/run/{run_id}")).json()["workflow_api"] is None
    assert (await sdk.get("/run", params={"run_id": run_id})).json()["workflow_api"] is None  # hidden alias
    async with emulator.client() as plain:
        assert "workflow_api" not in (await plain.get(f"/run/{run_id}")).json()
        browser = {"x-speakeasy-user-agent": "speakeasy-sdk/typescript 0.3.0 2.400.0 V2 comfydeploy"}
        assert (await plain.get(f"/run/{run_id}", headers=browser)).json()["workflow_api"] is None


async def test_queue_position_is_an_int_the_sdk_ignores(sdk):
    run_ids = [await sdk_queue(sdk, "text2img-staging") for _ in range(3)]  # concurrency_limit 1
    response = await sdk.get(f"/run/{run_ids[-1]}", params={"queue_position": "true"})
    run = response.json()
    check_run(run)
    assert run["status"] in ("not-started", "queued")
    assert isinstance(run["queue_position"], int) and run["queue_position"] >= 1


async def test_cancel_answers_the_sdk(sdk):
    run_id = await sdk_queue(sdk, "text2img")
    response = await sdk.post(f"/run/{run_id}/cancel")  # no body, as the SDK sends it
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/json")
    assert response.json() == {"status": "success", "message": "Function cancelled"}
    run = (await sdk.get(f"/run/{run_id}")).json()
    check_run(run)
    assert run["status"] == "cancelled"
    again = await sdk.post(f"/run/{run_id}/cancel")  # terminal: still 200, nothing changes
    assert again.status_code == 200
    missing = await sdk.post("/run/00000000-0000-4000-8000-000000000000/cancel")
    assert missing.status_code == 500 and missing.headers["content-type"].startswith("application/json")


async def test_error_statuses_and_bodies_the_sdk_raises_on(sdk, emulator):
    async with httpx.AsyncClient(base_url=emulator.base_url, headers=SDK_HEADERS, trust_env=False) as anonymous:
        for headers in ({"authorization": "Bearer wrong"}, {}):
            for method, path in (("GET", f"/run/{DEPLOYMENTS['text2img']}"), ("POST", "/run/deployment/queue")):
                response = await anonymous.request(method, path, headers=headers, json={})
                assert response.status_code == 401 and response.headers["content-type"].startswith("application/json")
                assert isinstance(response.json()["detail"], str)
    unknown_run = await sdk.get("/run/00000000-0000-4000-8000-000000000000")
    assert (unknown_run.status_code, unknown_run.json()) == (404, {"detail": "Run not found"})
    unknown_deployment = await sdk.post(
        "/run/deployment/queue", json={"deployment_id": "00000000-0000-4000-8000-000000000000"}
    )
    assert (unknown_deployment.status_code, unknown_deployment.json()) == (404, {"detail": "Deployment not found"})

    check_validation_error(await sdk.get("/run/not-a-uuid"))
    check_validation_error(await sdk.post("/run/not-a-uuid/cancel"))
    for body in (
        {"deployment_id": "nope", "webhook_intermediate_status": False},
        {"webhook_intermediate_status": False},
        {"deployment_id": DEPLOYMENTS["text2img"], "gpu": "RTX4090"},
        {"deployment_id": DEPLOYMENTS["text2img"], "inputs": {"x": {"nested": 1}}},
    ):
        check_validation_error(await sdk.post("/run/deployment/queue", json=body))


async def test_webhook_payloads_parse_as_the_sdks_webhook_body(sdk, emulator):
    """SDK ``WorkflowRunWebhookBody``: run_id, status (enum), live_status (required, nullable), progress, outputs."""
    run_id = await sdk_queue(
        sdk, "text2img", webhook="http://127.0.0.1:9/hook?target_events=run.output", webhook_intermediate_status=True
    )
    await emulator.wait_run(run_id)
    await asyncio.sleep(0.1)
    deliveries = await emulator.webhooks(run_id)
    assert {d["event_type"] for d in deliveries} == {"run.updated", "run.output"}
    for delivery in deliveries:
        payload = delivery["payload"]
        assert payload["run_id"] == run_id and payload["status"] in WORKFLOW_RUN_STATUS
        assert "live_status" in payload and (payload["live_status"] is None or isinstance(payload["live_status"], str))
        assert is_number(payload["progress"]) and isinstance(payload["outputs"], list)
        for output in payload["outputs"]:
            check_output(output)
