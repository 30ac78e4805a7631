"""What a replica says about itself: counters, latency, CPU and memory, and its output.

Pure Python (no ray): ``ray_backend`` hands each replica a ``ReplicaSignals`` and pushes
its ``take()`` to the cluster's collector (``Collector``, a detached actor there) about
four times a second; the control plane reads the collector with a cursor of its own.

Why the replica counts, and not Ray Serve's own metrics (README, "Signals"): the model's
exceptions are answered as HTTP 500 by our wrapper, so Serve counts them as successes;
Serve's latency buckets are too coarse for a p99 (10 buckets from 1 ms to 10 s); and its
figures reach the node's metrics agent every 10 s by default. What only Serve's proxy can
see, requests refused before a replica got them (back-pressure), comes from its metrics.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import TextIO

# Latency buckets: upper bounds growing by 10% from 0.1 ms (a quantile is known within 10%),
# up to 10 minutes; bucket i holds latencies in (BOUND(i-1), BOUND(i)].
LATENCY_BASE_MS = 0.1
LATENCY_GROWTH = 1.1
LATENCY_BUCKETS = 1 + math.ceil(math.log(600_000 / LATENCY_BASE_MS, LATENCY_GROWTH))
MAX_LINE = 4096  # characters kept of one output line
PENDING_LINES = 10_000  # a replica keeps at most this many lines not yet collected
# The request being answered: the lines the model writes meanwhile carry its id (the
# model's function runs in a thread of its own, which copies the context).
REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="")


def answering(request_id: str) -> Token[str]:
    """Marks the lines written from here on (in this context) as the request's."""
    return REQUEST_ID.set(request_id)


def answered(token: Token[str]) -> None:
    REQUEST_ID.reset(token)


def latency_bucket(ms: float) -> int:
    if ms <= LATENCY_BASE_MS:
        return 0
    i = math.ceil(math.log(ms / LATENCY_BASE_MS, LATENCY_GROWTH) - 1e-9)
    return min(i, LATENCY_BUCKETS - 1)


def bucket_bound_ms(i: int) -> float:
    return float(LATENCY_BASE_MS * LATENCY_GROWTH**i)


class Outcome:
    """How a request ended, from the replica's side."""

    OK = "ok"
    MODEL_ERROR = "model_error"  # the model raised (HTTP 500)
    CLIENT_ERROR = "client_error"  # 4xx: not JSON, no key
    SERVER_ERROR = "server_error"  # any other 5xx

    @staticmethod
    def of(status: int) -> str:
        if status < 400:
            return Outcome.OK
        if status < 500:
            return Outcome.CLIENT_ERROR
        return Outcome.MODEL_ERROR if status == 500 else Outcome.SERVER_ERROR


@dataclass(frozen=True)
class ReplicaFigures:
    """A replica's figures since it started (cumulative), as of ``time``."""

    app: str
    replica: str
    build: str
    node: str
    pid: int
    start_time: float  # unix seconds
    time: float
    requests: int = 0
    model_errors: int = 0
    client_errors: int = 0
    server_errors: int = 0
    latency: tuple[tuple[int, int], ...] = ()  # (bucket, count), cumulative
    in_flight: int = 0
    busy_limit: int = 0  # requests a replica takes at once (Serve's max_ongoing_requests)
    cpu_seconds: float = 0.0
    rss_bytes: int = 0
    gpu_used: float = -1.0  # GPUs' worth in use (utilisation x GPUs); -1: not measured
    requested_cpus: float = 0.0
    requested_memory_bytes: int = 0
    requested_gpus: float = 0.0

    @property
    def at_limit(self) -> bool:
        """The replica has as many requests as it takes at once (when its limit is known)."""
        return self.busy_limit > 0 and self.in_flight >= self.busy_limit


@dataclass(frozen=True)
class LogLine:
    """One line of a replica's output, or its access line for one request."""

    app: str
    replica: str
    build: str
    node: str
    seq: int  # per replica, from 0, without gaps
    time: float
    stream: str  # stdout, stderr, log, access
    text: str
    request_id: str = ""


@dataclass(frozen=True)
class ProxyFigures:
    """What Serve's proxies say of an application (every node's): requests they refused
    for want of capacity (back-pressure 503, time-outs), cumulative, and those queued now."""

    app: str
    refused: int
    queued: int


@dataclass(frozen=True)
class Batch:
    """What the collector holds after a reader's cursor."""

    epoch: str
    cursor: int
    replicas: tuple[ReplicaFigures, ...] = ()
    lines: tuple[LogLine, ...] = ()
    proxies: tuple[ProxyFigures, ...] = ()
    lines_lost: int = 0  # lines that left the collector's ring before this reader came


@dataclass(frozen=True)
class Report:
    """One push of a replica: its figures now and its lines since the last push."""

    figures: ReplicaFigures
    lines: tuple[LogLine, ...]


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclass
class Identity:
    app: str
    replica: str
    build: str
    node: str
    busy_limit: int = 0
    requested_cpus: float = 0.0
    requested_memory_bytes: int = 0
    requested_gpus: float = 0.0
    gpu_probe: Callable[[], float] | None = None  # GPUs' worth in use, or -1


class ReplicaSignals:
    """Counts a replica's requests and collects its output lines (thread-safe)."""

    def __init__(self, who: Identity, clock: Callable[[], float] = time.time) -> None:
        self.who = who
        self._clock = clock
        self._lock = threading.Lock()
        self._started = clock()
        self._counts = {o: 0 for o in ("ok", "model_error", "client_error", "server_error")}
        self._latency: dict[int, int] = {}
        self._in_flight = 0
        self._seq = 0
        self._lines: deque[LogLine] = deque()
        self.dropped_lines = 0

    def started(self) -> None:
        with self._lock:
            self._in_flight += 1

    def finished(self, status: int, seconds: float, request_id: str) -> None:
        ms = seconds * 1000
        with self._lock:
            self._in_flight -= 1
            self._counts[Outcome.of(status)] += 1
            b = latency_bucket(ms)
            self._latency[b] = self._latency.get(b, 0) + 1
        self.line("access", f"{status} {ms:.1f} ms", request_id)

    def line(self, stream: str, text: str, request_id: str = "") -> None:
        text = text.rstrip("\n")[:MAX_LINE]
        request_id = request_id or REQUEST_ID.get()
        w = self.who
        with self._lock:
            if len(self._lines) >= PENDING_LINES:  # nobody collects: keep the newest
                self._lines.popleft()
                self.dropped_lines += 1
            self._lines.append(
                LogLine(
                    w.app,
                    w.replica,
                    w.build,
                    w.node,
                    self._seq,
                    self._clock(),
                    stream,
                    text,
                    request_id,
                )
            )
            self._seq += 1

    def figures(self) -> ReplicaFigures:
        w = self.who
        gpu = w.gpu_probe() if w.gpu_probe is not None else -1.0
        with self._lock:
            c = dict(self._counts)
            latency = tuple(sorted(self._latency.items()))
            in_flight = self._in_flight
        return ReplicaFigures(
            app=w.app,
            replica=w.replica,
            build=w.build,
            node=w.node,
            pid=os.getpid(),
            start_time=self._started,
            time=self._clock(),
            requests=sum(c.values()),
            model_errors=c[Outcome.MODEL_ERROR],
            client_errors=c[Outcome.CLIENT_ERROR],
            server_errors=c[Outcome.SERVER_ERROR],
            latency=latency,
            in_flight=in_flight,
            busy_limit=w.busy_limit,
            cpu_seconds=time.process_time(),
            rss_bytes=_rss_bytes(),
            gpu_used=gpu,
            requested_cpus=w.requested_cpus,
            requested_memory_bytes=w.requested_memory_bytes,
            requested_gpus=w.requested_gpus,
        )

    def has_lines(self) -> bool:
        return bool(self._lines)

    def take(self) -> Report:
        """The figures now and every line not taken before."""
        with self._lock:
            lines = tuple(self._lines)
            self._lines.clear()
        return Report(self.figures(), lines)

    def put_back(self, report: Report) -> None:
        """A push that failed: its lines go first in the next one."""
        with self._lock:
            self._lines.extendleft(reversed(report.lines))
            while len(self._lines) > PENDING_LINES:
                self._lines.popleft()
                self.dropped_lines += 1


class _Tee(io.TextIOBase):
    """Writes through to the stream it replaces and hands each whole line to ``sink``."""

    def __init__(self, inner: TextIO, sink: Callable[[str], None]) -> None:
        self._inner = inner
        self._sink = sink
        self._partial = threading.local()

    def write(self, s: str) -> int:
        n = self._inner.write(s)
        buf = getattr(self._partial, "text", "") + s
        *whole, rest = buf.split("\n")
        self._partial.text = rest[-MAX_LINE:]
        for text in whole:
            if text:
                self._sink(text)
        return n

    def flush(self) -> None:
        self._inner.flush()

    def fileno(self) -> int:
        return self._inner.fileno()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return str(getattr(self._inner, "encoding", "utf-8"))

    def writable(self) -> bool:
        return True


class _Records(logging.Handler):
    """The model's own logging records (not Ray's), formatted as one line each."""

    def __init__(self, signals: ReplicaSignals) -> None:
        super().__init__(logging.DEBUG)
        self._signals = signals
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.partition(".")[0] != "ray"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            for text in self.format(record).splitlines() or [""]:
                self._signals.line("log", text)
        except Exception:  # never let a log line break a request
            self.handleError(record)


def capture_output(signals: ReplicaSignals) -> None:
    """From now on, the process's ``print`` (stdout), stderr and logging records of any
    logger but Ray's become the replica's lines (they still reach Ray's log files)."""
    if isinstance(sys.stdout, _Tee):
        return  # once per process
    sys.stdout = _Tee(sys.stdout, lambda t: signals.line("stdout", t))
    sys.stderr = _Tee(sys.stderr, lambda t: signals.line("stderr", t))
    logging.getLogger().addHandler(_Records(signals))


class Collector:
    """The cluster's one place where replicas leave their reports (a detached actor in
    ``ray_backend``): the newest figures of each replica seen in the last hour, and a ring
    of the newest lines. Readers keep their own cursor, so several servers read it; a
    collector started again has a new ``epoch``, and a cursor of another epoch reads from
    the start."""

    def __init__(self, max_lines: int = 50_000, keep_s: float = 3600.0) -> None:
        self.epoch = os.urandom(8).hex()
        self._figures: dict[tuple[str, str], ReplicaFigures] = {}
        self._lines: deque[LogLine] = deque()
        self._max_lines = max_lines
        self._keep_s = keep_s
        self._first = 1  # cursor of self._lines[0]

    def push(self, reports: Iterable[Report]) -> None:
        for report in reports:
            f = report.figures
            self._figures[(f.app, f.replica)] = f
            self._lines.extend(report.lines)
        while len(self._lines) > self._max_lines:
            self._lines.popleft()
            self._first += 1
        horizon = time.time() - self._keep_s
        for key in [k for k, f in self._figures.items() if f.time < horizon]:
            del self._figures[key]

    def read(self, epoch: str, cursor: int, max_lines: int = 20_000) -> Batch:
        """Every replica's figures and the lines after ``cursor``."""
        if epoch != self.epoch:
            cursor = 0
        skip = max(0, cursor - self._first + 1)
        lost = max(0, self._first - cursor - 1) if cursor else 0
        lines = tuple(itertools.islice(self._lines, skip, skip + max_lines))
        return Batch(
            epoch=self.epoch,
            cursor=self._first + skip + len(lines) - 1,
            replicas=tuple(self._figures.values()),
            lines=lines,
            lines_lost=lost,
        )


def proxy_figures(
    families: Mapping[str, Iterable[tuple[Mapping[str, str], float]]],
) -> list[ProxyFigures]:
    """Refused and queued requests per application from Serve's proxy metrics (samples of
    every node, by metric name): HTTP 503 (back-pressure, no replica), 504 and 408
    (time-outs) count as refused."""
    refused: dict[str, float] = {}
    queued: dict[str, float] = {}
    for labels, value in families.get("ray_serve_num_http_requests_total", ()):
        app = labels.get("application", "")
        if app and labels.get("status_code") in ("503", "504", "408"):
            refused[app] = refused.get(app, 0.0) + value
    for labels, value in families.get("ray_serve_deployment_queued_queries", ()):
        app = labels.get("application", "")
        if app:
            queued[app] = queued.get(app, 0.0) + value
    return [
        ProxyFigures(app, int(refused.get(app, 0)), int(queued.get(app, 0)))
        for app in sorted(set(refused) | set(queued))
    ]


PROXIES_IDLE_S = 10.0  # Serve's proxy metrics are read this often while nothing presses


class ProxyPace:
    """When to read Serve's proxies' metrics again. Reading them is not free: a node's
    metrics page holds every metric of every replica on it (at 50 replicas: 4.7 MB,
    11,700 lines, ~1 s of its agent's time to make), and only two of them are of use. So
    they are read at every reading of the replicas' signals while what they say matters
    (a replica has as many requests as it takes at once, or the proxies queue or refused
    requests at the last read), and every ``idle_s`` otherwise: refused requests are a
    counter, and a reading later still counts them all."""

    def __init__(self, idle_s: float = PROXIES_IDLE_S) -> None:
        self.idle_s = idle_s
        self._at: float | None = None
        self._pressed = False
        self._refused: dict[str, int] = {}

    def due(self, now: float, replicas: Iterable[ReplicaFigures]) -> bool:
        if self._at is None or self._pressed or now - self._at >= self.idle_s:
            return True
        return any(f.at_limit for f in replicas)

    def read(self, now: float, proxies: Iterable[ProxyFigures]) -> None:
        """What a reading at ``now`` found."""
        refused = {p.app: p.refused for p in proxies}
        self._pressed = any(p.queued > 0 for p in proxies) or any(
            n > self._refused.get(app, n) for app, n in refused.items()
        )
        self._at, self._refused = now, refused


@dataclass
class Pusher:
    """Sends a replica's reports every ``interval_s`` (sooner when lines wait), on a
    daemon thread, through ``send`` (which may raise: the lines are kept for the next)."""

    signals: ReplicaSignals
    send: Callable[[Report], None]
    interval_s: float = 1.0
    lines_interval_s: float = 0.2
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self._run, name="replica-signals", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        last = 0.0
        while not self._stop.wait(self.lines_interval_s):
            now = time.monotonic()
            if now - last < self.interval_s and not self.signals.has_lines():
                continue
            self.push_now()
            last = now

    def push_now(self) -> bool:
        report = self.signals.take()
        try:
            self.send(report)
            return True
        except Exception:
            self.signals.put_back(report)
            return False
