"""WorkflowsService integration tests: real Redis, the ComfyUI Deploy emulator, real gRPC, a fake clock.

The rules under test are those of protos/stationthis/workflows/v1/*.proto (normative). Time-to-live
expiry runs on a fake clock (advanced, never slept); "answered while the refresh is still running" is
shown with a gate that holds the upstream listing, not with timings. Upstream request counts come from
the emulator's /_emulator/stats.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import uuid
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2

from comfydeploy.models import Deployment, Machine
from common.errors import InvalidArgument
from emulator.testing import DEPLOYMENTS, MACHINES, WORKFLOWS
from services.workflows import catalog, convert, inputs
from services.workflows.catalog import CatalogIndex, MalformedListing, Routing, standardize
from services.workflows.config import LEGACY_ALIASES, WorkflowsConfig, parse_pairs
from services.workflows.server import SERVICE_NAME, build
from stationthis.type.v1 import gpu_pb2
from stationthis.workflows.v1 import workflows_service_pb2_grpc
from tests.conftest import wait_serving
from tests.workflows_helpers import (
    FakeClock,
    GatedClient,
    Replica,
    Upstream,
    W,
    by_id,
    create_deployed_workflow,
    create_deployment,
    create_workflow,
    eventually,
    fails,
    listings,
    plain,
    rpc,
    simple_graph,
    violations,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
PROD, STAGING, PREVIEW = W.ENVIRONMENT_PRODUCTION, W.ENVIRONMENT_STAGING, W.ENVIRONMENT_PREVIEW
G = gpu_pb2
NAMES = ["controlnet", "img2img", "img2vid", "inpaint", "lora_train", "text2img", "toon", "upscale"]
MACHINE_GPU = {"StationthisHun": G.GPU_TYPE_A10G, "inpainter": G.GPU_TYPE_L4, "fluxdev": G.GPU_TYPE_A100}
MACHINE_GPU["TRIPO"] = G.GPU_TYPE_L40S
MISSING = object()
X = "ComfyUIDeployExternal"
DEFAULT_ALIASES = parse_pairs(LEGACY_ALIASES)


def dep(suffix: str) -> str:
    return f"d4000000-0000-4000-8000-0000000000{suffix}"


def ver(suffix: str) -> str:
    return f"c3000000-0000-4000-8000-000000000{suffix}"


# The fixture deployments: id suffix -> (workflow, environment, machine, version suffix, fluid, own gpu).
DEPLOYED: dict[str, tuple[str, int, str, str, bool, int]] = {
    "01": ("text2img", PROD, "StationthisHun", "012", False, 0),
    "02": ("text2img", STAGING, "StationthisHun", "012", False, 0),
    "03": ("img2img", PROD, "fluxdev", "021", False, 0),
    "04": ("inpaint", PROD, "inpainter", "031", False, 0),
    "05": ("upscale", PROD, "fluxdev", "041", False, G.GPU_TYPE_A100_80GB),
    "06": ("img2vid", PROD, "TRIPO", "051", True, G.GPU_TYPE_L40S),
    "07": ("controlnet", PROD, "fluxdev", "061", False, 0),
    "08": ("toon", PROD, "TRIPO", "071", False, 0),
    "09": ("lora_train", PROD, "StationthisHun", "081", False, G.GPU_TYPE_H100),
    "10": ("img2img", STAGING, "fluxdev", "021", False, 0),
    "11": ("img2vid", STAGING, "TRIPO", "051", False, 0),
    "12": ("upscale", STAGING, "classic", "041", False, 0),
    "13": ("text2img", PREVIEW, "StationthisHun", "011", False, 0),
}
DESCRIPTIONS = {
    "text2img": "text2img production",
    "upscale": "upscale: its own GPU overrides the request's",
    "img2vid": "img2vid: fluid deployment (modal_image_id)",
    "lora_train": "lora_train",
}
# (class_type, OutputType, output_id when the node names one) per workflow, in node order.
OUTPUTS: dict[str, list[tuple[str, int, str | None]]] = {
    "text2img": [("ComfyDeployStdOutputImage", W.OUTPUT_TYPE_IMAGE, "output_image")],
    "img2img": [("ComfyDeployOutputImage", W.OUTPUT_TYPE_IMAGE, "output_images")],
    "controlnet": [("ComfyDeployOutputImage", W.OUTPUT_TYPE_IMAGE, "output_images")],
    "inpaint": [("SaveImage", W.OUTPUT_TYPE_IMAGE, None)],  # PreviewImage is not an output
    "upscale": [("SaveImage", W.OUTPUT_TYPE_IMAGE, None)],
    "img2vid": [("VHS_VideoCombine", W.OUTPUT_TYPE_GIF, None)],  # format image/gif
    "toon": [("VHS_VideoCombine", W.OUTPUT_TYPE_GIF, None)],
    "lora_train": [
        ("ShowText|pysssss", W.OUTPUT_TYPE_TEXT, None),
        ("ComfyDeployOutputFile", W.OUTPUT_TYPE_FILE, "output_lora"),
    ],
}


def spec(item: W.WorkflowInput) -> tuple[Any, ...]:
    """One input as (id, type, class, default or MISSING, required, min, max, step, options, label, help)."""
    return (
        item.input_id,
        item.type,
        item.class_type,
        plain(item.default_value) if item.HasField("default_value") else MISSING,
        item.required,
        item.min_value if item.HasField("min_value") else None,
        item.max_value if item.HasField("max_value") else None,
        item.step if item.HasField("step") else None,
        list(item.enum_options),
        item.display_name,
        item.description,
    )


def inp(
    input_id: str,
    kind: int,
    cls: str,
    default: Any = MISSING,
    *,
    low: float | None = None,
    high: float | None = None,
    step: float | None = None,
    options: tuple[str, ...] = (),
    label: str = "",
    help_text: str = "",
) -> tuple[Any, ...]:
    """What ``spec`` should give: required exactly when there is no default; label defaults to the id."""
    required = default is MISSING
    return (input_id, kind, X + cls, default, required, low, high, step, list(options), label or input_id, help_text)


def text(input_id: str, default: Any, label: str, help_text: str = "") -> tuple[Any, ...]:
    return inp(input_id, W.INPUT_TYPE_TEXT, "Text", default, label=label, help_text=help_text)


def integer(input_id: str, default: float, label: str, cls: str = "NumberInt", **bounds: Any) -> tuple[Any, ...]:
    return inp(input_id, W.INPUT_TYPE_INTEGER, cls, default, label=label, **bounds)


SEED = inp(
    "input_seed", W.INPUT_TYPE_SEED, "Seed", -1.0, low=1.0, high=4294967295.0, label="Seed", help_text="-1 = random"
)


@pytest.fixture
async def make_replica(redis_url, start_service, emulator):
    """Start one more WorkflowsService instance (a replica: same Redis, same emulator, same fake clock).

    ``upstream``: route its deployment listings through a shared ``Upstream`` gate; ``serving``: wait
    until health is SERVING (a replica that cannot load a catalog never is)."""
    clock = FakeClock()
    started: list[Any] = []
    gates: list[Upstream] = []

    async def make(
        upstream: Upstream | None = None,
        client_options: dict[str, Any] | None = None,
        serving: bool = True,
        **env: str,
    ):
        environ = {
            "REDIS_URL": redis_url,
            "COMFYDEPLOY_API_URL": emulator.base_url,
            "COMFYDEPLOY_API_KEY": emulator.api_key,
            **env,
        }

        async def builder(config: WorkflowsConfig) -> Any:
            client = None
            if upstream is not None:
                gates.append(upstream)
                client = GatedClient(
                    config.comfydeploy_api_url, config.comfydeploy_api_key, upstream, **(client_options or {})
                )
            app = await build(config, clock=clock, upstream=client)
            if client is not None:
                app.service.on_stop = [*app.service.on_stop, client.aclose]
            return app

        running = await start_service(builder, WorkflowsConfig, environ)
        started.append(running)
        if serving:
            await wait_serving(running)
        return Replica(workflows_service_pb2_grpc.WorkflowsServiceStub(running.channel), clock, running, emulator)

    yield make
    for upstream in gates:  # a test that failed with its gate closed must not hang the teardown
        upstream.gate.set()
    for running in started:  # before the emulator goes away under a refresh
        await running.server.stop(0)


@pytest.fixture
async def replica(make_replica) -> Replica:
    return await make_replica()


async def refresh(replica: Replica, request_id: str = "") -> rpc.RefreshCatalogResponse:
    """RefreshCatalog a moment later on the fake clock (a refresh finished at the very instant a
    RefreshCatalog starts counts as that refresh, so the frozen clock must move first)."""
    replica.clock.advance(1)
    return await replica.refresh(request_id)


# --- 1. catalog contents ------------------------------------------------------------------------------


async def test_catalog_holds_the_fixture_workflows(replica, emulator):
    listed = await replica.list_all()
    # The other tenant's workflow and the deleted workflow's deployment are not ours.
    assert [w.name for w in listed] == NAMES
    for workflow in listed:
        name = workflow.name
        assert workflow.workflow_id == WORKFLOWS[name]
        assert workflow.display_name == name  # as written upstream
        assert workflow.environment == PROD  # the default view: production
        assert workflow.description == DESCRIPTIONS.get(name, "")
        ours = sorted((s for s, d in DEPLOYED.items() if d[0] == name), reverse=True)  # most recently updated first
        assert [d.deployment_id for d in workflow.deployments] == [dep(s) for s in ours]
        for deployment in workflow.deployments:
            _, environment, machine, version, fluid, own_gpu = DEPLOYED[deployment.deployment_id[-2:]]
            assert deployment.environment == environment
            assert deployment.machine_id == MACHINES[machine]
            assert deployment.workflow_version_id == ver(version)
            assert deployment.is_fluid is fluid
            assert deployment.update_time.ToJsonString() == f"2025-10-12T12:{deployment.deployment_id[-2:]}:00Z"
            if own_gpu:
                assert deployment.gpu == own_gpu
        production = next(s for s in ours if DEPLOYED[s][1] == PROD)
        _, _, machine, version, _, own_gpu = DEPLOYED[production]
        assert workflow.version.workflow_version_id == ver(version)
        # Where the production deployment runs: its machine, and its own GPU else the machine's.
        assert (workflow.machine_id, workflow.machine_name) == (MACHINES[machine], machine)
        assert workflow.gpu == (own_gpu or MACHINE_GPU[machine])
        outputs = [(o.class_type, o.type) for o in workflow.outputs]
        assert outputs == [(c, t) for c, t, _ in OUTPUTS[name]]
        for output, (_, _, output_id) in zip(workflow.outputs, OUTPUTS[name], strict=True):
            if output_id:
                assert output.output_id == output_id
    text2img = next(w for w in listed if w.name == "text2img")
    assert (text2img.version.version, text2img.version.create_time.ToJsonString()) == (2, "2025-10-08T11:00:00Z")
    assert list(text2img.aliases) == ["make", "makeimage"]
    assert {w.name: list(w.aliases) for w in listed if w.aliases} == {
        "text2img": ["make", "makeimage"],
        "lora_train": ["train"],
        "toon": ["tooncraft"],
        "img2vid": ["video"],
    }
    # The fluid deployment (listed upstream only with is_fluid=true) is in the catalog, and is img2vid's default.
    img2vid = await replica.get(WORKFLOWS["img2vid"])
    assert [(d.deployment_id, d.is_fluid, d.gpu) for d in img2vid.deployments if d.is_fluid] == [
        (DEPLOYMENTS["img2vid"], True, G.GPU_TYPE_L40S)
    ]
    assert (await replica.resolve("img2vid")).deployment.deployment_id == DEPLOYMENTS["img2vid"]
    # Each environment's view serves its own version.
    preview = await replica.get(WORKFLOWS["text2img"], PREVIEW)
    assert (preview.environment, preview.version.workflow_version_id, preview.version.version) == (
        PREVIEW,
        ver("011"),
        1,
    )
    staging = await replica.get(WORKFLOWS["upscale"], STAGING)
    assert (staging.environment, staging.version.workflow_version_id) == (STAGING, ver("041"))


async def test_deployment_gpu_falls_back_to_its_machine(replica):
    """WorkflowDeployment.gpu: the deployment's own gpu, else its machine's, else UNSPECIFIED."""
    text2img = await replica.get(WORKFLOWS["text2img"])
    assert {d.deployment_id: d.gpu for d in text2img.deployments} == {
        dep("01"): G.GPU_TYPE_A10G,
        dep("02"): G.GPU_TYPE_A10G,
        dep("13"): G.GPU_TYPE_A10G,
    }
    upscale = await replica.get(WORKFLOWS["upscale"])
    assert {d.deployment_id: d.gpu for d in upscale.deployments} == {
        dep("05"): G.GPU_TYPE_A100_80GB,  # its own
        dep("12"): G.GPU_TYPE_UNSPECIFIED,  # the classic machine reports no gpu
    }


async def test_unnamed_outputs_are_node_ids(replica):
    listed = {w.name: w for w in await replica.list_all()}
    assert [o.output_id for o in listed["inpaint"].outputs] == ["node_14"]
    assert [o.output_id for o in listed["upscale"].outputs] == ["node_11"]
    assert [o.output_id for o in listed["img2vid"].outputs] == ["node_12"]
    assert [o.output_id for o in listed["lora_train"].outputs] == ["node_15", "output_lora"]


# --- 2. inputs ----------------------------------------------------------------------------------------


async def test_fixture_inputs_with_their_defaults(replica, emulator):
    text2img = await replica.get(WORKFLOWS["text2img"])
    sampler_options = ("euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "ddim")
    assert [spec(i) for i in text2img.inputs] == [
        text("input_prompt", "a cozy cabin in a snowy forest at dusk, warm light", "Prompt", "What to draw"),
        text("input_negative", "blurry, lowres, watermark, text", "Negative prompt"),
        integer("input_steps", 20.0, "Steps"),
        integer("input_width", 1024.0, "Width"),
        integer("input_height", 1024.0, "Height"),
        inp("input_cfg", W.INPUT_TYPE_NUMBER, "Number", 7.0, label="CFG scale"),
        SEED,
        inp("input_sampler", W.INPUT_TYPE_ENUM, "Enum", "euler_ancestral", options=sampler_options, label="Sampler"),
        inp(
            "input_checkpoint",
            W.INPUT_TYPE_CHECKPOINT,
            "Checkpoint",
            "sd_xl_base_1.0.safetensors",
            label="Checkpoint",
            help_text="Base model file",
        ),
        # A LoRA node with an empty lora_url and a default_lora_name defaults to "" (its own LoRA).
        inp("input_lora", W.INPUT_TYPE_LORA, "Lora", "", label="LoRA", help_text="URL of a .safetensors LoRA"),
        inp("input_lora_strength", W.INPUT_TYPE_NUMBER, "NumberSlider", 0.8, low=0.0, high=1.0, label="LoRA strength"),
    ]
    # Node 26 has its input_id wired to node 12: not an input.
    assert "cinematic lighting" not in str(text2img.inputs)

    preview = await replica.get(WORKFLOWS["text2img"], PREVIEW)  # version 1, node order 8, 9, 10, 11
    assert [i.input_id for i in preview.inputs] == ["input_prompt", "input_negative", "input_seed", "input_steps"]

    inpaint = by_id((await replica.get(WORKFLOWS["inpaint"])).inputs)
    image_url = f"{emulator.root_url}/files/inputs/img_MASi45ub7Qe4ZE36.png"
    assert spec(inpaint["input_image"]) == inp("input_image", W.INPUT_TYPE_IMAGE, "Image", image_url, label="Image")
    assert spec(inpaint["input_mask"]) == inp(  # ImageAlpha without a default: required
        "input_mask", W.INPUT_TYPE_IMAGE, "ImageAlpha", label="Mask", help_text="White = repaint"
    )
    assert spec(inpaint["input_denoise"]) == inp(
        "input_denoise", W.INPUT_TYPE_NUMBER, "NumberSlider", 1.0, low=0.0, high=1.0, label="Denoise"
    )
    async with httpx.AsyncClient(trust_env=False) as http:  # the default image is really served
        assert (await http.get(image_url)).status_code == 200

    upscale = by_id((await replica.get(WORKFLOWS["upscale"])).inputs)
    assert spec(upscale["input_face_restore"]) == inp(
        "input_face_restore", W.INPUT_TYPE_BOOLEAN, "Boolean", False, label="Restore faces"
    )
    assert upscale["input_face_restore"].default_value.WhichOneof("kind") == "bool_value"
    assert spec(upscale["input_scale"])[3:7] == (0.5, False, 0.25, 1.0)
    assert list(upscale["input_upscale_model"].enum_options) == [
        "4x-UltraSharp.pth",
        "RealESRGAN_x4plus.pth",
        "4x_NMKD-Siax_200k.pth",
    ]

    lora = by_id((await replica.get(WORKFLOWS["lora_train"])).inputs)
    assert spec(lora["input_images"]) == inp(  # images "[]": no default, so required
        "input_images",
        W.INPUT_TYPE_IMAGE_BATCH,
        "ImageBatch",
        label="Training images",
        help_text="A JSON list of image URLs, or a zip URL",
    )
    assert spec(lora["input_learning_rate"])[1:5] == (W.INPUT_TYPE_NUMBER, "ComfyUIDeployExternalNumber", 0.0004, False)
    assert spec(lora["input_train_steps"])[1:4] == (W.INPUT_TYPE_INTEGER, "ComfyUIDeployExternalNumberInt", 1000.0)

    img2vid = by_id((await replica.get(WORKFLOWS["img2vid"])).inputs)
    assert spec(img2vid["input_frames"]) == integer(
        "input_frames", 14.0, "Frames", "NumberSliderInt", low=1.0, high=25.0
    )
    assert spec(img2vid["input_motion_bucket_id"]) == integer("input_motion_bucket_id", 127.0, "Motion")
    assert spec(img2vid["input_seed"]) == SEED


# Every other input kind, on a workflow uploaded through the emulator's API (node ids chosen so that
# numeric and string order differ: "3" < "10").
def node(cls: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": X + cls, "inputs": inputs}


CDN = "https://cdn.example"
KITCHEN_SINK_API: dict[str, Any] = {
    "10": node("Text", input_id="dup", default_value="from node 10", display_name="Ten"),
    "3": node("Text", input_id="dup", default_value="from node 3", display_name="Three"),
    "4": node("TextAny", input_id="any_text", default_value=""),
    "5": node("TextSingleLine", input_id="line", description="one line"),
    "6": node("NumberSlider", input_id="slider", default_value=0.5, min_value=0, max_value=2, step=0.25),
    "7": node("NumberSliderInt", input_id="count", default_value=3, min_value=1, max_value=9, step=1),
    "8": node("Number", input_id="linked_number", default_value=["6", 0]),
    "9": node("Video", input_id="clip", default_value_url=f"{CDN}/clip.mp4"),
    "11": node("Vid", input_id="legacy_clip"),
    "12": node("Audio", input_id="voice", audio_file=f"{CDN}/voice.wav"),
    "13": node("File", input_id="doc", file_url=""),
    "14": node("EXR", input_id="hdr", exr_file=f"{CDN}/sky.exr"),
    "15": node("FaceModel", input_id="face", face_model_url=f"{CDN}/face.onnx"),
    "16": node("Color", input_id="tint", default_value="#FFaa00"),
    "17": node("ImageBatch", input_id="refs", images=f'["{CDN}/a.png", "{CDN}/b.png"]'),
    "18": node("Lora", input_id="style_lora", lora_url=f"{CDN}/style.safetensors"),
    "19": node("Lora", input_id="bare_lora", lora_url=""),
    "20": node("Checkpoint", input_id="ckpt", default_value=""),
    "21": node("Hologram", input_id="hologram", default_value={"any": "thing"}),
    "22": {"class_type": "ComfyDeployWebscoketImageInput", "inputs": {"input_id": "websocket_image"}},
    "23": node("Boolean", input_id="flag", default_value=True),
    "24": node("Enum", input_id="mode", default_value="b", options='["a", "b"]'),
    "25": node("ImageAlpha", input_id="alpha", default_value_url=f"{CDN}/mask.png"),
    "26": node("Text", input_id=["3", 0], default_value="wired"),
    "27": node("Seed", input_id="seed", default_value=42, min_value=1, max_value=100),
    "30": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["1", 0]}},
    "31": {"class_type": "SaveAudio", "inputs": {"audio": ["1", 0]}},
    "32": {"class_type": "ComfyDeployStdOutputAny", "inputs": {"output_id": "out_any", "source": ["1", 0]}},
    "33": {"class_type": "VHS_VideoCombine", "inputs": {"images": ["1", 0], "format": "video/h264-mp4"}},
}
NOTE = "Kitchen sink: every input kind StationThis knows"
KITCHEN_SINK_UI: dict[str, Any] = {
    "nodes": [
        {"id": 1, "type": "Note", "widgets_values": [NOTE]},
        {"id": 30, "type": "SaveAnimatedWEBP", "widgets_values": ["ComfyUI"]},
        {"id": 31, "type": "SaveAudio", "widgets_values": ["ComfyUI"]},
        {"id": 32, "type": "ComfyDeployStdOutputAny", "widgets_values": ["out_any"]},
        {"id": 33, "type": "VHS_VideoCombine", "widgets_values": [8, 0, "clip", "video/h264-mp4"]},
    ],
    "links": [],
}


async def kitchen_sink(replica: Replica, emulator: Any) -> str:
    workflow_id, _ = await create_workflow(emulator, "Kitchen Sink — Test!", KITCHEN_SINK_API, KITCHEN_SINK_UI)
    await refresh(replica)
    return workflow_id


async def test_every_input_kind_is_extracted(replica, emulator):
    workflow_id = await kitchen_sink(replica, emulator)
    workflow = await replica.get(workflow_id, PREVIEW)  # upload with a machine = a preview deployment
    assert (workflow.name, workflow.display_name) == ("kitchen_sink_test", "Kitchen Sink — Test!")
    t = W
    assert [spec(i) for i in workflow.inputs] == [
        inp("dup", t.INPUT_TYPE_TEXT, "Text", "from node 3", label="Three"),  # the first node, numerically
        inp("any_text", t.INPUT_TYPE_TEXT, "TextAny", ""),  # an empty text is a default
        inp("line", t.INPUT_TYPE_TEXT, "TextSingleLine", help_text="one line"),
        inp("slider", t.INPUT_TYPE_NUMBER, "NumberSlider", 0.5, low=0.0, high=2.0, step=0.25),
        inp("count", t.INPUT_TYPE_INTEGER, "NumberSliderInt", 3.0, low=1.0, high=9.0, step=1.0),
        inp("linked_number", t.INPUT_TYPE_NUMBER, "Number"),  # a link is no default
        inp("clip", t.INPUT_TYPE_VIDEO, "Video", f"{CDN}/clip.mp4"),
        inp("legacy_clip", t.INPUT_TYPE_VIDEO, "Vid"),
        inp("voice", t.INPUT_TYPE_AUDIO, "Audio", f"{CDN}/voice.wav"),
        inp("doc", t.INPUT_TYPE_FILE, "File"),  # "" is no default for a non-text input
        inp("hdr", t.INPUT_TYPE_EXR, "EXR", f"{CDN}/sky.exr"),
        inp("face", t.INPUT_TYPE_FACE_MODEL, "FaceModel", f"{CDN}/face.onnx"),
        inp("tint", t.INPUT_TYPE_COLOR, "Color", "#FFaa00"),
        inp("refs", t.INPUT_TYPE_IMAGE_BATCH, "ImageBatch", [f"{CDN}/a.png", f"{CDN}/b.png"]),
        inp("style_lora", t.INPUT_TYPE_LORA, "Lora", f"{CDN}/style.safetensors"),
        inp("bare_lora", t.INPUT_TYPE_LORA, "Lora"),  # empty URL and no default_lora_name
        inp("ckpt", t.INPUT_TYPE_CHECKPOINT, "Checkpoint"),
        inp("hologram", t.INPUT_TYPE_UNSPECIFIED, "Hologram", {"any": "thing"}),
        inp("flag", t.INPUT_TYPE_BOOLEAN, "Boolean", True),
        inp("mode", t.INPUT_TYPE_ENUM, "Enum", "b", options=("a", "b")),
        inp("alpha", t.INPUT_TYPE_IMAGE, "ImageAlpha", f"{CDN}/mask.png"),
        inp("seed", t.INPUT_TYPE_SEED, "Seed", 42.0, low=1.0, high=100.0),
    ]
    assert [(o.class_type, o.type) for o in workflow.outputs] == [
        ("SaveAnimatedWEBP", W.OUTPUT_TYPE_GIF),
        ("SaveAudio", W.OUTPUT_TYPE_AUDIO),
        ("ComfyDeployStdOutputAny", W.OUTPUT_TYPE_FILE),
        ("VHS_VideoCombine", W.OUTPUT_TYPE_VIDEO),
    ]
    # Listed in its default view: its only deployment (preview), routed to the machine it was uploaded with.
    listed = next(w for w in await replica.list_all() if w.workflow_id == workflow_id)
    assert (listed.environment, len(listed.inputs)) == (PREVIEW, 22)
    assert [d.environment for d in listed.deployments] == [PREVIEW]


async def test_description_falls_back_to_the_first_note(replica, emulator):
    workflow_id = await kitchen_sink(replica, emulator)
    assert (await replica.get(workflow_id, PREVIEW)).description == NOTE


async def test_default_view_without_production_is_the_latest_deployment(replica, emulator):
    workflow_id = await kitchen_sink(replica, emulator)  # deployed in preview only
    assert (await replica.get(workflow_id)).environment == PREVIEW
    resolved = await replica.resolve("kitchen sink test")
    assert resolved.deployment.environment == PREVIEW
    with pytest.raises(grpc.aio.AioRpcError) as refused:  # validated against the preview deployment
        await replica.validate(workflow_id, {"line": "x"})
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- 3. validation ------------------------------------------------------------------------------------


async def test_validate_merges_defaults(replica):
    text2img = WORKFLOWS["text2img"]
    answer = await replica.validate(text2img, {"input_prompt": "a cat", "input_steps": 30, "input_seed": None})
    assert plain(answer.inputs) == {
        "input_prompt": "a cat",
        "input_negative": "blurry, lowres, watermark, text",
        "input_steps": 30.0,
        "input_width": 1024.0,
        "input_height": 1024.0,
        "input_cfg": 7.0,
        "input_seed": -1.0,  # null = not given
        "input_sampler": "euler_ancestral",
        "input_checkpoint": "sd_xl_base_1.0.safetensors",
        "input_lora": "",
        "input_lora_strength": 0.8,
    }
    assert list(answer.defaulted_input_ids) == [
        "input_negative",
        "input_width",
        "input_height",
        "input_cfg",
        "input_seed",
        "input_sampler",
        "input_checkpoint",
        "input_lora",
        "input_lora_strength",
    ]
    assert answer.workflow_version_id == ver("012")

    given = {
        "input_prompt": "",  # an empty text is a text
        "input_steps": 25.0,  # an integral number is an integer
        "input_cfg": 3.5,
        "input_seed": 4294967295,
        "input_sampler": "ddim",
        "input_checkpoint": "https://models.example/x.safetensors",
        "input_lora": "https://models.example/lora.safetensors",
        "input_lora_strength": 1,
    }
    answer = await replica.validate(text2img, given)
    as_json = {k: float(v) if isinstance(v, int) else v for k, v in given.items()}  # Struct numbers are doubles
    assert {k: v for k, v in plain(answer.inputs).items() if k in given} == as_json
    assert list(answer.defaulted_input_ids) == ["input_negative", "input_width", "input_height"]

    # The staging and preview views check against the version they serve.
    preview = await replica.validate(text2img, {}, PREVIEW)
    assert preview.workflow_version_id == ver("011")
    assert set(plain(preview.inputs)) == {"input_prompt", "input_negative", "input_seed", "input_steps"}

    # Required inputs given; an image batch as a list or as one JSON-array string (forwarded as given).
    inpaint = await replica.validate(WORKFLOWS["inpaint"], {"input_mask": "https://cdn.example/mask.png"})
    assert plain(inpaint.inputs)["input_mask"] == "https://cdn.example/mask.png"
    assert "input_mask" not in inpaint.defaulted_input_ids
    for images in (["https://cdn.example/a.png", "http://cdn.example/b.png"], '["https://cdn.example/a.png"]'):
        answer = await replica.validate(WORKFLOWS["lora_train"], {"input_images": images})
        assert plain(answer.inputs)["input_images"] == images
    upscale = await replica.validate(WORKFLOWS["upscale"], {"input_face_restore": True, "input_scale": 0.25})
    assert plain(upscale.inputs)["input_face_restore"] is True


async def test_every_validation_failure_in_one_error(replica):
    info, bad = await fails(
        replica.validate(
            WORKFLOWS["inpaint"],
            {
                "bogus": 1,  # unknown
                "input_prompt": 5,  # not a string
                "input_denoise": 1.5,  # above 1
                "input_image": "file:///etc/passwd",  # not http(s)
                "input_seed": 0,  # neither -1 nor within 1..4294967295
                # input_mask (no default) missing
            },
        ),
        INVALID,
        "INVALID_INPUTS",
    )
    found = violations(bad)
    assert set(found) == {
        "inputs.bogus",
        "inputs.input_prompt",
        "inputs.input_denoise",
        "inputs.input_image",
        "inputs.input_seed",
        "inputs.input_mask",
    }
    assert found["inputs.bogus"] == "unknown input"
    assert found["inputs.input_mask"] == "required"
    assert dict(info.metadata) == {"workflow_id": WORKFLOWS["inpaint"], "workflow_version_id": ver("031")}

    cases: list[tuple[str, dict[str, Any], set[str]]] = [
        (
            WORKFLOWS["text2img"],
            {
                "input_sampler": "heun",  # not an option
                "input_steps": 2.5,  # not integral
                "input_width": 3e9,  # beyond 32 bits
                "input_cfg": "7",  # a string, not a number
                "input_lora": "not a url",
                "input_negative": False,
                "input_seed": -2,
                "input_lora_strength": -0.1,  # below 0
            },
            {
                "input_sampler",
                "input_steps",
                "input_width",
                "input_cfg",
                "input_lora",
                "input_negative",
                "input_seed",
                "input_lora_strength",
            },
        ),
        (
            WORKFLOWS["upscale"],
            {"input_face_restore": "true", "input_upscale_model": 4},
            {"input_face_restore", "input_upscale_model"},
        ),
        (
            WORKFLOWS["img2vid"],
            {"input_frames": 26, "input_fps": 0, "input_image": "data:image/png;base64,AAAA"},
            {"input_frames", "input_fps", "input_image"},
        ),
        (WORKFLOWS["lora_train"], {"input_images": [f"{CDN}/a.png", "ftp://cdn.example/b.png"]}, {"input_images"}),
        (WORKFLOWS["lora_train"], {"input_images": []}, {"input_images"}),
        (WORKFLOWS["lora_train"], {"input_images": f"{CDN}/a.png"}, {"input_images"}),  # not a JSON array
        (
            WORKFLOWS["controlnet"],
            {"input_control_image": "http://", "input_control_type": "Canny"},
            {"input_control_image", "input_control_type"},
        ),
        (WORKFLOWS["lora_train"], {}, {"input_images"}),  # required
    ]
    for workflow_id, given, bad_ids in cases:
        _, bad = await fails(replica.validate(workflow_id, given), INVALID, "INVALID_INPUTS")
        assert set(violations(bad)) == {f"inputs.{i}" for i in bad_ids}, given
    _, bad = await fails(replica.validate(WORKFLOWS["img2vid"], {"input_frames": 26}), INVALID, "INVALID_INPUTS")
    assert violations(bad) == {"inputs.input_frames": "must be an integer between 1 and 25"}
    # The preview view (version 1) has no sampler.
    _, bad = await fails(
        replica.validate(WORKFLOWS["text2img"], {"input_sampler": "euler"}, PREVIEW), INVALID, "INVALID_INPUTS"
    )
    assert violations(bad) == {"inputs.input_sampler": "unknown input"}


async def test_validation_of_the_other_input_kinds(replica, emulator):
    workflow_id = await kitchen_sink(replica, emulator)
    required = {"line": "x", "linked_number": 1.5, "legacy_clip": "https://cdn.example/v.mp4"}
    required |= {"doc": "https://cdn.example/d.pdf", "bare_lora": "http://cdn.example/l.safetensors", "ckpt": "a.ckpt"}
    answer = await replica.validate(workflow_id, {**required, "hologram": [1, "anything", {"goes": True}]}, PREVIEW)
    complete = plain(answer.inputs)
    assert complete["hologram"] == [1.0, "anything", {"goes": True}]  # an unknown kind passes through
    assert complete["dup"] == "from node 3" and complete["tint"] == "#FFaa00" and complete["mode"] == "b"
    assert len(complete) == 22 and set(answer.defaulted_input_ids) == set(complete) - set(required) - {"hologram"}

    _, bad = await fails(replica.validate(workflow_id, {}, PREVIEW), INVALID, "INVALID_INPUTS")
    assert violations(bad) == {f"inputs.{k}": "required" for k in required}
    wrong = {
        "clip": "ftp://cdn.example/v.mp4",
        "voice": "voice.wav",
        "hdr": 5,
        "face": "s3://bucket/face.onnx",
        "count": 10,
        "slider": 2.5,
        "seed": 101,
        "flag": 1,
        "mode": "c",
        "alpha": "https:///no-host.png",
        "refs": "not json",
    }
    _, bad = await fails(replica.validate(workflow_id, {**required, **wrong}, PREVIEW), INVALID, "INVALID_INPUTS")
    assert set(violations(bad)) == {f"inputs.{k}" for k in wrong}


async def test_checkpoint_must_be_non_empty_and_color_hex(replica, emulator):
    workflow_id = await kitchen_sink(replica, emulator)
    required = {"line": "x", "linked_number": 1, "legacy_clip": "https://cdn.example/v.mp4"}
    required |= {"doc": "https://cdn.example/d.pdf", "bare_lora": "https://cdn.example/l.safetensors"}
    ok = await replica.validate(workflow_id, {**required, "ckpt": "a.ckpt", "tint": "#00ff7F"}, PREVIEW)
    assert plain(ok.inputs)["tint"] == "#00ff7F"
    _, bad = await fails(
        replica.validate(workflow_id, {**required, "ckpt": "", "tint": "red"}, PREVIEW), INVALID, "INVALID_INPUTS"
    )
    assert set(violations(bad)) == {"inputs.ckpt", "inputs.tint"}


def test_validate_inputs_unit_rules():
    """The same rules on the pure function (bounds messages, null = not given, several nodes)."""
    specs = [
        {"input_id": "n", "type": W.INPUT_TYPE_NUMBER, "required": True, "enum_options": [], "min_value": 1.0},
        {"input_id": "i", "type": W.INPUT_TYPE_INTEGER, "required": False, "enum_options": [], "default": 2},
    ]
    complete, defaulted = inputs.validate_inputs(specs, {"n": 1, "i": None}, {})
    assert (complete, defaulted) == ({"n": 1, "i": 2}, ["i"])
    with pytest.raises(InvalidArgument) as caught:
        inputs.validate_inputs(specs, {"n": 0.5, "i": 2**31}, {"workflow_id": "w"})
    error = caught.value
    assert error.reason == "INVALID_INPUTS" and error.metadata["workflow_id"] == "w"
    assert {v.field: v.description for v in error.violations} == {
        "inputs.n": "must be a number of at least 1",
        "inputs.i": "must be an integer between -2147483647 and 2147483647",
    }


async def test_bad_requests_and_missing_workflows(replica):
    _, bad = await fails(replica.get(""), INVALID, "INVALID_REQUEST")
    assert set(violations(bad)) == {"workflow_id"}
    _, bad = await fails(replica.get(WORKFLOWS["toon"], 42), INVALID, "INVALID_REQUEST")
    assert set(violations(bad)) == {"environment"}
    _, bad = await fails(replica.resolve("  "), INVALID, "INVALID_REQUEST")
    assert set(violations(bad)) == {"name"}
    _, bad = await fails(replica.validate("", {}), INVALID, "INVALID_REQUEST")
    assert set(violations(bad)) == {"workflow_id"}
    for request_id in ("has space", "x" * 129, "naïve"):
        _, bad = await fails(replica.refresh(request_id), INVALID, "INVALID_REQUEST")
        assert set(violations(bad)) == {"request_id"}

    missing = str(uuid.uuid4())
    info, _ = await fails(replica.get(missing), NOT_FOUND, "WORKFLOW_NOT_FOUND")
    assert info.metadata["workflow_id"] == missing
    info, _ = await fails(replica.validate(missing, {}), NOT_FOUND, "WORKFLOW_NOT_FOUND")
    assert info.metadata["workflow_id"] == missing
    for call in (
        replica.get(WORKFLOWS["inpaint"], STAGING),
        replica.resolve("inpaint", STAGING),
        replica.validate(WORKFLOWS["inpaint"], {}, STAGING),
    ):
        info, _ = await fails(call, PRECONDITION, "NO_DEPLOYMENT_FOR_ENVIRONMENT")
        assert dict(info.metadata) == {
            "workflow_id": WORKFLOWS["inpaint"],
            "environment": "ENVIRONMENT_STAGING",
            "environments": "ENVIRONMENT_PRODUCTION",
        }
    community = replica.resolve("text2img", W.ENVIRONMENT_COMMUNITY_SHARE)
    info, _ = await fails(community, PRECONDITION, "NO_DEPLOYMENT_FOR_ENVIRONMENT")
    assert info.metadata["environments"] == "ENVIRONMENT_PREVIEW,ENVIRONMENT_PRODUCTION,ENVIRONMENT_STAGING"


async def test_resolve_name_is_at_most_200_characters(replica):
    await fails(replica.resolve("a" * 200), NOT_FOUND, "WORKFLOW_NOT_FOUND")
    _, bad = await fails(replica.resolve("a" * 201), INVALID, "INVALID_REQUEST")
    assert set(violations(bad)) == {"name"}


# --- 4. names -----------------------------------------------------------------------------------------


def test_standardisation_rules():
    assert standardize("Flux Dev") == "flux_dev"
    assert standardize("/make") == "make"
    assert standardize(" Text2Img ") == "text2img"
    assert standardize("Img-2-Vid!") == "img_2_vid"
    assert standardize("  /Lora -- Train  ") == "lora_train"
    assert standardize("__a   b__") == "a_b"
    assert standardize("Café Noir (v2)") == "caf_noir_v2"
    assert standardize("!!!") == ""


async def test_resolve_match_order_and_aliases(replica):
    cases = [
        (f"  {WORKFLOWS['inpaint']} ", "inpaint", "MATCHED_BY_ID"),
        (" Text2Img ", "text2img", "MATCHED_BY_DISPLAY_NAME"),  # the display name, ignoring case
        ("/text2img", "text2img", "MATCHED_BY_NAME"),
        ("LORA-TRAIN", "lora_train", "MATCHED_BY_NAME"),
        ("Img 2 Img", None, None),  # "img_2_img" is not "img2img"
        ("/make", "text2img", "MATCHED_BY_ALIAS"),
        ("MakeImage", "text2img", "MATCHED_BY_ALIAS"),
        ("train", "lora_train", "MATCHED_BY_ALIAS"),
        ("/tooncraft", "toon", "MATCHED_BY_ALIAS"),
        ("Video", "img2vid", "MATCHED_BY_ALIAS"),
        ("make", "text2img", "MATCHED_BY_ALIAS"),
    ]
    for typed, name, matched_by in cases:
        if name is None:
            await fails(replica.resolve(typed), NOT_FOUND, "WORKFLOW_NOT_FOUND")
            continue
        answer = await replica.resolve(typed)
        assert (answer.workflow.name, rpc.MatchedBy.Name(answer.matched_by)) == (name, matched_by), typed
        assert answer.standardized_name == standardize(typed)
        assert answer.workflow.workflow_id == WORKFLOWS[name]
        assert answer.deployment.deployment_id == DEPLOYMENTS[name]  # production
        assert answer.workflow.environment == PROD
    assert (await replica.resolve("/make")).standardized_name == "make"
    staging = await replica.resolve("/make", STAGING)
    assert (staging.deployment.deployment_id, staging.workflow.environment) == (dep("02"), STAGING)
    video = await replica.resolve("video", STAGING)
    assert (video.deployment.deployment_id, video.deployment.is_fluid) == (dep("11"), False)


async def test_configured_aliases(make_replica):
    replica = await make_replica(WORKFLOWS_ALIASES="Pic=Text2Img, big-picture=upscale")
    answer = await replica.resolve("/pic")
    assert (answer.workflow.name, answer.matched_by) == ("text2img", rpc.MATCHED_BY_ALIAS)
    assert (await replica.resolve("Big Picture")).workflow.name == "upscale"
    assert list(answer.workflow.aliases) == ["pic"]
    await fails(replica.resolve("/make"), NOT_FOUND, "WORKFLOW_NOT_FOUND")  # the table replaces the default


async def test_unknown_name_is_not_found_with_suggestions(replica):
    candidates = sorted({*NAMES, *DEFAULT_ALIASES})
    for typed, best in [("txt2img", "text2img"), ("/Make Imag", "makeimage"), ("upscal", "upscale")]:
        info, _ = await fails(replica.resolve(typed), NOT_FOUND, "WORKFLOW_NOT_FOUND")
        std = standardize(typed)
        expected = difflib.get_close_matches(std, candidates, n=5, cutoff=0.6)
        assert dict(info.metadata) == {"name": typed, "standardized_name": std, "suggestions": ",".join(expected)}
        assert expected[0] == best
    info, _ = await fails(replica.resolve("zzzz"), NOT_FOUND, "WORKFLOW_NOT_FOUND")
    assert info.metadata["suggestions"] == ""


async def test_name_collision_is_reported_not_overwritten(replica, emulator):
    new_id, version_id = await create_workflow(emulator, "Text2Img", simple_graph("new"), machine="StationthisHun")
    new_deployment = await create_deployment(emulator, new_id, version_id, "production", "StationthisHun")
    stats = (await refresh(replica)).stats
    old_id = WORKFLOWS["text2img"]
    assert list(stats.name_collisions) == [f"text2img: {new_id} kept, {old_id}"]
    assert list((await replica.stats()).name_collisions) == [f"text2img: {new_id} kept, {old_id}"]
    assert stats.workflow_count == 9
    listed = await replica.list_all()
    assert {w.workflow_id for w in listed} == {*WORKFLOWS.values(), new_id}
    # The most recently updated one keeps the name (and the alias); the other is reachable by id.
    for typed in ("text2img", "/make", "Text2Img"):
        answer = await replica.resolve(typed)
        assert (answer.workflow.workflow_id, answer.deployment.deployment_id) == (new_id, new_deployment)
    assert (await replica.resolve(old_id)).matched_by == rpc.MATCHED_BY_ID
    assert (await replica.get(old_id)).version.workflow_version_id == ver("012")


async def test_workflow_named_only_with_symbols_gets_a_name_from_its_id(replica, emulator):
    workflow_id, _ = await create_workflow(emulator, "!!!", simple_graph())
    await refresh(replica)
    workflow = await replica.get(workflow_id, PREVIEW)
    assert (workflow.name, workflow.display_name) == (f"workflow_{workflow_id[:8]}", "!!!")
    answer = await replica.resolve(f"workflow_{workflow_id[:8]}", PREVIEW)
    assert (answer.workflow.workflow_id, answer.matched_by) == (workflow_id, rpc.MATCHED_BY_NAME)


# --- 5. routing ---------------------------------------------------------------------------------------


async def test_a_workflow_shows_the_machine_its_deployment_runs_on(make_replica):
    """A deployment run cannot choose its machine: Workflow.machine_id, machine_name and gpu are the
    chosen deployment's (its own gpu, else its machine's), wherever routing would send the workflow.
    Here neither the rule's nor the default machine is ready, so routing falls back to any ready
    machine (the classic one, no GPU), where none of these deployments runs."""
    replica = await make_replica(
        WORKFLOWS_MACHINE_ROUTING="text2img=StationthisHun-next", WORKFLOWS_DEFAULT_MACHINE="reactor-broken"
    )
    expected = {
        "text2img": ("StationthisHun", G.GPU_TYPE_A10G),
        "toon": ("TRIPO", G.GPU_TYPE_L40S),
        "img2vid": ("TRIPO", G.GPU_TYPE_L40S),  # fluid, with its own gpu
        "lora_train": ("StationthisHun", G.GPU_TYPE_H100),  # its own gpu, not its machine's
    }
    listed = {w.name: w for w in await replica.list_all()}
    for name, (machine, gpu) in expected.items():
        answer = await replica.resolve(name)
        assert answer.deployment.machine_id == MACHINES[machine]
        for view in (answer.workflow, await replica.get(WORKFLOWS[name]), listed[name]):
            assert (view.machine_id, view.machine_name, view.gpu) == (MACHINES[machine], machine, gpu), name
    classic = await replica.get(WORKFLOWS["upscale"], STAGING)  # its staging deployment runs there
    assert (classic.machine_id, classic.machine_name, classic.gpu) == (
        MACHINES["classic"],
        "selfhosted-3090",
        G.GPU_TYPE_UNSPECIFIED,
    )


async def test_routing_picks_the_deployment_rule_then_default_then_any_ready(make_replica, emulator):
    """Among a workflow's deployments in the environment, routing prefers the one on the rule's
    machine if ready, else on the default machine if ready, else on any ready machine, else the most
    recently updated; the view shows the machine of the deployment picked."""
    img2img, version = WORKFLOWS["img2img"], ver("021")
    on_fluxdev = DEPLOYMENTS["img2img"]  # the oldest
    on_classic = await create_deployment(emulator, img2img, version, "production", "classic", str(uuid.uuid4()))
    on_tripo = await create_deployment(emulator, img2img, version, "production", "TRIPO", str(uuid.uuid4()))
    async with emulator.client() as http:  # upstream order; the first ready one is "any ready"
        machines = (await http.get("/machines", params={"is_deleted": "false"})).json()
    assert next(m for m in machines if m["status"] == "ready")["id"] == MACHINES["classic"]
    cases = [
        ("img2img=fluxdev", "TRIPO", on_fluxdev, "fluxdev"),  # the rule's machine
        ("img2img=StationthisHun-next", "TRIPO", on_tripo, "TRIPO"),  # building: the default machine
        ("img2img=reactor-broken", "StationthisHun-next", on_classic, "classic"),  # any ready machine
        ("img2img=StationthisHun", "inpainter", on_tripo, "TRIPO"),  # none there: the most recent
    ]
    for rules, default, chosen, machine in cases:
        replica = await make_replica(WORKFLOWS_MACHINE_ROUTING=rules, WORKFLOWS_DEFAULT_MACHINE=default)
        answer = await replica.resolve("img2img")
        assert answer.deployment.deployment_id == chosen, rules
        for view in (answer.workflow, await replica.get(img2img)):
            assert (view.machine_id, view.gpu) == (MACHINES[machine], MACHINE_GPU.get(machine, 0)), rules


def test_no_ready_machine_routes_nowhere():
    deployment = Deployment.from_json(
        {
            "id": "d1",
            "workflow_id": "w1",
            "environment": "production",
            "machine_id": "m1",
            "workflow": {"id": "w1", "name": "Solo"},
            "version": {"id": "v1", "version": 1, "workflow_api": simple_graph()},
            "updated_at": "2025-10-12T12:00:00Z",
        }
    )
    machines = [
        Machine.from_json({"id": "m1", "name": "box", "status": "building", "gpu": "A10G"}),
        Machine.from_json({"id": "m2", "name": "broken", "status": "error", "gpu": "T4"}),
    ]
    built = catalog.build([deployment], machines, 0)
    index = CatalogIndex(built, DEFAULT_ALIASES, Routing({"solo": "box"}, "broken"))
    assert index.route("solo") is None
    workflow = index.get("w1")
    rendered = convert.workflow(index, workflow, index.deployment_for(workflow, 0))
    # Its deployment still runs where it is deployed.
    assert (rendered.machine_id, rendered.machine_name, rendered.gpu) == ("m1", "box", G.GPU_TYPE_A10G)
    assert [i.input_id for i in rendered.inputs] == ["input_prompt"]


async def test_resolve_prefers_the_deployment_on_the_routed_machine(replica, emulator):
    newer = await create_deployment(
        emulator, WORKFLOWS["img2img"], ver("021"), "production", "TRIPO", deployment_id=str(uuid.uuid4())
    )
    await refresh(replica)
    workflow = await replica.get(WORKFLOWS["img2img"])
    assert [d.deployment_id for d in workflow.deployments][:1] == [newer]  # the most recent
    answer = await replica.resolve("img2img")
    assert answer.workflow.machine_name == "fluxdev"
    assert answer.deployment.deployment_id == DEPLOYMENTS["img2img"]  # on fluxdev


# --- 6. the cache: one listing for many replicas and requests -------------------------------------


async def test_300_cold_requests_on_3_replicas_list_upstream_once(make_replica, emulator):
    replicas = [await make_replica() for _ in range(3)]
    names = ["/make", "text2img", "Video", "train", "inpaint", "Upscale", "/tooncraft", "controlnet"]
    ids = list(WORKFLOWS.values())

    wanted = {"/make": "text2img", "Video": "img2vid", "train": "lora_train", "Upscale": "upscale"}
    wanted |= {"/tooncraft": "toon", "text2img": "text2img", "inpaint": "inpaint", "controlnet": "controlnet"}

    async def one(i: int) -> tuple[str, str]:
        target = replicas[i % 3]
        if i % 2:
            name = names[(i // 2) % len(names)]
            return (await target.resolve(name)).workflow.workflow_id, WORKFLOWS[wanted[name]]
        workflow_id = ids[(i // 2) % len(ids)]
        return (await target.get(workflow_id)).workflow_id, workflow_id

    results = await asyncio.gather(*(one(i) for i in range(300)))
    assert len(results) == 300 and all(got == expected for got, expected in results)
    assert {got for got, _ in results} == set(WORKFLOWS.values())
    assert await listings(emulator) == (2, 1)  # one refresh: regular + fluid deployments, machines once
    for target in replicas:
        stats = await target.stats()
        assert (stats.refreshes, stats.workflow_count, stats.refresh_failures) == (1, 8, 0)
        # The catalog also loads at start-up, so a request may find it loaded (hit) or wait (miss).
        assert stats.hits + stats.misses == 100
    assert await listings(emulator) == (2, 1)


async def test_ttl_expiry_serves_stale_and_refreshes_once_across_replicas(make_replica, emulator):
    upstream = Upstream()
    ttl = {"WORKFLOWS_CACHE_TTL_SECONDS": "60", "WORKFLOWS_LOCAL_CACHE_SECONDS": "0.05"}
    replicas = [await make_replica(upstream, **ttl) for _ in range(3)]
    for target in replicas:
        assert len(await target.list_all()) == 8
    assert await listings(emulator) == (2, 1)
    new_id = await create_deployed_workflow(emulator, "Night Shift")

    replicas[0].clock.advance(59)  # not yet stale: nothing happens
    await asyncio.gather(*(replicas[i % 3].resolve("/make") for i in range(30)))
    assert (await replicas[0].stats()).stale is False
    assert await listings(emulator) == (2, 1)

    upstream.gate.clear()  # hold the next deployment listing until we let it go
    replicas[0].clock.advance(2)  # 61 s: past the TTL
    answers = await asyncio.gather(*(replicas[i % 3].resolve("/make") for i in range(30)))
    # Answered from the stale catalog while the one refresh is still held at the gate.
    assert {a.workflow.workflow_id for a in answers} == {WORKFLOWS["text2img"]}
    for target in replicas:
        stats = await target.stats()
        assert stats.stale and stats.workflow_count == 8 and stats.catalog_age.ToSeconds() == 61
    await fails(replicas[1].resolve("night shift"), NOT_FOUND, "WORKFLOW_NOT_FOUND")
    assert upstream.listings == 1  # the first load only

    upstream.gate.set()

    async def all_fresh() -> bool:
        for target in replicas:
            stats = await target.stats()
            if stats.stale or stats.workflow_count != 9:
                return False
        return True

    await eventually(all_fresh, what="every replica on the refreshed catalog")
    for target in replicas:
        assert (await target.resolve("Night Shift")).workflow.workflow_id == new_id
        assert (await target.stats()).refreshes == 2
    await asyncio.gather(*(replicas[i % 3].resolve("/make") for i in range(30)))
    assert upstream.listings == 2
    assert await listings(emulator) == (4, 2)  # exactly one more listing, across the three replicas


async def test_refresh_catalog_forces_a_refresh_and_is_idempotent(make_replica, emulator):
    first, other = await make_replica(), await make_replica()
    await first.list_all()
    new_id = await create_deployed_workflow(emulator, "Fresh Upscale")
    await fails(first.resolve("fresh upscale"), NOT_FOUND, "WORKFLOW_NOT_FOUND")  # the catalog is fresh
    assert await listings(emulator) == (2, 1)

    response = await refresh(first, "refresh-1")
    assert (response.stats.workflow_count, response.stats.refreshes) == (9, 2)
    assert (await first.resolve("fresh upscale")).workflow.workflow_id == new_id
    assert await listings(emulator) == (4, 2)

    later_id = await create_deployed_workflow(emulator, "Later Still")
    again = await refresh(first, "refresh-1")  # the same request: the first answer, nothing done
    assert again == response
    assert await refresh(other, "refresh-1") == response  # remembered in Redis, for every replica
    assert await listings(emulator) == (4, 2)
    await fails(first.resolve("later still"), NOT_FOUND, "WORKFLOW_NOT_FOUND")

    response = await refresh(first, "refresh-2")
    assert (response.stats.workflow_count, response.stats.refreshes) == (10, 3)
    assert (await first.resolve("later still")).workflow.workflow_id == later_id
    assert await listings(emulator) == (6, 3)

    # No request_id: no deduplication. Concurrent refreshes on several replicas are coalesced into one.
    first.clock.advance(1)
    answers = await asyncio.gather(*(target.refresh() for target in (first, other) for _ in range(5)))
    assert {a.stats.refreshes for a in answers} == {4}
    assert await listings(emulator) == (8, 4)


async def test_catalog_stats_fields(make_replica, emulator):
    replica = await make_replica(WORKFLOWS_CACHE_TTL_SECONDS="120")
    t0 = replica.clock()
    stats = await replica.stats()  # the catalog loaded at start-up; GetCatalogStats is not a lookup
    assert (stats.workflow_count, stats.hits, stats.misses, stats.refreshes, stats.refresh_failures) == (8, 0, 0, 1, 0)
    assert stats.last_refresh_time.ToMilliseconds() == int(t0 * 1000)
    assert stats.HasField("last_refresh_duration") and stats.last_refresh_duration.ToNanoseconds() >= 0
    assert stats.catalog_age.ToNanoseconds() == 0 and not stats.stale
    assert (stats.upstream_healthy, stats.last_error, stats.upstream_errors) == (True, "", 0)
    assert stats.ttl.ToSeconds() == 120 and list(stats.name_collisions) == []

    before = stats.hits
    for name in ("make", "toon", "upscale"):
        await replica.resolve(name)
    await replica.get(WORKFLOWS["toon"])
    await replica.list_all()
    stats = await replica.stats()
    assert stats.misses == 0 and stats.hits - before == 5  # five lookups; the stats reads are not lookups

    replica.clock.advance(30)
    stats = await replica.stats()
    assert stats.catalog_age.ToSeconds() == 30 and not stats.stale
    assert stats.last_refresh_time.ToMilliseconds() == int(t0 * 1000)
    replica.clock.advance(91)
    stats = await replica.stats()
    assert stats.catalog_age.ToSeconds() == 121 and stats.stale

    async def refreshed() -> bool:
        return (await replica.stats()).refreshes == 2

    await eventually(refreshed, what="the stale-triggered refresh")
    stats = await replica.stats()
    assert stats.last_refresh_time.ToMilliseconds() == int(replica.clock() * 1000)
    assert not stats.stale and stats.misses == 0
    assert await listings(emulator) == (4, 2)


async def test_list_pages_and_environment_filter(replica):
    pages = []
    token = ""
    while True:
        page = await replica.stub.ListWorkflows(rpc.ListWorkflowsRequest(page_size=3, page_token=token))
        pages.append([w.name for w in page.workflows])
        token = page.next_page_token
        if not token:
            break
    assert pages == [NAMES[:3], NAMES[3:6], NAMES[6:]]
    assert [w.name for w in await replica.list_all(page_size=500)] == NAMES  # capped at 200: one page

    staging = await replica.list_all(STAGING)
    assert [(w.name, w.environment) for w in staging] == [
        (n, STAGING) for n in ("img2img", "img2vid", "text2img", "upscale")
    ]
    assert next(w for w in staging if w.name == "upscale").deployments[0].machine_id == MACHINES["classic"]
    preview = await replica.list_all(PREVIEW)
    assert [(w.name, w.version.version) for w in preview] == [("text2img", 1)]
    assert await replica.list_all(W.ENVIRONMENT_PUBLIC_SHARE) == []

    _, bad = await fails(replica.stub.ListWorkflows(rpc.ListWorkflowsRequest(page_size=-1)), INVALID, "INVALID_REQUEST")
    assert set(violations(bad)) == {"page_size"}
    await fails(
        replica.stub.ListWorkflows(rpc.ListWorkflowsRequest(page_token="garbage")), INVALID, "INVALID_PAGE_TOKEN"
    )
    first = await replica.stub.ListWorkflows(rpc.ListWorkflowsRequest(page_size=2))
    other_filter = rpc.ListWorkflowsRequest(page_size=2, page_token=first.next_page_token, environment=STAGING)
    await fails(replica.stub.ListWorkflows(other_filter), INVALID, "INVALID_PAGE_TOKEN")


# --- 7. upstream failures -----------------------------------------------------------------------------

DOWN = [pytest.param("machines"), pytest.param("deployments")]


async def first_refresh(replica: Replica) -> None:
    """Wait for the refresh a stale read started (this replica's single-flight task) to end."""
    task = replica.cache._refreshing
    assert task is not None
    await asyncio.wait([task], timeout=30)


@pytest.mark.parametrize("route", DOWN)
async def test_upstream_down_serves_the_last_good_catalog(make_replica, emulator, route):
    replica = await make_replica(WORKFLOWS_CACHE_TTL_SECONDS="60")
    good = [w.SerializeToString() for w in await replica.list_all()]
    await emulator.set_faults(error_rates={route: {"503": 1.0}})
    replica.clock.advance(61)

    assert [w.SerializeToString() for w in await replica.list_all()] == good  # stale, answered
    await first_refresh(replica)
    shared = await replica.cache.shared_stats()
    assert shared.get("refresh_failures") == "1" and shared.get("last_error")
    stats = await replica.stats()
    assert stats.stale and stats.catalog_age.ToSeconds() == 61
    assert (stats.workflow_count, stats.refreshes) == (8, 1)
    assert stats.refresh_failures >= 1 and stats.upstream_errors >= 1
    assert not stats.upstream_healthy and stats.last_error
    assert (await replica.resolve("/make")).workflow.workflow_id == WORKFLOWS["text2img"]
    assert [w.SerializeToString() for w in await replica.list_all()] == good


@pytest.mark.parametrize("route", DOWN)
async def test_cold_start_with_upstream_down_is_unavailable(make_replica, emulator, route):
    await emulator.set_faults(error_rates={route: {"503": 1.0}})
    replica = await make_replica(serving=False)
    await fails(replica.stub.ListWorkflows(rpc.ListWorkflowsRequest()), UNAVAILABLE, "CATALOG_UNAVAILABLE")
    await fails(replica.resolve("/make"), UNAVAILABLE, "CATALOG_UNAVAILABLE")
    await fails(replica.validate(WORKFLOWS["text2img"], {}), UNAVAILABLE, "CATALOG_UNAVAILABLE")
    stats = await replica.stats()  # the stats still answer
    assert (stats.workflow_count, stats.refreshes, stats.stale, stats.upstream_healthy) == (0, 0, True, False)
    assert stats.refresh_failures >= 1 and stats.last_error and not stats.HasField("last_refresh_time")


async def test_malformed_listing_does_not_replace_a_good_catalog(make_replica, emulator):
    upstream = Upstream()
    replica = await make_replica(upstream, WORKFLOWS_CACHE_TTL_SECONDS="60")
    good = [w.SerializeToString() for w in await replica.list_all()]

    def without_workflow_id(found: list[Deployment]) -> list[Deployment]:
        return [dataclasses.replace(found[0], workflow_id=None), *found[1:]]

    upstream.tamper = without_workflow_id
    replica.clock.advance(61)
    assert [w.SerializeToString() for w in await replica.list_all()] == good
    await first_refresh(replica)
    stats = await replica.stats()
    assert stats.refresh_failures == 1 and stats.last_error.startswith("MalformedListing")
    assert (stats.refreshes, stats.workflow_count, stats.stale) == (1, 8, True)
    assert [w.SerializeToString() for w in await replica.list_all()] == good

    upstream.tamper = None  # the next stale read refreshes for real
    await eventually(lambda: _refreshes_reached(replica, 2), what="a good refresh")
    stats = await replica.stats()
    assert (stats.last_error, stats.stale, stats.workflow_count) == ("", False, 8)


async def _refreshes_reached(replica: Replica, count: int) -> bool:
    return (await replica.stats()).refreshes >= count


def test_build_refuses_a_deployment_without_workflow_id():
    good = {"id": "d1", "workflow_id": "w1", "environment": "production", "workflow": {"name": "A"}}
    assert len(catalog.build([Deployment.from_json(good)], [], 1)["workflows"]) == 1
    with pytest.raises(MalformedListing):
        catalog.build([Deployment.from_json(good), Deployment.from_json({**good, "workflow_id": None})], [], 1)


@pytest.mark.parametrize("route", ["machines", "deployments"])
async def test_failed_refresh_catalog_is_unavailable_and_not_remembered(make_replica, emulator, route):
    replica = await make_replica(Upstream(), client_options={"breaker_failure_threshold": 1000})
    await replica.list_all()
    await emulator.set_faults(error_rates={route: {"503": 1.0}})
    info, _ = await fails(refresh(replica, "try-1"), UNAVAILABLE, "CATALOG_REFRESH_FAILED")
    assert info.metadata["last_error"]
    assert len(await replica.list_all()) == 8  # the previous catalog is kept
    await emulator.set_faults()
    await create_deployed_workflow(emulator, "After The Storm")
    assert (await refresh(replica, "try-1")).stats.workflow_count == 9  # not remembered: done now


async def test_upstream_errors_count_every_failed_call(make_replica, emulator):
    await emulator.set_faults(error_rates={"machines": {"503": 1.0}})
    replica = await make_replica(serving=False)
    await fails(replica.stub.ListWorkflows(rpc.ListWorkflowsRequest()), UNAVAILABLE, "CATALOG_UNAVAILABLE")
    failed_calls = (await emulator.stats())["faults"].get("error:503:machines", 0)
    assert failed_calls > 1  # the client retried
    assert replica.cache.upstream_errors() == failed_calls  # what GetCatalogStats.upstream_errors reports


async def test_an_outage_backs_off_refreshes_across_replicas(make_replica, emulator):
    """While ComfyUI Deploy fails, stale lookups on every replica wait out one shared backoff after
    each failed refresh: a handful of refreshes in seconds of lookups, not one per lookup. And
    upstream_errors counts the requests that reached upstream and failed, not the calls the
    client's circuit breaker refused (here it opens at the first failure)."""
    upstream = Upstream()
    options = {"breaker_failure_threshold": 1}
    ttl = {"WORKFLOWS_CACHE_TTL_SECONDS": "60", "WORKFLOWS_LOCAL_CACHE_SECONDS": "0.05"}
    replicas = [await make_replica(upstream, client_options=options, **ttl) for _ in range(2)]
    assert len(await replicas[0].list_all()) == 8
    await emulator.set_faults(error_rates={"machines": {"503": 1.0}})
    clock = replicas[0].clock  # shared by the replicas
    clock.advance(61)

    lookups = 0
    loop = asyncio.get_running_loop()
    until = loop.time() + 3
    while loop.time() < until:
        answers = await asyncio.gather(*(r.resolve("/make") for r in replicas for _ in range(5)))
        assert {a.workflow.workflow_id for a in answers} == {WORKFLOWS["text2img"]}  # stale, answered
        lookups += len(answers)
        await asyncio.sleep(0.005)
    clock.advance(-61)  # fresh again: no lookup starts a refresh while the counts are read
    for target in replicas:
        if target.cache._refreshing is not None:
            await asyncio.wait([target.cache._refreshing], timeout=30)

    failed_requests = (await emulator.stats())["faults"].get("error:503:machines", 0)
    stats = [await target.stats() for target in replicas]
    assert lookups > 200
    assert 1 <= stats[0].refresh_failures <= 4, stats[0].refresh_failures  # shared by the replicas
    assert stats[0].last_error and not stats[0].upstream_healthy
    assert sum(s.upstream_errors for s in stats) == failed_requests >= 1
    assert sum(target.cache.counters.refused for target in replicas) >= 1  # refusals happened, apart


async def test_health_is_not_serving_until_a_catalog_has_loaded(make_replica, emulator):
    """A replica that never loaded a catalog answers every lookup UNAVAILABLE, so health says
    NOT_SERVING; once ComfyUI Deploy answers, the warm-up (restarted by the bootstrap) loads it."""
    await emulator.set_faults(error_rates={"deployments": {"503": 1.0}})
    replica = await make_replica(Upstream(), client_options={"breaker_reset_seconds": 1.0}, serving=False)
    names = ("", SERVICE_NAME)
    await fails(replica.resolve("/make"), UNAVAILABLE, "CATALOG_UNAVAILABLE")
    for _ in range(5):
        assert [await replica.running.health(name) for name in names] == [NOT_SERVING, NOT_SERVING]
        await asyncio.sleep(0.1)
    assert (await replica.stats()).refresh_failures >= 1

    await emulator.set_faults()
    await wait_serving(replica.running, timeout=30)
    assert await replica.running.health(SERVICE_NAME) == SERVING
    assert (await replica.resolve("/make")).workflow.workflow_id == WORKFLOWS["text2img"]

    # A catalog found in Redis counts: another replica is ready though ComfyUI Deploy is down again.
    await emulator.set_faults(error_rates={"*": {"503": 1.0}})
    other = await make_replica()
    assert await other.running.health(SERVICE_NAME) == SERVING
