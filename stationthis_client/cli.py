"""``stationthis``: the StationThis services from a terminal.

It finds the services the way the client library does (``Endpoints.discover``: POINTS_SERVICE_ADDR,
WORKFLOWS_SERVICE_ADDR, COMFYUI_SERVICE_ADDR, GATEWAY_URL, GATEWAY_API_KEY, STATIONTHIS_DATA_DIR,
defaulting to what ``make run`` starts), so on a machine running ``make run`` it needs no flag::

    stationthis workflows                      # the catalog
    stationthis workflow text2img              # one workflow and its inputs
    stationthis make "a cat astronaut" --user 42 --set steps=30 --download out/
    stationthis account 42 | credit 42 1000 --ref PAYMENT | history 42
    stationthis runs 42 | run RUN | cancel RUN | regen RUN --same-seed --set cfg=5
    stationthis upload cat.png --user 42

``--json`` prints one JSON document per command (messages in the proto3 JSON mapping with the proto
field names, as the gateway answers; for ``make``, the final run). Errors are one line on stderr
(``error: ...``), never a traceback; with ``--json`` stdout also gets ``{"error": {...}}``.

Exit codes:
    0    ok
    1    anything else (an error not listed below)
    2    bad input: a usage error, or inputs the workflow refuses (INVALID_ARGUMENT)
    3    not found: no such workflow, run or file
    4    not enough points for the run
    5    unavailable: the services cannot be reached, or did not answer in time
    6    the run ended but did not succeed (failed, timed out or cancelled)
    130  interrupted (Ctrl-C); ``make`` asks first whether to cancel the run

During ``make``, Ctrl-C asks "Cancel the run? [y/N]": y cancels it (and shows the refund), N (or
Enter) goes on watching, a second Ctrl-C (or end of input) leaves the run running and exits 130.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NoReturn, TypeVar

import click
from google.protobuf.message import Message

from stationthis.comfyui.v1 import comfyui_service_pb2 as svc
from stationthis.comfyui.v1 import run_pb2
from stationthis.points.v1 import points_service_pb2 as pts
from stationthis.workflows.v1 import workflow_pb2

from . import _render as render
from .aio import AsyncClient
from .endpoints import Endpoints
from .errors import (
    AlreadyExists,
    DeadlineExceeded,
    InsufficientPoints,
    InvalidInputs,
    NotFound,
    StationThisError,
    Unavailable,
)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_NOT_FOUND = 3
EXIT_NO_POINTS = 4
EXIT_UNAVAILABLE = 5
EXIT_RUN_NOT_SUCCEEDED = 6
EXIT_INTERRUPTED = 130

EXIT_CODES_EPILOG = """\b
Exit codes:
  0    ok
  1    anything else
  2    bad input (usage errors, inputs the workflow refuses)
  3    not found (workflow, run, file)
  4    not enough points
  5    services unavailable or too slow (deadline)
  6    the run ended but did not succeed (failed, timeout, cancelled)
  130  interrupted (Ctrl-C)

\b
Addresses come from POINTS_SERVICE_ADDR, WORKFLOWS_SERVICE_ADDR,
COMFYUI_SERVICE_ADDR, GATEWAY_URL and GATEWAY_API_KEY (default: the local
system `make run` starts). --user defaults to $STATIONTHIS_USER.
"""

T = TypeVar("T")


class CliError(Exception):
    """An error the CLI reports as one line and an exit code."""

    def __init__(self, exit_code: int, message: str, *, printed_json: bool = False) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message
        self.printed_json = printed_json  # with --json: stdout has its document already (make's run)


@dataclass
class Options:
    as_json: bool = False
    timeout: float = 30.0
    # input_id -> the name the user typed (``steps`` for ``input_steps``), to speak their words in errors.
    typed_names: dict[str, str] = field(default_factory=dict)


# --- talking to the services ---------------------------------------------------------------------


def _client(options: Options) -> AsyncClient:
    return AsyncClient(Endpoints.discover(os.environ), timeout=options.timeout)


def call(options: Options, work: Callable[[AsyncClient], Awaitable[T]]) -> T:
    """Run ``work(client)`` in a fresh event loop with a client bound to the discovered endpoints."""

    async def main() -> T:
        async with _client(options) as client:
            return await work(client)

    return asyncio.run(main())


def out(text: str = "") -> None:
    click.echo(text)


def emit(options: Options, message: Message | dict[str, Any], human: str) -> None:
    if options.as_json:
        document = message if isinstance(message, dict) else render.to_dict(message)
        out(render.dumps(document))
    else:
        out(human)


# --- parsing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One ``--set NAME=VALUE``: ``value`` is the JSON it parses as, else the text; ``text`` as typed."""

    name: str
    value: Any
    text: str


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number here")  # NaN, Infinity: kept as text


def parse_settings(_ctx: click.Context, _param: click.Parameter, values: Sequence[str]) -> list[Setting]:
    """``--set k=v``: v is JSON when it parses as JSON (``30``, ``true``, ``[1, 2]``), else a string."""
    parsed = []
    for raw in values:
        name, sep, text = raw.partition("=")
        name = name.strip()
        if not sep or not name:
            raise click.BadParameter(f"{raw!r} is not NAME=VALUE", param_hint="--set")
        try:
            value: Any = json.loads(text, parse_constant=_no_constants)
        except ValueError:
            value = text
        parsed.append(Setting(name, value, text))
    return parsed


# Inputs whose value is a string whatever it looks like: `--set negative=42` means the text "42".
TEXT_INPUTS = frozenset(
    {
        workflow_pb2.INPUT_TYPE_TEXT, workflow_pb2.INPUT_TYPE_ENUM, workflow_pb2.INPUT_TYPE_IMAGE,
        workflow_pb2.INPUT_TYPE_LORA, workflow_pb2.INPUT_TYPE_CHECKPOINT, workflow_pb2.INPUT_TYPE_VIDEO,
        workflow_pb2.INPUT_TYPE_AUDIO, workflow_pb2.INPUT_TYPE_FILE, workflow_pb2.INPUT_TYPE_EXR,
        workflow_pb2.INPUT_TYPE_FACE_MODEL, workflow_pb2.INPUT_TYPE_COLOR,
    }
)  # fmt: skip


def resolve_names(
    settings: Sequence[Setting], specs: Sequence[workflow_pb2.WorkflowInput], options: Options
) -> dict[str, Any]:
    """The inputs ``--set`` gives, keyed by input id: NAME is the id itself, else ``input_<NAME>``
    when the workflow has it; an unknown name is passed as typed (the catalog refuses it, naming it).
    A text-like input gets the text as typed, even when it looks like JSON."""
    by_id = {spec.input_id: spec for spec in specs}
    inputs: dict[str, Any] = {}
    for setting in settings:
        name = setting.name
        input_id = name if name in by_id or f"input_{name}" not in by_id else f"input_{name}"
        if input_id in inputs:
            raise CliError(EXIT_BAD_INPUT, f"--set {name}: given twice")
        value = setting.value
        spec = by_id.get(input_id)
        if spec is not None and spec.type in TEXT_INPUTS and not isinstance(value, str):
            value = setting.text
        inputs[input_id] = value
        options.typed_names[input_id] = name
    return inputs


PROMPT_NAMES = ("input_prompt", "prompt", "input_positive_prompt", "positive_prompt", "input_text", "text")


def prompt_input(workflow: workflow_pb2.Workflow) -> str | None:
    """The text input a prompt goes into: a well-known name, else the one text input naming a prompt
    (not a negative one), else the only text input."""
    texts = [spec.input_id for spec in workflow.inputs if spec.type == workflow_pb2.INPUT_TYPE_TEXT]
    for name in PROMPT_NAMES:
        if name in texts:
            return name
    prompts = [t for t in texts if "prompt" in t.lower() and "neg" not in t.lower()]
    if prompts:
        return prompts[0]
    return texts[0] if len(texts) == 1 else None


# --- errors and exit codes -------------------------------------------------------------------------


def exit_code_for(error: StationThisError) -> int:
    if isinstance(error, InsufficientPoints):
        return EXIT_NO_POINTS
    if isinstance(error, InvalidInputs):  # INVALID_ARGUMENT (and OUT_OF_RANGE)
        return EXIT_BAD_INPUT
    if isinstance(error, NotFound):
        return EXIT_NOT_FOUND
    if isinstance(error, Unavailable | DeadlineExceeded):
        return EXIT_UNAVAILABLE
    return EXIT_ERROR


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def message_for(error: StationThisError, options: Options) -> str:
    """What went wrong, in one line and in the user's words (``steps: ...`` for ``inputs.input_steps``)."""
    if error.violations:
        parts = []
        for violation in error.violations:
            where = violation.field
            if where.startswith("inputs."):
                input_id = where.removeprefix("inputs.")
                where = options.typed_names.get(input_id, input_id)
            description = one_line(violation.description)
            parts.append(f"{where}: {description}" if where else description)
        return "; ".join(parts)
    if isinstance(error, InsufficientPoints) and error.needed:
        return f"not enough points: the run needs {error.needed}; you have {error.available}"
    return one_line(error.message or str(error) or type(error).__name__)


def fail(exit_code: int, message: str) -> NoReturn:
    raise CliError(exit_code, message)


# --- the command group ---------------------------------------------------------------------------


def _json_here(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        options_of(ctx).as_json = True


class _Commands(click.Group):
    """Every command also takes ``--json`` after its name (``stationthis runs 42 --json``)."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        here = "Print one JSON document (same as stationthis --json ...)."
        cmd.params.append(click.Option(["--json"], is_flag=True, expose_value=False, callback=_json_here, help=here))
        super().add_command(cmd, name)


@click.group(
    cls=_Commands,
    epilog=EXIT_CODES_EPILOG,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (proto3 JSON mapping) per command.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds each call to the services may take.",
)
@click.pass_context
def cli(ctx: click.Context, as_json: bool, timeout: float) -> None:
    """StationThis from the command line: workflows, points and generations."""
    options = ctx.ensure_object(Options)
    options.as_json, options.timeout = as_json, timeout


def options_of(ctx: click.Context) -> Options:
    options = ctx.find_object(Options)
    assert options is not None
    return options


USER = click.option("--user", "user", envvar="STATIONTHIS_USER", required=True, help="The user who pays.")
SETTINGS = click.option(
    "--set",
    "settings",
    multiple=True,
    callback=parse_settings,
    metavar="NAME=VALUE",
    help="An input value: JSON when it parses (30, true, [1, 2]), else a string (text inputs always take the text "
    "as typed); NAME may omit the input_ prefix. Repeatable.",
)


@cli.command("workflows")
@click.pass_context
def workflows_command(ctx: click.Context) -> None:
    """List the workflow catalog."""
    options = options_of(ctx)
    found = call(options, lambda client: client.workflows())
    emit(options, {"workflows": [render.to_dict(w) for w in found]}, render.workflows_table(found))


@cli.command("workflow")
@click.argument("name")
@click.pass_context
def workflow_command(ctx: click.Context, name: str) -> None:
    """Show one workflow (by name, alias or id) with its inputs."""
    options = options_of(ctx)
    found = call(options, lambda client: client.workflow(name))
    emit(options, found, render.workflow_details(found))


@cli.command("account")
@click.argument("user")
@click.pass_context
def account_command(ctx: click.Context, user: str) -> None:
    """Show a user's points: free allowance, qoints, holds, level."""
    options = options_of(ctx)
    account = call(options, lambda client: client.account(user))
    emit(options, account, render.account_text(account))


@cli.command("credit")
@click.argument("user")
@click.argument("qoints", type=click.IntRange(min=1))
@click.option("--ref", "reference", required=True, help="What pays for it (a payment id); unique for all time.")
@click.option("--memo", default="", help="Free text recorded with the credit.")
@click.pass_context
def credit_command(ctx: click.Context, user: str, qoints: int, reference: str, memo: str) -> None:
    """Credit a user QOINTS paid qoints."""
    options = options_of(ctx)

    async def work(client: AsyncClient) -> pts.CreditQointsResponse:
        try:
            return await client.credit(user, qoints, reference, memo=memo)
        except AlreadyExists as error:  # say which reference: the service's message cannot
            raise CliError(EXIT_ERROR, f"--ref {reference}: {one_line(error.message)}") from error

    reply = call(options, work)
    account = reply.account
    emit(
        options,
        reply,
        f"credited {qoints} qoints to {user} (ref {reference}); qoints now {account.qoints}\n"
        + render.account_text(account),
    )


@cli.command("history")
@click.argument("user")
@click.option("--limit", type=click.IntRange(min=1, max=200), default=20, show_default=True)
@click.pass_context
def history_command(ctx: click.Context, user: str, limit: int) -> None:
    """A user's ledger: holds, charges, refunds, credits."""
    options = options_of(ctx)
    found = call(options, lambda client: client.history(user, limit=limit))
    emit(options, {"transactions": [render.to_dict(t) for t in found]}, render.transactions_table(found))


@cli.command("runs")
@click.argument("user")
@click.option("--limit", type=click.IntRange(min=1, max=200), default=20, show_default=True)
@click.pass_context
def runs_command(ctx: click.Context, user: str, limit: int) -> None:
    """A user's runs, newest first."""
    options = options_of(ctx)
    found = call(options, lambda client: client.runs(user, limit=limit))
    emit(options, {"runs": [render.to_dict(r) for r in found]}, render.runs_table(found))


@cli.command("run")
@click.argument("run_id", metavar="RUN")
@click.pass_context
def run_command(ctx: click.Context, run_id: str) -> None:
    """Show one run: status, outputs, receipt."""
    options = options_of(ctx)
    found = call(options, lambda client: client.run(run_id))
    emit(options, found, render.run_text(found))


@cli.command("cancel")
@click.argument("run_id", metavar="RUN")
@click.pass_context
def cancel_command(ctx: click.Context, run_id: str) -> None:
    """Cancel a run (refunded in full unless it already started)."""
    options = options_of(ctx)
    found = call(options, lambda client: client.cancel(run_id))
    emit(options, found, render.run_text(found))


@cli.command("regen")
@click.argument("run_id", metavar="RUN")
@click.option("--same-seed", is_flag=True, help="Keep the seed(s) of the run instead of drawing new ones.")
@SETTINGS
@click.pass_context
def regen_command(ctx: click.Context, run_id: str, same_seed: bool, settings: list[Setting]) -> None:
    """Re-roll a run: a new run from its inputs, with a new seed unless --same-seed."""
    options = options_of(ctx)

    async def work(client: AsyncClient) -> run_pb2.Run:
        overrides = None
        if settings:  # the names and types of the run's workflow, to read NAME=VALUE as `make` does
            original = await client.run(run_id)
            workflow = await client.workflow(original.workflow_id or original.workflow_name)
            overrides = resolve_names(settings, list(workflow.inputs), options)
        return await client.regenerate(run_id, same_seed=same_seed, overrides=overrides)

    found = call(options, work)
    emit(options, found, f"re-rolled {run_id} as run {found.run_id}\n" + render.run_text(found))


@cli.command("upload")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path))
@USER
@click.option("--content-type", default=None, help="MIME type (default: guessed from the file name).")
@click.pass_context
def upload_command(ctx: click.Context, path: Path, user: str, content_type: str | None) -> None:
    """Upload a file; its URL can be an input value (--set image=URL)."""
    options = options_of(ctx)
    reply = call(options, lambda client: client.upload(path, user=user, content_type=content_type))
    emit(options, reply, f"uploaded {path} ({reply.size_bytes} bytes, {reply.content_type})\n{reply.url}")


# --- make ----------------------------------------------------------------------------------------


@cli.command("make", epilog="Ctrl-C while it runs asks whether to cancel the run (refunded).")
@click.argument("prompt", required=False)
@click.option("--workflow", "-w", default="text2img", show_default=True, help="Workflow name, alias or id.")
@USER
@SETTINGS
@click.option(
    "--download",
    type=click.Path(file_okay=False, writable=True, path_type=Path),
    default=None,
    help="Save the outputs into this directory.",
)
@click.option(
    "--cancel-after",
    type=click.FloatRange(min=1, max=86400),
    default=None,
    help="Cancel (and refund) the run if it has not ended after this many seconds.",
)
@click.option(
    "--yes",
    "-y",
    is_flag=True,
    help="For scripts: make never asks before it starts a run (it stops with exit code 4 when the quote "
    "exceeds what the user has); Ctrl-C still asks before cancelling.",
)
@click.pass_context
def make_command(
    ctx: click.Context,
    prompt: str | None,
    workflow: str,
    user: str,
    settings: list[Setting],
    download: Path | None,
    cancel_after: float | None,
    yes: bool,
) -> None:
    """Generate: quote, run with live progress, then the outputs and the receipt."""
    options = options_of(ctx)
    make = Make(options, prompt, workflow, user, settings, download, cancel_after)
    call(options, make.run)


@dataclass
class Make:
    options: Options
    prompt: str | None
    workflow: str
    user: str
    settings: list[Setting]
    download: Path | None
    cancel_after: float | None

    def say(self, text: str) -> None:
        """Human-readable narration: stdout, or nothing with --json (stdout carries the document)."""
        if not self.options.as_json:
            out(text)

    async def run(self, client: AsyncClient) -> None:
        spec = await client.workflow(self.workflow)
        inputs = resolve_names(self.settings, list(spec.inputs), self.options)
        if self.prompt is not None:
            target = prompt_input(spec)
            if target is None:
                fail(EXIT_BAD_INPUT, f"workflow {spec.name} has no prompt input; give its inputs with --set")
            if target in inputs:
                fail(EXIT_BAD_INPUT, f"the prompt is given twice (as PROMPT and as --set {target})")
            inputs = {target: self.prompt, **inputs}
            self.options.typed_names.setdefault(target, "prompt")
        quote = await client.quote(self.user, spec.name, inputs)
        self.say(render.quote_text(quote))
        if not quote.affordable:
            fail(
                EXIT_NO_POINTS,
                f"not enough points: {spec.name} costs at most {quote.cost_points} points and user {self.user} "
                f"has {quote.available_points} ({quote.shortfall_points} short); add some with "
                f"`stationthis credit {self.user} QOINTS --ref PAYMENT`",
            )
        kwargs: dict[str, Any] = {"request_id": f"cli-{uuid.uuid4()}"}
        if self.cancel_after is not None:
            kwargs["cancel_after"] = self.cancel_after
        try:
            created = await client.create(self.user, spec.name, inputs, **kwargs)
        except asyncio.CancelledError:  # Ctrl-C while the run was being created: say what may be left
            fail(
                EXIT_INTERRUPTED,
                f"interrupted while the run was being created; it may have started: `stationthis runs {self.user}` "
                "lists it and `stationthis cancel RUN` cancels it",
            )
        self.say(f"run {created.run_id} started ({created.points_held} points held)")
        final = await Follow(client, created, self.options).watch()
        await self.report(final)

    async def report(self, run: run_pb2.Run) -> None:
        ok = run.status == run_pb2.RUN_STATUS_SUCCESS
        took = render.human_seconds(render.seconds_of(run.run_duration)) if run.HasField("run_duration") else ""
        if ok:
            count = f"{len(run.outputs)} output{'' if len(run.outputs) == 1 else 's'}"
            self.say(f"Done{' in ' + took if took else ''}: {count}")
        else:
            self.say(f"The run {ended(run)}: {render.error_text(run)}")
        for output in run.outputs:
            self.say(f"  {output.url or output.text}")
        if run.HasField("receipt"):
            self.say(render.receipt_text(run.receipt))
        elif run.points_held:
            self.say(
                f"Not settled yet: {run.points_held} points are held; `stationthis run {run.run_id}` shows the "
                "receipt once settled."
            )
        if self.download is not None and run.outputs:
            saved = await download_outputs(run, self.download, self.options.timeout)
            for path in saved:
                if self.options.as_json:
                    click.echo(f"saved {path}", err=True)
                else:
                    self.say(f"saved {path}")
        if self.options.as_json:
            out(render.dumps(render.to_dict(run)))
        if not ok:
            raise CliError(
                EXIT_RUN_NOT_SUCCEEDED,
                f"run {run.run_id} {ended(run)}: {render.error_text(run)}",
                printed_json=True,
            )


def ended(run: run_pb2.Run) -> str:
    """How a run that did not succeed ended, as a verb: ``failed``, ``timed out``, ``was cancelled``."""
    return {
        run_pb2.RUN_STATUS_FAILED: "failed",
        run_pb2.RUN_STATUS_TIMEOUT: "timed out",
        run_pb2.RUN_STATUS_CANCELLED: "was cancelled",
    }.get(run.status, f"ended {render.status_name(run.status)}")


async def download_outputs(run: run_pb2.Run, directory: Path, call_seconds: float) -> list[Path]:
    """GET each output URL into ``directory`` (made if missing; inline text outputs written as .txt);
    never overwrites a file."""
    import httpx

    os.makedirs(directory, exist_ok=True)
    saved: list[Path] = []

    def free_path(name: str) -> Path:
        name = os.path.basename(name) or "output"
        path = directory / name
        stem, suffix = os.path.splitext(name)
        counter = 1
        while path.exists():
            path = directory / f"{stem}-{counter}{suffix}"
            counter += 1
        return path

    async with httpx.AsyncClient(timeout=call_seconds, follow_redirects=True) as http:
        for index, output in enumerate(run.outputs, start=1):
            if not output.url:
                path = free_path(f"{run.run_id[:8]}-text-{index}.txt")
                path.write_text(output.text)
                saved.append(path)
                continue
            name = output.filename or output.url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
            path = free_path(name)
            try:
                async with http.stream("GET", output.url) as response:
                    response.raise_for_status()
                    with path.open("wb") as file:
                        async for chunk in response.aiter_bytes():
                            file.write(chunk)
            except httpx.HTTPStatusError as error:
                path.unlink(missing_ok=True)
                code = EXIT_NOT_FOUND if error.response.status_code == 404 else EXIT_ERROR
                fail(code, f"download of {output.url} failed: HTTP {error.response.status_code}")
            except httpx.TransportError as error:
                path.unlink(missing_ok=True)
                why = one_line(str(error)) or type(error).__name__
                fail(EXIT_UNAVAILABLE, f"download of {output.url} failed: {why}")
            saved.append(path)
    return saved


# --- following a run: progress, Ctrl-C -------------------------------------------------------------


class Progress:
    """The live view of a run: one line redrawn in place on a terminal (with a ticking ETA), plain
    status lines otherwise (one per change of status, place in queue, 10% of progress or node)."""

    def __init__(self, stream: IO[str] | None, tty: bool) -> None:
        self.stream = stream
        self.tty = tty
        self.run: run_pb2.Run | None = None
        self.paused = False
        self.drawn = False
        self.last_key: tuple[Any, ...] | None = None
        self.last_line = ""

    def write(self, text: str) -> None:
        if self.stream is None:
            return
        self.stream.write(text)
        self.stream.flush()

    def update(self, run: run_pb2.Run) -> None:
        self.run = run
        if not self.paused:
            self.draw()

    def draw(self) -> None:
        if self.run is None or self.stream is None:
            return
        if self.tty:
            width = max(20, _terminal_width(self.stream) - 1)
            line = render.progress_line(self.run)[:width]
            if line != self.last_line or not self.drawn:
                self.write("\r\x1b[2K" + line)
                self.last_line, self.drawn = line, True
        else:
            key = render.status_key(self.run)
            if key != self.last_key:
                self.last_key = key
                self.write(render.progress_line(self.run) + "\n")

    def pause(self) -> None:
        self.paused = True
        if self.tty and self.drawn:
            self.write("\n")
            self.drawn = False

    def resume(self) -> None:
        self.paused = False
        self.last_line = ""
        self.draw()

    def finish(self) -> None:
        if self.tty and self.drawn:
            self.write("\n")
            self.drawn = False

    async def tick(self) -> None:
        """Redraw every second so the ETA counts down between events."""
        while True:
            await asyncio.sleep(1.0)
            if not self.paused and self.tty:
                self.draw()


def _terminal_width(stream: IO[str]) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 80


class Follow:
    """Watch a run to the end (FINISHED: terminal and settled), drawing its progress; Ctrl-C asks
    whether to cancel it."""

    def __init__(self, client: AsyncClient, run: run_pb2.Run, options: Options) -> None:
        self.client = client
        self.run = run
        self.options = options
        if options.as_json:
            stream: IO[str] | None = sys.stderr if sys.stderr.isatty() else None
        else:
            stream = sys.stdout
        self.progress = Progress(stream, tty=stream is not None and stream.isatty())
        # Where the user sees the question: the progress line's terminal, else stderr's, else stderr.
        self.prompt_stream: IO[str] = stream if self.progress.tty and stream is not None else sys.stderr
        self.interrupted = asyncio.Event()

    async def watch(self) -> run_pb2.Run:
        loop = asyncio.get_running_loop()
        installed = False
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGINT, self.interrupted.set)
            installed = True
        self.progress.update(self.run)
        ticker = asyncio.create_task(self.progress.tick())
        watching = asyncio.create_task(self.consume())
        try:
            while True:
                waiting = asyncio.create_task(self.interrupted.wait())
                done, _ = await asyncio.wait({watching, waiting}, return_when=asyncio.FIRST_COMPLETED)
                if watching in done:
                    waiting.cancel()
                    final = watching.result()
                    self.progress.update(final)
                    return final
                await self.ask(watching)
        finally:
            for task in (ticker, watching):
                task.cancel()
            for task in (ticker, watching):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self.progress.finish()
            if installed:
                loop.remove_signal_handler(signal.SIGINT)

    async def consume(self) -> run_pb2.Run:
        """The run once FINISHED, following the stream again if it ends early."""
        run_id = self.run.run_id
        while True:
            try:
                async with contextlib.aclosing(self.client.watch(run_id)) as events:
                    async for event in events:
                        self.run = event.run
                        self.progress.update(event.run)
                        if event.event_type == svc.RUN_EVENT_TYPE_FINISHED:
                            return event.run
            except StationThisError as error:
                if exit_code_for(error) == EXIT_UNAVAILABLE:
                    raise CliError(
                        EXIT_UNAVAILABLE,
                        f"lost the run while watching it ({message_for(error, self.options)}); it goes on: "
                        f"`stationthis run {run_id}` shows it",
                    ) from error
                raise
            current = await self.client.run(run_id)  # the stream ended early: finished meanwhile?
            self.run = current
            self.progress.update(current)
            if current.status in render.TERMINAL and current.HasField("settle_time"):
                return current
            await asyncio.sleep(0.2)

    async def ask(self, watching: asyncio.Task[run_pb2.Run]) -> None:
        """Ctrl-C: ask whether to cancel; y cancels, anything else goes on watching; a second Ctrl-C
        (or end of input) leaves the run running."""
        run_id = self.run.run_id
        self.progress.pause()
        self.interrupted.clear()
        self.prompt_stream.write("Cancel the run? [y/N] ")
        self.prompt_stream.flush()
        answer = asyncio.ensure_future(read_line())
        again = asyncio.create_task(self.interrupted.wait())
        try:
            done, _ = await asyncio.wait({answer, again, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (answer, again):
                task.cancel()
        if watching in done:
            self.prompt_stream.write("\n(the run ended meanwhile)\n")
            self.progress.resume()
            return
        line = answer.result() if answer in done and not answer.cancelled() else None
        if again in done or line is None:
            self.prompt_stream.write("\n")
            self.prompt_stream.flush()
            raise CliError(
                EXIT_INTERRUPTED,
                f"left run {run_id} running: `stationthis run {run_id}` follows it, "
                f"`stationthis cancel {run_id}` cancels it",
            )
        if line.strip().lower() in ("y", "yes"):
            self.prompt_stream.write(f"cancelling run {run_id}...\n")
            self.prompt_stream.flush()
            self.progress.update(await self.client.cancel(run_id))
        self.progress.resume()
        self.interrupted.clear()


async def read_line() -> str | None:
    """One line from stdin without blocking the event loop; None at end of input."""
    loop = asyncio.get_running_loop()
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, ValueError, OSError):
        return None
    done: asyncio.Future[str | None] = loop.create_future()
    buffer = bytearray()

    def readable() -> None:
        try:
            chunk = os.read(fd, 1024)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            if not done.done():
                done.set_result(buffer.decode(errors="replace") if buffer else None)
            return
        buffer.extend(chunk)
        if b"\n" in buffer and not done.done():
            done.set_result(buffer.split(b"\n", 1)[0].decode(errors="replace"))

    try:
        loop.add_reader(fd, readable)
    except (PermissionError, ValueError, OSError):  # a regular file: reading it does not block
        data = os.read(fd, 1024)
        return data.split(b"\n", 1)[0].decode(errors="replace") if data else None
    try:
        return await done
    finally:
        loop.remove_reader(fd)


# --- the entry point -------------------------------------------------------------------------------


def _report(message: str) -> None:
    with contextlib.suppress(Exception):
        click.echo(f"error: {message}", err=True)


def _json_error(options: Options, exit_code: int, message: str, error: StationThisError | None) -> None:
    """With --json, the error as stdout's one document too: ``{"error": {exit_code, message, ...}}``
    with the service's status code, reason and metadata when a service refused."""
    if not options.as_json:
        return
    document: dict[str, Any] = {"exit_code": exit_code, "message": message}
    if error is not None:
        document.update(status=error.code, reason=error.reason, metadata=error.metadata)
        document["violations"] = [{"field": v.field, "description": v.description} for v in error.violations]
    with contextlib.suppress(Exception):
        out(render.dumps({"error": document}))


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run the CLI and exit with its code (see the module docstring); never a traceback."""
    sys.exit(run_cli(argv))


def run_cli(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    options = Options()  # filled in by the group's callback
    try:
        with cli.make_context("stationthis", args, obj=options) as ctx:
            cli.invoke(ctx)
        return EXIT_OK
    except click.exceptions.Exit as stop:
        return int(stop.exit_code)
    except click.exceptions.Abort:
        return EXIT_INTERRUPTED
    except click.ClickException as error:
        message = one_line(error.format_message())
        code = EXIT_ERROR
        if isinstance(error, click.UsageError):
            code = EXIT_BAD_INPUT
            if error.ctx is not None:
                message += f" (see `{error.ctx.command_path} --help`)"
        _json_error(options, code, message, None)
        _report(message)
        return code
    except CliError as error:
        if not error.printed_json:
            cause = error.__cause__ if isinstance(error.__cause__, StationThisError) else None
            _json_error(options, error.exit_code, error.message, cause)
        _report(error.message)
        return error.exit_code
    except KeyboardInterrupt:  # quietly: the user knows they pressed Ctrl-C
        with contextlib.suppress(Exception):
            if sys.stderr.isatty():
                sys.stderr.write("\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        with contextlib.suppress(Exception):  # `stationthis runs 42 | head`: the reader left
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except StationThisError as error:
        code = exit_code_for(error)
        message = message_for(error, options)
        _json_error(options, code, message, error)
        _report(message)
        return code
    except Exception as error:  # a bug of ours: still one line, never a traceback
        message = f"unexpected {type(error).__name__}: {one_line(str(error))}"
        _json_error(options, EXIT_ERROR, message, None)
        _report(message)
        return EXIT_ERROR


if __name__ == "__main__":
    main()
