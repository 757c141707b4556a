"""Fault injection: latency, error statuses, dropped connections, lost responses, webhook faults, run outcomes.

The configuration is one JSON object, replaced as a whole by ``POST /_emulator/faults`` (``{}`` clears it):

    latency_ms                 float   added before every /api and /files request
    error_rates                {group|"*": {"429"|"500"|"502"|"503"|"504": probability}}
    retry_after                int     Retry-After seconds sent with 429 (default 1)
    drop_connection            float   probability of closing the connection without a response
    lose_queue_response        float   probability that a queue request creates the run and then loses the answer
    lose_queue_response_status int?    null: drop the connection (default); e.g. 502: answer that instead
    next_errors                [{"route": group|"*", "status"?: int, "action"?: "error"|"drop"|"lose_response",
                                 "retry_after"?: int}]  deterministic, consumed first-match in order
                                       (retry_after: also sends Retry-After with a 503)
    webhook_drop               float   probability that a webhook event is never sent
    webhook_duplicate          float   probability that a webhook event is delivered twice
    webhook_reorder            float   probability that an event is held back and sent after the next one
    next_run_outcomes          ["success"|"failed"|"timeout"|"stuck", ...]  for the next queued runs, in order
    seed                       int?    seeds the random draws

Route groups: queue (POST /run/deployment/queue, POST /run), run (GET /run/{id}, GET /run), cancel,
deployments, machines, workflows, upload (POST /file/upload), files (GET /files/...).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

ROUTE_GROUPS = ("queue", "run", "cancel", "deployments", "machines", "workflows", "upload", "files")
ERROR_STATUSES = (429, 500, 502, 503, 504)
ACTIONS = ("error", "drop", "lose_response")
OUTCOMES = ("success", "failed", "timeout", "stuck")
_PROBABILITIES = ("drop_connection", "lose_queue_response", "webhook_drop", "webhook_duplicate", "webhook_reorder")


class FaultConfigError(ValueError):
    """The fault configuration is malformed; the message says which key."""


@dataclass
class FaultConfig:
    latency_ms: float = 0.0
    error_rates: dict[str, dict[str, float]] = field(default_factory=dict)
    retry_after: int = 1
    drop_connection: float = 0.0
    lose_queue_response: float = 0.0
    lose_queue_response_status: int | None = None
    next_errors: list[dict[str, Any]] = field(default_factory=list)
    webhook_drop: float = 0.0
    webhook_duplicate: float = 0.0
    webhook_reorder: float = 0.0
    next_run_outcomes: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass(frozen=True)
class Action:
    kind: str  # error | drop | lose_response
    status: int | None = None
    retry_after: int | None = None  # seconds for a Retry-After header (always sent with 429)


def _probability(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise FaultConfigError(f"{name} must be a probability between 0 and 1")
    return float(value)


def _group(name: str, value: Any) -> str:
    if value != "*" and value not in ROUTE_GROUPS:
        raise FaultConfigError(f"{name} must be '*' or one of {', '.join(ROUTE_GROUPS)}")
    return str(value)


def _status(name: str, value: Any) -> int:
    if value not in ERROR_STATUSES or isinstance(value, bool):
        raise FaultConfigError(f"{name} must be one of {', '.join(map(str, ERROR_STATUSES))}")
    return int(value)


def _non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FaultConfigError(f"{name} must be a non-negative integer")
    return value


def parse(raw: Any) -> FaultConfig:
    if not isinstance(raw, dict):
        raise FaultConfigError("the fault configuration must be a JSON object")
    unknown = set(raw) - set(FaultConfig.__dataclass_fields__)
    if unknown:
        raise FaultConfigError(f"unknown fault keys: {', '.join(sorted(unknown))}")
    config = FaultConfig()
    for name in _PROBABILITIES:
        if name in raw:
            setattr(config, name, _probability(name, raw[name]))
    if "latency_ms" in raw:
        value = raw["latency_ms"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise FaultConfigError("latency_ms must be a non-negative number")
        config.latency_ms = float(value)
    if "retry_after" in raw:
        config.retry_after = _non_negative_int("retry_after", raw["retry_after"])
    if raw.get("lose_queue_response_status") is not None:
        config.lose_queue_response_status = _status("lose_queue_response_status", raw["lose_queue_response_status"])
    if raw.get("seed") is not None:
        config.seed = _non_negative_int("seed", raw["seed"])
    rates = raw.get("error_rates") or {}
    if not isinstance(rates, dict):
        raise FaultConfigError("error_rates must map a route group to {status: probability}")
    for group, by_status in rates.items():
        _group("error_rates key", group)
        if not isinstance(by_status, dict):
            raise FaultConfigError(f"error_rates[{group}] must map a status to a probability")
        checked = {}
        for status, p in by_status.items():
            code = _status(f"error_rates[{group}] key", int(status) if str(status).isdigit() else status)
            checked[str(code)] = _probability(f"error_rates[{group}][{status}]", p)
        config.error_rates[group] = checked
    entries = raw.get("next_errors") or []
    if not isinstance(entries, list):
        raise FaultConfigError("next_errors must be a list")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise FaultConfigError(f"next_errors[{i}] must be an object")
        extra = set(entry) - {"route", "status", "action", "retry_after"}
        if extra:
            raise FaultConfigError(f"next_errors[{i}] has unknown keys: {', '.join(sorted(extra))}")
        action = entry.get("action", "error")
        if action not in ACTIONS:
            raise FaultConfigError(f"next_errors[{i}].action must be one of {', '.join(ACTIONS)}")
        checked_entry: dict[str, Any] = {"route": _group(f"next_errors[{i}].route", entry.get("route", "*"))}
        checked_entry["action"] = action
        if action == "error" or entry.get("status") is not None:
            checked_entry["status"] = _status(f"next_errors[{i}].status", entry.get("status"))
        if "retry_after" in entry:
            checked_entry["retry_after"] = _non_negative_int(f"next_errors[{i}].retry_after", entry["retry_after"])
        config.next_errors.append(checked_entry)
    outcomes = raw.get("next_run_outcomes") or []
    if not isinstance(outcomes, list) or any(o not in OUTCOMES for o in outcomes):
        raise FaultConfigError(f"next_run_outcomes must be a list of {', '.join(OUTCOMES)}")
    config.next_run_outcomes = list(outcomes)
    return config


class Faults:
    def __init__(self, seed: int | None = None) -> None:
        self.default_seed = seed
        self.config = FaultConfig()
        self.rng = random.Random(seed)  # noqa: S311 - fault draws, not secrets

    def configure(self, raw: Any) -> None:
        self.config = parse(raw)
        seed = self.config.seed if self.config.seed is not None else self.default_seed
        self.rng = random.Random(seed)  # noqa: S311 - fault draws, not secrets

    def reset(self) -> None:
        self.configure({})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self.config)

    def chance(self, probability: float) -> bool:
        if probability <= 0:
            return False
        return probability >= 1 or self.rng.random() < probability

    def for_request(self, group: str | None) -> Action | None:
        """The fault to inject into one request of ``group`` (None for unknown routes), if any."""
        config = self.config
        for index, entry in enumerate(config.next_errors):
            if entry["route"] in ("*", group):
                del config.next_errors[index]
                status = entry.get("status")
                retry_after = entry.get("retry_after", config.retry_after if status == 429 else None)
                return Action(entry["action"], status, retry_after)
        if self.chance(config.drop_connection):
            return Action("drop")
        for key in (group, "*"):
            for status, probability in (config.error_rates.get(key or "") or {}).items():
                if self.chance(probability):
                    return Action("error", int(status), config.retry_after if status == "429" else None)
        if group == "queue" and self.chance(config.lose_queue_response):
            return Action("lose_response", config.lose_queue_response_status)
        return None

    def next_outcome(self) -> str:
        return self.config.next_run_outcomes.pop(0) if self.config.next_run_outcomes else "success"
