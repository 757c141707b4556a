"""ComfyUIService's pass-through RPCs and UploadFile over real gRPC, against the real stack and the emulator.

What upstream saw is read from the emulator's request statistics: bad input must make no upstream
call at all, idempotent replays no second one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import json_format, struct_pb2

from comfydeploy import errors as cd
from common.config import ConfigError, load
from emulator.testing import DEPLOYMENTS, MACHINES, WORKFLOWS, RunningEmulator
from services.comfyui.admin import Named, upstream_error
from services.comfyui.config import ComfyUIConfig
from services.comfyui.server import build as build_comfyui
from stationthis.comfyui.v1 import comfyui_service_pb2 as svc
from stationthis.comfyui.v1 import comfyui_service_pb2_grpc, deployment_pb2, machine_pb2
from stationthis.type.v1 import gpu_pb2
from stationthis.workflows.v1 import workflows_service_pb2, workflows_service_pb2_grpc
from tests.conftest import Running
from tests.support import expect_failure

DOMAIN = "comfyui.stationthis.dev"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
MISSING = "00000000-0000-4000-8000-0000000000ff"
TEXT2IMG_V1 = "c3000000-0000-4000-8000-000000000011"
TEXT2IMG_V2 = "c3000000-0000-4000-8000-000000000012"
IMG2IMG_V1 = "c3000000-0000-4000-8000-000000000021"
OTHER_TENANT_MACHINE = "a1000000-0000-4000-8000-000000000009"
LIVE_MACHINES_BY_NAME = [
    "fluxdev", "inpainter", "reactor-broken", "selfhosted-3090", "StationthisHun", "StationthisHun-next", "TRIPO",
]  # fmt: skip
BAD_IDS = ["", "xyz", "../machines", MISSING + "0", "a1000000_0000_4000_8000_000000000001"]


@pytest.fixture
def stub(stack: dict[str, Running]) -> comfyui_service_pb2_grpc.ComfyUIServiceStub:
    return comfyui_service_pb2_grpc.ComfyUIServiceStub(stack["comfyui"].channel)


class Upstream:
    """Counts of the requests the emulator received, by route template."""

    def __init__(self, emulator: RunningEmulator) -> None:
        self.emulator = emulator

    async def total(self) -> int:
        return int((await self.emulator.stats())["total"])

    async def count(self, route: str) -> int:
        return int((await self.emulator.stats())["routes"].get(route, 0))


@pytest.fixture
def upstream(emulator: RunningEmulator) -> Upstream:
    return Upstream(emulator)


async def invalid(call: Awaitable[Any], upstream: Upstream, *fields: str, reason: str = "INVALID_REQUEST") -> None:
    """The call fails INVALID_ARGUMENT naming exactly ``fields``, and nothing reached ComfyUI Deploy."""
    before = await upstream.total()
    _, bad = await expect_failure(call, INVALID, reason, DOMAIN)
    assert bad is not None and {v.field for v in bad.field_violations} == set(fields), bad
    assert await upstream.total() == before, "bad input reached ComfyUI Deploy"


async def missing(call: Awaitable[Any], reason: str, **metadata: str) -> None:
    """The call fails NOT_FOUND with ``reason`` and exactly ``metadata`` (the id upstream lacks)."""
    info, _ = await expect_failure(call, NOT_FOUND, reason, DOMAIN)
    assert dict(info.metadata) == metadata


async def walk(fetch: Callable[[str], Awaitable[Any]], items: str) -> list[list[Any]]:
    """Every page of a List RPC (``fetch(page_token)``), following next_page_token."""
    pages, token = [], ""
    while True:
        response = await fetch(token)
        pages.append(list(getattr(response, items)))
        token = response.next_page_token
        if not token:
            return pages


async def start_comfyui(start_service: Any, stack: dict[str, Running], redis_url: str, **env: str) -> Any:
    """A second comfyui service wired like the stack's one, with ``env`` overriding its variables."""
    environ = {
        "REDIS_URL": redis_url,
        "POINTS_SERVICE_ADDR": stack["points"].address,
        "WORKFLOWS_SERVICE_ADDR": stack["workflows"].address,
        **env,
    }
    running = await start_service(build_comfyui, ComfyUIConfig, environ)
    return comfyui_service_pb2_grpc.ComfyUIServiceStub(running.channel)


# --------------------------------------------------------------------------- machines


async def test_list_machines_by_name_without_deleted_ones_in_pages(stub, upstream):
    everything = (await stub.ListMachines(svc.ListMachinesRequest())).machines
    assert [m.name for m in everything] == LIVE_MACHINES_BY_NAME  # no deleted machine, no other tenant's
    hun = next(m for m in everything if m.name == "StationthisHun")
    assert hun.machine_id == MACHINES["StationthisHun"]
    assert (hun.type, hun.status, hun.gpu) == (
        machine_pb2.MACHINE_TYPE_COMFY_DEPLOY_SERVERLESS,
        machine_pb2.MACHINE_STATUS_READY,
        gpu_pb2.GPU_TYPE_A10G,
    )
    assert hun.machine_version == "v4" and hun.comfyui_version and hun.create_time.seconds and hun.update_time.seconds
    assert hun.concurrency_limit == 0 and not hun.HasField("run_timeout")  # the list omits the settings
    building = next(m for m in everything if m.name == "StationthisHun-next")
    assert building.status == machine_pb2.MACHINE_STATUS_BUILDING
    classic = next(m for m in everything if m.name == "selfhosted-3090")
    assert (classic.type, classic.gpu) == (machine_pb2.MACHINE_TYPE_CLASSIC, gpu_pb2.GPU_TYPE_UNSPECIFIED)

    async def page(token: str) -> Any:
        return await stub.ListMachines(svc.ListMachinesRequest(page_size=3, page_token=token))

    pages = await walk(page, "machines")
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [m.name for p in pages for m in p] == LIVE_MACHINES_BY_NAME
    capped = await stub.ListMachines(svc.ListMachinesRequest(page_size=5000))
    assert len(capped.machines) == len(LIVE_MACHINES_BY_NAME) and not capped.next_page_token

    await invalid(stub.ListMachines(svc.ListMachinesRequest(page_size=-1)), upstream, "page_size")
    for token in ("not-a-token", (await stub.ListDeployments(svc.ListDeploymentsRequest(page_size=1))).next_page_token):
        await expect_failure(
            stub.ListMachines(svc.ListMachinesRequest(page_token=token)), INVALID, "INVALID_PAGE_TOKEN", DOMAIN
        )


async def test_get_machine_with_its_settings_and_not_found(stub, upstream):
    machine = (await stub.GetMachine(svc.GetMachineRequest(machine_id=MACHINES["fluxdev"]))).machine
    assert (machine.name, machine.gpu, machine.concurrency_limit, machine.keep_warm) == (
        "fluxdev",
        gpu_pb2.GPU_TYPE_A100,
        2,
        0,
    )
    assert (machine.run_timeout.seconds, machine.idle_timeout.seconds) == (300, 60)
    upper = await stub.GetMachine(svc.GetMachineRequest(machine_id=MACHINES["fluxdev"].upper()))
    assert upper.machine == machine

    for machine_id in (MISSING, MACHINES["deleted"], OTHER_TENANT_MACHINE):
        request = svc.GetMachineRequest(machine_id=machine_id)
        await missing(stub.GetMachine(request), "MACHINE_NOT_FOUND", machine_id=machine_id)
    for bad in BAD_IDS:
        await invalid(stub.GetMachine(svc.GetMachineRequest(machine_id=bad)), upstream, "machine_id")


# --------------------------------------------------------------------------- deployments


async def test_list_deployments_filters_merges_fluid_and_pages(stub, upstream):
    regular = (await stub.ListDeployments(svc.ListDeploymentsRequest())).deployments
    ids = [d.deployment_id for d in regular]
    assert DEPLOYMENTS["text2img"] in ids and DEPLOYMENTS["img2vid"] not in ids  # fluid only when asked
    assert DEPLOYMENTS["other-tenant"] not in ids and DEPLOYMENTS["deleted-workflow"] not in ids
    stamps = [d.update_time.ToDatetime() for d in regular]
    assert stamps == sorted(stamps, reverse=True)  # most recently updated first

    merged = (await stub.ListDeployments(svc.ListDeploymentsRequest(include_fluid=True))).deployments
    assert {d.deployment_id for d in merged} == set(ids) | {DEPLOYMENTS["img2vid"]}
    fluid = next(d for d in merged if d.deployment_id == DEPLOYMENTS["img2vid"])
    assert fluid.is_fluid and fluid.gpu == gpu_pb2.GPU_TYPE_L40S
    stamps = [d.update_time.ToDatetime() for d in merged]
    assert stamps == sorted(stamps, reverse=True)

    staging = svc.ListDeploymentsRequest(environment=deployment_pb2.ENVIRONMENT_STAGING, include_fluid=True)
    only = (await stub.ListDeployments(staging)).deployments
    assert only and {d.environment for d in only} == {deployment_pb2.ENVIRONMENT_STAGING}

    async def page(token: str) -> Any:
        return await stub.ListDeployments(svc.ListDeploymentsRequest(page_size=4, include_fluid=True, page_token=token))

    pages = await walk(page, "deployments")
    assert [d.deployment_id for p in pages for d in p] == [d.deployment_id for d in merged]
    assert all(len(p) == 4 for p in pages[:-1])

    first = await stub.ListDeployments(svc.ListDeploymentsRequest(page_size=2))
    other_filter = svc.ListDeploymentsRequest(page_size=2, include_fluid=True, page_token=first.next_page_token)
    await expect_failure(stub.ListDeployments(other_filter), INVALID, "INVALID_PAGE_TOKEN", DOMAIN)
    await invalid(stub.ListDeployments(svc.ListDeploymentsRequest(environment=99)), upstream, "environment")
    await invalid(
        stub.ListDeployments(svc.ListDeploymentsRequest(page_size=-5, environment=42)),
        upstream,
        "page_size",
        "environment",
    )


async def test_get_deployment_converts_every_field(stub):
    text2img = (await stub.GetDeployment(svc.GetDeploymentRequest(deployment_id=DEPLOYMENTS["text2img"]))).deployment
    assert (text2img.workflow_id, text2img.workflow_name, text2img.workflow_version_id) == (
        WORKFLOWS["text2img"],
        "text2img",
        TEXT2IMG_V2,
    )
    assert (text2img.machine_id, text2img.machine_name) == (MACHINES["StationthisHun"], "StationthisHun")
    assert text2img.environment == deployment_pb2.ENVIRONMENT_PRODUCTION and not text2img.is_fluid
    assert text2img.gpu == gpu_pb2.GPU_TYPE_UNSPECIFIED and text2img.description == "text2img production"
    inputs = {i.input_id: i for i in text2img.input_types}
    assert inputs["input_steps"].type == "integer" and inputs["input_steps"].default_value.number_value == 20
    assert inputs["input_prompt"].display_name == "Prompt"
    assert inputs["input_prompt"].class_type == "ComfyUIDeployExternalText"
    assert list(inputs["input_sampler"].enum_options)[:2] == ["euler", "euler_ancestral"]
    assert inputs["input_lora_strength"].HasField("max_value") and inputs["input_lora_strength"].max_value == 1
    assert not inputs["input_prompt"].HasField("min_value")
    assert [(o.class_type, o.output_id) for o in text2img.output_types] == [
        ("ComfyDeployStdOutputImage", "output_image")
    ]
    lora = (await stub.GetDeployment(svc.GetDeploymentRequest(deployment_id=DEPLOYMENTS["lora_train"]))).deployment
    assert (lora.gpu, lora.concurrency_limit, lora.run_timeout.seconds) == (gpu_pb2.GPU_TYPE_H100, 1, 3600)
    upscale = (await stub.GetDeployment(svc.GetDeploymentRequest(deployment_id=DEPLOYMENTS["upscale"]))).deployment
    assert upscale.gpu == gpu_pb2.GPU_TYPE_A100_80GB
    preview = await stub.GetDeployment(svc.GetDeploymentRequest(deployment_id=DEPLOYMENTS["text2img-preview"]))
    assert preview.deployment.environment == deployment_pb2.ENVIRONMENT_PREVIEW


async def test_get_deployment_not_found_through_the_500_quirk_and_real_500s(stub, upstream, emulator):
    # Upstream answers an unknown (or another tenant's) deployment with a 500: checked against the lists.
    for deployment_id in (MISSING, DEPLOYMENTS["other-tenant"]):
        request = svc.GetDeploymentRequest(deployment_id=deployment_id)
        await missing(stub.GetDeployment(request), "DEPLOYMENT_NOT_FOUND", deployment_id=deployment_id)
    # A 500 for a deployment the lists do have is an outage, not a not-found.
    await emulator.set_faults(next_errors=[{"route": "deployments", "status": 500}])
    info, _ = await expect_failure(
        stub.GetDeployment(svc.GetDeploymentRequest(deployment_id=DEPLOYMENTS["text2img"])),
        grpc.StatusCode.UNAVAILABLE,
        "UPSTREAM_UNAVAILABLE",
        DOMAIN,
    )
    assert info.metadata["upstream_status"] == "500"
    for bad in BAD_IDS:
        await invalid(stub.GetDeployment(svc.GetDeploymentRequest(deployment_id=bad)), upstream, "deployment_id")


async def test_create_deployment_is_idempotent_and_refreshes_the_catalog(stub, upstream, stack):
    request = svc.CreateDeploymentRequest(
        request_id="create-deployment-1",
        workflow_id=WORKFLOWS["text2img"],
        workflow_version_id=TEXT2IMG_V1,
        machine_id=MACHINES["TRIPO"],
        environment=deployment_pb2.ENVIRONMENT_PRIVATE_SHARE,
        description="shared with friends",
    )
    refreshes = await upstream.count("GET /api/deployments")
    created = (await stub.CreateDeployment(request)).deployment
    assert (created.workflow_id, created.workflow_version_id, created.machine_id) == (
        WORKFLOWS["text2img"],
        TEXT2IMG_V1,
        MACHINES["TRIPO"],
    )
    assert created.environment == deployment_pb2.ENVIRONMENT_PRIVATE_SHARE
    assert (created.description, created.machine_name, created.workflow_name) == (
        "shared with friends",
        "TRIPO",
        "text2img",
    )
    assert await upstream.count("GET /api/deployments") > refreshes  # the catalog was reloaded...
    workflows = workflows_service_pb2_grpc.WorkflowsServiceStub(stack["workflows"].channel)
    listed = await workflows.GetWorkflow(workflows_service_pb2.GetWorkflowRequest(workflow_id=WORKFLOWS["text2img"]))
    assert created.deployment_id in {d.deployment_id for d in listed.workflow.deployments}  # ...and shows it

    again = await stub.CreateDeployment(request)
    assert again.deployment == created
    assert await upstream.count("POST /api/deployment") == 1  # the replay did not reach upstream
    reused = svc.CreateDeploymentRequest()
    reused.CopyFrom(request)
    reused.description = "something else"
    info, _ = await expect_failure(stub.CreateDeployment(reused), INVALID, "REQUEST_ID_REUSED", DOMAIN)
    assert info.metadata["request_id"] == "create-deployment-1"

    # Same (workflow, environment), no request_id: upstream upserts the same deployment.
    request.ClearField("request_id")
    request.workflow_version_id = TEXT2IMG_V2
    updated = (await stub.CreateDeployment(request)).deployment
    assert updated.deployment_id == created.deployment_id and updated.workflow_version_id == TEXT2IMG_V2


async def test_create_deployment_not_found_reasons_and_bad_input(stub, upstream):
    good = {
        "workflow_id": WORKFLOWS["text2img"],
        "workflow_version_id": TEXT2IMG_V1,
        "machine_id": MACHINES["TRIPO"],
        "environment": deployment_pb2.ENVIRONMENT_STAGING,
    }
    cases = [
        ({"workflow_id": MISSING}, "WORKFLOW_NOT_FOUND", "workflow_id"),
        ({"workflow_version_id": MISSING}, "WORKFLOW_VERSION_NOT_FOUND", "workflow_version_id"),
        ({"workflow_version_id": IMG2IMG_V1}, "WORKFLOW_VERSION_NOT_FOUND", "workflow_version_id"),  # not its own
        ({"machine_id": MISSING}, "MACHINE_NOT_FOUND", "machine_id"),
        ({"machine_id": MACHINES["deleted"]}, "MACHINE_NOT_FOUND", "machine_id"),
    ]
    for change, reason, key in cases:
        request = svc.CreateDeploymentRequest(**{**good, **change})
        await missing(stub.CreateDeployment(request), reason, **{key: getattr(request, key)})

    await invalid(
        stub.CreateDeployment(svc.CreateDeploymentRequest()),
        upstream,
        "workflow_id",
        "workflow_version_id",
        "machine_id",
        "environment",
    )
    too_long = svc.CreateDeploymentRequest(**good, description="x" * 1001, request_id="has a space")
    await invalid(stub.CreateDeployment(too_long), upstream, "description", "request_id")
    await invalid(stub.CreateDeployment(svc.CreateDeploymentRequest(**{**good, "machine_id": "xyz"})), upstream,
                  "machine_id")  # fmt: skip
    assert await upstream.count("POST /api/deployment") == len(cases)


# --------------------------------------------------------------------------- workflows and versions


async def test_workflow_versions_get_and_list_in_pages(stub, upstream):
    version = await stub.GetWorkflowVersion(svc.GetWorkflowVersionRequest(workflow_version_id=TEXT2IMG_V1))
    first = version.workflow_version
    assert (first.workflow_id, first.version, first.comment) == (WORKFLOWS["text2img"], 1, "initial version")
    assert first.HasField("workflow") and first.HasField("workflow_api") and first.create_time.seconds

    listed = await stub.ListWorkflowVersions(svc.ListWorkflowVersionsRequest(workflow_id=WORKFLOWS["text2img"]))
    assert [(v.workflow_version_id, v.version) for v in listed.workflow_versions] == [
        (TEXT2IMG_V2, 2),
        (TEXT2IMG_V1, 1),
    ]
    assert not any(v.HasField("workflow") or v.HasField("workflow_api") for v in listed.workflow_versions)
    assert not listed.next_page_token

    async def page(token: str) -> Any:
        request = svc.ListWorkflowVersionsRequest(workflow_id=WORKFLOWS["text2img"], page_size=1, page_token=token)
        return await stub.ListWorkflowVersions(request)

    assert [[v.version for v in p] for p in await walk(page, "workflow_versions")] == [[2], [1]]
    token = (await page("")).next_page_token
    elsewhere = svc.ListWorkflowVersionsRequest(workflow_id=WORKFLOWS["toon"], page_token=token)
    await expect_failure(stub.ListWorkflowVersions(elsewhere), INVALID, "INVALID_PAGE_TOKEN", DOMAIN)

    get = stub.GetWorkflowVersion(svc.GetWorkflowVersionRequest(workflow_version_id=MISSING))
    await missing(get, "WORKFLOW_VERSION_NOT_FOUND", workflow_version_id=MISSING)
    listing = stub.ListWorkflowVersions(svc.ListWorkflowVersionsRequest(workflow_id=MISSING))
    await missing(listing, "WORKFLOW_NOT_FOUND", workflow_id=MISSING)
    for bad in BAD_IDS:
        await invalid(
            stub.GetWorkflowVersion(svc.GetWorkflowVersionRequest(workflow_version_id=bad)),
            upstream,
            "workflow_version_id",
        )
        await invalid(stub.ListWorkflowVersions(svc.ListWorkflowVersionsRequest(workflow_id=bad)), upstream,
                      "workflow_id")  # fmt: skip
    await invalid(
        stub.ListWorkflowVersions(svc.ListWorkflowVersionsRequest(workflow_id=WORKFLOWS["toon"], page_size=-1)),
        upstream,
        "page_size",
    )


async def test_upload_workflow_then_a_version_idempotently(stub, upstream, emulator):
    source = await stub.GetWorkflowVersion(svc.GetWorkflowVersionRequest(workflow_version_id=TEXT2IMG_V2))
    graphs = source.workflow_version
    request = svc.UploadWorkflowRequest(
        request_id="upload-workflow-1",
        name="  my text2img  ",
        workflow=graphs.workflow,
        workflow_api=graphs.workflow_api,
        machine_id=MACHINES["TRIPO"],
    )
    refreshes = await upstream.count("GET /api/deployments")
    created = await stub.UploadWorkflow(request)
    assert created.version == 1 and created.machine_id == MACHINES["TRIPO"]
    assert created.workflow_id not in WORKFLOWS.values() and created.workflow_version_id
    assert await upstream.count("GET /api/deployments") > refreshes  # catalog refreshed
    assert await stub.UploadWorkflow(request) == created
    assert await upstream.count("POST /api/workflow") == 1

    # Upstream stored the graphs as sent: whole numbers stay ints (link indexes, INT inputs).
    async with emulator.client() as api:
        stored = (await api.get(f"/workflow-version/{created.workflow_version_id}")).json()
        original = (await api.get(f"/workflow-version/{TEXT2IMG_V2}")).json()
        workflow = (await api.get(f"/workflow/{created.workflow_id}")).json()
    assert stored["workflow_api"] == original["workflow_api"]
    links = [v for node in stored["workflow_api"].values() for v in node["inputs"].values() if isinstance(v, list)]
    assert links and all(type(index) is int for _, index in links)  # ["12", 0], not ["12", 0.0]
    assert stored["workflow"] == original["workflow"] and workflow["name"] == "my text2img"

    version_request = svc.UploadWorkflowRequest(
        request_id="upload-workflow-2",
        workflow_id=created.workflow_id,
        workflow=graphs.workflow,
        workflow_api=graphs.workflow_api,
        comment="second take",
    )
    second = await stub.UploadWorkflow(version_request)
    assert (second.workflow_id, second.version) == (created.workflow_id, 2)
    assert await stub.UploadWorkflow(version_request) == second
    assert await upstream.count("POST /api/workflow/{workflow_id}/version") == 1
    got = await stub.GetWorkflowVersion(svc.GetWorkflowVersionRequest(workflow_version_id=second.workflow_version_id))
    assert got.workflow_version.comment == "second take"
    assert json_format.MessageToDict(got.workflow_version.workflow_api) == json_format.MessageToDict(
        graphs.workflow_api
    )

    preview = svc.ListDeploymentsRequest(environment=deployment_pb2.ENVIRONMENT_PREVIEW)
    previews = (await stub.ListDeployments(preview)).deployments
    assert created.workflow_id in {d.workflow_id for d in previews}  # upstream made a preview deployment

    reused = svc.UploadWorkflowRequest()
    reused.CopyFrom(version_request)
    reused.comment = "third take"
    await expect_failure(stub.UploadWorkflow(reused), INVALID, "REQUEST_ID_REUSED", DOMAIN)


async def test_upload_workflow_not_found_reasons_and_bad_input(stub, upstream):
    graph = json_format.ParseDict({"1": {"class_type": "ComfyUIDeployExternalText", "inputs": {}}}, struct_pb2.Struct())
    ui = json_format.ParseDict({"nodes": []}, struct_pb2.Struct())
    to_missing = svc.UploadWorkflowRequest(workflow_id=MISSING, workflow=ui, workflow_api=graph)
    await missing(stub.UploadWorkflow(to_missing), "WORKFLOW_NOT_FOUND", workflow_id=MISSING)  # from a 500
    for workflow_id in ("", WORKFLOWS["toon"]):
        on_missing_machine = svc.UploadWorkflowRequest(
            name="x", workflow_id=workflow_id, workflow=ui, workflow_api=graph, machine_id=MISSING
        )
        await missing(stub.UploadWorkflow(on_missing_machine), "MACHINE_NOT_FOUND", machine_id=MISSING)

    await invalid(stub.UploadWorkflow(svc.UploadWorkflowRequest()), upstream, "name", "workflow", "workflow_api")
    await invalid(
        stub.UploadWorkflow(svc.UploadWorkflowRequest(name="x" * 201, workflow=ui, workflow_api=graph)),
        upstream,
        "name",
    )
    await invalid(
        stub.UploadWorkflow(
            svc.UploadWorkflowRequest(
                workflow_id="nope", machine_id="nope", workflow=ui, workflow_api=graph, comment="c" * 1001
            )
        ),
        upstream,
        "workflow_id",
        "machine_id",
        "comment",
    )
    # Adding a version needs no name.
    added = await stub.UploadWorkflow(svc.UploadWorkflowRequest(workflow_id=WORKFLOWS["toon"], workflow=ui,
                                                                workflow_api=graph))  # fmt: skip
    assert added.version == 2


# --------------------------------------------------------------------------- upstream failures


async def test_upstream_503_after_retries_is_unavailable(stub, upstream, emulator):
    before = await upstream.count("GET /api/machines")
    await emulator.set_faults(error_rates={"machines": {"503": 1.0}})
    info, _ = await expect_failure(
        stub.ListMachines(svc.ListMachinesRequest()), grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE", DOMAIN
    )
    assert info.metadata["upstream_status"] == "503"
    assert await upstream.count("GET /api/machines") - before == 4  # the client's attempts, then the answer
    await emulator.set_faults(next_errors=[{"route": "workflows", "action": "drop"}])
    request = svc.UploadWorkflowRequest(name="x", workflow=struct_pb2.Struct(), workflow_api=struct_pb2.Struct())
    info, _ = await expect_failure(
        stub.UploadWorkflow(request), grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE", DOMAIN
    )
    assert info.metadata["outcome"] == "unknown"  # the upload may have happened: never re-sent
    assert await upstream.count("POST /api/workflow") == 1


async def test_rejected_key_and_the_upload_limit_setting(stub, stack, emulator, start_service, redis_url):
    wrong = await start_comfyui(
        start_service, stack, redis_url, COMFYDEPLOY_API_URL=emulator.base_url, COMFYDEPLOY_API_KEY="wrong-key"
    )
    await expect_failure(
        wrong.ListMachines(svc.ListMachinesRequest()), grpc.StatusCode.INTERNAL, "UPSTREAM_UNAUTHORIZED", DOMAIN
    )
    small = await start_comfyui(
        start_service,
        stack,
        redis_url,
        COMFYDEPLOY_API_URL=emulator.base_url,
        COMFYDEPLOY_API_KEY=emulator.api_key,
        COMFYUI_MAX_UPLOAD_BYTES="1000",
    )
    info, _ = await expect_failure(
        small.UploadFile(stream(metadata(size_bytes=1001))), INVALID, "FILE_TOO_LARGE", DOMAIN
    )
    assert dict(info.metadata) == {"limit_bytes": "1000", "size_bytes": "1001"}
    assert load(ComfyUIConfig, {}).max_upload_bytes == 262_144_000
    with pytest.raises(ConfigError, match="COMFYUI_MAX_UPLOAD_BYTES"):
        load(ComfyUIConfig, {"COMFYUI_MAX_UPLOAD_BYTES": "0"})


# --------------------------------------------------------------------------- UploadFile


def metadata(**fields: Any) -> svc.UploadFileRequest:
    values = {"user_id": "user-1", "filename": "cat.png", "content_type": "image/png", "size_bytes": 4, **fields}
    return svc.UploadFileRequest(metadata=svc.UploadFileMetadata(**values))


async def stream(*messages: svc.UploadFileRequest, chunks: Iterable[bytes] = ()) -> AsyncIterator[Any]:
    for message in messages:
        yield message
    for chunk in chunks:
        yield svc.UploadFileRequest(chunk=chunk)


async def test_upload_file_streams_chunks_and_replays(stub, upstream, emulator):
    data = bytes(range(256)) * 10_000  # 2.4 MiB: three chunks
    chunks = [data[i : i + (1 << 20)] for i in range(0, len(data), 1 << 20)]
    first = metadata(request_id="upload-file-1", size_bytes=len(data), filename="big.png")
    uploaded = await stub.UploadFile(stream(first, chunks=chunks))
    assert uploaded.file_id.startswith("img_") and uploaded.url.endswith(f"{uploaded.file_id}.png")
    assert (uploaded.size_bytes, uploaded.content_type, uploaded.filename) == (len(data), "image/png", "big.png")
    async with httpx.AsyncClient(trust_env=False) as plain:
        assert (await plain.get(uploaded.url)).content == data

    assert await stub.UploadFile(stream(first, chunks=chunks)) == uploaded  # bytes read, discarded
    assert await upstream.count("POST /api/file/upload") == 1
    other = metadata(request_id="upload-file-1", size_bytes=len(data), filename="other.png")
    await expect_failure(stub.UploadFile(stream(other, chunks=chunks)), INVALID, "REQUEST_ID_REUSED", DOMAIN)
    video = await stub.UploadFile(stream(metadata(filename="clip.mp4", content_type="video/mp4"), chunks=[b"abcd"]))
    assert video.file_id.startswith("vid_")


async def test_upload_file_stops_reading_once_more_bytes_arrive_than_declared(stub, upstream):
    sent = 0
    chunk = b"x" * (1 << 20)

    async def endless() -> AsyncIterator[Any]:
        nonlocal sent
        yield metadata(size_bytes=len(chunk) + 10)
        for _ in range(64):  # 64 MiB offered
            sent += 1
            yield svc.UploadFileRequest(chunk=chunk)

    before = await upstream.total()
    info, _ = await expect_failure(stub.UploadFile(endless()), INVALID, "FILE_TOO_LARGE", DOMAIN)
    assert info.metadata["received_bytes"] == str(2 * len(chunk)) and info.metadata["size_bytes"] == str(
        len(chunk) + 10
    )
    assert sent < 32, f"{sent} chunks were read: the stream should stop at the second"
    assert await upstream.total() == before


async def test_upload_file_rejections_never_reach_upstream(stub, upstream):
    async def fails(reason: str, *messages: Any, chunks: Iterable[bytes] = ()) -> Any:
        before = await upstream.total()
        info, bad = await expect_failure(stub.UploadFile(stream(*messages, chunks=chunks)), INVALID, reason, DOMAIN)
        assert await upstream.total() == before
        return info, bad

    info, _ = await fails("FILE_TOO_LARGE", metadata(size_bytes=262_144_001))
    assert dict(info.metadata) == {"limit_bytes": "262144000", "size_bytes": "262144001"}
    info, _ = await fails("FILE_SIZE_MISMATCH", metadata(size_bytes=10), chunks=[b"abc", b"def"])
    assert dict(info.metadata) == {"size_bytes": "10", "received_bytes": "6"}
    await fails("FILE_SIZE_MISMATCH", svc.UploadFileRequest(chunk=b"abcd"))  # no metadata first
    await fails("FILE_SIZE_MISMATCH")  # nothing at all
    info, bad = await fails("UNSUPPORTED_FILE_TYPE", metadata(content_type="text/plain"), chunks=[b"abcd"])
    assert dict(info.metadata) == {"content_type": "text/plain"}
    assert [v.field for v in bad.field_violations] == ["metadata.content_type"]
    _, bad = await fails(
        "UNSUPPORTED_FILE_TYPE", metadata(filename="notes.txt", content_type="application/octet-stream")
    )
    assert [v.field for v in bad.field_violations] == ["metadata.filename"]  # upstream goes by the extension

    cases = [
        (metadata(filename="dir/cat.png"), ["metadata.filename"]),
        (metadata(filename="..\\cat.png"), ["metadata.filename"]),
        (metadata(filename="c" * 252 + ".png"), ["metadata.filename"]),
        (metadata(filename="", user_id="", content_type="png", size_bytes=0, request_id="a b"),
         ["metadata.filename", "metadata.user_id", "metadata.content_type", "metadata.size_bytes",
          "metadata.request_id"]),
    ]  # fmt: skip
    for first, fields in cases:
        _, bad = await fails("INVALID_REQUEST", first, chunks=[b"abcd"])
        assert sorted(v.field for v in bad.field_violations) == sorted(fields)
    _, bad = await fails("INVALID_REQUEST", metadata(size_bytes=(1 << 20) + 1), chunks=[b"x" * ((1 << 20) + 1)])
    assert [v.field for v in bad.field_violations] == ["chunk"]
    _, bad = await fails("INVALID_REQUEST", metadata(), metadata())
    assert [v.field for v in bad.field_violations] == ["metadata"]


# --------------------------------------------------------------------------- error mapping


WORKFLOW = Named("WORKFLOW_NOT_FOUND", "workflow_id", "w")
VERSION = Named("WORKFLOW_VERSION_NOT_FOUND", "workflow_version_id", "v")
MACHINE = Named("MACHINE_NOT_FOUND", "machine_id", "m")
ROUTE = "POST /deployment"


@pytest.mark.parametrize(
    "error,named,code,reason,metadata",
    [
        (cd.NotFound(404, "Workflow version not found", False, ROUTE), [WORKFLOW, VERSION, MACHINE],
         grpc.StatusCode.NOT_FOUND, "WORKFLOW_VERSION_NOT_FOUND", {"workflow_version_id": "v"}),
        (cd.NotFound(404, "Workflow not found", False, ROUTE), [WORKFLOW, VERSION, MACHINE],
         grpc.StatusCode.NOT_FOUND, "WORKFLOW_NOT_FOUND", {"workflow_id": "w"}),
        (cd.ServerError(500, "Internal server error: 404: Machine not found", False, ROUTE), [WORKFLOW, MACHINE],
         grpc.StatusCode.NOT_FOUND, "MACHINE_NOT_FOUND", {"machine_id": "m"}),
        (cd.NotFound(404, "Not Found", False, ROUTE), [MACHINE],
         grpc.StatusCode.NOT_FOUND, "MACHINE_NOT_FOUND", {"machine_id": "m"}),  # the only thing it can be
        (cd.NotFound(404, "Not Found", False, ROUTE), [],
         grpc.StatusCode.FAILED_PRECONDITION, "UPSTREAM_REJECTED",
         {"upstream_status": "404", "upstream_detail": "Not Found"}),
        (cd.ValidationFailed(422, "body.x: Field required", False, ROUTE), [MACHINE],
         grpc.StatusCode.FAILED_PRECONDITION, "UPSTREAM_REJECTED",
         {"upstream_status": "422", "upstream_detail": "body.x: Field required"}),
        (cd.Unauthorized(401, "Invalid or expired token", False, ROUTE), [],
         grpc.StatusCode.INTERNAL, "UPSTREAM_UNAUTHORIZED", {"upstream_status": "401"}),
        (cd.Forbidden(403, "Your account has been suspended.", False, ROUTE), [],
         grpc.StatusCode.INTERNAL, "UPSTREAM_UNAUTHORIZED", {"upstream_status": "403"}),
        (cd.RateLimited(429, "Too Many Requests", True, ROUTE), [],
         grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE", {"upstream_status": "429"}),
        (cd.ServerError(500, "Internal server error", False, ROUTE), [MACHINE],
         grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE", {"upstream_status": "500"}),
        (cd.CircuitOpen(None, "circuit breaker open", True, ROUTE), [],
         grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE", {}),
        (cd.DeadlineExceeded(None, "deadline reached", False, ROUTE), [],
         grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE", {}),
        (cd.OutcomeUnknown(502, "Bad Gateway", False, ROUTE), [],
         grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE", {"upstream_status": "502", "outcome": "unknown"}),
    ],
)  # fmt: skip
def test_upstream_errors_map_to_the_contract_reasons(error, named, code, reason, metadata):
    mapped = upstream_error(error, named)
    assert (mapped.code, mapped.reason, mapped.metadata) == (code, reason, metadata)
