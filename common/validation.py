"""Validation of untrusted request fields, collecting every violation before failing once."""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from .errors import FieldViolation, InvalidArgument

USER_ID = re.compile(r"[A-Za-z0-9._@-]{1,128}")
REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200


class Violations:
    """Collects field violations; ``check()`` raises one INVALID_ARGUMENT listing them all."""

    def __init__(self) -> None:
        self.found: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.found.append(FieldViolation(field, description))

    def user_id(self, field: str, value: str) -> None:
        if not USER_ID.fullmatch(value):
            self.add(field, "must be 1 to 128 characters from A-Z a-z 0-9 . _ @ -")

    def request_id(self, value: str, field: str = "request_id") -> None:
        if not REQUEST_ID.fullmatch(value):
            self.add(field, "is required: 1 to 128 printable ASCII characters without spaces (a UUID is best)")

    def text(self, field: str, value: str, max_length: int, required: bool = False) -> None:
        if required and not value:
            self.add(field, "is required")
        elif len(value) > max_length:
            self.add(field, f"must be at most {max_length} characters")

    def amount(self, field: str, value: int, maximum: int, allow_zero: bool = False) -> None:
        if value < 0 or (value == 0 and not allow_zero):
            self.add(field, "must be positive" if not allow_zero else "must not be negative")
        elif value > maximum:
            self.add(field, f"must be at most {maximum}")

    def page_size(self, value: int, field: str = "page_size") -> int:
        if value < 0:
            self.add(field, "must not be negative")
            return DEFAULT_PAGE_SIZE
        return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)

    def check(self, reason: str = "INVALID_REQUEST") -> None:
        if self.found:
            raise InvalidArgument.for_fields(self.found, reason=reason)


def encode_page_token(payload: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode().rstrip("=")


def decode_page_token(token: str, expect: dict[str, Any]) -> dict[str, Any]:
    """The payload of a token we issued for the same ``expect`` parameters, else INVALID_ARGUMENT."""
    try:
        payload = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        payload = None
    if not isinstance(payload, dict) or any(payload.get(k) != v for k, v in expect.items()):
        raise InvalidArgument.for_fields(
            [FieldViolation("page_token", "is not a page token of this list")], reason="INVALID_PAGE_TOKEN"
        )
    return payload
