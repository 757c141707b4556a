"""Refunds by failure class, and the receipt each settlement writes into its run. Pure functions.

The class decides what the ledger is asked: a success is charged its GPU time; a user's cancel after
the run started is charged the configured share of the GPU time used (none by default); everything
else (provider failures, timeouts, our own faults, cancels before the start, deadlines, upstream
cancels) is refunded in full. The receipt is built from the ledger's own answer (the hold it
settled), so the two always agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from google.protobuf import duration_pb2

from stationthis.comfyui.v1 import run_pb2
from stationthis.points.v1 import points_pb2
from stationthis.type.v1 import gpu_pb2

S = run_pb2
R = run_pb2  # SettlementRule lives in run.proto

EXPLANATIONS = {
    R.SETTLEMENT_RULE_SUCCESS_CHARGED: "the run succeeded: its GPU time was charged",
    R.SETTLEMENT_RULE_PROVIDER_FAILURE_REFUNDED: "ComfyUI Deploy reported a failure: refunded in full",
    R.SETTLEMENT_RULE_TIMEOUT_REFUNDED: "the run timed out: refunded in full",
    R.SETTLEMENT_RULE_SERVICE_FAULT_REFUNDED: "the run could not be run through no fault of yours: refunded in full",
    R.SETTLEMENT_RULE_CANCELLED_BEFORE_START_REFUNDED: "cancelled before it started: refunded in full",
    R.SETTLEMENT_RULE_CANCELLED_AFTER_START: "cancelled after it started: {share} of the GPU time used was charged",
    R.SETTLEMENT_RULE_DEADLINE_REFUNDED: "its cancel_after deadline passed: cancelled and refunded in full",
    R.SETTLEMENT_RULE_CANCELLED_UPSTREAM_REFUNDED: "cancelled by ComfyUI Deploy: refunded in full",
}
_OUR_FAULTS = frozenset({"SUBMIT_FAILED", "SUBMIT_OUTCOME_UNKNOWN", "INTERRUPTED"})


def rule(run: S.Run) -> R.SettlementRule:
    """The failure class of a terminal run."""
    if run.status == S.RUN_STATUS_SUCCESS:
        return R.SETTLEMENT_RULE_SUCCESS_CHARGED
    if run.status == S.RUN_STATUS_TIMEOUT:
        return R.SETTLEMENT_RULE_TIMEOUT_REFUNDED
    if run.status == S.RUN_STATUS_CANCELLED:
        source = run.error.metadata.get("source", "")
        if source == "cancel_after":
            return R.SETTLEMENT_RULE_DEADLINE_REFUNDED
        if source == "upstream":
            return R.SETTLEMENT_RULE_CANCELLED_UPSTREAM_REFUNDED
        if run.HasField("start_time"):
            return R.SETTLEMENT_RULE_CANCELLED_AFTER_START
        return R.SETTLEMENT_RULE_CANCELLED_BEFORE_START_REFUNDED
    if run.error.reason in _OUR_FAULTS:
        return R.SETTLEMENT_RULE_SERVICE_FAULT_REFUNDED
    return R.SETTLEMENT_RULE_PROVIDER_FAILURE_REFUNDED


@dataclass(frozen=True)
class Charge:
    """What to ask the ledger: a capture of ``gpu_time`` on ``gpu``, or (None) a release in full."""

    gpu: gpu_pb2.GpuType
    gpu_time: duration_pb2.Duration


def charge(run: S.Run, cancel_share: Decimal) -> Charge | None:
    """The capture a terminal run calls for, or None for a full refund."""
    kind = rule(run)
    gpu = run.gpu or gpu_pb2.GPU_TYPE_CPU
    if kind == R.SETTLEMENT_RULE_SUCCESS_CHARGED:
        return Charge(gpu, run.run_duration)
    if kind == R.SETTLEMENT_RULE_CANCELLED_AFTER_START and cancel_share > 0:
        used = duration_pb2.Duration()
        used.FromNanoseconds(int(Decimal(run.run_duration.ToNanoseconds()) * cancel_share))
        return Charge(gpu, used)
    return None


def receipt(
    run: S.Run,
    hold: points_pb2.Hold | None,
    transaction_id: str,
    charged: Charge | None,
    usd_per_second: str,
    multiplier: str,
    cancel_share: Decimal,
) -> S.Receipt:
    """The receipt of a settlement, from the hold as the ledger settled it."""
    kind = rule(run)
    held = (hold.points_held + hold.qoints_held) if hold is not None else run.points_held
    cost = hold.cost_points if hold is not None and charged is not None else 0
    explanation = EXPLANATIONS[kind].format(share=f"{cancel_share:%}" if cancel_share else "none")
    if kind == R.SETTLEMENT_RULE_CANCELLED_AFTER_START and charged is None:
        explanation = "cancelled after it started: none of the GPU time used was charged"
    if cost > held:
        explanation += f"; it ran past its quote, so {cost - held} points beyond the hold were charged"
    message = S.Receipt(
        gpu=charged.gpu if charged else (run.gpu or gpu_pb2.GPU_TYPE_CPU),
        usd_per_second=usd_per_second,
        multiplier=multiplier,
        points_held=held,
        points_charged=cost,
        points_refunded=max(0, held - cost),
        overage_points=max(0, cost - held),
        rule=kind,
        explanation=explanation,
        transaction_id=transaction_id,
    )
    if charged is not None:
        message.gpu_time.CopyFrom(charged.gpu_time)
    return message
