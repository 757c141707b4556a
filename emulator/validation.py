"""Request validation answering exactly like FastAPI/pydantic v2: 422 ``{"detail": [{type, loc, msg, input}]}``."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

Loc = tuple[str | int, ...]
ErrorList = list[dict[str, Any]]

GPUS = ("CPU", "T4", "L4", "A10G", "L40S", "A100", "A100-80GB", "H100", "H200", "B200")
ENVIRONMENTS = ("staging", "production", "public-share", "private-share", "preview", "community-share")
EXECUTION_MODES = ("async", "sync", "sync_first_result", "stream")
_HEX = set("0123456789abcdefABCDEF-")


class ValidationFailed(Exception):
    def __init__(self, errors: ErrorList) -> None:
        super().__init__("validation failed")
        self.errors = errors


def error(kind: str, loc: Loc, msg: str, value: Any, ctx: dict[str, Any] | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"type": kind, "loc": list(loc), "msg": msg, "input": value}
    if ctx:
        item["ctx"] = ctx
    return item


def _uuid_problem(text: str) -> str:
    body = text[9:] if text.lower().startswith("urn:uuid:") else text
    for position, char in enumerate(body, start=1):
        if char not in _HEX and char not in "{}":
            return (
                "invalid character: expected an optional prefix of `urn:uuid:` followed by [0-9a-fA-F-], "
                f"found `{char}` at {position}"
            )
    return (
        f"invalid group count: expected 5, found {len(body.split('-'))}"
        if "-" in body
        else (f"invalid length: expected length 32 for simple format, found {len(body)}")
    )


def to_uuid(value: Any, loc: Loc, errors: ErrorList) -> str | None:
    """The canonical form of a UUID value, or None after recording pydantic's error."""
    if not isinstance(value, str):
        errors.append(error("uuid_type", loc, "UUID input should be a string, bytes or UUID object", value))
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        problem = _uuid_problem(value)
        errors.append(error("uuid_parsing", loc, f"Input should be a valid UUID, {problem}", value, {"error": problem}))
        return None


def parse_uuid(value: str, loc: Loc) -> str:
    errors: ErrorList = []
    parsed = to_uuid(value, loc, errors)
    if parsed is None:
        raise ValidationFailed(errors)
    return parsed


_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off"}


def to_bool(value: Any, loc: Loc, errors: ErrorList) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    kind = "bool_parsing" if isinstance(value, str) else "bool_type"
    msg = "Input should be a valid boolean" + (", unable to interpret input" if isinstance(value, str) else "")
    errors.append(error(kind, loc, msg, value))
    return None


def to_int(value: Any, loc: Loc, errors: ErrorList) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
        errors.append(
            error("int_parsing", loc, "Input should be a valid integer, unable to parse string as an integer", value)
        )
        return None
    errors.append(error("int_type", loc, "Input should be a valid integer", value))
    return None


def to_str(value: Any, loc: Loc, errors: ErrorList) -> str | None:
    if isinstance(value, str):
        return value
    errors.append(error("string_type", loc, "Input should be a valid string", value))
    return None


def to_enum(choices: Sequence[str]) -> Callable[[Any, Loc, ErrorList], Any]:
    expected = ", ".join(f"'{c}'" for c in choices[:-1]) + f" or '{choices[-1]}'"

    def check(value: Any, loc: Loc, errors: ErrorList) -> str | None:
        if isinstance(value, str) and value in choices:
            return value
        errors.append(error("enum", loc, f"Input should be {expected}", value, {"expected": expected}))
        return None

    return check


def to_dict(value: Any, loc: Loc, errors: ErrorList) -> dict[str, Any] | None:
    if isinstance(value, dict):
        return value
    errors.append(error("dict_type", loc, "Input should be a valid dictionary", value))
    return None


def to_str_list(value: Any, loc: Loc, errors: ErrorList) -> list[str] | None:
    if not isinstance(value, list):
        errors.append(error("list_type", loc, "Input should be a valid list", value))
        return None
    before = len(errors)
    for index, item in enumerate(value):
        to_str(item, (*loc, index), errors)
    return value if len(errors) == before else None


def to_inputs(value: Any, loc: Loc, errors: ErrorList) -> dict[str, Any] | None:
    """``Dict[str, Union[str, int, float, bool, List[Any]]]``."""
    mapping = to_dict(value, loc, errors)
    if mapping is None:
        return None
    before = len(errors)
    for key, item in mapping.items():
        if not isinstance(item, (str, int, float, bool, list)):
            errors.append(error("string_type", (*loc, key, "str"), "Input should be a valid string", item))
    return mapping if len(errors) == before else None


def to_any(value: Any, loc: Loc, errors: ErrorList) -> Any:
    return value


@dataclass(frozen=True)
class Field:
    check: Callable[[Any, Loc, ErrorList], Any]
    required: bool = False
    nullable: bool = True
    default: Any = None


def validate_body(body: Any, fields: dict[str, Field]) -> dict[str, Any]:
    """Check a JSON body against ``fields``; unknown keys are ignored, as pydantic does by default."""
    if not isinstance(body, dict):
        raise ValidationFailed(
            [
                error(
                    "model_attributes_type",
                    ("body",),
                    "Input should be a valid dictionary or object to extract fields from",
                    body,
                )
            ]
        )
    errors: ErrorList = []
    out: dict[str, Any] = {}
    for name, spec in fields.items():
        loc: Loc = ("body", name)
        if name not in body:
            if spec.required:
                errors.append(error("missing", loc, "Field required", body))
            out[name] = spec.default
            continue
        value = body[name]
        if value is None and spec.nullable and not spec.required:
            out[name] = spec.default
            continue
        out[name] = spec.check(value, loc, errors)
    if errors:
        raise ValidationFailed(errors)
    return out


async def json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        raise ValidationFailed([error("missing", ("body",), "Field required", None)])
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValidationFailed(
            [error("json_invalid", ("body", exc.pos), "JSON decode error", {}, {"error": exc.msg})]
        ) from None


def query_bool(request: Request, name: str, default: bool | None) -> bool | None:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    errors: ErrorList = []
    value = to_bool(raw, ("query", name), errors)
    if errors:
        raise ValidationFailed(errors)
    return value


def query_int(request: Request, name: str, default: int | None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    errors: ErrorList = []
    value = to_int(raw, ("query", name), errors)
    if errors:
        raise ValidationFailed(errors)
    return value
