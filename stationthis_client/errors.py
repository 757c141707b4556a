"""The errors a client raises: one class per kind of failure, each carrying what the service said.

Every service answers a failure as a ``google.rpc.Status``: a canonical code, a message written for
people, an ``ErrorInfo`` (``reason`` in UPPER_SNAKE, ``domain`` such as ``points.stationthis.dev``,
``metadata``) and, for bad input, ``BadRequest`` field violations. Over gRPC that status travels in
the ``grpc-status-details-bin`` trailer; over HTTP the gateway writes it as
``{"error": {"code", "message", "status", "details"}}``. Both are decoded here into the same
exception, so a caller writes one ``except`` whichever transport it uses::

    try:
        run = await client.create("alice", "/make", {"input_prompt": "a cat"})
    except InsufficientPoints as e:
        reply(f"you need {e.needed} points, you have {e.available}")
    except InvalidInputs as e:
        reply("; ".join(f"{v.field}: {v.description}" for v in e.violations))

``str(error)`` is the service's own message. When no service answered (it could not be reached, the
deadline passed first) the message is written here, in the same plain words, never a library's text.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2

from common.errors import status_from_trailers


@dataclass(frozen=True)
class Violation:
    """One bad field of a request: ``field`` is its path (``inputs.input_steps``, ``user_id``)."""

    field: str
    description: str


class StationThisError(Exception):
    """Base of every error a client raises.

    ``code`` is the canonical gRPC code name (``"INVALID_ARGUMENT"``, ``"UNAVAILABLE"``...),
    ``message`` the service's message, ``reason``/``domain``/``metadata`` its ``ErrorInfo`` (empty
    when it sent none), ``violations`` its ``BadRequest`` field violations.
    """

    def __init__(
        self,
        code: str,
        message: str,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        violations: Iterable[Violation] = (),
        *,
        domain: str = "",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})
        self.violations: list[Violation] = list(violations)

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, reason={self.reason!r})"


class InvalidInputs(StationThisError):
    """INVALID_ARGUMENT: the request (often the workflow's inputs) was refused; ``violations`` name
    each bad field."""


class FailedPrecondition(StationThisError):
    """FAILED_PRECONDITION: the request is well formed but the system is not in a state to do it."""


class InsufficientPoints(FailedPrecondition):
    """FAILED_PRECONDITION, reason INSUFFICIENT_POINTS: the user cannot pay for the run.

    ``needed`` is the points the run needs held (metadata ``required``); ``available`` what the user
    has now (``points_available`` + ``qoints_available``).
    """

    @property
    def needed(self) -> int:
        return _int(self.metadata.get("required"))

    @property
    def available(self) -> int:
        return _int(self.metadata.get("points_available")) + _int(self.metadata.get("qoints_available"))


class NotFound(StationThisError):
    """NOT_FOUND: no such run, workflow, hold..."""


class AlreadyExists(StationThisError):
    """ALREADY_EXISTS: e.g. an external_reference that was credited before."""


class Aborted(StationThisError):
    """ABORTED: a concurrent change got in the way; the same request (same request_id) may be retried."""


class Unauthenticated(StationThisError):
    """UNAUTHENTICATED: no API key, or a wrong one."""


class PermissionDenied(StationThisError):
    """PERMISSION_DENIED."""


class RateLimited(StationThisError):
    """RESOURCE_EXHAUSTED: a rate limit, or a cap such as TOO_MANY_OPEN_HOLDS. ``retry_after`` is
    how many seconds to wait when the service said so (the gateway's ``Retry-After``), else None."""

    def __init__(
        self,
        code: str,
        message: str,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        violations: Iterable[Violation] = (),
        *,
        domain: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(code, message, reason, metadata, violations, domain=domain)
        self.retry_after = retry_after


class Unavailable(StationThisError):
    """UNAVAILABLE: the service (or one it needs) could not be reached; the call may be retried."""


class DeadlineExceeded(StationThisError):
    """DEADLINE_EXCEEDED: no answer within the client's timeout."""


class Cancelled(StationThisError):
    """CANCELLED: the call was cancelled (not by this client's own task cancellation, which raises
    ``asyncio.CancelledError``)."""


class Unimplemented(StationThisError):
    """UNIMPLEMENTED: the service does not offer this call."""


class Internal(StationThisError):
    """Anything else: INTERNAL, UNKNOWN, DATA_LOSS... The service logged the details on its side."""


BY_CODE: dict[str, type[StationThisError]] = {
    "INVALID_ARGUMENT": InvalidInputs,
    "OUT_OF_RANGE": InvalidInputs,
    "FAILED_PRECONDITION": FailedPrecondition,
    "NOT_FOUND": NotFound,
    "ALREADY_EXISTS": AlreadyExists,
    "ABORTED": Aborted,
    "UNAUTHENTICATED": Unauthenticated,
    "PERMISSION_DENIED": PermissionDenied,
    "RESOURCE_EXHAUSTED": RateLimited,
    "UNAVAILABLE": Unavailable,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
    "CANCELLED": Cancelled,
    "UNIMPLEMENTED": Unimplemented,
}
ERROR_INFO = "google.rpc.ErrorInfo"
BAD_REQUEST = "google.rpc.BadRequest"
RETRY_INFO = "google.rpc.RetryInfo"


def _int(raw: str | None) -> int:
    try:
        return int(raw or 0)
    except ValueError:
        return 0


def make_error(
    code: str,
    message: str,
    reason: str = "",
    metadata: Mapping[str, str] | None = None,
    violations: Iterable[Violation] = (),
    *,
    domain: str = "",
    retry_after: float | None = None,
) -> StationThisError:
    """The exception of the right class for ``code`` (and ``reason``)."""
    if code == "FAILED_PRECONDITION" and reason == "INSUFFICIENT_POINTS":
        return InsufficientPoints(code, message, reason, metadata, violations, domain=domain)
    cls = BY_CODE.get(code, Internal)
    if cls is RateLimited:
        return RateLimited(code, message, reason, metadata, violations, domain=domain, retry_after=retry_after)
    return cls(code, message, reason, metadata, violations, domain=domain)


def from_status(status: Any, fallback: str | None = None) -> StationThisError:
    """The exception for a ``google.rpc.Status`` message; ``fallback`` replaces an empty message."""
    code = code_pb2.Code.Name(status.code) if status.code in code_pb2.Code.values() else "UNKNOWN"
    reason, domain, metadata = "", "", {}
    violations: list[Violation] = []
    retry_after: float | None = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(Violation(v.field, v.description) for v in bad.field_violations)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToTimedelta().total_seconds()
    message = status.message or fallback or _DEFAULT_MESSAGES.get(code, "the request failed")
    return make_error(code, message, reason, metadata, violations, domain=domain, retry_after=retry_after)


def from_error_body(body: Any, http_status: int, retry_after: float | None = None) -> StationThisError:
    """The exception for the gateway's error JSON ``{"error": {"code", "message", "status", "details"}}``.

    A body of another shape (a proxy's HTML page, say) still gives the class its HTTP status implies.
    """
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        code = _BY_HTTP_STATUS.get(http_status, "UNKNOWN")
        return make_error(code, f"the gateway answered HTTP {http_status}", retry_after=retry_after)
    code = str(error.get("status") or _BY_HTTP_STATUS.get(http_status, "UNKNOWN"))
    reason, domain, metadata = "", "", {}
    violations: list[Violation] = []
    for detail in error.get("details") or ():
        if not isinstance(detail, dict):
            continue
        kind = str(detail.get("@type", "")).rpartition("/")[2]
        if kind == ERROR_INFO:
            reason = str(detail.get("reason", ""))
            domain = str(detail.get("domain", ""))
            metadata = {str(k): str(v) for k, v in (detail.get("metadata") or {}).items()}
        elif kind == BAD_REQUEST:
            for item in detail.get("field_violations") or detail.get("fieldViolations") or ():
                violations.append(Violation(str(item.get("field", "")), str(item.get("description", ""))))
        elif kind == RETRY_INFO and retry_after is None:
            retry_after = _duration_seconds(detail.get("retry_delay") or detail.get("retryDelay"))
    message = str(error.get("message") or "")
    if not domain or not message:
        # No ErrorInfo: neither a service nor the gateway wrote this error; the gateway failed to reach
        # the service, and the message is the gRPC library's (e.g. "failed to connect to all
        # addresses; ..."). Said in our words instead.
        message = _DEFAULT_MESSAGES.get(code, "the request failed")
    return make_error(code, message, reason, metadata, violations, domain=domain, retry_after=retry_after)


def _duration_seconds(raw: Any) -> float | None:
    if not isinstance(raw, str):
        return None
    duration = duration_pb2.Duration()
    try:
        duration.FromJsonString(raw)
    except ValueError:
        return None
    seconds = duration.ToTimedelta().total_seconds()
    return seconds if math.isfinite(seconds) else None


# What the gateway's table maps each code to, read backwards (FAILED_PRECONDITION shares 400 with
# INVALID_ARGUMENT; a body without a "status" is not the gateway's, so 400 means bad input).
_BY_HTTP_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    409: "ALREADY_EXISTS",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_DEFAULT_MESSAGES = {
    "CANCELLED": "the call was cancelled",
    "UNKNOWN": "the request failed",
    "INVALID_ARGUMENT": "invalid request",
    "DEADLINE_EXCEEDED": "no answer in time",
    "NOT_FOUND": "not found",
    "ALREADY_EXISTS": "already exists",
    "PERMISSION_DENIED": "permission denied",
    "RESOURCE_EXHAUSTED": "too many requests",
    "FAILED_PRECONDITION": "the request cannot be done now",
    "ABORTED": "the request was aborted; retry",
    "UNIMPLEMENTED": "not implemented",
    "INTERNAL": "internal error",
    "UNAVAILABLE": "the service is not available; retry",  # also what the gateway could not reach
    "DATA_LOSS": "internal error",
    "UNAUTHENTICATED": "missing or invalid API key",
}


__all__ = [
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InsufficientPoints",
    "Internal",
    "InvalidInputs",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "StationThisError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Violation",
    "from_error_body",
    "from_status",
    "make_error",
    "status_from_trailers",  # from common.errors
]
