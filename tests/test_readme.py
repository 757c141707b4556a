"""The README tells the truth: its commands, its variables and the state of each RPC."""

from __future__ import annotations

import re

import grpc
import pytest

from common.config import ServerConfig, variables
from emulator.settings import EmulatorSettings
from gateway.app import SERVICES
from gateway.config import GatewayConfig
from gateway.routes import routes_for
from services.comfyui.config import ComfyUIConfig
from services.points.config import PointsConfig
from services.workflows.config import WorkflowsConfig
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
CONFIGS = (ServerConfig, PointsConfig, WorkflowsConfig, ComfyUIConfig, GatewayConfig, EmulatorSettings)
ADDRESS_OF = {"PointsService": "points", "WorkflowsService": "workflows", "ComfyUIService": "comfyui"}


def table_rows(heading_pattern: str) -> list[list[str]]:
    """Rows of the first Markdown table after the first line matching ``heading_pattern``."""
    lines = README.splitlines()
    start = next(i for i, line in enumerate(lines) if re.search(heading_pattern, line))
    rows, in_table = [], False
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            in_table = True
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not set("".join(cells)) <= set("-: "):
                rows.append(cells)
        elif in_table:
            break
    return rows[1:]  # without the header


def test_two_commands_and_ci():
    assert "make run" in README and "make test" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci, ".ci/run must call the README's test command"


def test_every_variable_is_documented_with_its_default():
    documented = {row[0].strip("`"): row[1] for row in table_rows(r"^## Environment variables")}
    for config in CONFIGS:
        for name, default, _doc, _secret in variables(config):
            assert name in documented, f"{name} ({config.__name__}) is missing from the README"
            if default:
                assert documented[name] == f"`{default}`", f"{name}: README says {documented[name]}, code {default}"
            else:
                assert documented[name] in {"(empty)", "(required)"}, f"{name}: README default should be empty"
    known = {name for config in CONFIGS for name, *_ in variables(config)}
    extra = set(documented) - known - {"OTEL_EXPORTER_OTLP_ENDPOINT", "STATIONTHIS_DATA_DIR"}
    assert not extra, f"README documents variables nobody reads: {extra}"


def rpc_table(service_name: str) -> dict[str, tuple[str, str]]:
    full = f"stationthis.{ADDRESS_OF[service_name]}.v1.{service_name}"
    return {row[0]: (row[1], row[2]) for row in table_rows(re.escape(f"**{full}**"))}


@pytest.mark.parametrize("module,service_name", SERVICES, ids=[name for _, name in SERVICES])
def test_rpc_table_lists_every_rpc_with_its_route(module, service_name):
    descriptor = module.DESCRIPTOR.services_by_name[service_name]
    table = rpc_table(service_name)
    assert set(table) == {m.name for m in descriptor.methods}, "README RPC table and contract differ"
    routes = {r.method: r for r in routes_for(descriptor)}
    for method in descriptor.methods:
        http, _state = table[method.name]
        route = routes.get(method.name)
        if route is None:
            assert "gRPC only" in http, f"{method.name} has no HTTP route but README says {http}"
        else:
            assert f"`{route.http_method} {route.template}`" in http, f"{method.name}: README route {http}"


async def _code_of(channel: grpc.aio.Channel, method, request_cls) -> grpc.StatusCode:
    path = f"/{method.containing_service.full_name}/{method.name}"
    kwargs = {"request_serializer": request_cls.SerializeToString, "response_deserializer": None}
    try:
        if method.client_streaming:

            async def one():
                yield request_cls()

            await channel.stream_unary(path, **kwargs)(one(), timeout=5)
        elif method.server_streaming:
            async for _ in channel.unary_stream(path, **kwargs)(request_cls(), timeout=5):
                pass
        else:
            await channel.unary_unary(path, **kwargs)(request_cls(), timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_rpc_states_match_the_running_services(stack):
    from google.protobuf import message_factory

    for module, service_name in SERVICES:
        descriptor = module.DESCRIPTOR.services_by_name[service_name]
        channel = stack[ADDRESS_OF[service_name]].channel
        table = rpc_table(service_name)
        for method in descriptor.methods:
            code = await _code_of(channel, method, message_factory.GetMessageClass(method.input_type))
            says_unimplemented = table[method.name][1] == "UNIMPLEMENTED"
            assert (code == grpc.StatusCode.UNIMPLEMENTED) == says_unimplemented, (
                f"{service_name}.{method.name}: README says {table[method.name][1]}, the service answered {code.name}"
            )
