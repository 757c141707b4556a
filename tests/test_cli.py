"""The ``stationthis`` CLI driven as a user drives it: a child process against the whole system (real
services, the emulator and the gateway, in-process on free ports), found through the same variables
``make run`` prints. In a pseudo-terminal for what only a terminal shows (the progress line redrawn in
place, Ctrl-C typed at the keyboard); with pipes for the JSON documents, the exit codes and the one
line on stderr."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import signal
import struct
import termios
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from devtools.redis_server import free_port
from emulator.testing import RunningEmulator, start_for_tests
from stationthis.comfyui.v1 import comfyui_service_pb2 as svc
from stationthis.comfyui.v1 import run_pb2 as R
from tests.conftest import PYTHON, python_env
from tests.runs_helpers import System, ensure_points, eventually, open_system
from tests.test_gateway import KEYS

CLI = ("-m", "stationthis_client.cli")
# The CLI as a shell starts it in a terminal: a session of its own whose controlling terminal is the
# pty, so the line discipline turns a typed Ctrl-C (\x03) into SIGINT for its process group.
IN_A_TERMINAL = (
    "import fcntl, os, sys, termios; os.setsid(); fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.executable, [sys.executable, '-m', 'stationthis_client.cli', *sys.argv[1:]])"
)
REDRAW = "\r\x1b[2K"
EXIT = {"ok": 0, "error": 1, "bad_input": 2, "not_found": 3, "no_points": 4, "unavailable": 5, "run_failed": 6}
IMAGE = "https://example.com/cat.png"  # an image URL is all the catalog checks; the emulator never fetches it


# --- running the CLI ------------------------------------------------------------------------------


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    def one_error_line(self) -> str:
        """stderr is exactly one line, ``error: ...``, and no traceback."""
        assert "Traceback" not in self.stderr, self.stderr
        lines = self.stderr.splitlines()
        assert len(lines) == 1 and self.stderr.endswith("\n"), self.stderr
        assert lines[0].startswith("error: "), self.stderr
        return lines[0]


def cli_env(system: System | None = None, **extra: str) -> dict[str, str]:
    env = python_env()
    for name in ("STATIONTHIS_USER", "GATEWAY_API_KEYS", "GATEWAY_LISTEN_ADDR", "POINTS_LISTEN_ADDR",
                 "WORKFLOWS_LISTEN_ADDR", "COMFYUI_LISTEN_ADDR"):  # fmt: skip
        env.pop(name, None)
    if system is not None:
        assert system.gateway is not None
        env.update(
            POINTS_SERVICE_ADDR=system.points.address,
            WORKFLOWS_SERVICE_ADDR=system.workflows.address,
            COMFYUI_SERVICE_ADDR=system.comfyui[0].address,
            GATEWAY_URL=f"http://127.0.0.1:{system.gateway.port}",
            GATEWAY_API_KEY=KEYS[0],
        )
    env.update(extra)
    return env


async def stationthis(env: dict[str, str], *args: str, within: float = 60) -> Result:
    """Run the CLI with pipes (not a terminal) and no input, as a script would."""
    process = await asyncio.create_subprocess_exec(
        PYTHON, *CLI, *args, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(), within)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"stationthis {' '.join(args)} did not end within {within}s") from None
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


class Terminal:
    """The CLI in a pseudo-terminal of 160 columns: what it writes, and keys typed at it."""

    def __init__(self) -> None:
        self.master = -1
        self.output = ""
        self.mark = 0  # expect() searches from here
        self.closed = False
        self.changed = asyncio.Event()
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, env: dict[str, str], *args: str) -> Terminal:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
        self.process = await asyncio.create_subprocess_exec(
            PYTHON, "-c", IN_A_TERMINAL, *args, env=env, stdin=slave, stdout=slave, stderr=slave
        )
        os.close(slave)
        os.set_blocking(master, False)
        self.master = master
        asyncio.get_running_loop().add_reader(master, self._read)
        return self

    def _read(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except BlockingIOError:
            return
        except OSError:  # EIO: the child closed the terminal
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self.master)
            self.closed = True
        self.output += data.decode(errors="replace")
        self.changed.set()

    async def expect(self, pattern: str, within: float = 20) -> re.Match[str]:
        """The next match of ``pattern`` after the previous one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            found = re.compile(pattern).search(self.output, self.mark)
            if found:
                self.mark = found.end()
                return found
            left = deadline - loop.time()
            assert left > 0 and not self.closed, f"no {pattern!r} within {within}s; it shows:\n{self.output!r}"
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), min(left, 0.5))
            except TimeoutError:
                pass

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    async def exit_code(self, within: float = 30) -> int:
        assert self.process is not None
        code = await asyncio.wait_for(self.process.wait(), within)
        await eventually(self._drained, "the terminal drained", within=5)
        return code

    async def _drained(self) -> bool:
        return self.closed

    def redraws(self) -> list[str]:
        """Each state of the progress line: the text after every in-place redraw."""
        return [re.split(r"[\r\n]", part, maxsplit=1)[0] for part in self.output.split(REDRAW)[1:]]

    async def close(self) -> None:
        print("the terminal showed:", repr(self.output))  # shown by pytest when the test fails
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        if self.master >= 0:
            if not self.closed:
                asyncio.get_running_loop().remove_reader(self.master)
            os.close(self.master)
            self.master = -1


@pytest.fixture
async def terminal() -> AsyncIterator[Terminal]:
    opened = Terminal()
    yield opened
    await opened.close()


@pytest.fixture
async def system(redis_url: str, start_service: Any, emulator: RunningEmulator) -> AsyncIterator[System]:
    async with open_system(redis_url, start_service, emulator) as running:
        yield running


async def runs_of(system: System, user: str) -> list[R.Run]:
    return list((await system.runs.ListRuns(svc.ListRunsRequest(user_id=user), timeout=10)).runs)


def run_id_in(text: str) -> str:
    found = re.search(r"run ([0-9a-f-]{36}) started", text)
    assert found, text
    return found.group(1)


# --- --help ---------------------------------------------------------------------------------------


async def test_help_documents_every_exit_code() -> None:
    result = await stationthis(cli_env(), "--help")
    assert result.code == 0 and not result.stderr, result
    meanings = {0: "ok", 1: "anything else", 2: "bad input", 3: "not found", 4: "not enough points",
                5: "unavailable", 6: "did not succeed", 130: "interrupted"}  # fmt: skip
    import stationthis_client.cli as cli

    for code, meaning in meanings.items():
        assert re.search(rf"^\s+{code}\s+.*{meaning}", result.stdout, re.MULTILINE), (code, result.stdout)
        assert re.search(rf"^\s+{code}\s+\S", cli.__doc__ or "", re.MULTILINE), (code, "not in the module docstring")


# --- --json ---------------------------------------------------------------------------------------


async def test_json_documents_for_the_catalog_an_account_a_make_and_the_runs(system: System) -> None:
    env = cli_env(system)
    catalog = await stationthis(env, "--json", "workflows")
    assert catalog.code == 0 and not catalog.stderr, catalog
    by_name = {w["name"]: w for w in catalog.json()["workflows"]}
    assert {"text2img", "img2img", "lora_train"} <= set(by_name), by_name.keys()
    assert "make" in by_name["text2img"]["aliases"] and by_name["text2img"]["gpu"] == "GPU_TYPE_A10G"

    one = await stationthis(env, "--json", "workflow", "/make")  # an alias, as a chat user types it
    assert one.code == 0, one
    inputs = {i["input_id"]: i for i in one.json()["inputs"]}
    assert inputs["input_steps"]["type"] == "INPUT_TYPE_INTEGER" and inputs["input_steps"]["default_value"] == 20

    await ensure_points(system, "42", qoints=5000)
    account = await stationthis(env, "--json", "account", "42")
    assert account.code == 0, account
    assert account.json()["user_id"] == "42" and int(account.json()["qoints"]) == 5000
    assert int(account.json()["points_held"]) == 0  # present although zero: scripts need no defaults

    settings = ("--set", "steps=30", "--set", "input_sampler=euler", "--set", "cfg=5.5", "--set", "negative=42")
    made = await stationthis(env, "--json", "make", "a cat astronaut", "--workflow", "text2img", "--user", "42",
                             *settings)  # fmt: skip
    assert made.code == 0 and not made.stderr, made
    run = made.json()  # one document: the final run, nothing else on stdout
    assert run["status"] == "RUN_STATUS_SUCCESS" and run["user_id"] == "42", run
    assert run["inputs"]["input_prompt"] == "a cat astronaut"
    assert run["inputs"]["input_steps"] == 30 and run["inputs"]["input_cfg"] == 5.5
    assert run["inputs"]["input_sampler"] == "euler"
    assert run["inputs"]["input_negative"] == "42"  # a text input takes the text as typed, not the number
    assert run["outputs"] and run["outputs"][0]["url"].startswith("http")
    receipt = run["receipt"]
    assert receipt["rule"] == "SETTLEMENT_RULE_SUCCESS_CHARGED"
    assert int(receipt["points_charged"]) == int(run["cost_points"]) > 0
    stored = await system.get(run["run_id"])
    assert stored.status == R.RUN_STATUS_SUCCESS and stored.receipt.points_charged == int(receipt["points_charged"])

    listed = await stationthis(env, "--json", "runs", "42")
    assert listed.code == 0, listed
    assert [r["run_id"] for r in listed.json()["runs"]] == [run["run_id"]]
    shown = await stationthis(env, "--json", "run", run["run_id"])
    assert shown.code == 0 and shown.json()["receipt"] == receipt, shown


# --- human output ----------------------------------------------------------------------------------


async def test_make_without_a_terminal_prints_the_quote_status_lines_outputs_receipt_and_downloads(
    system: System, tmp_path: Path
) -> None:
    await ensure_points(system, "42")
    target = tmp_path / "out"
    made = await stationthis(cli_env(system), "make", "a cat astronaut", "--user", "42", "--download", str(target))
    assert made.code == 0 and not made.stderr, made
    lines = made.stdout.splitlines()
    quote = re.fullmatch(r"text2img costs at most (\d+) points \(default: 60 s of A10G time\); you have (\d+)\.",
                         lines[0])  # fmt: skip
    assert quote and int(quote.group(2)) == 370 + 10_000, lines
    assert REDRAW not in made.stdout and "\r" not in made.stdout  # no terminal: plain lines, nothing redrawn
    status_lines = [line for line in lines if re.match(r"(submitting|not started|queued|started|running|success) ",
                                                       line)]  # fmt: skip
    assert status_lines[-1].startswith("success") and len(status_lines) >= 2, lines
    run = await system.get(run_id_in(made.stdout))
    assert run.status == R.RUN_STATUS_SUCCESS and run.inputs["input_prompt"] == "a cat astronaut"
    assert f"  {run.outputs[0].url}" in lines
    receipt = run.receipt
    assert (f"Charged {receipt.points_charged} of the {receipt.points_held} points held, {receipt.points_refunded} "
            "back (the run succeeded: its GPU time was charged).") in lines  # fmt: skip
    saved = [Path(line.removeprefix("saved ")) for line in lines if line.startswith("saved ")]
    assert [p.parent for p in saved] == [target] * len(run.outputs) and saved, lines
    async with httpx.AsyncClient() as http:
        for output, path in zip(run.outputs, saved, strict=True):
            assert path.read_bytes() == (await http.get(output.url)).content and path.stat().st_size > 0

    # The other commands a user reads: the catalog, one workflow, the account, the ledger, the runs.
    env = cli_env(system)
    catalog = await stationthis(env, "workflows")
    assert catalog.code == 0 and re.search(r"^text2img\s+make, makeimage\s+A10G\s+11\s", catalog.stdout, re.M), catalog
    one = await stationthis(env, "workflow", "text2img")
    assert one.code == 0 and re.search(r"^input_lora_strength\s+number\s+no\s+0\.8\s+0\.\.1\s", one.stdout, re.M), one
    assert re.search(r"^input_sampler\s+enum\s+no\s+euler_ancestral\s+one of euler, euler_ancestral,", one.stdout, re.M)
    account = await stationthis(env, "account", "42")
    assert account.code == 0 and "qoints" in account.stdout and "level" in account.stdout, account
    history = await stationthis(env, "history", "42")
    assert history.code == 0 and "hold captured" in history.stdout and "qoints credited" in history.stdout, history
    runs = await stationthis(env, "runs", "42")
    assert runs.code == 0 and re.search(rf"^{run.run_id}\s.*text2img\s+success\s", runs.stdout, re.M), runs


async def test_credit_upload_regen_and_cancel(system: System, tmp_path: Path) -> None:
    env = cli_env(system)
    credited = await stationthis(env, "credit", "42", "1000", "--ref", "PAYMENT-1")
    assert credited.code == 0 and "credited 1000 qoints to 42" in credited.stdout, credited
    assert (await system.account("42")).qoints == 1000
    again = await stationthis(env, "credit", "42", "1000", "--ref", "PAYMENT-1")  # a payment is credited once
    assert again.code == EXIT["error"], again
    assert again.one_error_line() == "error: --ref PAYMENT-1: this external_reference was already credited", again
    assert (await system.account("42")).qoints == 1000

    picture = tmp_path / "cat.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    uploaded = await stationthis(env, "--json", "upload", str(picture), "--user", "42")
    assert uploaded.code == 0, uploaded
    assert uploaded.json()["url"].startswith("http") and int(uploaded.json()["size_bytes"]) == 72

    original = await system.create(user="42", inputs={"input_prompt": "a cat astronaut", "input_seed": 7})
    await system.wait(original.run_id)
    regen = await stationthis(env, "--json", "regen", original.run_id, "--same-seed", "--set", "steps=12")
    assert regen.code == 0, regen
    rerolled = await system.get(regen.json()["run_id"])
    assert rerolled.regenerated_from == original.run_id
    assert rerolled.inputs["input_seed"] == 7 and rerolled.inputs["input_steps"] == 12
    await system.wait(rerolled.run_id)

    await system.emulator.set_faults(next_run_outcomes=["stuck"])
    stuck = await system.create(user="42")
    await system.wait(stuck.run_id, (R.RUN_STATUS_RUNNING,), settled=False)
    cancelled = await stationthis(env, "cancel", stuck.run_id)
    assert cancelled.code == 0 and "cancelled" in cancelled.stdout, cancelled
    assert (await system.wait(stuck.run_id)).status == R.RUN_STATUS_CANCELLED
    shown = await stationthis(env, "run", stuck.run_id)
    assert shown.code == 0 and re.search(r"receipt\s+Charged 0 of the (\d+) points held, \1 back", shown.stdout), shown


# --- exit codes ----------------------------------------------------------------------------------


async def test_bad_input_exits_2_with_one_line_naming_the_input_and_starts_nothing(system: System) -> None:
    await ensure_points(system, "42")
    env = cli_env(system)
    cases = [
        (("--set", "lora_strength=5"), "error: lora_strength: must be a number between 0 and 1"),
        (("--set", "steps=10000000000"), "error: steps: must be an integer between -2147483647 and 2147483647"),
        (("--set", "nosuch=1"), "error: nosuch: unknown input"),
        (("--set", "steps"), "error: Invalid value for --set: 'steps' is not NAME=VALUE"),
        (("--sett", "steps=3"), "error: No such option '--sett'"),
    ]
    for extra, expected in cases:
        result = await stationthis(env, "make", "a cat", "--user", "42", *extra)
        assert result.code == EXIT["bad_input"], result
        assert result.one_error_line().startswith(expected), (expected, result.stderr)
    no_prompt = await stationthis(env, "make", "a cat", "--user", "42", "--workflow", "upscale")
    assert no_prompt.code == 2, no_prompt
    assert no_prompt.one_error_line() == "error: workflow upscale has no prompt input; give its inputs with --set"
    missing_user = await stationthis(env, "make", "a cat")
    assert missing_user.code == 2 and "--user" in missing_user.one_error_line(), missing_user
    as_json = await stationthis(env, "--json", "make", "a cat", "--user", "42", "--set", "nosuch=1")
    assert as_json.code == 2 and as_json.json()["error"]["exit_code"] == 2, as_json
    assert as_json.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert await runs_of(system, "42") == []


async def test_unknown_runs_and_workflows_exit_3(system: System) -> None:
    env = cli_env(system)
    unknown = "00000000-0000-4000-8000-000000000000"
    for args in (("run", unknown), ("cancel", unknown), ("regen", unknown), ("workflow", "no-such-workflow"),
                 ("make", "a cat", "--user", "42", "--workflow", "text2imgg")):  # fmt: skip
        result = await stationthis(env, *args)
        assert result.code == EXIT["not_found"], (args, result)
        result.one_error_line()
    suggested = await stationthis(env, "workflow", "text2imgg")
    assert "did you mean text2img" in suggested.one_error_line(), suggested


async def test_a_user_without_points_exits_4_after_the_quote_and_nothing_is_held(
    redis_url: str, start_service: Any, emulator: RunningEmulator
) -> None:
    poor = {"POINTS_TOKEN_OFFSET": "1"}  # max_points = floor((0 + 1) / 540) = 0: no free allowance
    async with open_system(redis_url, start_service, emulator, points_env=poor) as system:
        result = await stationthis(cli_env(system), "make", "a cat astronaut", "--user", "poor")
        assert result.code == EXIT["no_points"], result
        assert re.match(r"text2img costs at most \d+ points .*; you have 0\.", result.stdout), result
        assert "not enough points" in result.one_error_line()
        assert await runs_of(system, "poor") == []
        assert (await system.account("poor")).points_held == 0


async def test_services_that_cannot_be_reached_exit_5() -> None:
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there
    env = cli_env(
        None, POINTS_SERVICE_ADDR=closed, WORKFLOWS_SERVICE_ADDR=closed, COMFYUI_SERVICE_ADDR=closed,
        GATEWAY_URL=f"http://{closed}",
    )  # fmt: skip
    for args in (("workflows",), ("account", "42"), ("make", "a cat", "--user", "42")):
        result = await stationthis(env, "--timeout", "0.5", *args)
        assert result.code == EXIT["unavailable"], (args, result)
        assert "workflows service" in result.one_error_line() or "points service" in result.stderr, result


async def test_ctrl_c_outside_make_exits_130_quietly() -> None:
    connected = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set()  # a peer that accepts the connection and never answers
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    env = cli_env(None, POINTS_SERVICE_ADDR=address, WORKFLOWS_SERVICE_ADDR=address, COMFYUI_SERVICE_ADDR=address)
    process = await asyncio.create_subprocess_exec(
        PYTHON, *CLI, "workflows", env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await asyncio.wait_for(connected.wait(), 20)  # it is waiting for the catalog's answer
        process.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(process.communicate(), 20)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        server.close()
    assert process.returncode == 130, (out, err)
    assert out == b"" and err == b"", (out, err)


async def test_ctrl_c_while_the_run_is_created_says_it_may_have_started(system: System) -> None:
    """A comfyui service that quotes but never answers CreateRun: Ctrl-C then tells the user where to
    look for the run that may exist, in one line, exit 130."""
    from stationthis.comfyui.v1 import comfyui_service_pb2_grpc

    creating = asyncio.Event()

    class Stalling(comfyui_service_pb2_grpc.ComfyUIServiceServicer):
        async def QuoteRun(self, request: Any, context: Any) -> svc.QuoteRunResponse:
            return svc.QuoteRunResponse(cost_points=3, affordable=True, available_points=370, basis="default")

        async def CreateRun(self, request: Any, context: Any) -> svc.CreateRunResponse:
            creating.set()
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

    server = grpc.aio.server()
    comfyui_service_pb2_grpc.add_ComfyUIServiceServicer_to_server(Stalling(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    env = cli_env(system, COMFYUI_SERVICE_ADDR=f"127.0.0.1:{port}")
    process = await asyncio.create_subprocess_exec(
        PYTHON, *CLI, "make", "a cat astronaut", "--user", "42", env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await asyncio.wait_for(creating.wait(), 30)
        process.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(process.communicate(), 20)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await server.stop(0)
    result = Result(process.returncode, out.decode(), err.decode())
    assert result.code == 130, result
    line = result.one_error_line()
    assert "may have started" in line and "stationthis runs 42" in line, line


async def test_a_run_that_fails_exits_6_with_its_refund(system: System) -> None:
    await ensure_points(system, "42")
    await system.emulator.set_faults(next_run_outcomes=["failed", "failed"])
    env = cli_env(system)
    human = await stationthis(env, "make", "a cat astronaut", "--user", "42")
    assert human.code == EXIT["run_failed"], human
    run_id = run_id_in(human.stdout)
    assert re.fullmatch(rf"error: run {run_id} failed: .+", human.one_error_line()), human.stderr
    run = await system.get(run_id)
    assert run.status == R.RUN_STATUS_FAILED and run.receipt.points_refunded == run.points_held > 0
    assert (f"Charged 0 of the {run.points_held} points held, {run.points_held} back (ComfyUI Deploy reported a "
            "failure: refunded in full).") in human.stdout.splitlines()  # fmt: skip

    as_json = await stationthis(env, "--json", "make", "a cat astronaut", "--user", "42")
    assert as_json.code == EXIT["run_failed"], as_json
    document = as_json.json()
    assert document["status"] == "RUN_STATUS_FAILED" and document["error"]["reason"], document
    assert int(document["receipt"]["points_refunded"]) == int(document["points_held"]) > 0
    assert document["receipt"]["rule"] == "SETTLEMENT_RULE_PROVIDER_FAILURE_REFUNDED"
    as_json.one_error_line()
    assert (await system.account("42")).points_held == 0 and (await system.account("42")).qoints_held == 0


async def test_cancel_after_ends_the_run_at_its_deadline_refunded_and_exits_6(system: System) -> None:
    await ensure_points(system, "42")
    await system.emulator.set_faults(next_run_outcomes=["stuck"])  # it would run for ever
    result = await stationthis(cli_env(system), "--json", "make", "a cat", "--user", "42", "--cancel-after", "1")
    assert result.code == EXIT["run_failed"], result
    run = result.json()
    assert run["status"] == "RUN_STATUS_CANCELLED" and run["cancel_after"] == "1s", run
    assert run["receipt"]["rule"] == "SETTLEMENT_RULE_DEADLINE_REFUNDED"
    assert int(run["receipt"]["points_refunded"]) == int(run["points_held"]) > 0
    assert "was cancelled" in result.one_error_line()


# --- in a terminal ------------------------------------------------------------------------------


@pytest.fixture
async def slow_emulator() -> AsyncIterator[RunningEmulator]:
    """Steps of 0.1 s, so a run lasts long enough to be watched waiting, then running."""
    running = await start_for_tests(step_seconds=0.1)
    yield running
    await running.close()


async def test_a_terminal_shows_one_progress_line_redrawn_with_status_queue_eta_and_percent(
    redis_url: str, start_service: Any, slow_emulator: RunningEmulator, terminal: Terminal
) -> None:
    # lora_train's deployment runs one run at a time: with another run on it ours waits in the queue.
    # Queue places come from upstream's run reads, so runs are polled often.
    async with open_system(redis_url, start_service, slow_emulator, COMFYUI_POLL_AFTER_SECONDS="0.2") as system:
        await ensure_points(system, "alice")
        inputs = {"input_images": [IMAGE]}
        history = await system.create(workflow="lora_train", inputs=inputs)  # so there is an ETA
        await system.wait(history.run_id)
        quote = svc.QuoteRunRequest(user_id="alice", workflow_name="lora_train")
        await eventually(lambda: _basis(system, quote), "the quote knows lora_train's history")
        await system.emulator.set_faults(next_run_outcomes=["stuck", "success"])
        blocker = await system.create(workflow="lora_train", inputs=inputs)
        await system.wait(blocker.run_id, (R.RUN_STATUS_RUNNING,), settled=False)

        await terminal.start(cli_env(system), "make", "--workflow", "lora_train", "--user", "alice",
                             "--set", f'images=["{IMAGE}"]')  # fmt: skip
        await terminal.expect(r"lora_train costs at most \d+ points \(history: ")
        waiting = r"(not started|queued) .*(next in the queue|\d+ ahead in the queue)  ETA "
        await terminal.expect(re.escape(REDRAW) + waiting)
        await system.runs.CancelRun(svc.CancelRunRequest(run_id=blocker.run_id), timeout=30)  # the line moves
        await terminal.expect(re.escape(REDRAW) + r"running +\[#+-+\] +([1-9]|[1-9]\d)%  ETA .*Executing ")
        await terminal.expect(r"Charged \d+ of the \d+ points held")
        assert await terminal.exit_code() == 0, terminal.output

    redraws = terminal.redraws()
    assert len(set(redraws)) >= 4, redraws
    states = {line.split("  ")[0].strip() for line in redraws}
    assert {"not started", "running", "success"} <= states, redraws
    percents = {int(p) for p in re.findall(r"\] +(\d+)%", "\n".join(redraws))}
    assert len(percents) >= 3 and max(percents) == 100, redraws  # the bar moves as the graph executes
    assert not any(len(line) > 159 for line in redraws)  # never wider than the terminal


async def _basis(system: System, request: svc.QuoteRunRequest) -> bool:
    quote: svc.QuoteRunResponse = await system.runs.QuoteRun(request, timeout=10)
    return quote.basis == "history"


async def test_ctrl_c_asks_and_y_cancels_the_run_and_shows_the_refund(system: System, terminal: Terminal) -> None:
    await ensure_points(system, "42")
    await system.emulator.set_faults(next_run_outcomes=["stuck"])
    await terminal.start(cli_env(system), "make", "a cat astronaut", "--user", "42")
    run_id = (await terminal.expect(r"run ([0-9a-f-]{36}) started")).group(1)
    await terminal.expect(re.escape(REDRAW) + r"running ")
    terminal.type(b"\x03")  # Ctrl-C, as typed
    await terminal.expect(r"Cancel the run\? \[y/N\] ")
    await asyncio.sleep(0.3)
    assert (await system.get(run_id)).status == R.RUN_STATUS_RUNNING  # asking changes nothing
    terminal.type(b"y\r")
    refund = await terminal.expect(r"Charged 0 of the (\d+) points held, (\d+) back \(cancelled")
    assert await terminal.exit_code() == EXIT["run_failed"], terminal.output
    run = await system.wait(run_id)
    assert run.status == R.RUN_STATUS_CANCELLED and run.error.metadata.get("source") != "upstream", run
    assert run.receipt.points_refunded == run.points_held == int(refund.group(1)) == int(refund.group(2)) > 0
    account = await system.account("42")
    assert account.points_held == 0 and account.qoints_held == 0
    assert "Traceback" not in terminal.output


async def test_ctrl_c_then_no_keeps_watching_and_a_second_ctrl_c_at_the_prompt_leaves_the_run_running(
    system: System, terminal: Terminal
) -> None:
    await ensure_points(system, "42")
    await system.emulator.set_faults(next_run_outcomes=["stuck"])
    await terminal.start(cli_env(system), "make", "a cat astronaut", "--user", "42")
    run_id = (await terminal.expect(r"run ([0-9a-f-]{36}) started")).group(1)
    await terminal.expect(re.escape(REDRAW) + r"running ")
    terminal.type(b"\x03")
    await terminal.expect(r"Cancel the run\? \[y/N\] ")
    terminal.type(b"n\r")
    await terminal.expect(re.escape(REDRAW) + r"running ")  # back to the progress line
    assert terminal.process is not None and terminal.process.returncode is None
    terminal.type(b"\x03")
    await terminal.expect(r"Cancel the run\? \[y/N\] ")
    terminal.type(b"\x03")
    left = await terminal.expect(r"error: left run ([0-9a-f-]{36}) running: `stationthis run \1` follows it")
    assert left.group(1) == run_id
    assert await terminal.exit_code() == 130, terminal.output
    run = await system.get(run_id)  # the CLI has exited: whatever it was to do is done
    assert run.status == R.RUN_STATUS_RUNNING and run.points_held > 0, run  # still running, still held
    assert "Traceback" not in terminal.output
    await system.runs.CancelRun(svc.CancelRunRequest(run_id=run_id), timeout=30)
    await system.wait(run_id)
