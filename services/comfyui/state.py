"""A run's state machine, as pure functions of protobuf messages: no I/O, no clock.

Reports about a run come from two sources, webhooks and polls, in any order and any number of
times. Both are turned into one ``Report`` and merged into the stored ``Run`` by ``merge``, which
never moves a run backwards (RunStatus order), never changes a terminal run, and keeps every output
seen once. ``finish`` applies our own terminal transitions (cancel, deadline, failed submission).
"""

from __future__ import annotations

import mimetypes
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from google.protobuf import duration_pb2, json_format, struct_pb2

from comfydeploy.models import MediaItem
from comfydeploy.models import Run as UpstreamRun
from comfydeploy.models import RunOutput as UpstreamOutput
from common.gpu import gpu_type
from common.proto_time import timestamp_from_ms
from stationthis.comfyui.v1 import comfyui_service_pb2, run_pb2, webhook_pb2
from stationthis.type.v1 import gpu_pb2
from stationthis.type.v1.gpu_pb2 import GpuType

S = run_pb2
E = comfyui_service_pb2
DOMAIN = "comfyui.stationthis.dev"

STATUS_BY_UPSTREAM: Mapping[str, S.RunStatus] = {
    "not-started": S.RUN_STATUS_NOT_STARTED,
    "queued": S.RUN_STATUS_QUEUED,
    "started": S.RUN_STATUS_STARTED,
    "running": S.RUN_STATUS_RUNNING,
    "uploading": S.RUN_STATUS_UPLOADING,
    "success": S.RUN_STATUS_SUCCESS,
    "failed": S.RUN_STATUS_FAILED,
    "timeout": S.RUN_STATUS_TIMEOUT,
    "cancelled": S.RUN_STATUS_CANCELLED,
}
TERMINAL = frozenset({S.RUN_STATUS_SUCCESS, S.RUN_STATUS_FAILED, S.RUN_STATUS_TIMEOUT, S.RUN_STATUS_CANCELLED})
WAITING = frozenset({S.RUN_STATUS_NOT_STARTED, S.RUN_STATUS_QUEUED})
UPSTREAM_ACTIVE = frozenset(
    {S.RUN_STATUS_NOT_STARTED, S.RUN_STATUS_QUEUED, S.RUN_STATUS_STARTED, S.RUN_STATUS_RUNNING,
     S.RUN_STATUS_UPLOADING}
)  # fmt: skip


def rank(status: int) -> int:
    """Order of the statuses: every terminal status ranks the same (and highest)."""
    return S.RUN_STATUS_SUCCESS if status in TERMINAL else status


def is_terminal(status: int) -> bool:
    return status in TERMINAL


# --- outputs --------------------------------------------------------------------------------------

_TYPE_BY_KIND: Mapping[str, S.OutputType] = {
    "image": S.OUTPUT_TYPE_IMAGE,
    "video": S.OUTPUT_TYPE_VIDEO,
    "gif": S.OUTPUT_TYPE_GIF,
    "audio": S.OUTPUT_TYPE_AUDIO,
    "text": S.OUTPUT_TYPE_TEXT,
    "file": S.OUTPUT_TYPE_FILE,
    "model": S.OUTPUT_TYPE_MODEL,
    "mesh": S.OUTPUT_TYPE_MESH,
    "other": S.OUTPUT_TYPE_FILE,
}
_EXTRA_TYPES = {".safetensors": "application/octet-stream", ".ckpt": "application/octet-stream",
                ".glb": "model/gltf-binary", ".gltf": "model/gltf+json", ".webp": "image/webp",
                ".webm": "video/webm", ".mkv": "video/x-matroska", ".flac": "audio/flac"}  # fmt: skip
_TEXT_KEYS = frozenset({"text_file"})
# The legacy rule for an image URL whose key says nothing (stationthis-legacy.md §2).
_IMAGE_URL = re.compile(r"\.(jpe?g|gif|png|bmp|webp)(\?.*)?$|/(images?|img)/", re.IGNORECASE)


def mime_type(name: str) -> str:
    """MIME type from a file name or URL path; application/octet-stream when unknown."""
    path = urlsplit(name).path if "://" in name else name
    ext = posixpath.splitext(path)[1].lower()
    return _EXTRA_TYPES.get(ext) or mimetypes.types_map.get(ext) or "application/octet-stream"


def _media_output(item: MediaItem, record_output_id: str, node_class: str) -> S.RunOutput | None:
    if item.kind == "text" or item.text is not None:
        if not item.text:
            return None
        return S.RunOutput(
            output_id=item.output_id or record_output_id, node_id=item.node_id or "", node_class=node_class,
            type=S.OUTPUT_TYPE_TEXT, text=item.text, mime_type="text/plain",
        )  # fmt: skip
    if item.folder_type == "temp" or not item.url:
        return None
    kind = _TYPE_BY_KIND.get(item.kind, S.OUTPUT_TYPE_FILE)
    if item.key in _TEXT_KEYS and kind == S.OUTPUT_TYPE_FILE:
        kind = S.OUTPUT_TYPE_TEXT
    if item.key not in ("images", "gifs", "files", "audio", "text_file", "model_file", "mesh", "result", "videos",
                        "video") and _IMAGE_URL.search(item.url) and kind == S.OUTPUT_TYPE_FILE:  # fmt: skip
        kind = S.OUTPUT_TYPE_IMAGE
    filename = item.filename or posixpath.basename(urlsplit(item.url).path)
    return S.RunOutput(
        output_id=item.output_id or record_output_id, node_id=item.node_id or "", node_class=node_class,
        type=kind, url=item.url, filename=filename, mime_type=mime_type(filename or item.url),
    )  # fmt: skip


def _nested(record: UpstreamOutput) -> Iterable[MediaItem]:
    """Media items, plus the legacy shapes: ``{"url": ...}`` or ``{"images": [...]}`` nested in a value."""
    for item in record.media():
        if item.url is None and item.text is None and item.extra:
            inner = item.extra.get("images")
            for value in inner if isinstance(inner, list) else []:
                found = MediaItem.from_json("images", value, node_id=record.node_id)
                if found is not None:
                    yield found
            continue
        yield item


def outputs_from_records(records: Iterable[Any]) -> list[S.RunOutput]:
    """RunOutputs from upstream output records (raw JSON or parsed), deduplicated, in order."""
    found: list[S.RunOutput] = []
    seen: set[tuple[str, ...]] = set()
    for raw in records:
        record = raw if isinstance(raw, UpstreamOutput) else UpstreamOutput.from_json(raw)
        if record is None:
            continue
        for item in _nested(record):
            output = _media_output(item, record.output_id or "", record.node_class or "")
            if output is None:
                continue
            key = output_key(output)
            if key not in seen:
                seen.add(key)
                found.append(output)
    return found


def output_key(output: S.RunOutput) -> tuple[str, ...]:
    """What identifies an output (RunOutput's contract): (node, type, file) or (node, text)."""
    if output.url:
        return (output.node_id, str(output.type), output.filename or output.url)
    return (output.node_id, "text", output.text)


# --- reports --------------------------------------------------------------------------------------


@dataclass
class Report:
    """What a webhook or a poll says about a run, normalised."""

    upstream_run_id: str
    status: S.RunStatus  # RUN_STATUS_UNSPECIFIED when upstream said something we do not know
    upstream_status: str
    live_status: str = ""
    progress: float = 0.0
    outputs: list[S.RunOutput] = field(default_factory=list)
    queue_position: int | None = None
    queued_ms: int = 0
    started_ms: int = 0
    ended_ms: int = 0
    gpu: GpuType = gpu_pb2.GPU_TYPE_UNSPECIFIED
    run_duration_seconds: float | None = None


def _ms(value: datetime | None) -> int:
    return int(value.timestamp() * 1000) if value is not None else 0


def report_from_run(run: UpstreamRun) -> Report:
    """A poll's answer (GET /run/{id})."""
    return Report(
        upstream_run_id=run.id,
        status=STATUS_BY_UPSTREAM.get(run.status, S.RUN_STATUS_UNSPECIFIED),
        upstream_status=run.status,
        live_status=run.live_status or "",
        progress=_unit(run.progress),
        outputs=outputs_from_records(run.outputs),
        queue_position=run.queue_position,
        queued_ms=_ms(run.queued_at),
        started_ms=_ms(run.started_at),
        ended_ms=_ms(run.ended_at),
        gpu=gpu_type(run.gpu),
        run_duration_seconds=run.run_duration if run.run_duration is not None and run.run_duration >= 0 else None,
    )


def report_from_webhook(payload: webhook_pb2.ComfyDeployWebhook) -> Report:
    """A callback's body (reference §3): no timestamps, outputs as Structs."""
    records = [json_format.MessageToDict(o) for o in payload.outputs]
    return Report(
        upstream_run_id=payload.run_id,
        status=STATUS_BY_UPSTREAM.get(payload.status, S.RUN_STATUS_UNSPECIFIED),
        upstream_status=payload.status,
        live_status=payload.live_status,
        progress=_unit(payload.progress),
        outputs=outputs_from_records(records),
    )


def _unit(value: float) -> float:
    return min(1.0, max(0.0, value)) if value == value else 0.0  # NaN -> 0


# --- merging --------------------------------------------------------------------------------------


@dataclass
class Change:
    run: S.Run
    event_type: E.RunEventType
    new_outputs: list[S.RunOutput]
    status_changed: bool
    upstream_duration: bool  # run_duration is upstream's own (a poll), not our observation


def _set_time(run: S.Run, name: str, ms: int) -> None:
    getattr(run, name).CopyFrom(timestamp_from_ms(ms))


def _error(reason: str, message: str, metadata: Mapping[str, str] | None = None) -> S.RunError:
    return S.RunError(reason=reason, domain=DOMAIN, message=message, metadata=dict(metadata or {}))


def _error_for(status: int, report: Report) -> S.RunError | None:
    if status == S.RUN_STATUS_FAILED:
        return _error("RUN_FAILED", report.live_status or "ComfyUI Deploy reported the run failed",
                      {"live_status": report.live_status} if report.live_status else {})  # fmt: skip
    if status == S.RUN_STATUS_TIMEOUT:
        return _error("RUN_TIMED_OUT", "ComfyUI Deploy reported a timeout", {"source": "upstream"})
    if status == S.RUN_STATUS_CANCELLED:
        return _error("RUN_CANCELLED", "the run was cancelled upstream", {"source": "upstream"})
    return None


_QUEUED_OR_LATER = frozenset({S.RUN_STATUS_QUEUED, S.RUN_STATUS_STARTED, S.RUN_STATUS_RUNNING, S.RUN_STATUS_UPLOADING})
_STARTED_OR_LATER = frozenset({S.RUN_STATUS_STARTED, S.RUN_STATUS_RUNNING, S.RUN_STATUS_UPLOADING})


def merge(current: S.Run, report: Report, now_ms: int, final: bool = False) -> Change | None:
    """The run after ``report``; None when the report changes nothing (a repeat, an earlier status
    with nothing new, or anything about a terminal run).

    ``final``: the report is upstream's own account of a run we already know is terminal (the poll
    that settlement makes for the billed duration): its times, GPU and outputs are taken, the status
    is not touched.
    """
    if is_terminal(current.status) and not final:
        return None
    run = S.Run()
    run.CopyFrom(current)
    status_changed = False
    if not run.upstream_run_id and report.upstream_run_id:
        run.upstream_run_id = report.upstream_run_id
    if report.status and rank(report.status) > rank(run.status):
        run.status = report.status
        status_changed = True
    # Times: upstream's when it gives them, else when we first learned of the status.
    if report.queued_ms and (final or not run.HasField("queue_time")):
        _set_time(run, "queue_time", report.queued_ms)
    elif status_changed and run.status in _QUEUED_OR_LATER and not run.HasField("queue_time"):
        _set_time(run, "queue_time", now_ms)
    if report.started_ms and (final or not run.HasField("start_time")):
        _set_time(run, "start_time", report.started_ms)
    elif status_changed and run.status in _STARTED_OR_LATER and not run.HasField("start_time"):
        _set_time(run, "start_time", now_ms)
    if report.gpu:
        run.gpu = report.gpu
    # An earlier status, or less progress, is old news: its live_status is older than the run's.
    stale = rank(report.status) < rank(current.status) or report.progress < current.progress
    if report.live_status and not final and not stale:
        run.live_status = report.live_status
    if report.progress > run.progress:
        run.progress = report.progress
    if run.status in WAITING and report.queue_position is not None:
        run.queue_position = report.queue_position
    elif run.status not in WAITING:
        run.ClearField("queue_position")
    known = {output_key(o) for o in run.outputs}
    new_outputs = [o for o in report.outputs if output_key(o) not in known]
    run.outputs.extend(new_outputs)
    upstream_duration = False
    if is_terminal(run.status):
        if report.ended_ms:
            _set_time(run, "end_time", report.ended_ms)
        elif not run.HasField("end_time"):
            _set_time(run, "end_time", now_ms)
        if report.run_duration_seconds is not None:
            run.run_duration.FromMilliseconds(round(report.run_duration_seconds * 1000))
            upstream_duration = True
        elif not final:
            run.run_duration.CopyFrom(billable_duration(run))
        if status_changed:
            error = _error_for(run.status, report)
            if error is not None:
                run.error.CopyFrom(error)
    comparable = S.Run()
    comparable.CopyFrom(run)
    comparable.ClearField("update_time")
    if current.HasField("update_time"):
        comparable.update_time.CopyFrom(current.update_time)
    if comparable == current:
        return None
    _set_time(run, "update_time", now_ms)
    if status_changed:
        event = E.RUN_EVENT_TYPE_STATUS_CHANGED  # for a terminal status, FINISHED follows settlement
    elif new_outputs:
        event = E.RUN_EVENT_TYPE_OUTPUT
    else:
        event = E.RUN_EVENT_TYPE_PROGRESS
    return Change(run, event, new_outputs, status_changed, upstream_duration)


def billable_duration(run: S.Run) -> duration_pb2.Duration:
    """end - start; if start is unknown, end - queue, else end - submit (Run.run_duration)."""
    end = run.end_time.ToMilliseconds() if run.HasField("end_time") else 0
    for name in ("start_time", "queue_time", "submit_time"):
        if run.HasField(name):
            begin = getattr(run, name).ToMilliseconds()
            duration = duration_pb2.Duration()
            duration.FromMilliseconds(max(0, end - begin))
            return duration
    return duration_pb2.Duration()


def finish(current: S.Run, status: S.RunStatus, error: S.RunError | None, now_ms: int) -> S.Run | None:
    """Our own terminal transition (cancel, deadline, failed or lost submission); None if terminal."""
    if is_terminal(current.status):
        return None
    run = S.Run()
    run.CopyFrom(current)
    run.status = status
    run.ClearField("queue_position")
    _set_time(run, "end_time", now_ms)
    _set_time(run, "update_time", now_ms)
    run.run_duration.CopyFrom(billable_duration(run))
    if error is not None:
        run.error.CopyFrom(error)
    return run


SEED_RANGE = 2**32  # ComfyUI's seeds are unsigned; the legacy bot drew them below 2^32


def _seed_ids(specs: Iterable[Any]) -> list[tuple[str, float | None, float | None]]:
    """(input_id, min, max) of the workflow's seed inputs (WorkflowInput messages)."""
    from stationthis.workflows.v1 import workflow_pb2

    return [
        (spec.input_id, spec.min_value if spec.HasField("min_value") else None,
         spec.max_value if spec.HasField("max_value") else None)
        for spec in specs
        if spec.type == workflow_pb2.INPUT_TYPE_SEED
    ]  # fmt: skip


def _draw(low: float | None, high: float | None) -> int:
    import secrets as _secrets

    lowest = int(low) if low is not None and low >= 0 else 0
    highest = int(high) if high is not None and high >= lowest else SEED_RANGE - 1
    return lowest + _secrets.randbelow(highest - lowest + 1)


def draw_seeds(inputs: struct_pb2.Struct, specs: Iterable[Any]) -> struct_pb2.Struct:
    """``inputs`` with every seed left to chance (-1) drawn now: the snapshot holds the seed used."""
    out = struct_pb2.Struct()
    out.CopyFrom(inputs)
    for input_id, low, high in _seed_ids(specs):
        value = out.fields.get(input_id)
        if value is not None and value.WhichOneof("kind") == "number_value" and value.number_value == -1:
            out[input_id] = _draw(low, high)
    return out


def new_seeds(inputs: struct_pb2.Struct, specs: Iterable[Any]) -> struct_pb2.Struct:
    """``inputs`` with a new seed for every seed input (a re-roll)."""
    out = struct_pb2.Struct()
    out.CopyFrom(inputs)
    for input_id, low, high in _seed_ids(specs):
        if input_id in out.fields:
            out[input_id] = _draw(low, high)
    return out


def estimate(run: S.Run, median_seconds: float | None, now_ms: int) -> None:
    """Set (or clear) the run's estimated_end_time from the median of recent runs: while it runs,
    start_time plus the median; while it waits, now plus one median for itself and one for each run
    ahead of it. No history (or a terminal run): no estimate."""
    if median_seconds is None or is_terminal(run.status):
        run.ClearField("estimated_end_time")
        return
    median_ms = round(median_seconds * 1000)
    if run.HasField("start_time") and run.status in _STARTED_OR_LATER:
        end = run.start_time.ToMilliseconds() + median_ms
    else:
        end = now_ms + median_ms * (1 + (run.queue_position if run.HasField("queue_position") else 0))
    run.estimated_end_time.CopyFrom(timestamp_from_ms(max(end, now_ms)))


_STOPS = {
    "cancel_run": (S.RUN_STATUS_CANCELLED, "RUN_CANCELLED", "cancelled by CancelRun"),
    "cancel_after": (S.RUN_STATUS_CANCELLED, "RUN_CANCELLED", "its cancel_after deadline passed"),
    "deadline": (S.RUN_STATUS_TIMEOUT, "RUN_TIMED_OUT", "the run did not finish within its time limit"),
}


def stopped_by_us(run: S.Run, why: str) -> None:
    """Upstream reports "cancelled" for a cancel we asked for: say whose it was (``why``)."""
    status, reason, message = _STOPS[why]
    run.status = status
    run.error.CopyFrom(_error(reason, message, {"source": why}))


def run_error(reason: str, message: str, metadata: Mapping[str, str] | None = None) -> S.RunError:
    return _error(reason, message, metadata)


def inputs_struct(values: Mapping[str, Any]) -> struct_pb2.Struct:
    inputs = struct_pb2.Struct()
    json_format.ParseDict(dict(values), inputs)
    return inputs


def struct_values(inputs: struct_pb2.Struct) -> dict[str, Any]:
    """The Struct as plain JSON values, with integral numbers as ints (upstream expects 20, not 20.0)."""
    values = json_format.MessageToDict(inputs)
    return {key: _integral(value) for key, value in values.items()}


def _integral(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def event(run: S.Run, event_type: E.RunEventType, new_outputs: Sequence[S.RunOutput] = ()) -> bytes:
    """A WatchRun message as stored in the run's event stream."""
    return E.WatchRunResponse(run=run, event_type=event_type, new_outputs=list(new_outputs)).SerializeToString()
