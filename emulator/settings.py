"""Emulator settings: a frozen dataclass, read from the environment by `python -m emulator`."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from common.config import csv_list, env, http_url, listen_address, positive_float

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def loopback_address(raw: str) -> str:
    """``host:port`` on a loopback host: the emulator is a local stand-in and never listens outside."""
    address = listen_address(raw)
    host = address.rpartition(":")[0].strip("[]")
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise ValueError("the emulator binds loopback only (127.0.0.1, ::1 or localhost)")
    return address


@dataclass(frozen=True)
class EmulatorSettings:
    api_keys: tuple[str, ...] = env(
        "EMULATOR_API_KEYS",
        parse=csv_list,
        secret=True,
        doc="Comma-separated Bearer keys the emulator accepts (the default tenant, which owns the fixtures).",
    )
    other_api_keys: tuple[str, ...] = env(
        "EMULATOR_OTHER_API_KEYS",
        default=(),
        parse=csv_list,
        secret=True,
        doc="Keys of a second tenant, which sees none of the default tenant's resources.",
    )
    listen_addr: str = env(
        "EMULATOR_LISTEN_ADDR", default="127.0.0.1:8188", parse=loopback_address, doc="Emulator listen address."
    )
    step_seconds: float = env(
        "EMULATOR_STEP_SECONDS",
        default=0.5,
        parse=positive_float,
        doc="Seconds between two steps of a run (status change or node executed).",
    )
    public_url: str = env(
        "EMULATOR_PUBLIC_URL",
        default="",
        parse=http_url,
        doc="Base of the file and output URLs the emulator hands out (default http://<listen addr>).",
    )
    log_level: str = env("LOG_LEVEL", default="INFO", doc="Log level.")
    # Not read from the environment: tests shrink them.
    webhook_backoff_scale: float = 1.0  # multiplies the real 0.5 s / 1 s webhook retry backoff
    webhook_timeout_seconds: float = 20.0
    max_upload_bytes: int = 250 * 1024 * 1024
    fixtures_dir: Path = FIXTURES
    fault_seed: int | None = None  # seeds the random draws of probabilistic faults
