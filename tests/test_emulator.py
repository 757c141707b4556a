"""The ComfyUI Deploy emulator over real HTTP: routes, shapes, quirks, lifecycle, webhooks and faults."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from emulator.media import GIF_MAGIC, PNG_MAGIC, png
from emulator.server import serve_asgi
from emulator.state import FILE_ID_ALPHABET
from emulator.testing import DEPLOYMENTS, MACHINES, TERMINAL, WORKFLOWS, RunningEmulator, start_for_tests
from tests.conftest import PYTHON, ROOT, python_env

ORDER = ["not-started", "queued", "started", "running", "success"]
RUN_KEYS = {
    "id", "workflow_version_id", "workflow_id", "workflow_inputs", "machine_id", "origin", "status", "created_at",
    "updated_at", "queued_at", "started_at", "ended_at", "gpu_event_id", "gpu", "machine_version", "machine_type",
    "modal_function_call_id", "user_id", "org_id", "live_status", "progress", "is_realtime", "webhook",
    "webhook_status", "webhook_intermediate_status", "outputs", "number", "duration", "cold_start_duration",
    "cold_start_duration_total", "run_duration", "queue_position",
}  # fmt: skip
OUTPUT_KEYS = {"id", "output_id", "run_id", "data", "node_meta", "created_at", "updated_at", "type", "node_id"}


# --- helpers -------------------------------------------------------------------------------------------


class Receiver:
    """A real HTTP server recording webhook POSTs; answers the statuses in ``replies`` first, then ``status``."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.replies: list[int] = []
        self.status = 200
        self.url = ""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.calls.append(
            {
                "path": scope["path"],
                "query": scope["query_string"].decode(),
                "headers": headers,
                "json": json.loads(body),
            }
        )
        status = self.replies.pop(0) if self.replies else self.status
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
        )
        await send({"type": "http.response.body", "body": b'{"message":"success"}'})

    def events(self, run_id: str) -> list[dict[str, Any]]:
        return [call["json"] for call in self.calls if call["json"]["run_id"] == run_id]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    recv = Receiver()
    root, stop = await serve_asgi(lambda root: recv, "127.0.0.1:0", lifespan="off")
    recv.url = f"{root}/hook"
    yield recv
    await stop()


@pytest.fixture
async def api(emulator: RunningEmulator) -> AsyncIterator[httpx.AsyncClient]:
    async with emulator.client() as client:
        yield client


async def queue(api: httpx.AsyncClient, deployment: str, **body: Any) -> str:
    response = await api.post("/run/deployment/queue", json={"deployment_id": DEPLOYMENTS[deployment], **body})
    assert response.status_code == 200, response.text
    assert set(response.json()) == {"run_id"}
    run_id: str = response.json()["run_id"]
    return run_id


async def poll(api: httpx.AsyncClient, run_id: str, until: tuple[str, ...] = TERMINAL, within: float = 15) -> dict:
    """GET the run every 10 ms until its status is in ``until``; return it."""
    async with asyncio.timeout(within):
        while True:
            response = await api.get(f"/run/{run_id}")
            assert response.status_code == 200, response.text
            if response.json()["status"] in until:
                return dict(response.json())
            await asyncio.sleep(0.01)


async def eventually(check: Any, within: float = 10) -> None:
    async with asyncio.timeout(within):
        while not await check():
            await asyncio.sleep(0.02)


def ts(value: str) -> datetime:
    assert value.endswith("Z"), value
    return datetime.fromisoformat(value)


# --- lifecycle -----------------------------------------------------------------------------------------


async def test_run_goes_through_every_status_with_timestamps_durations_and_outputs(api, emulator):
    run_id = await queue(api, "text2img", inputs={"input_prompt": "a red fox"})
    seen: list[str] = []
    progress: list[float] = []
    async with asyncio.timeout(15):
        while not seen or seen[-1] not in TERMINAL:
            run = (await api.get(f"/run/{run_id}")).json()
            if not seen or seen[-1] != run["status"]:
                seen.append(run["status"])
            progress.append(run["progress"])
            await asyncio.sleep(0.005)
    assert seen[-1] == "success"
    assert [ORDER.index(s) for s in seen] == sorted(ORDER.index(s) for s in seen), seen
    assert progress == sorted(progress) and progress[-1] == 1.0

    assert set(run) == RUN_KEYS
    created, queued, started, ended = (ts(run[k]) for k in ("created_at", "queued_at", "started_at", "ended_at"))
    assert created <= queued <= started <= ended
    assert run["duration"] == pytest.approx((ended - created).total_seconds(), abs=1e-5)
    assert run["cold_start_duration"] == pytest.approx((started - queued).total_seconds(), abs=1e-5)
    assert run["cold_start_duration_total"] == pytest.approx((started - created).total_seconds(), abs=1e-5)
    assert run["run_duration"] == pytest.approx((ended - started).total_seconds(), abs=1e-5)
    assert run["queue_position"] is None and run["origin"] == "api" and run["number"] == 0
    assert run["live_status"].startswith("Executing ")
    assert run["workflow_id"] == WORKFLOWS["text2img"] and run["machine_id"] == MACHINES["StationthisHun"]
    assert run["modal_function_call_id"].startswith("fc-")

    [output] = run["outputs"]
    assert set(output) == OUTPUT_KEYS and output["type"] is None and output["node_id"] is None
    assert output["run_id"] == run_id and output["output_id"] == "output_image"
    assert output["node_meta"] == {"node_id": "9", "node_class": "ComfyDeployStdOutputImage"}
    [image] = output["data"]["images"]
    assert image["type"] == "output" and image["is_public"] is True and image["output_id"] == "output_image"
    assert image["url"].endswith(f"/files/outputs/runs/{run_id}/{image['filename']}")
    async with httpx.AsyncClient(trust_env=False) as plain:  # file URLs need no auth
        fetched = await plain.get(image["url"])
    assert fetched.status_code == 200 and fetched.content.startswith(PNG_MAGIC)
    assert fetched.headers["content-type"] == "image/png"

    later = (await api.get(f"/run/{run_id}")).json()  # terminal statuses are sticky
    assert later["status"] == "success" and later["ended_at"] == run["ended_at"]


async def test_each_workflow_produces_its_kind_of_output(api, emulator):
    names = ["img2img", "inpaint", "upscale", "img2vid", "controlnet", "toon", "lora_train"]
    run_ids = [await queue(api, name) for name in names]
    runs = dict(zip(names, await asyncio.gather(*(poll(api, run_id) for run_id in run_ids)), strict=True))
    assert {name: run["status"] for name, run in runs.items()} == dict.fromkeys(names, "success")

    def kinds(run: dict) -> list[tuple[str, str]]:
        return [(o["node_meta"]["node_class"], key) for o in run["outputs"] for key in o["data"]]

    assert kinds(runs["img2img"]) == [("ComfyDeployOutputImage", "images")]
    assert runs["img2img"]["outputs"][0]["output_id"] == "output_images"
    assert kinds(runs["inpaint"]) == [("SaveImage", "images")]  # its PreviewImage is skipped
    assert runs["inpaint"]["outputs"][0]["output_id"] is None
    assert kinds(runs["controlnet"]) == [("ComfyDeployOutputImage", "images")]
    assert kinds(runs["img2vid"]) == [("VHS_VideoCombine", "gifs")]
    assert kinds(runs["toon"]) == [("VHS_VideoCombine", "gifs")]
    assert sorted(kinds(runs["lora_train"])) == [("ComfyDeployOutputFile", "files"), ("ShowText|pysssss", "text")]
    text = next(o for o in runs["lora_train"]["outputs"] if "text" in o["data"])["data"]["text"]
    assert text == ["flux_trainer_output/my_lora_rank16_bf16.safetensors (trigger word: stationthis)"]

    gif = runs["img2vid"]["outputs"][0]["data"]["gifs"][0]
    assert gif["format"] == "image/gif" and gif["filename"].endswith(".gif")
    async with httpx.AsyncClient(trust_env=False) as plain:
        assert (await plain.get(gif["url"])).content.startswith(GIF_MAGIC)


async def test_concurrency_limit_keeps_extra_runs_not_started_with_a_queue_position(api, emulator):
    await emulator.set_faults(next_run_outcomes=["stuck"])  # the first run holds the only slot
    first, second, third = [await queue(api, "text2img-staging") for _ in range(3)]
    await poll(api, first, until=("running",))
    for run_id, position in ((second, 0), (third, 1)):
        run = (await api.get(f"/run/{run_id}", params={"queue_position": "true"})).json()
        assert (run["status"], run["queue_position"]) == ("not-started", position)
        assert run["queued_at"] is None
    assert (await api.get(f"/run/{third}")).json()["queue_position"] is None  # only when asked

    assert (await api.post(f"/run/{first}/cancel")).status_code == 200
    runs = [await poll(api, run_id) for run_id in (first, second, third)]
    assert [r["status"] for r in runs] == ["cancelled", "success", "success"]
    assert ts(runs[1]["queued_at"]) >= ts(runs[0]["ended_at"])
    assert ts(runs[2]["queued_at"]) >= ts(runs[1]["ended_at"])


async def test_cancel_is_sticky_and_sends_a_cancelled_webhook(api, emulator, receiver):
    await emulator.set_faults(next_run_outcomes=["stuck"])
    run_id = await queue(api, "text2img", webhook=receiver.url)
    await poll(api, run_id, until=("running",))
    response = await api.post(f"/run/{run_id}/cancel")
    assert (response.status_code, response.json()) == (200, {"status": "success", "message": "Function cancelled"})
    run = await poll(api, run_id)
    assert run["status"] == "cancelled" and run["ended_at"] is not None
    await eventually(lambda: _async(receiver.events(run_id) and receiver.events(run_id)[-1]["status"] == "cancelled"))
    assert [e["status"] for e in receiver.events(run_id)] == ["queued", "started", "running", "cancelled"]

    again = await api.post(f"/run/{run_id}/cancel")  # a terminal run: 200, nothing changes
    assert again.status_code == 200
    await asyncio.sleep(0.1)
    after = (await api.get(f"/run/{run_id}")).json()
    assert (after["status"], after["ended_at"]) == ("cancelled", run["ended_at"])
    assert len(receiver.events(run_id)) == 4


async def _async(value: Any) -> Any:
    return value


async def test_failed_and_timeout_outcomes_from_next_run_outcomes(api, emulator):
    await emulator.set_faults(next_run_outcomes=["failed", "timeout"])
    failed, timed_out, normal = [await queue(api, "img2img") for _ in range(3)]
    runs = [await poll(api, run_id) for run_id in (failed, timed_out, normal)]
    assert [r["status"] for r in runs] == ["failed", "timeout", "success"]
    for run in runs[:2]:
        assert run["ended_at"] is not None and run["duration"] > 0
        assert 0 < run["progress"] < 1
        assert run["outputs"] == []  # the failed node's {"error": ...} record is dropped, as upstream
    assert (await emulator.set_faults())["next_run_outcomes"] == []


# --- auth, validation, quirks ---------------------------------------------------------------------------


async def test_auth_errors(emulator):
    async with httpx.AsyncClient(base_url=emulator.base_url, trust_env=False) as anonymous:
        cases = [
            ({}, "Invalid or missing token"),
            ({"Authorization": "Basic abc"}, "Invalid or missing token"),
            ({"Authorization": "Bearer wrong"}, "Invalid or expired token"),
        ]
        for headers, detail in cases:
            for method, path in (("GET", "/deployments"), ("POST", "/run/deployment/queue"), ("GET", "/nope")):
                response = await anonymous.request(method, path, headers=headers)
                assert (response.status_code, response.json()) == (401, {"detail": detail})
        unknown = await anonymous.get("/nope", headers=emulator.headers())
        assert (unknown.status_code, unknown.json()) == (404, {"detail": "Not Found"})


async def test_validation_errors_have_fastapi_shape(api):
    response = await api.get("/run/not-a-uuid")
    assert response.status_code == 422
    [detail] = response.json()["detail"]
    assert detail["type"] == "uuid_parsing" and detail["loc"] == ["path", "run_id"] and detail["input"] == "not-a-uuid"
    assert detail["msg"].startswith("Input should be a valid UUID")
    assert (await api.post("/run/123/cancel")).status_code == 422
    assert (await api.get("/run", params={"run_id": "x"})).json()["detail"][0]["loc"] == ["query", "run_id"]
    assert (await api.get("/run")).json()["detail"][0]["type"] == "missing"

    bodies = [
        ({"deployment_id": "nope"}, ["body", "deployment_id"], "uuid_parsing"),
        ({"inputs": {}}, ["body", "deployment_id"], "missing"),
        ({"deployment_id": DEPLOYMENTS["text2img"], "gpu": "RTX4090"}, ["body", "gpu"], "enum"),
        ({"deployment_id": DEPLOYMENTS["text2img"], "inputs": []}, ["body", "inputs"], "dict_type"),
        ([1, 2], ["body"], "model_attributes_type"),
    ]
    for body, loc, kind in bodies:
        response = await api.post("/run/deployment/queue", json=body)
        assert response.status_code == 422, body
        assert (response.json()["detail"][0]["loc"], response.json()["detail"][0]["type"]) == (loc, kind)
    broken = await api.post("/run/deployment/queue", content=b"{nope", headers={"content-type": "application/json"})
    assert broken.status_code == 422 and broken.json()["detail"][0]["type"] == "json_invalid"


async def test_quirks(api, emulator):
    # Cancel answers every error with a 500, not-found and classic machines (no Modal call id) alike.
    missing = await api.post("/run/00000000-0000-4000-8000-000000000000/cancel")
    body = {"detail": "Error cancel function 404: Run not found or has no modal function call ID"}
    assert (missing.status_code, missing.json()) == (500, body)
    classic = await queue(api, "upscale-classic")
    assert (await api.post(f"/run/{classic}/cancel")).status_code == 500

    # GET /deployment/{id} swallows its 404 into a 500; so is another tenant's deployment.
    for deployment_id in ("00000000-0000-4000-8000-000000000000", DEPLOYMENTS["other-tenant"], "xyz"):
        response = await api.get(f"/deployment/{deployment_id}")
        assert (response.status_code, response.json()) == (500, {"detail": "Internal server error"})

    # Unknown input keys are accepted and recorded; the deployment's GPU wins over the request's.
    run_id = await queue(api, "upscale", inputs={"input_scale": 0.75, "no_such_input": "x"}, gpu="T4")
    run = (await api.get(f"/run/{run_id}")).json()
    assert run["workflow_inputs"] == {"input_scale": 0.75, "no_such_input": "x"}
    assert run["gpu"] == "A100-80GB"
    own = (await api.get(f"/run/{await queue(api, 'img2img', gpu='T4')}")).json()
    assert own["gpu"] == "T4"  # this deployment has no GPU of its own

    # Queueing another tenant's deployment, or one whose workflow is deleted, is a 404.
    for name, detail in (("other-tenant", "Deployment not found"), ("deleted-workflow", "Workflow not found")):
        response = await api.post("/run/deployment/queue", json={"deployment_id": DEPLOYMENTS[name]})
        assert (response.status_code, response.json()) == (404, {"detail": detail})
    async with emulator.client(emulator.other_api_key) as other:
        assert (await other.get(f"/run/{run_id}")).status_code == 403
        assert (await other.post(f"/run/{run_id}/cancel")).status_code == 500
        assert [d["id"] for d in (await other.get("/deployments")).json()] == [DEPLOYMENTS["other-tenant"]]

    # data:image/png;base64 inputs are stored and replaced by a URL the emulator serves.
    data = png(4, 4, (1, 2, 3))
    encoded = "data:image/png;base64," + base64.b64encode(data).decode()
    run = (await api.get(f"/run/{await queue(api, 'img2img', inputs={'input_image': encoded})}")).json()
    url = run["workflow_inputs"]["input_image"]
    assert url.startswith(emulator.root_url + "/files/inputs/img_") and url.endswith(".png")
    async with httpx.AsyncClient(trust_env=False) as plain:
        assert (await plain.get(url)).content == data


async def test_deployment_lists_split_fluid_and_carry_versions_and_types(api):
    plain = (await api.get("/deployments")).json()
    fluid = (await api.get("/deployments", params={"is_fluid": "true"})).json()
    assert [d["id"] for d in fluid] == [DEPLOYMENTS["img2vid"]] and fluid[0]["modal_image_id"]
    assert DEPLOYMENTS["img2vid"] not in {d["id"] for d in plain}
    assert DEPLOYMENTS["deleted-workflow"] not in {d["id"] for d in plain}
    assert all(not d["modal_image_id"] for d in plain)
    updated = [d["updated_at"] for d in plain]
    assert updated == sorted(updated, reverse=True)
    staging = (await api.get("/deployments", params={"environment": "staging"})).json()
    assert {d["environment"] for d in staging} == {"staging"}
    assert (await api.get("/deployments", params={"environment": "moon"})).status_code == 422

    text2img = (await api.get(f"/deployment/{DEPLOYMENTS['text2img']}")).json()
    assert text2img["workflow"] == {"id": WORKFLOWS["text2img"], "name": "text2img", "cover_url": None}
    assert text2img["machine"] == {"id": MACHINES["StationthisHun"], "name": "StationthisHun"}
    assert text2img["version"]["version"] == 2 and "workflow_api" in text2img["version"]
    inputs = {item["input_id"]: item for item in text2img["input_types"]}
    assert set(inputs) == {
        "input_prompt", "input_negative", "input_steps", "input_width", "input_height", "input_cfg",
        "input_sampler", "input_checkpoint", "input_lora", "input_lora_strength",
    }  # fmt: skip  # not the wired input_id (node 26), not ExternalSeed (absent from the V2 list)
    assert inputs["input_sampler"]["enum_options"] == ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "ddim"]
    assert (inputs["input_steps"]["type"], inputs["input_steps"]["default_value"]) == ("integer", 20)
    assert (inputs["input_cfg"]["type"], inputs["input_lora_strength"]["max_value"]) == ("float", 1)
    assert inputs["input_prompt"]["display_name"] == "Prompt" and inputs["input_lora"]["type"] == "string"
    assert text2img["output_types"] == [{"class_type": "ComfyDeployStdOutputImage", "output_id": "output_image"}]
    upscale = (await api.get(f"/deployment/{DEPLOYMENTS['upscale']}")).json()
    assert {i["input_id"]: i["type"] for i in upscale["input_types"]}["input_face_restore"] == "boolean"


async def test_machines_and_workflows(api):
    machines = (await api.get("/machines")).json()
    assert MACHINES["deleted"] in {m["id"] for m in machines}  # deleted machines are listed unless excluded
    live = (await api.get("/machines", params={"is_deleted": "false"})).json()
    assert MACHINES["deleted"] not in {m["id"] for m in live}
    assert {m["status"] for m in machines} >= {"ready", "building", "error"}
    machine = (await api.get(f"/machine/{MACHINES['fluxdev']}")).json()
    assert (machine["name"], machine["gpu"], machine["concurrency_limit"]) == ("fluxdev", "A100", 2)
    missing = await api.get("/machine/00000000-0000-4000-8000-000000000000")
    assert (missing.status_code, missing.json()) == (404, {"detail": "Machine not found"})

    workflows = (await api.get("/workflows")).json()
    assert workflows[0]["name"] == "text2img" and workflows[0]["pinned"] is True
    assert {"text2img", "img2img", "inpaint", "upscale", "img2vid", "controlnet", "toon", "lora_train"} == {
        w["name"] for w in workflows
    }
    workflow = (await api.get(f"/workflow/{WORKFLOWS['text2img']}", params={"limit": 1})).json()
    assert [v["version"] for v in workflow["versions"]] == [2] and workflow["versions"][0]["workflow_api"]
    versions = (await api.get(f"/workflow/{WORKFLOWS['text2img']}/versions")).json()
    assert [v["version"] for v in versions] == [2, 1]
    assert (await api.get(f"/workflow-version/{versions[1]['id']}")).json()["comment"] == "initial version"
    gone = await api.get("/workflow-version/00000000-0000-4000-8000-000000000000")
    assert gone.json() == {"detail": "Workflow version not found or you don't have access to it"}


async def test_create_workflow_version_and_deployment(api):
    graph = {"1": {"class_type": "ComfyUIDeployExternalText", "inputs": {"input_id": "input_prompt"}}}
    bad = await api.post("/workflow", json={"name": "x", "workflow_json": "{nope"})
    assert (bad.status_code, bad.json()) == (400, {"error": "Invalid JSON format"})
    created = await api.post(
        "/workflow",
        json={
            "name": "mine",
            "workflow_json": "{}",
            "workflow_api": json.dumps(graph),
            "machine_id": MACHINES["TRIPO"],
        },
    )
    workflow_id = created.json()["workflow_id"]
    assert created.json()["machine_id"] == MACHINES["TRIPO"]
    version = (await api.post(f"/workflow/{workflow_id}/version", json={"workflow": {}, "workflow_api": graph})).json()
    assert version["version"] == 2
    missing = await api.post(f"/workflow/{MACHINES['TRIPO']}/version", json={"workflow": {}, "workflow_api": graph})
    assert (missing.status_code, missing.json()) == (500, {"detail": "404: Workflow not found"})
    preview = [d for d in (await api.get("/deployments", params={"environment": "preview"})).json()]
    assert any(d["workflow_id"] == workflow_id for d in preview)  # a machine id auto-creates a preview deployment

    body = {"workflow_id": workflow_id, "workflow_version_id": version["id"], "environment": "production"}
    assert (await api.post("/deployment", json=body)).status_code == 400  # neither machine id
    first = (await api.post("/deployment", json={**body, "machine_id": MACHINES["TRIPO"]})).json()
    again = (await api.post("/deployment", json={**body, "machine_id": MACHINES["fluxdev"]})).json()
    assert first["id"] == again["id"] and again["machine"]["name"] == "fluxdev"  # upsert by (workflow, env)
    assert again["input_types"][0]["input_id"] == "input_prompt"
    run = await poll(api, await queue_id(api, first["id"]))
    assert run["status"] == "success"


async def queue_id(api: httpx.AsyncClient, deployment_id: str) -> str:
    response = await api.post("/run/deployment/queue", json={"deployment_id": deployment_id})
    run_id: str = response.json()["run_id"]
    return run_id


async def test_upload(api, emulator):
    data = png(2, 2, (9, 9, 9))
    response = await api.post("/file/upload", files={"file": ("photo.png", data, "image/png")})
    body = response.json()
    assert body["message"] == "File uploaded successfully" and body["file_name"] == "photo.png"
    assert body["file_id"].startswith("img_") and len(body["file_id"]) == 20
    assert set(body["file_id"][4:]) <= set(FILE_ID_ALPHABET)
    assert body["file_url"] == f"{emulator.root_url}/files/inputs/{body['file_id']}.png"
    async with httpx.AsyncClient(trust_env=False) as plain:
        assert (await plain.get(body["file_url"])).content == data
    kinds = {"clip.mp4": "vid_", "a.zip": "zip_", "voice.mp3": "audio_", "doc.pdf": "file_"}
    for name, prefix in kinds.items():
        assert (await api.post("/file/upload", files={"file": (name, b"x")})).json()["file_id"].startswith(prefix)
    unsupported = await api.post("/file/upload", files={"file": ("notes.txt", b"x")})
    assert (unsupported.status_code, unsupported.json()) == (400, {"detail": "Unsupported file type"})
    assert (await api.post("/file/upload", json={})).status_code == 422

    small = await start_for_tests(max_upload_bytes=10)
    try:
        async with small.client() as client:
            too_big = await client.post("/file/upload", files={"file": ("big.png", b"x" * 11)})
        assert (too_big.status_code, too_big.json()) == (400, {"detail": "File size exceeds 250MB limit"})
    finally:
        await small.close()


async def test_legacy_aliases(api):
    created = await api.post("/run", json={"deployment_id": DEPLOYMENTS["inpaint"], "inputs": {"input_prompt": "x"}})
    run_id = created.json()["run_id"]
    legacy = (await api.get("/run", params={"run_id": run_id})).json()
    assert legacy["id"] == run_id and set(legacy) == RUN_KEYS
    batch = (await api.post("/run", json={"deployment_id": DEPLOYMENTS["inpaint"], "batch_number": 2})).json()
    assert batch["status"] == "success" and set(batch) == {"status", "batch_id"}


# --- webhooks ------------------------------------------------------------------------------------------


async def test_webhook_status_events_carry_all_outputs(api, emulator, receiver):
    run_id = await queue(api, "text2img", webhook=receiver.url + "?token=abc")
    await poll(api, run_id)
    await eventually(lambda: _async(len(receiver.events(run_id)) == 4))
    events = receiver.events(run_id)
    assert [(e["event_type"], e["status"]) for e in events] == [
        ("run.updated", s) for s in ("queued", "started", "running", "success")
    ]
    assert set(events[0]) == {"event_type", "status", "live_status", "progress", "run_id", "outputs"}
    assert events[0]["outputs"] == [] and len(events[-1]["outputs"]) == 1
    assert set(events[-1]["outputs"][0]) == OUTPUT_KEYS
    assert events[-1]["progress"] == 1.0
    assert {c["query"] for c in receiver.calls} == {"token=abc"}  # the URL's query is kept
    assert receiver.calls[0]["headers"]["content-type"] == "application/json"
    assert all(d["state"] == "delivered" for d in await emulator.webhooks(run_id))


async def test_intermediate_updates_only_when_asked(api, receiver):
    run_id = await queue(api, "img2img", webhook=receiver.url, webhook_intermediate_status=True)
    await poll(api, run_id)
    await eventually(lambda: _async(receiver.events(run_id) and receiver.events(run_id)[-1]["status"] == "success"))
    events = receiver.events(run_id)
    running = [e for e in events if e["status"] == "running"]
    assert len(running) > 2  # the status change plus one per executed node
    assert [e["progress"] for e in running] == sorted(e["progress"] for e in running)
    assert {e["live_status"] for e in running[1:]} >= {"Executing KSampler", "Executing VAEDecode"}
    assert all(e["outputs"] == [] for e in running)


async def test_run_output_events_only_with_target_events(api, receiver):
    plain = await queue(api, "lora_train", webhook=receiver.url)
    targeted = await queue(api, "img2img", webhook=receiver.url + "?target_events=run.output")
    await poll(api, plain)
    await poll(api, targeted)

    async def settled() -> bool:
        return all(receiver.events(r) and receiver.events(r)[-1]["status"] == "success" for r in (plain, targeted))

    await eventually(settled)
    assert {e["event_type"] for e in receiver.events(plain)} == {"run.updated"}
    outputs = [e for e in receiver.events(targeted) if e["event_type"] == "run.output"]
    assert len(outputs) == 1 and len(outputs[0]["outputs"]) == 1 and outputs[0]["status"] == "running"
    assert {c["query"] for c in receiver.calls if c["json"]["run_id"] == targeted} == {"target_events=run.output"}
    assert [e["status"] for e in receiver.events(targeted) if e["event_type"] == "run.updated"][-1] == "success"


async def test_webhook_retries_three_times(api, emulator, receiver):
    receiver.status = 500
    run_id = await queue(api, "img2img", webhook=receiver.url)
    await poll(api, run_id)

    async def all_failed() -> bool:
        log = await emulator.webhooks(run_id)
        return len(log) == 4 and all(d["state"] == "failed" for d in log)

    await eventually(all_failed)
    assert len(receiver.events(run_id)) == 12
    assert all([a["status_code"] for a in d["attempts"]] == [500] * 3 for d in await emulator.webhooks(run_id))

    receiver.status, receiver.replies = 200, [503]
    second = await queue(api, "img2img", webhook=receiver.url)
    await poll(api, second)
    await eventually(lambda: _async(len(receiver.events(second)) == 5))
    first_event = (await emulator.webhooks(second))[0]
    assert (first_event["state"], [a["status_code"] for a in first_event["attempts"]]) == ("delivered", [503, 200])

    closed = await queue(api, "img2img", webhook="http://127.0.0.1:9/hook")  # connection refused

    async def refused() -> bool:
        log = await emulator.webhooks(closed)
        return len(log) == 4 and all(d["state"] == "failed" for d in log)

    await eventually(refused)
    assert all(len(d["attempts"]) == 3 and d["attempts"][0]["error"] for d in await emulator.webhooks(closed))


async def test_webhook_faults_duplicate_reorder_drop(api, emulator, receiver):
    await emulator.set_faults(webhook_duplicate=1.0)
    duplicated = await queue(api, "img2img", webhook=receiver.url)
    await poll(api, duplicated)
    await eventually(lambda: _async(len(receiver.events(duplicated)) == 8))
    statuses = [e["status"] for e in receiver.events(duplicated)]
    assert statuses == [s for s in ("queued", "started", "running", "success") for _ in range(2)]

    await emulator.set_faults(webhook_reorder=1.0)
    reordered = await queue(api, "img2img", webhook=receiver.url)
    await poll(api, reordered)
    await eventually(lambda: _async(len(receiver.events(reordered)) == 4))
    assert [e["status"] for e in receiver.events(reordered)] == ["started", "queued", "success", "running"]

    await emulator.set_faults(webhook_drop=1.0)
    dropped = await queue(api, "img2img", webhook=receiver.url)
    await poll(api, dropped)
    assert [d["state"] for d in await emulator.webhooks(dropped)] == ["dropped"] * 4
    assert receiver.events(dropped) == []


# --- fault injection -----------------------------------------------------------------------------------


async def test_error_faults(api, emulator):
    await emulator.set_faults(next_errors=[{"route": "queue", "status": 429, "retry_after": 7}])
    limited = await api.post("/run/deployment/queue", json={"deployment_id": DEPLOYMENTS["text2img"]})
    assert (limited.status_code, limited.headers["retry-after"]) == (429, "7")
    assert limited.json() == {"detail": "Too Many Requests"}
    assert (await api.post("/run/deployment/queue", json={"deployment_id": DEPLOYMENTS["text2img"]})).status_code == 200

    await emulator.set_faults(error_rates={"run": {"503": 1.0}})
    unavailable = await api.get("/run/00000000-0000-4000-8000-000000000000")
    assert (unavailable.status_code, unavailable.json()) == (503, {"detail": "Service Unavailable"})
    assert "retry-after" not in unavailable.headers
    assert (await api.get("/deployments")).status_code == 200  # other route groups are untouched

    await emulator.set_faults(next_errors=[{"route": "run", "status": 503, "retry_after": 2}])
    paused = await api.get("/run/00000000-0000-4000-8000-000000000000")
    assert (paused.status_code, paused.headers["retry-after"]) == (503, "2")

    await emulator.set_faults(next_errors=[{"route": "*", "status": 500}])
    crashed = await api.get("/machines")
    assert (crashed.status_code, crashed.text) == (500, "Internal Server Error")

    await emulator.set_faults(latency_ms=150)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await api.get("/machines")).status_code == 200
    assert loop.time() - started >= 0.15

    async with httpx.AsyncClient(trust_env=False) as plain:
        bad = await plain.post(f"{emulator.root_url}/_emulator/faults", json={"nope": 1})
    assert bad.status_code == 400 and "nope" in bad.json()["detail"]


async def test_dropped_connection_and_lost_queue_response(api, emulator):
    await emulator.set_faults(next_errors=[{"route": "deployments", "action": "drop"}])
    with pytest.raises(httpx.TransportError):
        await api.get("/deployments")
    assert (await api.get("/deployments")).status_code == 200

    await emulator.set_faults(
        next_errors=[
            {"route": "queue", "action": "lose_response"},
            {"route": "queue", "action": "lose_response", "status": 502},
        ]
    )
    with pytest.raises(httpx.TransportError):
        await api.post("/run/deployment/queue", json={"deployment_id": DEPLOYMENTS["toon"]})
    bad_gateway = await api.post("/run/deployment/queue", json={"deployment_id": DEPLOYMENTS["toon"]})
    assert (bad_gateway.status_code, bad_gateway.text) == (502, "Bad Gateway")
    runs = [r for r in await emulator.runs() if r["deployment_id"] == DEPLOYMENTS["toon"]]
    assert len(runs) == 2  # both runs exist although neither answer arrived: the "outcome unknown" case
    assert all(set(r) >= RUN_KEYS for r in runs)

    stats = await emulator.stats()
    assert stats["routes"]["POST /api/run/deployment/queue"] == 2 and stats["groups"]["deployments"] == 2
    await emulator.reset()
    assert await emulator.runs() == [] and (await emulator.stats())["total"] == 0


async def test_main_requires_api_keys():
    env = python_env()
    env.pop("EMULATOR_API_KEYS", None)
    done = subprocess.run(
        [PYTHON, "-m", "emulator"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 2 and "EMULATOR_API_KEYS" in done.stderr
    env["EMULATOR_API_KEYS"] = "k"
    env["EMULATOR_LISTEN_ADDR"] = "0.0.0.0:8188"
    done = subprocess.run(
        [PYTHON, "-m", "emulator"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 2 and "EMULATOR_LISTEN_ADDR" in done.stderr


# --- deployment runs ------------------------------------------------------------------------------------

DEPLOYMENT_RUN_KEYS = {
    "id", "status", "created_at", "started_at", "ended_at", "workflow_id", "workflow_version_id", "machine_id",
    "gpu", "origin", "user_id", "deployment_id", "duration",
}  # fmt: skip


async def test_deployment_runs_newest_first_by_offset_with_upstream_shapes(api, emulator):
    deployment = DEPLOYMENTS["text2img-preview"]
    first = await queue(api, "text2img-preview")
    second = await queue(api, "text2img-preview")
    await queue(api, "img2img")  # another deployment's run is not listed
    body = (await api.get(f"/deployment/{deployment}/runs")).json()
    assert body["meta"] == {"totalRowCount": 0, "filterRowCount": 0, "chartData": []}
    assert [row["id"] for row in body["data"]] == [second, first]
    row = body["data"][0]
    assert set(row) == DEPLOYMENT_RUN_KEYS
    assert (row["deployment_id"], row["workflow_id"], row["origin"]) == (deployment, WORKFLOWS["text2img"], "api")
    assert not row["created_at"].endswith("Z")  # built by hand with isoformat(), unlike the run model
    params = {"limit": 1, "offset": 1, "filter_user_runs": "false"}
    assert [r["id"] for r in (await api.get(f"/deployment/{deployment}/runs", params=params)).json()["data"]] == [first]

    await emulator.wait_run(first)
    finished = next(r for r in (await api.get(f"/deployment/{deployment}/runs")).json()["data"] if r["id"] == first)
    assert finished["status"] == "success" and float(finished["duration"]) > 0  # ended_at - started_at, as text

    # Every failure is a 500: an unknown id, another tenant's deployment, a malformed id.
    for deployment_id in ("00000000-0000-4000-8000-000000000000", DEPLOYMENTS["other-tenant"], "xyz"):
        response = await api.get(f"/deployment/{deployment_id}/runs")
        assert response.status_code == 500 and response.json()["detail"].startswith("Internal server error: ")
    async with emulator.client(emulator.other_api_key) as other:
        assert (await other.get(f"/deployment/{deployment}/runs")).status_code == 500
    assert (await emulator.stats())["routes"]["GET /api/deployment/{deployment_id}/runs"] == 7
