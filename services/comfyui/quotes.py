"""The hold is the quote: what a run of a workflow will cost at most, from its recent history.

A high percentile of the GPU seconds of the workflow's recent successful runs on that GPU
(``history.py``), priced by the points economy (PointsService.QuoteCost); the configured default
GPU time when there is no history yet. CreateRun holds exactly this quote.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import duration_pb2

from common.channels import peer_error
from stationthis.points.v1 import points_service_pb2
from stationthis.type.v1 import gpu_pb2

from .history import Durations, History

POINTS = "stationthis.points.v1.PointsService"


@dataclass(frozen=True)
class QuoteSettings:
    percentile: float = 0.9
    default_seconds: float = 60.0


@dataclass(frozen=True)
class Quote:
    cost_points: int
    gpu: gpu_pb2.GpuType
    gpu_time: duration_pb2.Duration
    basis: str  # "history" | "default"
    durations: Durations
    usd_per_second: str
    multiplier: str


class Quotes:
    def __init__(self, history: History, points: Any, settings: QuoteSettings | None = None) -> None:
        self.history = history
        self.points = points  # a PointsServiceStub
        self.settings = settings or QuoteSettings()

    async def quote(self, workflow_id: str, gpu: int, seconds_left: float) -> Quote:
        billed_gpu: gpu_pb2.GpuType = gpu or gpu_pb2.GPU_TYPE_CPU  # type: ignore[assignment]
        durations = await self.history.durations(workflow_id, billed_gpu)
        seconds = durations.high(self.settings.percentile) if durations.known else self.settings.default_seconds
        gpu_time = duration_pb2.Duration()
        gpu_time.FromNanoseconds(int(seconds * 1e9))
        try:
            priced: points_service_pb2.QuoteCostResponse = await self.points.QuoteCost(
                points_service_pb2.QuoteCostRequest(gpu=billed_gpu, gpu_time=gpu_time), timeout=seconds_left
            )
        except grpc.aio.AioRpcError as exc:
            raise peer_error(exc, POINTS) from None
        return Quote(
            cost_points=priced.cost_points,
            gpu=billed_gpu,
            gpu_time=gpu_time,
            basis="history" if durations.known else "default",
            durations=durations,
            usd_per_second=priced.usd_per_second,
            multiplier=priced.multiplier,
        )
