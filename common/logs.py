"""Structured JSON logs, one object per line, carrying the current trace and span ids.

Secrets registered with ``configure`` are replaced by ``[REDACTED]`` in every record, whatever
logger wrote it, so a key that slips into an exception text or a URL never reaches the output.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import Any

from opentelemetry import trace

_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
# The X-Request-Id of the request being served (set by the server's logging interceptor from the
# ``x-request-id`` metadata the gateway sends; passed on by common.channels): in every log line.
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@+=/-]{1,128}")


def valid_request_id(value: str) -> bool:
    return bool(_REQUEST_ID.fullmatch(value))


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str, redactor: Redactor | None = None) -> None:
        super().__init__()
        self.service = service
        self.redact = redactor or Redactor(())

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = REQUEST_ID.get()
        if request_id:
            entry["request_id"] = request_id
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = format(span.trace_id, "032x")
            entry["span_id"] = format(span.span_id, "016x")
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        # Redact the finished line, so a secret is caught in the message, the extras or a traceback.
        return self.redact(json.dumps(entry, default=str))


class Redactor:
    """Replaces every registered secret by ``[REDACTED]``."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "[REDACTED]")
        return text


def configure(service: str, level: str = "INFO", secrets: Iterable[str] = (), stream: Any = None) -> None:
    """Route all logging to one JSON handler on stderr (or ``stream``)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(service, Redactor(secrets)))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
