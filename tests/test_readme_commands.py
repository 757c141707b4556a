"""Every command block of the README runs, as typed, against the system `make run` starts.

The launcher (what `make run` runs once set up) starts Redis, the emulator, the three services and the
gateway as real processes. The README's ```sh blocks then run in order in bash (``-e -o pipefail``)
and its ```python blocks in the venv's Python, from a folder laid out like the checkout after
`make run` (``.venv`` and ``.data``). The only change made to a command is the address: the README
shows the default ports, the test's system listens on free ones, so each default address is replaced
by the test's. A block is skipped only when the README says why, just above it, in a
``<!-- not run by tests: ... -->`` comment.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess

import pytest

from devtools.redis_server import free_port
from emulator.settings import EmulatorSettings
from gateway.config import GatewayConfig
from services.comfyui.config import ComfyUIConfig
from services.points.config import PointsConfig
from services.workflows.config import WorkflowsConfig
from tests.conftest import PYTHON, ROOT, python_env
from tests.test_make_run import UNSET, Output, children_of, running, wait_until

README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"(?:<!-- (?P<why>not run by tests: [^>]*) -->\s*\n)?```(?P<lang>[a-z]*)\n(?P<body>.*?)```", re.S)
SKIP_REASON = "not run by tests: "


@dataclasses.dataclass(frozen=True)
class Block:
    lang: str
    body: str
    line: int
    why_not: str | None


def blocks() -> list[Block]:
    found = []
    for match in FENCE.finditer(README):
        line = README.count("\n", 0, match.start("body"))
        found.append(Block(match["lang"], match["body"], line, match["why"]))
    return found


def default(config: type, name: str) -> str:
    value = {f.name: f.default for f in dataclasses.fields(config)}[name]
    assert isinstance(value, str)
    return value


# What the README shows -> the variable the launcher reads to listen elsewhere.
ADDRESSES = {
    default(PointsConfig, "listen_addr"): "POINTS_LISTEN_ADDR",
    default(WorkflowsConfig, "listen_addr"): "WORKFLOWS_LISTEN_ADDR",
    default(ComfyUIConfig, "listen_addr"): "COMFYUI_LISTEN_ADDR",
    default(GatewayConfig, "listen_addr"): "GATEWAY_LISTEN_ADDR",
    default(EmulatorSettings, "listen_addr"): "EMULATOR_LISTEN_ADDR",
    default(PointsConfig, "metrics_addr"): "POINTS_METRICS_ADDR",
    default(WorkflowsConfig, "metrics_addr"): "WORKFLOWS_METRICS_ADDR",
    default(ComfyUIConfig, "metrics_addr"): "COMFYUI_METRICS_ADDR",
    default(GatewayConfig, "metrics_addr"): "GATEWAY_METRICS_ADDR",
}


def test_the_readme_says_why_a_block_is_not_run() -> None:
    found = blocks()
    assert sum(b.lang in ("sh", "python") for b in found) >= 8, "the README lost its examples"
    for block in found:
        if block.lang in ("sh", "python"):
            continue
        # A block in another language is output or a picture, never a command to type.
        assert not re.search(r"^\s*(\.venv/bin/|curl |make |stationthis )", block.body, re.M), (
            f"README line {block.line}: a command block must be ```sh (or say why it is not run)"
        )
    skipped = [b for b in found if b.why_not]
    assert all(len(b.why_not or "") > len(SKIP_REASON) + 10 for b in skipped)
    assert len(skipped) <= 3, "most of the README must run"


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """`make run` on free ports, with a folder laid out like the checkout after it."""
    home = tmp_path_factory.mktemp("readme")
    data = home / ".data"
    (home / ".venv").symlink_to(ROOT / ".venv")
    listen = {variable: f"127.0.0.1:{free_port()}" for variable in ADDRESSES.values()}
    environ = python_env(STATIONTHIS_DATA_DIR=str(data), **listen)
    for variable in UNSET:
        environ.pop(variable, None)
    process = subprocess.Popen(
        [PYTHON, "-m", "devtools.launcher"], cwd=ROOT, env=environ,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, err = Output(process.stdout), Output(process.stderr)
    children: dict[int, str] = {}
    try:
        wait_until(lambda: "all up" in out.text, 90, "all up", process)
        children = children_of(process.pid)
        shell = {k: v for k, v in os.environ.items() if k not in UNSET and not k.endswith(("_ADDR", "_URL"))}
        shell.pop("PYTHONPATH", None)  # the README's commands work without it
        shell.update(HOME=str(home), STATIONTHIS_DATA_DIR=str(data), NO_COLOR="1")
        yield {"cwd": str(home), **{f"env:{k}": v for k, v in shell.items()},
               **{f"addr:{shown}": listen[variable] for shown, variable in ADDRESSES.items()}}  # fmt: skip
    finally:
        children = children or children_of(process.pid)
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pid in children:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        out.finish(process.stdout)
        err.finish(process.stderr)


def as_run_here(text: str, system: dict[str, str]) -> str:
    for key, address in system.items():
        if key.startswith("addr:"):
            text = re.sub(re.escape(key[5:]) + r"(?!\d)", address, text)
    return text


RUNNABLE = [b for b in blocks() if b.lang in ("sh", "python") and not b.why_not]


@pytest.mark.parametrize("block", RUNNABLE, ids=[f"line{b.line}" for b in RUNNABLE])
def test_readme_block_runs_as_typed(system: dict[str, str], block: Block) -> None:
    environ = {k[4:]: v for k, v in system.items() if k.startswith("env:")}
    # The CLI and the client find the system by its default addresses; here it listens elsewhere.
    environ.update(
        POINTS_SERVICE_ADDR=system[f"addr:{default(PointsConfig, 'listen_addr')}"],
        WORKFLOWS_SERVICE_ADDR=system[f"addr:{default(WorkflowsConfig, 'listen_addr')}"],
        COMFYUI_SERVICE_ADDR=system[f"addr:{default(ComfyUIConfig, 'listen_addr')}"],
        GATEWAY_URL="http://" + system[f"addr:{default(GatewayConfig, 'listen_addr')}"],
    )
    code = as_run_here(block.body, system)
    command = ["bash", "-e", "-o", "pipefail", "-c", code] if block.lang == "sh" else [".venv/bin/python", "-c", code]
    done = subprocess.run(command, cwd=system["cwd"], env=environ, capture_output=True, text=True, timeout=180)
    shown = f"README line {block.line}:\n{code}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    print(shown)
    assert done.returncode == 0, shown
    assert "Traceback" not in done.stdout + done.stderr, shown
    assert done.stdout.strip(), shown
