"""How the ``stationthis`` CLI shows things to a person: tables, amounts, durations, the progress line
and the receipt. Pure functions of protobuf messages (no I/O), so they are easy to test."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from stationthis.comfyui.v1 import comfyui_service_pb2 as svc
from stationthis.comfyui.v1 import run_pb2
from stationthis.points.v1 import points_pb2
from stationthis.type.v1 import gpu_pb2
from stationthis.workflows.v1 import workflow_pb2

TERMINAL = frozenset(
    {run_pb2.RUN_STATUS_SUCCESS, run_pb2.RUN_STATUS_FAILED, run_pb2.RUN_STATUS_TIMEOUT, run_pb2.RUN_STATUS_CANCELLED}
)
WAITING = frozenset({run_pb2.RUN_STATUS_NOT_STARTED, run_pb2.RUN_STATUS_QUEUED})
BAR_WIDTH = 20


def to_dict(message: Message) -> dict[str, Any]:
    """A message in the proto3 JSON mapping, with the proto field names (as the gateway answers) and
    every field present (zeros included, so scripts need no defaults)."""
    result: dict[str, Any] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return result


def dumps(document: Any) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False)


# --- names ---------------------------------------------------------------------------------------


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    try:
        name: str = enum.Name(value)
    except ValueError:
        return str(value)
    return name.removeprefix(prefix)


def gpu_name(value: int) -> str:
    if value == gpu_pb2.GPU_TYPE_UNSPECIFIED:
        return "-"
    return _enum_name(gpu_pb2.GpuType, value, "GPU_TYPE_").replace("_80GB", "-80GB")


def status_name(value: int) -> str:
    """``RUN_STATUS_NOT_STARTED`` -> ``not started``."""
    return _enum_name(run_pb2.RunStatus, value, "RUN_STATUS_").lower().replace("_", " ")


def input_type_name(value: int) -> str:
    return _enum_name(workflow_pb2.InputType, value, "INPUT_TYPE_").lower().replace("_", " ")


def transaction_kind_name(value: int) -> str:
    return _enum_name(points_pb2.TransactionKind, value, "TRANSACTION_KIND_").lower().replace("_", " ")


def seconds_of(duration: Any) -> float:
    return float(duration.ToNanoseconds()) / 1e9


def human_seconds(seconds: float) -> str:
    """``0.5 s``, ``60 s``, ``3 min 05 s``, ``1 h 02 min``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 100:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def timestamp(value: Any) -> str:
    """A Timestamp as local ``YYYY-MM-DD HH:MM:SS``, ``-`` when unset (seconds 0)."""
    if not value.seconds and not value.nanos:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value.seconds))


def trim(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def value_text(value: Any) -> str:
    """A JSON value (Python) as a person reads it: strings bare, the rest as JSON."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return json.dumps(value, ensure_ascii=False)


# --- tables ----------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, the last one left ragged."""
    if not rows:
        return "  ".join(headers)
    widths = [max(len(headers[i]), *(len(row[i]) for row in rows)) for i in range(len(headers))]
    lines = []
    for row in (list(headers), *rows):
        cells = [cell.ljust(widths[i]) if i < len(row) - 1 else cell for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def workflows_table(workflows: Sequence[workflow_pb2.Workflow]) -> str:
    rows = [
        [w.name, ", ".join(w.aliases) or "-", gpu_name(w.gpu), str(len(w.inputs)), trim(w.description, 60) or "-"]
        for w in workflows
    ]
    return table(["NAME", "ALIASES", "GPU", "INPUTS", "DESCRIPTION"], rows)


def limits_text(spec: workflow_pb2.WorkflowInput) -> str:
    if spec.enum_options:
        return "one of " + ", ".join(spec.enum_options)
    low = value_text(spec.min_value) if spec.HasField("min_value") else ""
    high = value_text(spec.max_value) if spec.HasField("max_value") else ""
    text = ""
    if low and high:
        text = f"{low}..{high}"
    elif low:
        text = f">= {low}"
    elif high:
        text = f"<= {high}"
    if spec.type == workflow_pb2.INPUT_TYPE_SEED:
        text = f"-1 (random) or {text}" if text else "-1 (random) or an integer"
    if spec.HasField("step"):
        text = f"{text}, step {value_text(spec.step)}" if text else f"step {value_text(spec.step)}"
    return text or "-"


def workflow_details(workflow: workflow_pb2.Workflow) -> str:
    lines = [f"{workflow.name}  ({workflow.display_name or workflow.name}, id {workflow.workflow_id})"]
    if workflow.description:
        lines.append(f"  {' '.join(workflow.description.split())}")
    lines.append(f"  aliases: {', '.join(workflow.aliases) or '-'}")
    machine = workflow.machine_name or workflow.machine_id or "-"
    lines.append(f"  runs on: {gpu_name(workflow.gpu)} (machine {machine})")
    if workflow.outputs:
        kinds = sorted({_enum_name(workflow_pb2.OutputType, o.type, "OUTPUT_TYPE_").lower() for o in workflow.outputs})
        lines.append(f"  outputs: {', '.join(kinds)}")
    lines.append("")
    rows = []
    for spec in workflow.inputs:
        default = "-"
        if spec.HasField("default_value"):
            default = trim(value_text(json_format.MessageToDict(spec.default_value)), 40)
        rows.append(
            [
                spec.input_id,
                input_type_name(spec.type),
                "yes" if spec.required else "no",
                default,
                trim(limits_text(spec), 50),
                trim(spec.description or (spec.display_name if spec.display_name != spec.input_id else ""), 60) or "-",
            ]
        )
    lines.append(table(["INPUT", "TYPE", "REQUIRED", "DEFAULT", "LIMITS", "DESCRIPTION"], rows))
    return "\n".join(lines)


def account_text(account: points_pb2.Account) -> str:
    available = account.points_available + account.qoints_available
    lines = [
        f"user {account.user_id}: {available} points available to spend",
        f"  free allowance  {account.points_available} available of {account.max_points} "
        f"({account.points_used} used, {account.points_held} held)",
        f"  qoints          {account.qoints_available} available of {account.qoints} ({account.qoints_held} held)",
    ]
    if account.next_regeneration_points:
        lines.append(
            f"  regenerates     {account.next_regeneration_points} points at "
            f"{timestamp(account.next_regeneration_time)}"
        )
    lines.append(f"  level           {account.level} ({account.exp} exp)")
    if account.unpaid_points:
        lines.append(f"  unpaid          {account.unpaid_points} points")
    if account.token_balance:
        lines.append(f"  tokens          {account.token_balance}")
    if account.open_holds:
        lines.append(f"  open holds      {len(account.open_holds)}")
        for hold in account.open_holds:
            held = hold.points_held + hold.qoints_held
            lines.append(f"    {hold.hold_id}  {held} points for run {hold.run_id or '-'}")
    return "\n".join(lines)


def _signed(value: int) -> str:
    return f"{value:+d}" if value else "0"


def transactions_table(transactions: Sequence[points_pb2.Transaction]) -> str:
    rows = []
    for t in transactions:
        what = (t.run_id and f"run {t.run_id}") or t.external_reference or t.counterparty_user_id or t.memo or "-"
        rows.append(
            [
                timestamp(t.create_time),
                transaction_kind_name(t.kind),
                _signed(t.points_used_delta),
                _signed(t.points_held_delta),
                _signed(t.qoints_delta),
                _signed(t.qoints_held_delta),
                str(t.qoints_after),
                trim(what, 50),
            ]
        )
    return table(["TIME", "KIND", "USED", "HELD", "QOINTS", "Q-HELD", "QOINTS AFTER", "FOR"], rows)


def runs_table(runs: Sequence[run_pb2.Run]) -> str:
    rows = []
    for run in runs:
        cost = str(run.cost_points) if run.status == run_pb2.RUN_STATUS_SUCCESS else "-"
        rows.append(
            [
                run.run_id,
                timestamp(run.create_time),
                run.workflow_name or run.workflow_id,
                status_name(run.status),
                f"{run.progress:.0%}",
                cost,
                str(len(run.outputs)),
            ]
        )
    return table(["RUN", "CREATED", "WORKFLOW", "STATUS", "PROGRESS", "COST", "OUTPUTS"], rows)


# --- one run -------------------------------------------------------------------------------------


def quote_text(quote: svc.QuoteRunResponse) -> str:
    basis = quote.basis or "default"
    gpu_time = human_seconds(seconds_of(quote.gpu_time))
    return (
        f"{quote.workflow_name or 'the workflow'} costs at most {quote.cost_points} points "
        f"({basis}: {gpu_time} of {gpu_name(quote.gpu)} time); you have {quote.available_points}."
    )


def eta_text(run: run_pb2.Run, now: float | None = None) -> str:
    if run.status in TERMINAL or not run.HasField("estimated_end_time"):
        return ""
    now = time.time() if now is None else now
    left = run.estimated_end_time.ToNanoseconds() / 1e9 - now
    return "ETA any moment" if left < 0.5 else f"ETA {human_seconds(left)}"


def progress_line(run: run_pb2.Run, now: float | None = None) -> str:
    """``running      [##########----------]  50%  ETA 1.0 s  Executing KSampler``."""
    filled = min(BAR_WIDTH, max(0, round(run.progress * BAR_WIDTH)))
    parts = [f"{status_name(run.status):<11}", f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}]", f"{run.progress:4.0%}"]
    if run.status in WAITING and run.HasField("queue_position"):
        ahead = run.queue_position
        parts.append("next in the queue" if ahead == 0 else f"{ahead} ahead in the queue")
    eta = eta_text(run, now)
    if eta:
        parts.append(eta)
    if run.live_status and run.status not in TERMINAL:
        parts.append(run.live_status)
    return "  ".join(parts)


def status_key(run: run_pb2.Run) -> tuple[Any, ...]:
    """What a plain (non-TTY) status line reports: a new line only when one of these changes."""
    queue = run.queue_position if run.HasField("queue_position") else None
    return (run.status, queue, round(run.progress * 10), run.live_status)


def receipt_text(receipt: run_pb2.Receipt) -> str:
    text = f"Charged {receipt.points_charged} of the {receipt.points_held} points held, {receipt.points_refunded} back"
    if receipt.overage_points:
        text += f", {receipt.overage_points} beyond the hold"
    explanation = receipt.explanation or _enum_name(run_pb2.SettlementRule, receipt.rule, "SETTLEMENT_RULE_").lower()
    return f"{text} ({explanation})."


def error_text(run: run_pb2.Run) -> str:
    """Why a run did not succeed, in one line."""
    error = run.error
    reason = error.reason or status_name(run.status).upper()
    message = " ".join(error.message.split())
    return f"{message} ({reason})" if message else reason


def run_text(run: run_pb2.Run) -> str:
    lines = [f"run {run.run_id}: {run.workflow_name or run.workflow_id} for user {run.user_id}, "
             f"{status_name(run.status)}"]  # fmt: skip
    lines.append(f"  created   {timestamp(run.create_time)}")
    if run.status not in TERMINAL:
        lines.append(f"  progress  {progress_line(run)}")
    if run.HasField("end_time"):
        lines.append(f"  ended     {timestamp(run.end_time)}")
    if run.HasField("run_duration"):
        lines.append(f"  GPU time  {human_seconds(seconds_of(run.run_duration))} on {gpu_name(run.gpu)}")
    if run.regenerated_from:
        lines.append(f"  re-roll of {run.regenerated_from}")
    inputs = json_format.MessageToDict(run.inputs)
    for number, (name, value) in enumerate(sorted(inputs.items())):
        lines.append(f"  {'inputs' if number == 0 else '':<8}  {name} = {trim(value_text(value), 80)}")
    for output in run.outputs:
        lines.append(f"  output    {output.url or output.text}")
    if run.status in TERMINAL and run.status != run_pb2.RUN_STATUS_SUCCESS:
        lines.append(f"  error     {error_text(run)}")
    if run.HasField("receipt"):
        lines.append(f"  receipt   {receipt_text(run.receipt)}")
    elif run.points_held:
        lines.append(f"  held      {run.points_held} points")
    return "\n".join(lines)
