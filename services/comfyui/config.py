"""ComfyUI runs service configuration (environment variables)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from common.config import (
    ComfyDeploySettings,
    RedisSettings,
    env,
    http_url,
    listen_address,
    metrics_address,
    positive_float,
    positive_int,
    service_address,
)

from .callbacks import Adapters, parse_adapters, parse_secret
from .quotes import QuoteSettings
from .runs import RunSettings


def fraction(raw: str) -> Decimal:
    """A share from 0 to 1, e.g. ``0.5``."""
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise ValueError("expected a number from 0 to 1") from None
    if not value.is_finite() or not 0 <= value <= 1:
        raise ValueError("expected a number from 0 to 1")
    return value


def percentile(raw: str) -> float:
    value = float(raw)
    if not 0 < value <= 1:
        raise ValueError("expected a fraction above 0 and at most 1, e.g. 0.9")
    return value


def adapter_pairs(raw: str) -> tuple[tuple[str, str], ...]:
    """``adapter=value`` pairs, comma-separated; an adapter may appear several times."""
    pairs = []
    for item in raw.split(","):
        adapter, sep, value = item.strip().partition("=")
        if not item.strip():
            continue
        if not sep or not adapter.strip() or not value.strip():
            raise ValueError("expected adapter=value pairs separated by commas")
        pairs.append((adapter.strip(), value.strip()))
    return tuple(pairs)


def adapter_secrets(raw: str) -> tuple[tuple[str, str], ...]:
    pairs = adapter_pairs(raw)
    for _, secret in pairs:
        parse_secret(secret)  # a whsec_ secret, or a ValueError naming the form (never the value)
    return pairs


@dataclass(frozen=True)
class ComfyUIConfig(RedisSettings, ComfyDeploySettings):
    listen_addr: str = env(
        "COMFYUI_LISTEN_ADDR", default="127.0.0.1:50053", parse=listen_address, doc="gRPC listen address."
    )
    metrics_addr: str = metrics_address("COMFYUI_METRICS_ADDR", "127.0.0.1:9453")
    points_service_addr: str = env(
        "POINTS_SERVICE_ADDR", default="127.0.0.1:50051", parse=service_address, doc="Points service address."
    )
    workflows_service_addr: str = env(
        "WORKFLOWS_SERVICE_ADDR",
        default="127.0.0.1:50052",
        parse=service_address,
        doc="Workflow catalog service address.",
    )
    max_upload_bytes: int = env(
        "COMFYUI_MAX_UPLOAD_BYTES",
        default=262_144_000,
        parse=positive_int,
        doc="Largest file UploadFile accepts, in bytes (ComfyUI Deploy's own limit is 250 MB = 262144000).",
    )
    public_url: str = env(
        "COMFYUI_PUBLIC_URL",
        default="http://127.0.0.1:8080",
        parse=http_url,
        doc="The gateway's base URL as ComfyUI Deploy reaches it: webhooks go to <this>/v1/webhooks/comfydeploy.",
    )
    poll_after_seconds: float = env(
        "COMFYUI_POLL_AFTER_SECONDS",
        default=20.0,
        parse=positive_float,
        doc="A run with no webhook or poll for this long is polled (GET /run/{id}).",
    )
    poll_max_seconds: float = env(
        "COMFYUI_POLL_MAX_SECONDS",
        default=120.0,
        parse=positive_float,
        doc="Longest wait between two polls of a run waiting in the queue (the wait grows with the queue).",
    )
    run_timeout_seconds: float = env(
        "COMFYUI_RUN_TIMEOUT_SECONDS",
        default=3600.0,
        parse=positive_float,
        doc="A run not finished this long after it was submitted is cancelled upstream and ends TIMEOUT.",
    )
    submit_unknown_seconds: float = env(
        "COMFYUI_SUBMIT_UNKNOWN_SECONDS",
        default=600.0,
        parse=positive_float,
        doc="A submission whose answer was lost and that is not found upstream within this time ends FAILED.",
    )
    run_retention_seconds: int = env(
        "COMFYUI_RUN_RETENTION_SECONDS",
        default=604800,
        parse=positive_int,
        doc="How long a finished run and its events are kept.",
    )
    pending_grace_seconds: float = env(
        "COMFYUI_PENDING_GRACE_SECONDS",
        default=120.0,
        parse=positive_float,
        doc="A run still being created (PENDING) this long after CreateRun began was interrupted: it ends FAILED.",
    )
    reconcile_interval_seconds: float = env(
        "COMFYUI_RECONCILE_INTERVAL_SECONDS",
        default=1.0,
        parse=positive_float,
        doc="How often the reconciler (one replica at a time) looks at the runs that are due.",
    )

    quote_percentile: float = env(
        "COMFYUI_QUOTE_PERCENTILE",
        default=0.9,
        parse=percentile,
        doc="The quote (and the hold) is this percentile of the workflow's recent GPU seconds on that GPU.",
    )
    default_quote_seconds: float = env(
        "COMFYUI_DEFAULT_QUOTE_SECONDS",
        default=60.0,
        parse=positive_float,
        doc="GPU seconds a run is quoted (and held) for when its workflow has no history on that GPU yet.",
    )
    cancel_charge_share: Decimal = env(
        "COMFYUI_CANCEL_CHARGE_SHARE",
        default=Decimal(0),
        parse=fraction,
        doc="Share of the GPU time used that a user's cancel after the run started is charged (0: none).",
    )
    callback_origins: tuple[tuple[str, str], ...] = env(
        "COMFYUI_CALLBACK_ORIGINS",
        default=(),
        parse=adapter_pairs,
        doc="adapter=origin pairs: where each adapter's callback URLs may point, e.g. "
        "`telegram=https://bot.example.com`.",
    )
    callback_secrets: tuple[tuple[str, str], ...] = env(
        "COMFYUI_CALLBACK_SECRETS",
        default=(),
        parse=adapter_secrets,
        secret=True,
        doc="adapter=whsec_... pairs signing each adapter's callbacks (several per adapter while rotating).",
    )

    def adapters(self) -> Adapters:
        return parse_adapters(self.callback_origins, self.callback_secrets)

    def quote_settings(self) -> QuoteSettings:
        return QuoteSettings(percentile=self.quote_percentile, default_seconds=self.default_quote_seconds)

    def run_settings(self) -> RunSettings:
        return RunSettings(
            public_url=self.public_url,
            poll_after_seconds=self.poll_after_seconds,
            poll_max_seconds=self.poll_max_seconds,
            run_timeout_seconds=self.run_timeout_seconds,
            submit_unknown_seconds=self.submit_unknown_seconds,
            retention_seconds=self.run_retention_seconds,
            reconcile_interval_seconds=self.reconcile_interval_seconds,
            pending_grace_seconds=self.pending_grace_seconds,
            cancel_charge_share=self.cancel_charge_share,
        )
