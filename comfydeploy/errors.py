"""Errors raised by the ComfyUI Deploy client, and their mapping to the services' domain errors.

Every error carries the upstream HTTP ``status`` (None when no response came back), the ``detail``
the upstream sent (or what went wrong locally), whether it is ``retryable`` later by the caller, and
the ``endpoint`` as a route template such as ``"GET /run/{run_id}"``. No error text ever contains the
API key: the client redacts it from upstream details before building an error, and the key never
appears in a URL.
"""

from __future__ import annotations

from typing import Any

from common import errors as domain

_MAX_DETAIL = 500


class ComfyDeployError(Exception):
    """Base of every error the client raises."""

    def __init__(
        self,
        status: int | None,
        detail: str,
        retryable: bool,
        endpoint: str,
        *,
        attempts: int = 1,
    ) -> None:
        self.status = status
        self.detail = detail if len(detail) <= _MAX_DETAIL else detail[:_MAX_DETAIL] + "..."
        self.retryable = retryable
        self.endpoint = endpoint
        self.attempts = attempts
        super().__init__(self._message())

    def _message(self) -> str:
        status = "no response" if self.status is None else f"HTTP {self.status}"
        tries = f" after {self.attempts} attempts" if self.attempts > 1 else ""
        return f"ComfyDeploy {self.endpoint}: {status}: {self.detail}{tries}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status!r}, detail={self.detail!r}, "
            f"retryable={self.retryable!r}, endpoint={self.endpoint!r})"
        )


class Unauthorized(ComfyDeployError):
    """401: the API key is missing, invalid, expired or revoked."""


class Forbidden(ComfyDeployError):
    """403: the key may not do this (suspended account, scoped token, another tenant's run)."""


class InsufficientCredits(Forbidden):
    """403 "Insufficient ... GPU credits to create run" (free plan without credit top-up)."""


class NotFound(ComfyDeployError):
    """404. The endpoints that report not-found as 500 (§2.3, §2.5) raise ServerError instead."""


class ValidationFailed(ComfyDeployError):
    """422 (FastAPI validation) or 400; ``errors`` keeps FastAPI's ``detail`` list as sent."""

    def __init__(
        self,
        status: int | None,
        detail: str,
        retryable: bool,
        endpoint: str,
        *,
        attempts: int = 1,
        errors: list[Any] | None = None,
    ) -> None:
        self.errors: list[Any] = list(errors or [])
        super().__init__(status, detail, retryable, endpoint, attempts=attempts)


class RateLimited(ComfyDeployError):
    """429; ``retry_after`` is the upstream's Retry-After in seconds, if it sent one."""

    def __init__(
        self,
        status: int | None,
        detail: str,
        retryable: bool,
        endpoint: str,
        *,
        attempts: int = 1,
        retry_after: float | None = None,
    ) -> None:
        self.retry_after = retry_after
        super().__init__(status, detail, retryable, endpoint, attempts=attempts)


class ServerError(ComfyDeployError):
    """5xx. ``maybe_not_found`` marks the endpoints known to answer not-found with a 500."""

    def __init__(
        self,
        status: int | None,
        detail: str,
        retryable: bool,
        endpoint: str,
        *,
        attempts: int = 1,
        maybe_not_found: bool = False,
    ) -> None:
        self.maybe_not_found = maybe_not_found
        super().__init__(status, detail, retryable, endpoint, attempts=attempts)

    def _message(self) -> str:
        note = " (this endpoint also reports not-found as 500)" if self.maybe_not_found else ""
        return super()._message() + note


class UpstreamUnavailable(ComfyDeployError):
    """No usable answer: connection refused or reset, timeouts on a safe call, or the breaker is open."""


class CircuitOpen(UpstreamUnavailable):
    """The client's circuit breaker for this upstream is open: the call was refused without being sent."""


class OutcomeUnknown(ComfyDeployError):
    """A non-idempotent call (queue_run, upload_workflow) may have reached the server, but no answer
    says whether it took effect. Do not re-send blindly: reconcile first (e.g. list recent runs)."""


class MalformedResponse(ComfyDeployError):
    """A 2xx answer whose body is not the JSON shape the endpoint documents."""


class DeadlineExceeded(ComfyDeployError):
    """The caller's deadline passed before a usable answer came back."""


def to_domain_error(exc: ComfyDeployError) -> domain.DomainError:
    """The service-level error for a client error: what a gRPC caller of our services should see."""
    metadata = {"endpoint": exc.endpoint}
    if exc.status is not None:
        metadata["upstream_status"] = str(exc.status)
    message = str(exc)
    if isinstance(exc, NotFound):
        return domain.NotFound(message, reason="UPSTREAM_NOT_FOUND", metadata=metadata)
    if isinstance(exc, InsufficientCredits):
        return domain.FailedPrecondition(message, reason="UPSTREAM_INSUFFICIENT_CREDITS", metadata=metadata)
    if isinstance(exc, Forbidden):
        return domain.PermissionDenied(message, reason="UPSTREAM_FORBIDDEN", metadata=metadata)
    if isinstance(exc, Unauthorized):
        return domain.PermissionDenied(message, reason="UPSTREAM_UNAUTHORIZED", metadata=metadata)
    if isinstance(exc, ValidationFailed):
        return domain.InvalidArgument(message, reason="UPSTREAM_INVALID_ARGUMENT", metadata=metadata)
    if isinstance(exc, OutcomeUnknown):
        return domain.Unavailable(message, reason="SUBMIT_OUTCOME_UNKNOWN", metadata=metadata)
    if isinstance(exc, DeadlineExceeded):
        return domain.DeadlineExceeded(message, reason="UPSTREAM_DEADLINE_EXCEEDED", metadata=metadata)
    if isinstance(exc, RateLimited):
        if exc.retry_after is not None:
            metadata["retry_after_seconds"] = f"{exc.retry_after:g}"
        return domain.Unavailable(message, reason="UPSTREAM_RATE_LIMITED", metadata=metadata)
    if isinstance(exc, UpstreamUnavailable):
        return domain.Unavailable(message, reason="UPSTREAM_UNAVAILABLE", metadata=metadata)
    if isinstance(exc, MalformedResponse):
        return domain.Unavailable(message, reason="UPSTREAM_MALFORMED_RESPONSE", metadata=metadata)
    return domain.Unavailable(message, reason="UPSTREAM_ERROR", metadata=metadata)
