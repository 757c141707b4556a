"""Helpers for the WorkflowsService tests: a fake clock, error details, a gated upstream client and
shortcuts that create workflows and deployments through the emulator's own API."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2

from comfydeploy.client import ComfyDeployClient
from comfydeploy.models import Deployment
from emulator.testing import MACHINES, RunningEmulator
from stationthis.workflows.v1 import workflow_pb2, workflows_service_pb2, workflows_service_pb2_grpc
from tests.support import expect_failure, rpc_details

DOMAIN = "workflows.stationthis.dev"
T0 = 1_760_000_000.0  # the fake clock's start (epoch seconds)
rpc = workflows_service_pb2
W = workflow_pb2
LISTINGS = ("GET /api/deployments", "GET /api/machines")


class FakeClock:
    """Epoch seconds that only move when a test says so (the catalog's TTL runs on it)."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


details = rpc_details


async def fails(
    call: Awaitable[Any], code: grpc.StatusCode, reason: str
) -> tuple[error_details_pb2.ErrorInfo, error_details_pb2.BadRequest | None]:
    """Await ``call``, expecting ``code`` with ErrorInfo ``reason`` in this service's domain."""
    return await expect_failure(call, code, reason, DOMAIN)


def violations(bad: error_details_pb2.BadRequest | None) -> dict[str, str]:
    """field -> description; each field named once."""
    assert bad is not None, "no BadRequest"
    fields = [v.field for v in bad.field_violations]
    assert len(fields) == len(set(fields)), f"a field is reported twice: {fields}"
    return {v.field: v.description for v in bad.field_violations}


def plain(message: Any) -> Any:
    """A protobuf Value/Struct as plain Python (numbers stay floats, as JSON sends them)."""
    return json_format.MessageToDict(message)


# --- the upstream, gated ---------------------------------------------------------------------------


@dataclass
class Upstream:
    """Shared by the gated clients of several replicas: ``gate`` holds deployment listings until set;
    ``tamper`` (when set) rewrites a listing after it arrived (to make a malformed one)."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    tamper: Callable[[list[Deployment]], list[Deployment]] | None = None
    listings: int = 0  # listings that passed the gate

    def __post_init__(self) -> None:
        self.gate.set()


class GatedClient(ComfyDeployClient):
    """The real client against the emulator; only ``list_all_deployments`` waits for the gate."""

    def __init__(self, base_url: str, api_key: str, upstream: Upstream, **options: Any) -> None:
        super().__init__(base_url, api_key, **options)
        self.shared = upstream

    async def list_all_deployments(
        self, environment: str | None = None, *, deadline: float | None = None
    ) -> list[Deployment]:
        await self.shared.gate.wait()
        self.shared.listings += 1
        found = await super().list_all_deployments(environment, deadline=deadline)
        return self.shared.tamper(found) if self.shared.tamper else found


# --- one replica -----------------------------------------------------------------------------------


@dataclass
class Replica:
    stub: workflows_service_pb2_grpc.WorkflowsServiceStub
    clock: FakeClock
    running: Any
    emulator: RunningEmulator

    @property
    def cache(self) -> Any:
        return self.running.app.cache

    async def stats(self) -> W.CatalogStats:
        return (await self.stub.GetCatalogStats(rpc.GetCatalogStatsRequest(), timeout=30)).stats

    async def get(self, workflow_id: str, environment: int = 0) -> W.Workflow:
        request = rpc.GetWorkflowRequest(workflow_id=workflow_id, environment=environment)
        return (await self.stub.GetWorkflow(request, timeout=30)).workflow

    def resolve(self, name: str, environment: int = 0) -> Any:
        return self.stub.ResolveWorkflow(rpc.ResolveWorkflowRequest(name=name, environment=environment), timeout=30)

    def validate(self, workflow_id: str, inputs: dict[str, Any], environment: int = 0) -> Any:
        request = rpc.ValidateInputsRequest(workflow_id=workflow_id, environment=environment)
        request.inputs.update(inputs)
        return self.stub.ValidateInputs(request, timeout=30)

    async def list_all(self, environment: int = 0, page_size: int = 0) -> list[W.Workflow]:
        out: list[W.Workflow] = []
        token = ""
        while True:
            page = await self.stub.ListWorkflows(
                rpc.ListWorkflowsRequest(environment=environment, page_size=page_size, page_token=token), timeout=30
            )
            out.extend(page.workflows)
            token = page.next_page_token
            if not token:
                return out

    def refresh(self, request_id: str = "") -> Any:
        return self.stub.RefreshCatalog(rpc.RefreshCatalogRequest(request_id=request_id), timeout=30)


async def listings(emulator: RunningEmulator) -> tuple[int, int]:
    """(GET /deployments, GET /machines) requests the emulator received since its stats were reset."""
    routes = (await emulator.stats())["routes"]
    return routes.get(LISTINGS[0], 0), routes.get(LISTINGS[1], 0)


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 15.0, what: str = "condition") -> None:
    """Poll ``check`` (a logical condition, not a timing) until true; AssertionError after ``within`` s."""
    try:
        async with asyncio.timeout(within):
            while not await check():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"{what} not reached within {within}s") from None


# --- creating things upstream, through the emulator's API -----------------------------------------


async def create_workflow(
    emulator: RunningEmulator,
    name: str,
    workflow_api: dict[str, Any],
    ui: dict[str, Any] | None = None,
    machine: str = "fluxdev",
) -> tuple[str, str]:
    """``POST /api/workflow`` with a machine: a workflow, its version 1 and a preview deployment.
    Returns (workflow_id, workflow_version_id)."""
    async with emulator.client() as http:
        created = await http.post(
            "/workflow",
            json={
                "name": name,
                "workflow_json": json.dumps(ui or {"nodes": [], "links": []}),
                "workflow_api": json.dumps(workflow_api),
                "machine_id": MACHINES[machine],
            },
        )
        created.raise_for_status()
        workflow_id = created.json()["workflow_id"]
        found = await http.get(f"/workflow/{workflow_id}")
        found.raise_for_status()
        return workflow_id, found.json()["versions"][0]["id"]


async def create_deployment(
    emulator: RunningEmulator,
    workflow_id: str,
    version_id: str,
    environment: str,
    machine: str,
    deployment_id: str | None = None,
) -> str:
    """``POST /api/deployment``; returns the deployment id."""
    body = {
        "workflow_id": workflow_id,
        "workflow_version_id": version_id,
        "environment": environment,
        "machine_id": MACHINES[machine],
    }
    if deployment_id:
        body["deployment_id"] = deployment_id
    async with emulator.client() as http:
        response = await http.post("/deployment", json=body)
        response.raise_for_status()
        return str(response.json()["id"])


async def create_deployed_workflow(emulator: RunningEmulator, name: str, machine: str = "fluxdev") -> str:
    """A new workflow deployed in preview and production; returns its id."""
    workflow_id, version_id = await create_workflow(emulator, name, simple_graph(name), machine=machine)
    await create_deployment(emulator, workflow_id, version_id, "production", machine)
    return workflow_id


def simple_graph(prompt: str = "hello") -> dict[str, Any]:
    """A minimal workflow_api: one text input and a standard image output."""
    return {
        "1": {
            "class_type": "ComfyUIDeployExternalText",
            "inputs": {"input_id": "input_prompt", "default_value": prompt},
        },
        "2": {"class_type": "ComfyDeployStdOutputImage", "inputs": {"output_id": "output_image", "images": ["1", 0]}},
    }


def by_id(inputs: Sequence[W.WorkflowInput]) -> dict[str, W.WorkflowInput]:
    return {i.input_id: i for i in inputs}
