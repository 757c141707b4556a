"""In-memory store: tenants, machines, workflows, versions, deployments, runs, outputs and files.

Seeded from `fixtures/` (deterministic ids, see fixtures/README.md). A tenant is the user an API key
belongs to; rows carry `user_id`/`org_id` and are visible to a tenant under the V2 rule (§1): same
org, or same user and no org.
"""

from __future__ import annotations

import json
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import media

TERMINAL = frozenset({"success", "failed", "timeout", "cancelled"})
FILE_ID_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
PUBLIC_URL_PLACEHOLDER = "{{public_url}}"

Row = dict[str, Any]


def now() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime | None) -> str | None:
    """ISO-8601 UTC with a ``Z`` suffix, as the V2 API renders its naive UTC timestamps."""
    return None if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_file_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(FILE_ID_ALPHABET) for _ in range(16))


@dataclass(frozen=True)
class Tenant:
    name: str
    user_id: str
    org_id: str | None
    user_name: str
    user_icon: str | None

    def owns(self, row: Row) -> bool:
        if self.org_id:
            return bool(row.get("org_id") == self.org_id)
        return bool(row.get("user_id") == self.user_id and not row.get("org_id"))


@dataclass
class Output:
    id: str
    run_id: str
    data: dict[str, Any]
    node_meta: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime


@dataclass
class Run:
    id: str
    user_id: str
    org_id: str | None
    workflow_id: str
    workflow_version_id: str | None
    deployment_id: str | None
    machine_id: str
    machine_type: str | None
    machine_version: str | None
    gpu: str | None
    origin: str
    workflow_inputs: dict[str, Any]
    webhook: str | None
    webhook_intermediate_status: bool
    graph: dict[str, Any]  # the version's workflow_api with the inputs applied (never returned)
    input_defaults: dict[str, Any]
    outcome: str  # success | failed | timeout | stuck
    concurrency_key: str
    concurrency_limit: int
    created_at: datetime = field(default_factory=now)
    updated_at: datetime = field(default_factory=now)
    status: str = "not-started"
    queued_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    live_status: str | None = None
    progress: float = 0.0
    modal_function_call_id: str | None = None
    gpu_event_id: str | None = None
    batch_id: str | None = None
    outputs: list[Output] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def value(self, input_id: str) -> Any:
        """The value the run uses for ``input_id``: the request's, else the workflow's default."""
        return self.workflow_inputs.get(input_id, self.input_defaults.get(input_id))


@dataclass(frozen=True)
class StoredFile:
    content_type: str
    data: bytes


class Store:
    def __init__(self, fixtures_dir: Path, public_url: str) -> None:
        self.fixtures_dir = fixtures_dir
        self.public_url = public_url.rstrip("/")
        self.tenants: dict[str, Tenant] = {}
        self.machines: dict[str, Row] = {}
        self.workflows: dict[str, Row] = {}
        self.versions: dict[str, Row] = {}
        self.deployments: dict[str, Row] = {}
        self.runs: dict[str, Run] = {}
        self.files: dict[str, StoredFile] = {}
        self.load()

    # --- fixtures ---------------------------------------------------------------------------------

    def _read(self, path: Path) -> Any:
        return json.loads(path.read_text().replace(PUBLIC_URL_PLACEHOLDER, self.public_url))

    def load(self) -> None:
        """(Re)seed everything from the fixtures; runs, outputs and uploads are forgotten."""
        base = self.fixtures_dir
        self.tenants = {name: Tenant(name=name, **row) for name, row in self._read(base / "tenants.json").items()}
        self.machines = {row["id"]: row for row in self._read(base / "machines.json")}
        self.workflows, self.versions = {}, {}
        for path in sorted((base / "workflows").glob("*.json")):
            bundle = self._read(path)
            self.workflows[bundle["workflow"]["id"]] = bundle["workflow"]
            for version in bundle["versions"]:
                self.versions[version["id"]] = version
        self.deployments = {row["id"]: row for row in self._read(base / "deployments.json")}
        self.runs = {}
        self.files = {}
        for item in self._read(base / "files.json"):
            data = media.png(item["width"], item["height"], tuple(item["rgb"]))
            self.files[f"inputs/{item['file_id']}{item['ext']}"] = StoredFile("image/png", data)

    # --- lookups ----------------------------------------------------------------------------------

    def tenant_of_user(self, user_id: str | None) -> Tenant | None:
        return next((t for t in self.tenants.values() if t.user_id == user_id), None)

    def versions_of(self, workflow_id: str) -> list[Row]:
        """A workflow's versions, newest first."""
        found = [v for v in self.versions.values() if v["workflow_id"] == workflow_id]
        return sorted(found, key=lambda v: int(v["version"]), reverse=True)

    def live_workflow(self, workflow_id: str | None) -> Row | None:
        row = self.workflows.get(workflow_id or "")
        return row if row and not row.get("deleted") else None

    # --- files ------------------------------------------------------------------------------------

    def file_url(self, path: str) -> str:
        return f"{self.public_url}/files/{path}"

    def put_file(self, path: str, content_type: str, data: bytes) -> str:
        self.files[path] = StoredFile(content_type, data)
        return self.file_url(path)

    # --- writes -----------------------------------------------------------------------------------

    @staticmethod
    def new_id() -> str:
        return str(uuid.uuid4())
