"""gRPC handlers of WorkflowsService: validate at the edge, answer from the cached catalog."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2
from redis.asyncio import Redis

from common.errors import DomainError
from common.proto_time import duration_from_seconds, timestamp_from_ms
from common.validation import Violations, decode_page_token, encode_page_token
from stationthis.workflows.v1 import workflow_pb2, workflows_service_pb2, workflows_service_pb2_grpc

from .cache import CatalogCache
from .catalog import CatalogIndex, deployment_message, validate_inputs

MAX_ID = 256
MAX_NAME = 200
MAX_REMEMBERED_ANSWERS = 4096  # distinct (name as typed, environment) resolutions kept per catalog
IDEMPOTENCY_TTL_SECONDS = 86_400


ENVIRONMENTS = frozenset(workflow_pb2.Environment.values())


def _environment(check: Violations, value: int) -> None:
    if value not in ENVIRONMENTS:
        check.add("environment", "is not a known environment")


class WorkflowsServicer(workflows_service_pb2_grpc.WorkflowsServiceServicer):
    def __init__(self, cache: CatalogCache, redis: Redis) -> None:
        self.cache = cache
        self.redis = redis

    async def ListWorkflows(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        check = Violations()
        page_size = check.page_size(request.page_size)
        _environment(check, request.environment)
        check.check()
        index = await self.cache.index()
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
        return workflows_service_pb2.ListWorkflowsResponse(
            workflows=[index.render(w, d) for w, d in page],
            next_page_token=encode_page_token({"e": request.environment, "b": index.built_ms, "o": offset + page_size})
            if more
            else "",
        )

    async def _by_id(self, request: Any) -> tuple[Any, Any, Any]:
        """The catalog, the workflow a request names by id and its deployment in the environment."""
        check = Violations()
        check.text("workflow_id", request.workflow_id, MAX_ID, required=True)
        _environment(check, request.environment)
        check.check()
        index = await self.cache.index()
        workflow = index.get(request.workflow_id)
        return index, workflow, index.deployment_for(workflow, request.environment)

    async def GetWorkflow(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        index, workflow, deployment = await self._by_id(request)
        return workflows_service_pb2.GetWorkflowResponse(workflow=index.render(workflow, deployment))

    async def ResolveWorkflow(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        key = (request.name, request.environment)
        index = self.cache.current()
        if index is not None and key in index.answers:  # asked and answered before: valid, fresh
            self.cache.counters.hits += 1
            return index.answers[key]
        check = Violations()
        check.text("name", request.name.strip(), MAX_NAME, required=True)
        _environment(check, request.environment)
        check.check()
        index = await self.cache.index()
        answer = index.answers.get(key)
        if answer is None:  # the catalog never changes once built: each answer is built once
            workflow, matched_by, standardized = index.resolve(request.name)
            deployment = index.deployment_for(workflow, request.environment)
            answer = workflows_service_pb2.ResolveWorkflowResponse(
                workflow=index.render(workflow, deployment),
                standardized_name=standardized,
                matched_by=workflows_service_pb2.MatchedBy.Name(matched_by),
                deployment=deployment_message(deployment),
            )
            if len(index.answers) < MAX_REMEMBERED_ANSWERS:
                index.answers[key] = answer
        return answer

    async def ValidateInputs(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        _, workflow, deployment = await self._by_id(request)
        given = json_format.MessageToDict(request.inputs)
        complete, defaulted = validate_inputs(
            deployment["inputs"],
            given,
            {"workflow_id": workflow["workflow_id"], "workflow_version_id": deployment["workflow_version_id"]},
        )
        inputs = struct_pb2.Struct()
        json_format.ParseDict(complete, inputs)
        return workflows_service_pb2.ValidateInputsResponse(
            inputs=inputs, defaulted_input_ids=defaulted, workflow_version_id=deployment["workflow_version_id"]
        )

    async def RefreshCatalog(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        check = Violations()
        if request.request_id:
            check.request_id(request.request_id)
        check.check()
        key = f"wf:idem:RefreshCatalog:{request.request_id}"
        if request.request_id:
            stored = await self.redis.get(key)
            if stored is not None:
                return workflows_service_pb2.RefreshCatalogResponse.FromString(stored)  # type: ignore[arg-type]
        index = await self.cache.refresh()
        response = workflows_service_pb2.RefreshCatalogResponse(stats=await self._stats(index))
        if request.request_id:
            await self.redis.set(key, response.SerializeToString(), ex=IDEMPOTENCY_TTL_SECONDS, nx=True)
        return response

    async def GetCatalogStats(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            index: CatalogIndex | None = await self.cache.index(count=False)
        except DomainError:  # nothing loaded and upstream down: the stats say so; they must answer
            index = None
        return workflows_service_pb2.GetCatalogStatsResponse(stats=await self._stats(index))

    async def _stats(self, index: CatalogIndex | None) -> workflow_pb2.CatalogStats:
        shared = await self.cache.shared_stats()
        counters = self.cache.counters
        settings = self.cache.settings
        stats = workflow_pb2.CatalogStats(
            workflow_count=len(index) if index else 0,
            hits=counters.hits,
            misses=counters.misses,
            refreshes=int(shared.get("refreshes", 0)),
            refresh_failures=int(shared.get("refresh_failures", 0)),
            upstream_errors=self.cache.upstream_errors(),
            upstream_healthy=counters.upstream_healthy and not shared.get("last_error"),
            last_error=shared.get("last_error", ""),
            ttl=duration_from_seconds(settings.ttl_seconds),
            name_collisions=index.collisions if index else [],
        )
        if shared.get("last_refresh_ms"):
            stats.last_refresh_time.CopyFrom(timestamp_from_ms(int(shared["last_refresh_ms"])))
            stats.last_refresh_duration.CopyFrom(duration_from_seconds(int(shared.get("last_duration_ms", 0)) / 1000))
        if index is not None:
            age = max(0.0, self.cache.clock() - index.built_ms / 1000)
            stats.catalog_age.CopyFrom(duration_from_seconds(age))
            stats.stale = age > settings.ttl_seconds
        else:
            stats.stale = True
        return stats
