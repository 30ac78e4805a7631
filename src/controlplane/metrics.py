"""Prometheus metrics of one server: its own registry, served over HTTP on --metrics-port.

Counted as they happen: RPCs by method and code with their latency (api/interceptor.py)
and the operations this server finished, by kind and outcome, with their durations.
Read when scraped: models by state, replicas desired vs running per model, watch
streams open on this server, and the dispatcher's queue (every server's jobs).
RPC metrics use the names of go-grpc-prometheus, which dashboards already know.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    start_http_server,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from controlplane.domain.states import ModelState

log = logging.getLogger(__name__)

RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60)
OPERATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
RPC_LABELS = ("grpc_service", "grpc_method", "grpc_type")


@dataclass(frozen=True)
class Invocations:
    """A build's requests since this server started counting, as its replicas report them."""

    model: str
    build: str  # its version
    outcomes: dict[str, int]  # ok, model_error, client_error, server_error
    buckets: tuple[tuple[float, int], ...]  # (le seconds, cumulative count), +Inf last
    sum_seconds: float  # estimated from the buckets (each request at its bucket's bound)


@dataclass(frozen=True)
class ModelUse:
    """A model now: requests refused since this server started counting, and gauges."""

    model: str
    refused: int
    in_flight: int
    queued: int
    cpu_used: float  # cores, over the last minute
    cpu_requested: float
    memory_rss_bytes: int
    memory_requested_bytes: int
    gpu_used: float  # -1: not measured
    gpu_requested: float
    replicas: int


@dataclass(frozen=True)
class Figures:
    """What the server's state looks like right now (read at each scrape)."""

    models: dict[ModelState, int] = field(default_factory=dict)
    replicas: dict[str, tuple[int, int]] = field(default_factory=dict)  # desired, running
    jobs: dict[str, int] = field(default_factory=dict)  # pending, running
    watchers: int = 0
    invocations: tuple[Invocations, ...] = ()
    use: tuple[ModelUse, ...] = ()


def outcome_of(error_code: str | None) -> str:
    """An operation's outcome label: succeeded, cancelled or failed."""
    if not error_code:
        return "succeeded"
    return "cancelled" if error_code == "CANCELLED" else "failed"


class Metrics:
    def __init__(self) -> None:
        # A registry of the server's own, so that servers in one process (tests) and
        # Ray's own metrics never mix; the process figures are added to it.
        self.registry = CollectorRegistry()
        for shared in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(shared)
        reg = self.registry
        self.rpc_started = Counter(
            "grpc_server_started", "RPCs started on the server.", RPC_LABELS, registry=reg
        )
        self.rpc_handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by their status code.",
            (*RPC_LABELS, "grpc_code"),
            registry=reg,
        )
        self.rpc_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from an RPC's start to its status (a stream's whole life).",
            RPC_LABELS,
            buckets=RPC_BUCKETS,
            registry=reg,
        )
        self.operations = Counter(
            "modelctl_operations",
            "Operations this server finished, by kind and outcome (succeeded, failed, cancelled).",
            ("kind", "outcome"),
            registry=reg,
        )
        self.operation_seconds = Histogram(
            "modelctl_operation_duration_seconds",
            "Time from an operation's creation to its end, by kind and outcome.",
            ("kind", "outcome"),
            buckets=OPERATION_BUCKETS,
            registry=reg,
        )

    def operation_finished(self, kind: str, error_code: str | None, seconds: float) -> None:
        outcome = outcome_of(error_code)
        self.operations.labels(kind, outcome).inc()
        self.operation_seconds.labels(kind, outcome).observe(max(seconds, 0.0))

    def read_state_from(self, figures: Callable[[], Figures]) -> None:
        """Adds the figures read at each scrape (``figures`` runs in the HTTP thread)."""
        self.registry.register(_StateCollector(figures))


class _StateCollector(Collector):
    def __init__(self, figures: Callable[[], Figures]) -> None:
        self._figures = figures

    def describe(self) -> Iterator[Metric]:
        return iter(())  # unknown until read; describing would run a query at register

    def collect(self) -> Iterator[Metric]:
        f = self._figures()
        models = GaugeMetricFamily("modelctl_models", "Models by state.", labels=["state"])
        for state, n in f.models.items():
            models.add_metric([state.value], n)
        yield models
        desired = GaugeMetricFamily(
            "modelctl_model_replicas_desired",
            "Replicas each model's active deployment asks for while the model is DEPLOYING "
            "or DEPLOYED (0 once it stops).",
            labels=["model"],
        )
        running = GaugeMetricFamily(
            "modelctl_model_replicas_running",
            "Replicas of the active deployment of each model that Serve reports RUNNING.",
            labels=["model"],
        )
        for model, (want, have) in sorted(f.replicas.items()):
            desired.add_metric([model], want)
            running.add_metric([model], have)
        yield desired
        yield running
        yield GaugeMetricFamily(
            "modelctl_watchers", "Watch streams open on this server.", value=f.watchers
        )
        yield GaugeMetricFamily(
            "modelctl_dispatcher_queue_depth",
            "Jobs waiting for a dispatcher (every server's queue).",
            value=f.jobs.get("pending", 0),
        )
        yield GaugeMetricFamily(
            "modelctl_dispatcher_running_jobs",
            "Jobs being run (by every server).",
            value=f.jobs.get("running", 0),
        )
        yield from _invocations(f.invocations)
        yield from _use(f.use)


def _invocations(invocations: tuple[Invocations, ...]) -> Iterator[Metric]:
    requests = CounterMetricFamily(
        "modelctl_model_requests",
        "Requests the model's replicas answered, by build and outcome (ok; model_error: the "
        "model raised; client_error: 4xx; server_error: other 5xx).",
        labels=["model", "build", "outcome"],
    )
    latency = HistogramMetricFamily(
        "modelctl_model_request_duration_seconds",
        "Time a replica took to answer, by build (the sum is estimated from the buckets).",
        labels=["model", "build"],
    )
    for i in invocations:
        for outcome, n in sorted(i.outcomes.items()):
            requests.add_metric([i.model, i.build, outcome], n)
        buckets = [(("+Inf" if le == float("inf") else f"{le:g}"), n) for le, n in i.buckets]
        latency.add_metric([i.model, i.build], buckets, i.sum_seconds)
    yield requests
    yield latency


def _use(use: tuple[ModelUse, ...]) -> Iterator[Metric]:
    refused = CounterMetricFamily(
        "modelctl_model_refused_requests",
        "Requests Serve's proxies refused or dropped for want of capacity (back-pressure, "
        "time-outs) before a replica saw them.",
        labels=["model"],
    )
    gauges = {
        "in_flight": ("modelctl_model_requests_in_flight", "Requests the replicas are answering."),
        "queued": ("modelctl_model_requests_queued", "Requests waiting in Serve's queues."),
        "cpu_used": ("modelctl_model_cpu_used_cores", "CPU cores the replicas used (last minute)."),
        "cpu_requested": (
            "modelctl_model_cpu_requested_cores",
            "CPU cores the replicas asked for.",
        ),
        "memory_rss_bytes": ("modelctl_model_memory_rss_bytes", "The replicas' resident memory."),
        "memory_requested_bytes": (
            "modelctl_model_memory_requested_bytes",
            "Memory the replicas asked for (0: none asked).",
        ),
        "gpu_used": ("modelctl_model_gpu_used", "GPUs' worth in use (-1: not measured)."),
        "gpu_requested": ("modelctl_model_gpu_requested", "GPUs the replicas asked for."),
        "replicas": ("modelctl_model_replicas_reporting", "Replicas that reported lately."),
    }
    families = {k: GaugeMetricFamily(n, h, labels=["model"]) for k, (n, h) in gauges.items()}
    for u in use:
        refused.add_metric([u.model], u.refused)
        for key, family in families.items():
            family.add_metric([u.model], float(getattr(u, key)))
    yield refused
    yield from families.values()


class MetricsEndpoint:
    """The registry served at http://HOST:PORT/metrics from a thread of its own."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self._metrics = metrics
        self._host = host
        self._port = port
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        assert self._httpd is not None, "not started"
        return f"{self._host}:{self._httpd.server_address[1]}"

    def start(self) -> None:
        self._httpd, self._thread = start_http_server(
            self._port, self._host, registry=self._metrics.registry
        )
        log.info("metrics at http://%s/metrics", self.address)

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
