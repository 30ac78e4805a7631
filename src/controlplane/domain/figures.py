"""What GetModelMetrics answers: a model's figures over a window, as plain data.

``controlplane/series.py`` makes them from the replicas' readings; the API converts them
to and from protobuf; the CLI prints them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Figures:
    """A model's, build's or replica's figures over a point or a whole window."""

    requests: int = 0
    model_errors: int = 0
    client_errors: int = 0
    server_errors: int = 0
    refused: int = 0
    in_flight: int = 0
    queued: int = 0
    latency_p50_ms: float = 0.0
    latency_p95_ms: float = 0.0
    latency_p99_ms: float = 0.0
    cpu_used: float = 0.0  # cores, on average
    cpu_requested: float = 0.0
    memory_rss_bytes: int = 0
    memory_requested_bytes: int = 0
    gpu_used: float = -1.0  # GPUs' worth; -1: not measured
    gpu_requested: float = 0.0
    replicas: int = 0  # that reported
    busy_replicas: int = 0

    @property
    def errors(self) -> int:
        return self.model_errors + self.server_errors


@dataclass(frozen=True)
class Point:
    time: float  # start of the point, unix seconds
    figures: Figures


@dataclass(frozen=True)
class Series:
    totals: Figures
    points: tuple[Point, ...]


@dataclass(frozen=True)
class ReplicaSeries:
    replica: str
    build: str
    node: str
    pid: int
    running: bool  # reported in the last 10 s (it reports every second)
    series: Series


@dataclass(frozen=True)
class ModelSeries:
    app: str
    start: float
    end: float
    step_s: int
    model: Series
    builds: Mapping[str, Series]
    replicas: tuple[ReplicaSeries, ...]


@dataclass(frozen=True)
class ModelMetrics:
    """GetModelMetrics' answer: a model's series and its health in words."""

    name: str
    health: str
    series: ModelSeries
