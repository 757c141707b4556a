"""Configuration: ``common.config.load`` on each real config class, and each process failing fast on a bad one."""

from __future__ import annotations

import base64
import dataclasses
import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from common.config import (
    ConfigError,
    ServerConfig,
    env,
    http_url,
    load,
    parse_bool,
    positive_float,
    positive_int,
    secrets_of,
    variables,
)
from gateway.config import GatewayConfig
from services.comfyui.config import ComfyUIConfig
from services.points.config import PointsConfig
from services.workflows.config import WorkflowsConfig
from tests.conftest import PYTHON, ROOT, python_env

CONFIGS: dict[str, type[Any]] = {
    "services.points": PointsConfig,
    "services.workflows": WorkflowsConfig,
    "services.comfyui": ComfyUIConfig,
    "gateway": GatewayConfig,
}
GATEWAY_REQUIRED = {"GATEWAY_API_KEYS": "key-one"}


def config_error(cls: type[Any], environ: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as caught:
        load(cls, environ)
    return str(caught.value)


# --- defaults --------------------------------------------------------------------------------------


def test_defaults() -> None:
    points = load(PointsConfig, {})
    assert points.listen_addr == "127.0.0.1:50051"
    assert points.redis_url == "redis://127.0.0.1:6379/0"
    workflows = load(WorkflowsConfig, {})
    assert workflows.listen_addr == "127.0.0.1:50052"
    assert workflows.comfydeploy_api_url == "https://api.comfydeploy.com/api"
    assert workflows.comfydeploy_api_key == ""
    comfyui = load(ComfyUIConfig, {})
    assert (comfyui.listen_addr, comfyui.points_service_addr, comfyui.workflows_service_addr) == (
        "127.0.0.1:50053",
        "127.0.0.1:50051",
        "127.0.0.1:50052",
    )
    gateway = load(GatewayConfig, GATEWAY_REQUIRED)
    assert gateway.api_keys == ("key-one",)
    assert gateway.listen_addr == "127.0.0.1:8080"
    assert gateway.max_body_bytes == 1048576 and gateway.rpc_timeout_seconds == 30.0
    # The peers the gateway calls by default are where the services listen by default.
    assert (gateway.points_service_addr, gateway.workflows_service_addr, gateway.comfyui_service_addr) == (
        points.listen_addr,
        workflows.listen_addr,
        comfyui.listen_addr,
    )
    assert load(ServerConfig, {}) == ServerConfig(log_level="INFO", grace_seconds=10.0, health_interval_seconds=2.0)


def test_values_are_parsed_and_empty_means_default() -> None:
    config = load(
        ServerConfig, {"LOG_LEVEL": " debug ", "GRPC_GRACE_SECONDS": "2.5", "HEALTH_CHECK_INTERVAL_SECONDS": ""}
    )
    assert config == ServerConfig(log_level="DEBUG", grace_seconds=2.5, health_interval_seconds=2.0)
    gateway = load(GatewayConfig, {"GATEWAY_API_KEYS": " a-key , , b-key ,", "GATEWAY_MAX_BODY_BYTES": "10"})
    assert gateway.api_keys == ("a-key", "b-key") and gateway.max_body_bytes == 10
    workflows = load(WorkflowsConfig, {"COMFYDEPLOY_API_URL": "http://127.0.0.1:9999/api/"})
    assert workflows.comfydeploy_api_url == "http://127.0.0.1:9999/api"


def test_services_listen_on_loopback_by_default() -> None:
    listen = {
        name: default
        for cls in CONFIGS.values()
        for name, default, _doc, _secret in variables(cls)
        if name.endswith("_LISTEN_ADDR")
    }
    assert set(listen) == {"POINTS_LISTEN_ADDR", "WORKFLOWS_LISTEN_ADDR", "COMFYUI_LISTEN_ADDR", "GATEWAY_LISTEN_ADDR"}
    for name, default in listen.items():
        assert default.startswith("127.0.0.1:"), f"{name} defaults to {default}"
    for cls in CONFIGS.values():
        assert load(cls, GATEWAY_REQUIRED).listen_addr.startswith("127.0.0.1:")


# --- errors ----------------------------------------------------------------------------------------


def test_required_variable_missing() -> None:
    for environ in ({}, {"GATEWAY_API_KEYS": ""}, {"GATEWAY_API_KEYS": "   "}):
        message = config_error(GatewayConfig, environ)
        assert "GATEWAY_API_KEYS" in message and "required" in message


@pytest.mark.parametrize(
    ("cls", "variable", "value"),
    [
        (PointsConfig, "POINTS_LISTEN_ADDR", "nonsense"),
        (PointsConfig, "POINTS_LISTEN_ADDR", "127.0.0.1:70000"),
        (PointsConfig, "POINTS_LISTEN_ADDR", "127.0.0.1:port"),
        (PointsConfig, "POINTS_LISTEN_ADDR", "example.com:50051"),
        (WorkflowsConfig, "WORKFLOWS_LISTEN_ADDR", ":50052"),
        (ComfyUIConfig, "COMFYUI_LISTEN_ADDR", "127.0.0.1:-1"),
        (ComfyUIConfig, "POINTS_SERVICE_ADDR", "points:0"),
        (ComfyUIConfig, "WORKFLOWS_SERVICE_ADDR", "workflows"),
        (GatewayConfig, "GATEWAY_LISTEN_ADDR", "0.0.0.0:99999"),
        (GatewayConfig, "COMFYUI_SERVICE_ADDR", "comfyui:abc"),
        (PointsConfig, "REDIS_URL", "http://127.0.0.1:6379"),
        (PointsConfig, "REDIS_URL", "127.0.0.1:6379"),
        (WorkflowsConfig, "COMFYDEPLOY_API_URL", "ftp://api.comfydeploy.com"),
        (WorkflowsConfig, "COMFYDEPLOY_API_URL", "https://"),
        (GatewayConfig, "GATEWAY_MAX_BODY_BYTES", "-5"),
        (GatewayConfig, "GATEWAY_MAX_BODY_BYTES", "0"),
        (GatewayConfig, "GATEWAY_MAX_BODY_BYTES", "1.5"),
        (GatewayConfig, "GATEWAY_RPC_TIMEOUT_SECONDS", "-1"),
        (GatewayConfig, "GATEWAY_RPC_TIMEOUT_SECONDS", "nan"),
        (GatewayConfig, "GATEWAY_RPC_TIMEOUT_SECONDS", "inf"),
        (ServerConfig, "GRPC_GRACE_SECONDS", "-0.5"),
        (ServerConfig, "HEALTH_CHECK_INTERVAL_SECONDS", "soon"),
        (ServerConfig, "LOG_LEVEL", "LOUD"),
    ],
)
def test_malformed_value_names_the_variable(cls: type[Any], variable: str, value: str) -> None:
    environ = {**GATEWAY_REQUIRED, variable: value}
    load(cls, GATEWAY_REQUIRED)  # fine without the bad value
    message = config_error(cls, environ)
    assert message.startswith(f"{variable}="), message
    assert repr(value) in message, message  # not a secret: the bad value is shown to help


@dataclasses.dataclass(frozen=True)
class _Flags:
    """A config using the parsers no shipped config uses yet."""

    enabled: bool = env("TEST_ENABLED", default=False, parse=parse_bool)
    token: str = env("TEST_TOKEN", default="", secret=True, parse=lambda raw: raw)
    secret_url: str = env("TEST_SECRET_URL", default="", secret=True, parse=http_url)


def test_bad_bool() -> None:
    assert load(_Flags, {"TEST_ENABLED": "yes"}).enabled is True
    assert load(_Flags, {"TEST_ENABLED": "OFF"}).enabled is False
    for value in ("maybe", "2", "enabled"):
        message = config_error(_Flags, {"TEST_ENABLED": value})
        assert message.startswith("TEST_ENABLED="), message


@pytest.mark.parametrize(
    ("parse", "value"),
    [
        (http_url, "https//sk-live-0123456789abcdef"),
        (positive_int, "sk-live-0123456789abcdef"),  # int() quotes the value in its own message
        (positive_float, "sk-live-0123456789abcdef"),
    ],
)
def test_secret_value_never_in_the_error(parse: Callable[[str], Any], value: str) -> None:
    @dataclasses.dataclass(frozen=True)
    class Secretive:
        key: Any = env("TEST_SECRET_KEY", default="", secret=True, parse=parse)

    message = config_error(Secretive, {"TEST_SECRET_KEY": f"  {value} "})
    assert message.startswith("TEST_SECRET_KEY"), message
    assert "sk-live" not in message and "0123456789abcdef" not in message, message


def test_secrets_of() -> None:
    gateway = load(GatewayConfig, {"GATEWAY_API_KEYS": "first-key,second-key , third-key"})
    assert sorted(secrets_of(gateway)) == ["first-key", "second-key", "third-key"]
    comfyui = load(ComfyUIConfig, {"COMFYDEPLOY_API_KEY": "cd-secret-key", "REDIS_URL": "redis://r:6379/0"})
    assert secrets_of(comfyui) == ["cd-secret-key"]  # the Redis URL is not marked secret
    assert secrets_of(load(WorkflowsConfig, {})) == []  # an unset secret is not a secret to redact
    assert secrets_of(load(PointsConfig, {})) == []
    flags = load(_Flags, {"TEST_TOKEN": "tok-abc", "TEST_SECRET_URL": "https://x.example/hook"})
    assert sorted(secrets_of(flags)) == ["https://x.example/hook", "tok-abc"]
    # Every field marked secret is returned, whatever its shape; of name=value pairs, only the values.
    whsec = "whsec_" + base64.b64encode(b"callback-key-bytes-1").decode()
    shaped = {"COMFYUI_CALLBACK_SECRETS": (f"telegram={whsec}", whsec)}
    for cls in CONFIGS.values():
        secret_fields = [f for f in dataclasses.fields(cls) if f.metadata.get("secret")]
        environ = {f.metadata["env"]: f"{f.name}-value-1,{f.name}-value-2" for f in secret_fields}
        expected = {f.metadata["env"]: f"{f.name}-value-1" for f in secret_fields}
        for variable, (raw, secret) in shaped.items():
            if variable in environ:
                environ[variable], expected[variable] = raw, secret
        found = secrets_of(load(cls, {**GATEWAY_REQUIRED, **environ}))
        for f in secret_fields:
            assert any(expected[f.metadata["env"]] == s or expected[f.metadata["env"]] in s for s in found), (
                cls, f.name, found)  # fmt: skip
        assert "telegram" not in found


# --- the processes ---------------------------------------------------------------------------------

LOOPBACK_ANY = "127.0.0.1:0"  # if a bad variable were accepted, the process would not take a real port


@pytest.mark.parametrize(
    ("module", "variable", "value"),
    [
        ("services.points", "POINTS_LISTEN_ADDR", "nonsense"),
        ("services.workflows", "WORKFLOWS_LISTEN_ADDR", "localhost:http"),
        ("services.comfyui", "POINTS_SERVICE_ADDR", "points"),
        ("services.points", "REDIS_URL", "http://127.0.0.1:6379"),
        ("services.workflows", "GRPC_GRACE_SECONDS", "-1"),
        ("gateway", "GATEWAY_API_KEYS", ""),
        ("gateway", "GATEWAY_MAX_BODY_BYTES", "-1"),
    ],
)
def test_process_exits_2_naming_the_variable(module: str, variable: str, value: str) -> None:
    environ = python_env(
        GATEWAY_API_KEYS="key-one",
        POINTS_LISTEN_ADDR=LOOPBACK_ANY,
        WORKFLOWS_LISTEN_ADDR=LOOPBACK_ANY,
        COMFYUI_LISTEN_ADDR=LOOPBACK_ANY,
        GATEWAY_LISTEN_ADDR=LOOPBACK_ANY,
    )
    environ[variable] = value
    if not value:
        del environ[variable]
    try:
        done = subprocess.run([PYTHON, "-m", module], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"python -m {module} with {variable}={value!r} kept running instead of exiting")
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = [line for line in done.stderr.splitlines() if variable in line]
    assert lines, done.stderr
    assert "configuration error" in lines[0], done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "key-one" not in done.stderr + done.stdout


def test_the_comfydeploy_rate_limit_is_shared_by_the_processes_using_the_key() -> None:
    config = load(WorkflowsConfig, {"COMFYDEPLOY_RATE_LIMIT": "30", "COMFYDEPLOY_PROCESSES_PER_KEY": "3"})
    assert config.comfydeploy_rate_per_process == 10.0
    assert load(ComfyUIConfig, {}).comfydeploy_rate_per_process == 10.0  # 20/s shared by two processes
