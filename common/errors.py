"""Domain exceptions and their mapping to ``google.rpc.Status``.

Domain code raises these and knows nothing of gRPC. ``to_rpc_status`` (used by the error
interceptor) turns one into a rich status: a canonical code, an ``ErrorInfo`` whose reason is
UPPER_SNAKE, and for bad input a ``BadRequest`` with one field violation per bad field.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2


@dataclass(frozen=True)
class FieldViolation:
    """One bad field: ``field`` is a path such as ``inputs.width`` or ``user_id``."""

    field: str
    description: str


class DomainError(Exception):
    """Base of every error a service reports on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    default_reason = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        violations: Iterable[FieldViolation] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})
        self.violations = list(violations)


class InvalidArgument(DomainError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    @classmethod
    def for_fields(cls, violations: Iterable[FieldViolation], *, reason: str | None = None) -> InvalidArgument:
        found = list(violations)
        summary = "; ".join(f"{v.field}: {v.description}" for v in found)
        return cls(f"invalid request: {summary}", reason=reason, violations=found)

    @classmethod
    def field(cls, field: str, description: str) -> InvalidArgument:
        return cls.for_fields([FieldViolation(field, description)])


class NotFound(DomainError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(DomainError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Aborted(DomainError):
    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class ResourceExhausted(DomainError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class PermissionDenied(DomainError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(DomainError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class Unavailable(DomainError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class DeadlineExceeded(DomainError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class Unimplemented(DomainError):
    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "UNIMPLEMENTED"


class Relayed(DomainError):
    """An error another of our services answered, passed on unchanged: its code, message, domain and
    details (e.g. the catalog's INVALID_INPUTS with its field violations, the ledger's
    INSUFFICIENT_POINTS)."""

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message, reason="RELAYED")
        self.status = status
        self.code = next((c for c in grpc.StatusCode if c.value[0] == status.code), grpc.StatusCode.UNKNOWN)


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def to_rpc_status(error: DomainError, domain: str) -> status_pb2.Status:
    """The ``google.rpc.Status`` for ``error``, with ErrorInfo and, if any, BadRequest details."""
    if isinstance(error, Relayed):
        return error.status
    status = status_pb2.Status(code=error.code.value[0], message=error.message)
    status.details.append(
        _pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=domain, metadata=error.metadata))
    )
    if error.violations:
        status.details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                        for v in error.violations
                    ]
                )
            )
        )
    return status


def internal_status(domain: str) -> status_pb2.Status:
    """What a client sees for an unexpected exception: no text from the exception itself."""
    return status_pb2.Status(
        code=code_pb2.INTERNAL,
        message="internal error",
        details=[_pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=domain))],
    )


def status_from_trailers(trailers: Iterable[tuple[str, str | bytes]] | None) -> status_pb2.Status | None:
    """The ``google.rpc.Status`` in a call's ``grpc-status-details-bin`` trailer, or None."""
    for key, value in trailers or ():
        if key != "grpc-status-details-bin":
            continue
        raw = value
        if isinstance(raw, str):  # not expected (a -bin key arrives as bytes), but never crash here
            try:
                raw = base64.b64decode(raw + "=" * (-len(raw) % 4))
            except (binascii.Error, ValueError):
                return None
        try:
            return status_pb2.Status.FromString(raw)
        except Exception:  # a malformed trailer: decoded as if there were none
            return None
    return None
