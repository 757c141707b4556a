"""Configuration from environment variables, parsed once into frozen dataclasses.

Each config class is a frozen dataclass whose fields name their variable through ``env(...)``.
``load(Config, environ)`` reads them all and raises ``ConfigError`` naming the variable on the first
bad or missing value, so a service fails at start-up rather than at its first request. Tests pass a
plain dict as ``environ``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")

_MISSING = object()


class ConfigError(ValueError):
    """A configuration variable is missing or malformed. The message names the variable."""


def env(
    name: str,
    *,
    default: Any = _MISSING,
    parse: Callable[[str], Any] = str,
    secret: bool = False,
    doc: str = "",
) -> Any:
    """Declare a dataclass field read from environment variable ``name``.

    ``default`` is used when the variable is unset or empty; without one the variable is required.
    ``secret`` fields are never printed (``describe`` shows them as ``<set>``/``<unset>``).
    """
    meta = {"env": name, "parse": parse, "secret": secret, "doc": doc}
    if default is _MISSING:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def load(cls: type[T], environ: Mapping[str, str]) -> T:
    """Build ``cls`` from ``environ``; raise ``ConfigError`` naming the first bad variable."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        meta = field.metadata
        if "env" not in meta:
            continue
        name = meta["env"]
        raw = environ.get(name, "")
        if raw.strip() == "":
            if field.default is dataclasses.MISSING:
                raise ConfigError(f"{name} is required but not set")
            default = field.default
            if isinstance(default, str) and default and meta["parse"] is not str:
                default = meta["parse"](default)  # a default written the way the variable would be
            values[field.name] = default
            continue
        try:
            values[field.name] = meta["parse"](raw.strip())
        except (ValueError, TypeError) as exc:
            if meta["secret"]:  # the parser's message may quote the value: say nothing of it
                raise ConfigError(f"{name} is invalid (value hidden: it is a secret)") from None
            raise ConfigError(f"{name}={raw!r} is invalid: {exc}") from None
    return cls(**values)


def variables(cls: type[Any]) -> list[tuple[str, str, str, bool]]:
    """(variable, default shown as text, doc, secret) for every field: used by the README test."""
    out = []
    for field in dataclasses.fields(cls):
        meta = field.metadata
        if "env" not in meta:
            continue
        missing = field.default is dataclasses.MISSING or field.default in ((), "")
        default = "" if missing else str(field.default)
        out.append((meta["env"], default, meta["doc"], meta["secret"]))
    return out


def secrets_of(config: Any) -> list[str]:
    """The non-empty secret values of a loaded config, for the log redaction filter. A secret field
    holds a value, a list of values, or a list of (name, value) pairs whose values are the secrets."""
    found: list[str] = []
    for f in dataclasses.fields(config):
        if not f.metadata.get("secret"):
            continue
        value = getattr(config, f.name)
        for item in value if isinstance(value, (tuple, list)) else [value]:
            secret = item[-1] if isinstance(item, (tuple, list)) else item
            if secret:
                found.append(str(secret))
    return found


# --- parsers -------------------------------------------------------------------------------------


def parse_bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected true/false, 1/0, yes/no or on/off")


def positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError("must be a positive number")
    return value


def listen_address(raw: str) -> str:
    """``host:port`` with a literal IP host (or ``localhost``) and a port in 0..65535."""
    host, sep, port = raw.rpartition(":")
    if not sep or not host:
        raise ValueError("expected host:port, e.g. 127.0.0.1:50051")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("port must be a number from 0 to 65535")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if bare != "localhost":
        try:
            ipaddress.ip_address(bare)
        except ValueError:
            raise ValueError("host must be an IP address or localhost") from None
    return raw


def service_address(raw: str) -> str:
    """``host:port`` of a peer gRPC service (any resolvable host name)."""
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError("expected host:port, e.g. 127.0.0.1:50051")
    return raw


def http_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise ValueError("expected an http:// or https:// URL")
    return raw.rstrip("/")


def redis_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in {"redis", "rediss", "unix"}:
        raise ValueError("expected a redis://, rediss:// or unix:// URL")
    return raw


def csv_list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def log_level(raw: str) -> str:
    upper = raw.upper()
    if upper not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ValueError("expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return upper


def metrics_address(variable: str, default: str) -> Any:
    """Declare a process's metrics address: ``/metrics`` in Prometheus text format is served there."""
    return env(
        variable,
        default=default,
        parse=listen_address,
        doc="Where this process serves `/metrics` (Prometheus text format); port 0 picks a free one.",
    )


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """What every gRPC service reads, besides its own settings."""

    log_level: str = env("LOG_LEVEL", default="INFO", parse=log_level, doc="Log level.")
    grace_seconds: float = env(
        "GRPC_GRACE_SECONDS",
        default=10.0,
        parse=positive_float,
        doc="On SIGTERM, how long in-flight RPCs may run before they are cancelled.",
    )
    health_interval_seconds: float = env(
        "HEALTH_CHECK_INTERVAL_SECONDS",
        default=2.0,
        parse=positive_float,
        doc="How often a service probes its dependencies to set its health status.",
    )


@dataclasses.dataclass(frozen=True)
class RedisSettings:
    redis_url: str = env(
        "REDIS_URL", default="redis://127.0.0.1:6379/0", parse=redis_url, doc="Redis holding the service's state."
    )


@dataclasses.dataclass(frozen=True)
class ComfyDeploySettings:
    comfydeploy_api_url: str = env(
        "COMFYDEPLOY_API_URL",
        default="https://api.comfydeploy.com/api",
        parse=http_url,
        doc="ComfyUI Deploy API base URL (V2).",
    )
    comfydeploy_api_key: str = env(
        "COMFYDEPLOY_API_KEY", default="", secret=True, doc="ComfyUI Deploy API key (Bearer). Never logged."
    )
    comfydeploy_rate_limit: float = env(
        "COMFYDEPLOY_RATE_LIMIT",
        default=20.0,
        parse=positive_float,
        doc="Calls per second to ComfyUI Deploy for the whole API key, shared by the processes using it.",
    )
    comfydeploy_processes_per_key: int = env(
        "COMFYDEPLOY_PROCESSES_PER_KEY",
        default=2,
        parse=positive_int,
        doc="How many processes share the API key (each takes an equal share of the rate limit).",
    )

    @property
    def comfydeploy_rate_per_process(self) -> float:
        """This process's share of the key's rate limit (docs/decisions/0009)."""
        return self.comfydeploy_rate_limit / self.comfydeploy_processes_per_key
