"""gRPC handlers of WorkflowsService: validate at the edge, answer from the cached catalog."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from common.errors import DomainError
from common.idempotency import RequestIds, fingerprint
from common.validation import Violations, decode_page_token, encode_page_token
from stationthis.workflows.v1 import workflow_pb2, workflows_service_pb2, workflows_service_pb2_grpc

from . import convert
from .catalog import CatalogIndex
from .inputs import validate_inputs
from .store import CatalogStore

MAX_ID = 256
MAX_NAME = 200
MAX_REMEMBERED_ANSWERS = 4096  # distinct (name as typed, environment) resolutions kept per catalog

KNOWN_ENVIRONMENTS = frozenset(workflow_pb2.Environment.values())

SVC = workflows_service_pb2
ById = SVC.GetWorkflowRequest | SVC.ValidateInputsRequest


def _environment(check: Violations, value: int) -> None:
    if value not in KNOWN_ENVIRONMENTS:
        check.add("environment", "is not a known environment")


class Answers:
    """Messages built from one catalog. A catalog never changes once built, so each is built once;
    callers copy them into their responses (protobuf constructors copy) and never mutate them."""

    def __init__(self, index: CatalogIndex) -> None:
        self.index = index
        self.workflows: dict[tuple[str, str], workflow_pb2.Workflow] = {}
        self.resolved: dict[tuple[str, int], SVC.ResolveWorkflowResponse] = {}

    def workflow(self, entry: dict[str, Any], deployment: dict[str, Any] | None) -> workflow_pb2.Workflow:
        key = (entry["workflow_id"], deployment["deployment_id"] if deployment else "")
        message = self.workflows.get(key)
        if message is None:
            message = self.workflows[key] = convert.workflow(self.index, entry, deployment)
        return message


class WorkflowsServicer(workflows_service_pb2_grpc.WorkflowsServiceServicer):
    def __init__(self, store: CatalogStore, request_ids: RequestIds) -> None:
        self.store = store
        self.request_ids = request_ids
        self._answers: Answers | None = None

    def _built(self, index: CatalogIndex) -> Answers:
        """The answers built from ``index`` (started afresh when the catalog changes)."""
        answers = self._answers
        if answers is None or answers.index is not index:
            answers = self._answers = Answers(index)
        return answers

    async def ListWorkflows(
        self, request: SVC.ListWorkflowsRequest, context: grpc.aio.ServicerContext
    ) -> SVC.ListWorkflowsResponse:
        check = Violations()
        page_size = check.page_size(request.page_size)
        _environment(check, request.environment)
        check.check()
        index = await self.store.index()
        offset = 0
        if request.page_token:
            token = decode_page_token(request.page_token, {"e": request.environment, "b": index.built_ms})
            given = token.get("o")
            offset = given if isinstance(given, int) and not isinstance(given, bool) else -1
            if offset < 0:
                decode_page_token("", {})  # raises INVALID_PAGE_TOKEN
        chosen = []
        for workflow in index.all():
            deployment = index.listed_deployment(workflow, request.environment)
            if request.environment and deployment is None:
                continue
            chosen.append((workflow, deployment))
        page = chosen[offset : offset + page_size]
        more = offset + page_size < len(chosen)
        answers = self._built(index)
        return SVC.ListWorkflowsResponse(
            workflows=[answers.workflow(w, d) for w, d in page],
            next_page_token=encode_page_token({"e": request.environment, "b": index.built_ms, "o": offset + page_size})
            if more
            else "",
        )

    async def _by_id(self, request: ById) -> tuple[CatalogIndex, dict[str, Any], dict[str, Any]]:
        """The catalog, the workflow a request names by id and its deployment in the environment."""
        check = Violations()
        check.text("workflow_id", request.workflow_id, MAX_ID, required=True)
        _environment(check, request.environment)
        check.check()
        index = await self.store.index()
        workflow = index.get(request.workflow_id)
        return index, workflow, index.deployment_for(workflow, request.environment)

    async def GetWorkflow(
        self, request: SVC.GetWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> SVC.GetWorkflowResponse:
        index, workflow, deployment = await self._by_id(request)
        return SVC.GetWorkflowResponse(workflow=self._built(index).workflow(workflow, deployment))

    async def ResolveWorkflow(
        self, request: SVC.ResolveWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> SVC.ResolveWorkflowResponse:
        key = (request.name, request.environment)
        index = self.store.current()
        answers = self._answers
        if index is not None and answers is not None and answers.index is index:
            answer = answers.resolved.get(key)
            if answer is not None:  # asked and answered before: valid, fresh
                self.store.counters.hits += 1
                return answer
        check = Violations()
        check.text("name", request.name.strip(), MAX_NAME, required=True)
        _environment(check, request.environment)
        check.check()
        index = await self.store.index()
        answers = self._built(index)
        answer = answers.resolved.get(key)
        if answer is None:
            workflow, matched_by, standardized = index.resolve(request.name)
            deployment = index.deployment_for(workflow, request.environment)
            answer = SVC.ResolveWorkflowResponse(
                workflow=answers.workflow(workflow, deployment),
                standardized_name=standardized,
                matched_by=SVC.MatchedBy.Name(matched_by),
                deployment=convert.deployment_message(deployment),
            )
            if len(answers.resolved) < MAX_REMEMBERED_ANSWERS:
                answers.resolved[key] = answer
        return answer

    async def ValidateInputs(
        self, request: SVC.ValidateInputsRequest, context: grpc.aio.ServicerContext
    ) -> SVC.ValidateInputsResponse:
        _, workflow, deployment = await self._by_id(request)
        given = json_format.MessageToDict(request.inputs)
        complete, defaulted = validate_inputs(
            deployment["inputs"],
            given,
            {"workflow_id": workflow["workflow_id"], "workflow_version_id": deployment["workflow_version_id"]},
        )
        inputs = struct_pb2.Struct()
        json_format.ParseDict(complete, inputs)
        return SVC.ValidateInputsResponse(
            inputs=inputs, defaulted_input_ids=defaulted, workflow_version_id=deployment["workflow_version_id"]
        )

    async def RefreshCatalog(
        self, request: SVC.RefreshCatalogRequest, context: grpc.aio.ServicerContext
    ) -> SVC.RefreshCatalogResponse:
        check = Violations()
        if request.request_id:
            check.request_id(request.request_id)
        check.check()
        fp = fingerprint(request)
        if request.request_id:
            remembered = await self.request_ids.replay(
                "RefreshCatalog", request.request_id, fp, SVC.RefreshCatalogResponse
            )
            if remembered is not None:
                return remembered
        index = await self.store.refresh()
        response = SVC.RefreshCatalogResponse(stats=await self._stats(index))
        if request.request_id:  # two racing with one id: both get the first one's answer
            response = await self.request_ids.once("RefreshCatalog", request.request_id, fp, response)
        return response

    async def GetCatalogStats(
        self, request: SVC.GetCatalogStatsRequest, context: grpc.aio.ServicerContext
    ) -> SVC.GetCatalogStatsResponse:
        try:
            index: CatalogIndex | None = await self.store.index(count=False)
        except DomainError:  # nothing loaded and upstream down: the stats say so; they must answer
            index = None
        return SVC.GetCatalogStatsResponse(stats=await self._stats(index))

    async def _stats(self, index: CatalogIndex | None) -> workflow_pb2.CatalogStats:
        counters = self.store.counters
        return convert.catalog_stats(
            index,
            await self.store.shared_stats(),
            hits=counters.hits,
            misses=counters.misses,
            upstream_errors=self.store.upstream_errors(),
            upstream_healthy=counters.upstream_healthy,
            ttl_seconds=self.store.ttl_seconds,
            now_seconds=self.store.now(),
        )
