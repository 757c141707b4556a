"""Typed, frozen views of ComfyUI Deploy V2 answers, built by lenient parsers.

A parser never fails on an unknown field (kept in ``extra``), a missing optional field (None) or a
field of an unexpected type (None, or the default). Only an identifier the object cannot exist
without (a run's ``id``, a queued run's ``run_id``...) is required; ``from_json`` raises
``ValueError`` when it is missing, and the client turns that into ``MalformedResponse``.
Statuses stay the upstream strings (§4.1) so an unknown future status is still reported as it came.
"""

from __future__ import annotations

import json
import math
import posixpath
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

TERMINAL_STATUSES = frozenset({"success", "failed", "timeout", "cancelled"})
"""Run statuses that never change again (§4.1 ``endStatuses``)."""

RUN_STATUSES = ("not-started", "queued", "started", "running", "uploading", "success", "failed", "timeout", "cancelled")

MediaKind = Literal["image", "gif", "video", "audio", "file", "text", "model", "mesh", "other"]

_IMAGE_EXT = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".avif", ".heic"}
_VIDEO_EXT = {".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v"}
_AUDIO_EXT = {".mp3", ".wav", ".flac", ".ogg", ".m4a", ".aac", ".opus"}
_KIND_BY_KEY: dict[str, MediaKind] = {
    "images": "image",
    "gifs": "gif",
    "videos": "video",
    "video": "video",
    "audio": "audio",
    "files": "file",
    "text_file": "file",
    "result": "file",
    "model_file": "model",
    "mesh": "mesh",
    "text": "text",
}


# --------------------------------------------------------------------------- lenient field readers


def _str(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, int):
        return bool(value)
    return None


def _dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


def parse_datetime(value: Any) -> datetime | None:
    """An aware UTC-or-offset datetime from ISO-8601 text (``Z``, offsets, naive = UTC) or epoch seconds."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, int | float):
        try:
            return datetime.fromtimestamp(float(value), UTC)
        except (OverflowError, OSError, ValueError):
            return None
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    if text.endswith(("z", "Z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class _Seen(Mapping[str, Any]):
    """A read-only view of a JSON object that remembers which keys the parser read, so what it did
    not read is kept as ``extra`` without a second, hand-kept list of known keys."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = data
        self._read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self._read.add(key)
        return self._data[key]

    def get(self, key: str, default: Any = None) -> Any:
        self._read.add(key)
        return self._data.get(key, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def rest(self) -> dict[str, Any]:
        return {k: v for k, v in self._data.items() if k not in self._read}


def _rest(data: Mapping[str, Any]) -> dict[str, Any]:
    """The fields the parser did not read (all of them for a plain mapping)."""
    return data.rest() if isinstance(data, _Seen) else dict(data)


def _require(data: Any, key: str, what: str) -> tuple[Mapping[str, Any], str]:
    if not isinstance(data, Mapping):
        raise ValueError(f"{what}: expected a JSON object, got {type(data).__name__}")
    seen = _Seen(data)
    ident = _str(seen.get(key))
    if not ident:
        raise ValueError(f"{what}: missing {key!r}")
    return seen, ident


def _maybe_json(value: Any) -> Any:
    """Objects some endpoints return as JSON text (e.g. workflow_api on older rows)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


# --------------------------------------------------------------------------- runs


def _ext(name: str | None) -> str:
    if not name:
        return ""
    return posixpath.splitext(urlsplit(name).path if "://" in name else name)[1].lower()


@dataclass(frozen=True)
class MediaItem:
    """One output item, flattened: a URL with a kind, or (kind ``"text"``) a string."""

    kind: MediaKind
    key: str
    url: str | None = None
    text: str | None = None
    filename: str | None = None
    subfolder: str | None = None
    folder_type: str | None = None
    output_id: str | None = None
    is_public: bool | None = None
    format: str | None = None
    node_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, key: str, item: Any, *, node_id: str | None = None) -> MediaItem | None:
        base = _KIND_BY_KEY.get(key, "other")
        if isinstance(item, str):
            if key == "text" or (base == "other" and not item.startswith(("http://", "https://"))):
                return cls(kind="text", key=key, text=item, node_id=node_id)
            return cls(kind=_refine(base, item, None), key=key, url=item, node_id=node_id)
        if not isinstance(item, Mapping):
            return None
        item = _Seen(item)
        url = _str(item.get("url"))
        filename = _str(item.get("filename"))
        fmt = _str(item.get("format"))
        return cls(
            kind=_refine(base, filename or url, fmt),
            key=key,
            url=url,
            filename=filename,
            subfolder=_str(item.get("subfolder")),
            folder_type=_str(item.get("type")),
            output_id=_str(item.get("output_id")),
            is_public=_bool(item.get("is_public")),
            format=fmt,
            node_id=node_id,
            extra=_rest(item),
        )


def _refine(base: MediaKind, name: str | None, fmt: str | None) -> MediaKind:
    """The kind from the data key, corrected by the extension or format (videos hide under gifs/files)."""
    ext = _ext(name)
    if (fmt and fmt.startswith("video/")) or ext in _VIDEO_EXT:
        return "video"
    if (fmt and fmt.startswith("audio/")) or ext in _AUDIO_EXT:
        return "audio"
    if ext == ".gif" or fmt == "image/gif":
        return "gif"
    if ext in _IMAGE_EXT or (fmt and fmt.startswith("image/")):
        return "image" if base in ("other", "file", "image") else base
    return base


@dataclass(frozen=True)
class RunOutput:
    id: str | None
    run_id: str | None
    output_id: str | None
    data: dict[str, Any]
    node_id: str | None
    node_class: str | None
    created_at: datetime | None
    updated_at: datetime | None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any) -> RunOutput | None:
        if not isinstance(data, Mapping):
            return None
        data = _Seen(data)
        meta = _dict(data.get("node_meta"))
        return cls(
            id=_str(data.get("id")),
            run_id=_str(data.get("run_id")),
            output_id=_str(data.get("output_id")),
            data=_dict(data.get("data")),
            node_id=_str(meta.get("node_id")) or _str(data.get("node_id")),
            node_class=_str(meta.get("node_class")),
            created_at=parse_datetime(data.get("created_at")),
            updated_at=parse_datetime(data.get("updated_at")),
            extra=_rest(data),
        )

    def media(self) -> list[MediaItem]:
        """Every media item and text string in ``data``, in key order; booleans and junk are skipped."""
        items: list[MediaItem] = []
        for key, values in self.data.items():
            for value in values if isinstance(values, list) else [values]:
                item = MediaItem.from_json(key, value, node_id=self.node_id)
                if item is not None:
                    items.append(item)
        return items


def _run_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    """What every upstream view of a run carries: ``GET /run/{id}`` and a deployment's run list."""
    return {
        "status": _str(data.get("status")) or "unknown",
        "workflow_id": _str(data.get("workflow_id")),
        "workflow_version_id": _str(data.get("workflow_version_id")),
        "machine_id": _str(data.get("machine_id")),
        "origin": _str(data.get("origin")),
        "gpu": _str(data.get("gpu")),
        "created_at": parse_datetime(data.get("created_at")),
        "started_at": parse_datetime(data.get("started_at")),
        "ended_at": parse_datetime(data.get("ended_at")),
        "duration": _float(data.get("duration")),
    }


@dataclass(frozen=True)
class Run:
    id: str
    status: str
    progress: float
    live_status: str | None
    workflow_id: str | None
    workflow_version_id: str | None
    machine_id: str | None
    origin: str | None
    gpu: str | None
    workflow_inputs: dict[str, Any]
    outputs: tuple[RunOutput, ...]
    created_at: datetime | None
    updated_at: datetime | None
    queued_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None
    duration: float | None
    run_duration: float | None
    cold_start_duration: float | None
    queue_position: int | None
    webhook: str | None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any) -> Run:
        data, ident = _require(data, "id", "run")
        outputs = tuple(o for o in (RunOutput.from_json(x) for x in _list(data.get("outputs"))) if o is not None)
        return cls(
            id=ident,
            **_run_fields(data),
            progress=_float(data.get("progress")) or 0.0,
            live_status=_str(data.get("live_status")),
            workflow_inputs=_dict(data.get("workflow_inputs")),
            outputs=outputs,
            updated_at=parse_datetime(data.get("updated_at")),
            queued_at=parse_datetime(data.get("queued_at")),
            run_duration=_float(data.get("run_duration")),
            cold_start_duration=_float(data.get("cold_start_duration")),
            queue_position=_int(data.get("queue_position")),
            webhook=_str(data.get("webhook")),
            extra=_rest(data),
        )

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def is_success(self) -> bool:
        return self.status == "success"

    def media(self) -> list[MediaItem]:
        """All outputs flattened into media items (images, gifs, videos, audio, files, text)."""
        return [item for output in self.outputs for item in output.media()]


@dataclass(frozen=True)
class DeploymentRun:
    """One row of ``GET /deployment/{id}/runs`` (§2.5): a run without its inputs and outputs.

    ``duration`` is upstream's ``ended_at - started_at`` in seconds (sent as text, or null).
    """

    id: str
    status: str
    created_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None
    workflow_id: str | None
    workflow_version_id: str | None
    machine_id: str | None
    deployment_id: str | None
    user_id: str | None
    gpu: str | None
    origin: str | None
    duration: float | None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any) -> DeploymentRun:
        data, ident = _require(data, "id", "deployment run")
        return cls(
            id=ident,
            **_run_fields(data),
            deployment_id=_str(data.get("deployment_id")),
            user_id=_str(data.get("user_id")),
            extra=_rest(data),
        )

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


@dataclass(frozen=True)
class QueuedRun:
    run_id: str
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any) -> QueuedRun:
        data, ident = _require(data, "run_id", "queued run")
        return cls(run_id=ident, extra=_rest(data))


@dataclass(frozen=True)
class UploadedFile:
    file_id: str
    file_url: str | None
    file_name: str | None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any) -> UploadedFile:
        data, ident = _require(data, "file_id", "uploaded file")
        return cls(
            file_id=ident,
            file_url=_str(data.get("file_url")),
            file_name=_str(data.get("file_name")),
            extra=_rest(data),
        )


# --------------------------------------------------------------------------- catalog


@dataclass(frozen=True)
class InputType:
    input_id: str
    type: str | None
    class_type: str | None
    default_value: Any
    min_value: float | None
    max_value: float | None
    step: float | None
    display_name: str
    description: str
    enum_options: tuple[Any, ...] | None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any) -> InputType | None:
        if not isinstance(data, Mapping) or not _str(data.get("input_id")):
            return None
        data = _Seen(data)
        options = _maybe_json(data.get("enum_options"))
        return cls(
            input_id=str(_str(data.get("input_id"))),
            type=_str(data.get("type")),
            class_type=_str(data.get("class_type")),
            default_value=data.get("default_value"),
            min_value=_float(data.get("min_value")),
            max_value=_float(data.get("max_value")),
            step=_float(data.get("step")),
            display_name=_str(data.get("display_name")) or "",
            description=_str(data.get("description")) or "",
            enum_options=tuple(options) if isinstance(options, list) else None,
            extra=_rest(data),
        )


@dataclass(frozen=True)
class WorkflowVersion:
    id: str
    workflow_id: str | None
    version: int | None
    workflow: dict[str, Any]
    workflow_api: dict[str, Any] | None
    comment: str | None
    machine_id: str | None
    created_at: datetime | None
    updated_at: datetime | None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any) -> WorkflowVersion:
        data, ident = _require(data, "id", "workflow version")
        api = _maybe_json(data.get("workflow_api"))
        return cls(
            id=ident,
            workflow_id=_str(data.get("workflow_id")),
            version=_int(data.get("version")),
            workflow=_dict(_maybe_json(data.get("workflow"))),
            workflow_api=dict(api) if isinstance(api, Mapping) else None,
            comment=_str(data.get("comment")),
            machine_id=_str(data.get("machine_id")),
            created_at=parse_datetime(data.get("created_at")),
            updated_at=parse_datetime(data.get("updated_at")),
            extra=_rest(data),
        )


def _version_or_none(data: Any) -> WorkflowVersion | None:
    try:
        return WorkflowVersion.from_json(data)
    except ValueError:
        return None


@dataclass(frozen=True)
class Workflow:
    id: str
    name: str | None
    created_at: datetime | None
    updated_at: datetime | None
    user_id: str | None
    pinned: bool | None
    cover_image: str | None
    selected_machine_id: str | None
    versions: tuple[WorkflowVersion, ...]
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any) -> Workflow:
        data, ident = _require(data, "id", "workflow")
        versions = tuple(v for v in (_version_or_none(x) for x in _list(data.get("versions"))) if v is not None)
        return cls(
            id=ident,
            name=_str(data.get("name")),
            created_at=parse_datetime(data.get("created_at")),
            updated_at=parse_datetime(data.get("updated_at")),
            user_id=_str(data.get("user_id")),
            pinned=_bool(data.get("pinned")),
            cover_image=_str(data.get("cover_image")),
            selected_machine_id=_str(data.get("selected_machine_id")),
            versions=versions,
            extra=_rest(data),
        )


@dataclass(frozen=True)
class UploadedWorkflow:
    workflow_id: str
    machine_id: str | None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any) -> UploadedWorkflow:
        data, ident = _require(data, "workflow_id", "uploaded workflow")
        return cls(
            workflow_id=ident,
            machine_id=_str(data.get("machine_id")),
            extra=_rest(data),
        )


@dataclass(frozen=True)
class Machine:
    id: str
    name: str | None
    type: str | None
    status: str | None
    gpu: str | None
    deleted: bool | None
    endpoint: str | None
    concurrency_limit: int | None
    created_at: datetime | None
    updated_at: datetime | None
    # Settings GET /machine/{id} returns and GET /machines omits (None when absent).
    run_timeout: float | None = None
    idle_timeout: float | None = None
    keep_warm: int | None = None
    comfyui_version: str | None = None
    machine_version: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any) -> Machine:
        data, ident = _require(data, "id", "machine")
        return cls(
            id=ident,
            name=_str(data.get("name")),
            type=_str(data.get("type")),
            status=_str(data.get("status")),
            gpu=_str(data.get("gpu")),
            deleted=_bool(data.get("deleted")),
            endpoint=_str(data.get("endpoint")),
            concurrency_limit=_int(data.get("concurrency_limit")),
            created_at=parse_datetime(data.get("created_at")),
            updated_at=parse_datetime(data.get("updated_at")),
            run_timeout=_float(data.get("run_timeout")),
            idle_timeout=_float(data.get("idle_timeout")),
            keep_warm=_int(data.get("keep_warm")),
            comfyui_version=_str(data.get("comfyui_version")),
            machine_version=_str(data.get("machine_version")),
            extra=_rest(data),
        )


@dataclass(frozen=True)
class Deployment:
    id: str
    workflow_id: str | None
    workflow_version_id: str | None
    machine_id: str | None
    environment: str | None
    description: str | None
    gpu: str | None
    workflow_name: str | None
    machine_name: str | None
    modal_image_id: str | None
    input_types: tuple[InputType, ...]
    output_types: tuple[dict[str, Any], ...]
    version: WorkflowVersion | None
    created_at: datetime | None
    updated_at: datetime | None
    concurrency_limit: int | None = None
    run_timeout: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any) -> Deployment:
        data, ident = _require(data, "id", "deployment")
        inputs = tuple(i for i in (InputType.from_json(x) for x in _list(data.get("input_types"))) if i is not None)
        return cls(
            id=ident,
            workflow_id=_str(data.get("workflow_id")),
            workflow_version_id=_str(data.get("workflow_version_id")),
            machine_id=_str(data.get("machine_id")),
            environment=_str(data.get("environment")),
            description=_str(data.get("description")),
            gpu=_str(data.get("gpu")),
            workflow_name=_str(_dict(data.get("workflow")).get("name")),
            machine_name=_str(_dict(data.get("machine")).get("name")),
            modal_image_id=_str(data.get("modal_image_id")),
            input_types=inputs,
            output_types=tuple(_dict(x) for x in _list(data.get("output_types")) if isinstance(x, Mapping)),
            version=_version_or_none(data.get("version")),
            created_at=parse_datetime(data.get("created_at")),
            updated_at=parse_datetime(data.get("updated_at")),
            concurrency_limit=_int(data.get("concurrency_limit")),
            run_timeout=_float(data.get("run_timeout")),
            extra=_rest(data),
        )

    @property
    def is_fluid(self) -> bool:
        """A per-deployment-app ("fluid") deployment, listed only with ``is_fluid=true`` (§2.5)."""
        return self.modal_image_id is not None
