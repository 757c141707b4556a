"""`make run`: the launcher starts Redis, the emulator, the three services and the gateway; Ctrl-C stops them all.

The launcher (``python -m devtools.launcher``, what ``make run`` runs once set up) runs as a real process
on free loopback ports, with its data (Redis files, the generated API key) in a temporary folder.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx

from devtools.redis_server import free_port
from tests.conftest import METRICS_VARIABLES, PYTHON, ROOT, python_env
from tests.test_gateway import HTTP_STATUS
from tests.test_grpcurl import GRPCURL

CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}

GRPC = {
    "points": ("POINTS_LISTEN_ADDR", "stationthis.points.v1.PointsService"),
    "workflows": ("WORKFLOWS_LISTEN_ADDR", "stationthis.workflows.v1.WorkflowsService"),
    "comfyui": ("COMFYUI_LISTEN_ADDR", "stationthis.comfyui.v1.ComfyUIService"),
}
# Variables that would point the launcher somewhere else if the test's own environment had them.
UNSET = (
    "REDIS_URL",
    "GATEWAY_API_KEYS",
    "POINTS_SERVICE_ADDR",
    "WORKFLOWS_SERVICE_ADDR",
    "COMFYUI_SERVICE_ADDR",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "COMFYDEPLOY_API_KEY",  # unset: `make run` then starts the ComfyUI Deploy emulator
    "COMFYDEPLOY_API_URL",
    "EMULATOR_API_KEYS",
)
COMPONENTS = ("redis", "emulator", "points", "workflows", "comfyui", "gateway")


class Output:
    """Collects a pipe's lines on a thread, so the child never blocks on a full pipe."""

    def __init__(self, pipe) -> None:  # type: ignore[no-untyped-def]
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe) -> None:  # type: ignore[no-untyped-def]
        for line in pipe:
            with self._lock:
                self._lines.append(line)

    @property
    def text(self) -> str:
        with self._lock:
            return "".join(self._lines)

    def finish(self, pipe, timeout: float = 30) -> str:  # type: ignore[no-untyped-def]
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the pipe stayed open: some child still holds it"
        pipe.close()
        return self.text


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, f"the launcher exited with {process.returncode} before {what}"
        assert time.monotonic() < deadline, f"not {what} within {timeout:.0f}s"
        time.sleep(0.1)


def children_of(pid: int) -> dict[int, str]:
    """pid -> command line of the live children of ``pid`` (Linux /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except (OSError, IndexError, ValueError):
            continue  # it went away while we looked
    return found


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers do not count
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
    return True


def grpcurl_list(address: str) -> str:
    done = subprocess.run(
        [GRPCURL, "-plaintext", "-max-time", "20", address, "list"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_make_run_starts_everything_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    data = tmp_path / "data"
    addresses = {
        variable: f"127.0.0.1:{free_port()}"
        for variable in (
            "POINTS_LISTEN_ADDR",
            "WORKFLOWS_LISTEN_ADDR",
            "COMFYUI_LISTEN_ADDR",
            "GATEWAY_LISTEN_ADDR",
            "EMULATOR_LISTEN_ADDR",
            *METRICS_VARIABLES,
        )
    }
    environ = python_env(STATIONTHIS_DATA_DIR=str(data), **addresses)
    for variable in UNSET:
        environ.pop(variable, None)
    gateway = f"http://{addresses['GATEWAY_LISTEN_ADDR']}"
    token = "webhook-token-0d1f6a"

    process = subprocess.Popen(
        [PYTHON, "-m", "devtools.launcher"],
        cwd=ROOT,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = Output(process.stdout), Output(process.stderr)
    children: dict[int, str] = {}
    try:
        wait_until(lambda: "all up" in out.text, 90, "all up", process)
        started = out.text
        for name, (variable, _service) in GRPC.items():
            assert re.search(rf"{name}\s+grpc://{re.escape(addresses[variable])}\b", started), started
        assert re.search(rf"gateway\s+{re.escape(gateway)}\b", started), started
        emulator = re.escape(addresses["EMULATOR_LISTEN_ADDR"])
        assert re.search(rf"emulator\s+http://{emulator}/api\b", started), started
        start_order = [m.group(1) for m in re.finditer(r"^\[make run\] (\w+)\s", started, re.MULTILINE)]
        start_order = [name for name in start_order if name in COMPONENTS]
        assert sorted(start_order) == sorted(COMPONENTS), started
        redis_port = int(re.search(r"redis\s+redis://127\.0\.0\.1:(\d+)/0", started).group(1))  # type: ignore[union-attr]
        # Each process says where its metrics are, and serves them there.
        for variable in METRICS_VARIABLES:
            url = f"http://{addresses[variable]}/metrics"
            assert f"metrics {url}" in started, started
            assert httpx.get(url, timeout=10).status_code == 200
        # The "all up" hint works as typed, from the checkout (grpcurl is not on PATH on a fresh machine).
        hint = re.search(r"all up\. (.+?)\s+\|", started).group(1)  # type: ignore[union-attr]
        assert hint.startswith(".venv/bin/grpcurl "), hint
        done = subprocess.run(shlex.split(hint), cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and "stationthis.points.v1.PointsService" in done.stdout, done.stderr

        children = children_of(process.pid)
        commands = sorted(children.values())
        assert sum("redis-server" in c for c in commands) == 1, commands
        for module in ("services.points", "services.workflows", "services.comfyui", "gateway", "emulator"):
            assert sum(c.endswith(f"-m {module}") for c in commands) == 1, commands

        for _name, (variable, service) in GRPC.items():
            listed = grpcurl_list(addresses[variable]).split()
            assert service in listed and "grpc.health.v1.Health" in listed, listed

        deadline = time.monotonic() + 30  # health follows probes that can miss a beat on a loaded machine
        while (ready := httpx.get(f"{gateway}/readyz", timeout=10)).status_code != 200:
            assert time.monotonic() < deadline, ready.text
            time.sleep(0.2)
        assert set(ready.json()["services"].values()) == {"SERVING"}, ready.text

        key_file = data / "gateway-api-key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = key_file.read_text().strip()
        assert len(key) >= 32
        emulator_key_file = data / "emulator-api-key"
        assert stat.S_IMODE(emulator_key_file.stat().st_mode) == 0o600
        emulator_key = emulator_key_file.read_text().strip()
        assert len(emulator_key) >= 32

        # Through the gateway, the same answer as from the points service directly (grpcurl).
        answer = httpx.get(f"{gateway}/v1/accounts/alice", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        direct = subprocess.run(
            [GRPCURL, "-plaintext", "-max-time", "20", "-format-error", "-format", "json", "-d", '{"user_id":"alice"}',
             addresses["POINTS_LISTEN_ADDR"], "stationthis.points.v1.PointsService/GetAccount"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if direct.returncode == 0:
            assert answer.status_code == 200, answer.text
        else:
            code = json.loads(direct.stderr)["code"]
            assert answer.status_code == HTTP_STATUS[CODE_NAMES[code]], (answer.text, direct.stderr)
            assert answer.json()["error"]["details"][0]["domain"] == "points.stationthis.dev", answer.text
        assert httpx.get(f"{gateway}/v1/accounts/alice", timeout=10).status_code == 401
        # The webhook needs no key; whatever the comfyui service says, it is the service that says it.
        webhook = httpx.post(f"{gateway}/v1/webhooks/comfydeploy?token={token}", json={"run_id": "r1"}, timeout=10)
        # A made-up token: the service refuses it (not the gateway's API-key check).
        assert webhook.status_code == 401, webhook.text
        assert webhook.json()["error"]["details"][0]["domain"] == "comfyui.stationthis.dev", webhook.text
        assert webhook.json()["error"]["details"][0]["reason"] == "WEBHOOK_TOKEN_INVALID", webhook.text

        process.send_signal(signal.SIGINT)  # what Ctrl-C sends: the children have their own sessions
        assert process.wait(timeout=60) == 0
        deadline = time.monotonic() + 20
        while any(running(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [children[pid] for pid in children if running(pid)]
        ports = [redis_port, *(int(a.rsplit(":", 1)[1]) for a in addresses.values())]
        taken = [port for port in ports if not port_is_free(port)]
    finally:
        children = children or children_of(process.pid)  # a failure before they were looked at
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in children:
            if running(pid):
                os.kill(pid, signal.SIGKILL)

    assert not survivors, f"children outlived the launcher: {survivors}"
    assert not taken, f"ports still taken after the launcher exited: {taken}"
    stdout, stderr = out.finish(process.stdout), err.finish(process.stderr)
    stopped = [line.split("] ", 1)[1].split()[0] for line in stdout.splitlines() if line.endswith(" stopped")]
    # Reverse start order; Redis, started first, stops last.
    assert stopped == [name for name in reversed(start_order) if name != "redis"] + ["redis"], stdout
    assert sorted(stopped) == sorted(COMPONENTS), stdout
    # Each service drained and stopped by itself on SIGTERM, rather than being killed.
    messages = [json.loads(line).get("msg", "") for line in stderr.splitlines() if line.startswith("{")]
    for name in GRPC:
        assert f"{name} stopped" in messages, stderr
    # The key and the webhook token never reach the output, though both were used.
    assert key not in stdout and key not in stderr
    assert emulator_key not in stdout and emulator_key not in stderr
    assert token not in stdout and token not in stderr
