"""Monitoring and Logs of one model: its figures over a window (totals, small charts, a
row per build and per replica, its health), refreshed every few seconds; and its log lines,
filtered by replica and build, followed live (each new line appended once).

Both read only the public API: GetModelMetrics and StreamModelLogs (docs/metrics.md says
what each figure means)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from starlette.routing import BaseRoute, Route

from controlplane.console import kit, live
from controlplane.domain.figures import Figures, Point, ReplicaSeries, Series
from controlplane.domain.names import build_label
from controlplane.domain.types import LogLine

# ---- Monitoring ------------------------------------------------------------------------------

WINDOWS = {"5m": 300, "15m": 900, "1h": 3600}  # the choices, as the query names them
WINDOW_WORDS = {"5m": "5 min", "15m": "15 min", "1h": "1 hour"}
DEFAULT_WINDOW = "15m"
MAX_POINTS = 90  # a chart's points at most: the step grows with the window
REFRESH_S = 5.0  # how often an open Monitoring page is refreshed

CHART_W = 360
CHART_H = 96
PAD = 4  # the plot keeps off the frame's edges


def step_for(window_s: int) -> int:
    """The shortest step (a multiple of 10 s, as the API takes) giving at most MAX_POINTS."""
    return max(10, 10 * math.ceil(window_s / MAX_POINTS / 10))


def number(value: float, digits: int = 2) -> str:
    """1234.5 -> 1,234.5; small rates keep two decimals, whole counts none."""
    if value == int(value) and abs(value) >= 100:
        return f"{int(value):,}"
    return f"{value:,.{digits}f}"


def ms(value: float) -> str:
    return f"{value:.1f} ms" if value < 1000 else f"{value:,.0f} ms"


def size(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def percent(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "—"


def cpu(f: Figures) -> str:
    if not f.cpu_requested:
        return f"{f.cpu_used:.2f} cores used (none requested)"
    return f"{f.cpu_used:.2f} of {f.cpu_requested:g} cores ({percent(f.cpu_used, f.cpu_requested)})"


def memory(f: Figures) -> str:
    if not f.memory_requested_bytes:
        return f"{size(f.memory_rss_bytes)} (none requested)"
    return (
        f"{size(f.memory_rss_bytes)} of {size(f.memory_requested_bytes)} "
        f"({percent(f.memory_rss_bytes, f.memory_requested_bytes)})"
    )


def gpu(f: Figures) -> str:
    asked = f"{f.gpu_requested:g} requested" if f.gpu_requested else "none requested"
    if f.gpu_used < 0:
        return f"not measured ({asked})"
    if not f.gpu_requested:
        return f"{f.gpu_used:.2f} GPUs used ({asked})"
    return f"{f.gpu_used:.2f} of {f.gpu_requested:g} GPUs ({percent(f.gpu_used, f.gpu_requested)})"


def latencies(f: Figures) -> str:
    if not f.requests:
        return "—"
    return f"{ms(f.latency_p50_ms)} / {ms(f.latency_p95_ms)} / {ms(f.latency_p99_ms)}"


@dataclass(frozen=True)
class Stat:
    label: str
    value: str
    detail: str = ""


def stats(f: Figures, window_s: int, window_words: str) -> list[Stat]:
    """The model's totals over the window, in words a person reads at a glance."""
    return [
        Stat(
            "Requests/s",
            number(f.requests / window_s if window_s else 0.0),
            f"{f.requests:,} requests in {window_words}",
        ),
        Stat(
            "Error ratio",
            percent(f.errors, f.requests) if f.requests else "—",
            f"{f.model_errors:,} model errors, {f.server_errors:,} other 5xx, "
            f"{f.client_errors:,} 4xx",
        ),
        Stat("Refused", f"{f.refused:,}", "before any replica saw them"),
        Stat("In flight", f"{f.in_flight:,}", f"{f.queued:,} queued"),
        Stat("Latency p50 / p95 / p99", latencies(f), "time in the replica"),
        Stat("CPU", cpu(f)),
        Stat("Memory", memory(f)),
        Stat("GPU", gpu(f)),
        Stat("Replicas reporting", f"{f.replicas}", f"{f.busy_replicas} busy"),
    ]


@dataclass(frozen=True)
class Line:
    """One series of a chart: its polylines (a gap where it has no value) and its figures."""

    label: str
    colour: str
    dashed: bool
    segments: tuple[str, ...]  # each a polyline's points="x,y x,y ..."
    latest: str
    peak: str


@dataclass(frozen=True)
class Chart:
    id: str
    title: str
    description: str
    top: str  # the value at the top of the plot
    width: int
    height: int
    lines: tuple[Line, ...]


def _segments(values: Sequence[float | None], top: float) -> tuple[str, ...]:
    n = len(values)
    if n == 0:
        return ()
    inner_w, inner_h = CHART_W - 2 * PAD, CHART_H - 2 * PAD
    out: list[str] = []
    current: list[str] = []
    for i, v in enumerate(values):
        if v is None:
            if current:
                out.append(" ".join(current))
            current = []
            continue
        x = PAD + (inner_w * i / (n - 1) if n > 1 else inner_w / 2)
        y = PAD + inner_h * (1 - (v / top if top else 0))
        current.append(f"{x:.1f},{y:.1f}")
    if current:
        out.append(" ".join(current))
    # A single point draws nothing as a polyline: give it a short flat stroke.
    return tuple(s if " " in s else f"{s} {s}" for s in out)


def chart(
    id: str,
    title: str,
    unit: str,
    window_words: str,
    series: Sequence[tuple[str, str, bool, Sequence[float | None]]],
    fmt: Callable[[float], str] = number,
) -> Chart:
    """``series``: (label, colour, dashed, values; None where there is no value)."""
    known = [v for _, _, _, values in series for v in values if v is not None]
    peak = max(known, default=0.0)
    top = peak * 1.1 if peak > 0 else 1.0
    lines = []
    for label, colour, dashed, values in series:
        present = [v for v in values if v is not None]
        latest = fmt(present[-1]) if present else "—"
        lines.append(
            Line(
                label,
                colour,
                dashed,
                _segments(values, top),
                latest,
                fmt(max(present)) if present else "—",
            )
        )
    words = "; ".join(f"{ln.label}: peak {ln.peak}, latest {ln.latest}" for ln in lines)
    return Chart(
        id=id,
        title=f"{title} over the last {window_words}",
        description=f"{title} ({unit}), oldest on the left, now on the right. {words}.",
        top=fmt(top),
        width=CHART_W,
        height=CHART_H,
        lines=tuple(lines),
    )


ACCENT, DANGER, WARN, MUTED = "#0a58ca", "#b42318", "#7a4d00", "#57606a"


def charts(points: Sequence[Point], step_s: int, window_words: str) -> list[Chart]:
    per_s = float(step_s or 1)
    figures = [p.figures for p in points]
    return [
        chart(
            "chart-requests",
            "Requests per second",
            "requests/s",
            window_words,
            [
                ("answered", ACCENT, False, [f.requests / per_s for f in figures]),
                ("refused", MUTED, True, [f.refused / per_s for f in figures]),
            ],
        ),
        chart(
            "chart-errors",
            f"Errors per {step_s} s",
            "requests",
            window_words,
            [
                ("model and 5xx", DANGER, False, [float(f.errors) for f in figures]),
                ("4xx", WARN, True, [float(f.client_errors) for f in figures]),
            ],
            fmt=lambda v: f"{v:,.0f}",
        ),
        chart(
            "chart-latency",
            "Latency p99 and p50",
            "ms",
            window_words,
            [
                ("p99", ACCENT, False, [f.latency_p99_ms if f.requests else None for f in figures]),
                ("p50", MUTED, True, [f.latency_p50_ms if f.requests else None for f in figures]),
            ],
            fmt=ms,
        ),
    ]


@dataclass(frozen=True)
class FigureRow:
    """A build's or a replica's totals, formatted."""

    requests: str
    rate: str
    errors: str
    latency: str
    cpu: str
    memory: str


def figure_row(f: Figures, window_s: int) -> FigureRow:
    errors = f"{f.errors:,}" + (f" ({percent(f.errors, f.requests)})" if f.requests else "")
    return FigureRow(
        requests=f"{f.requests:,}",
        rate=number(f.requests / window_s if window_s else 0.0),
        errors=errors,
        latency=latencies(f),
        cpu=cpu(f),
        memory=memory(f),
    )


@dataclass(frozen=True)
class BuildRow:
    label: str
    figures: FigureRow


@dataclass(frozen=True)
class ReplicaRow:
    replica: ReplicaSeries
    build: str
    figures: FigureRow


def _build_order(item: tuple[str, Series]) -> tuple[int, str]:
    last = item[0].rsplit("/", 1)[-1]
    return (-int(last) if last.isdecimal() else 0, item[0])


async def monitoring(view: kit.View) -> dict[str, Any]:
    window = view.query("window", DEFAULT_WINDOW)
    if window not in WINDOWS:
        window = DEFAULT_WINDOW
    window_s = WINDOWS[window]
    words = WINDOW_WORDS[window]
    model, metrics = await asyncio.gather(
        view.client.get_model(view.model),
        view.client.get_model_metrics(view.model, window_s, step_for(window_s)),
    )
    s = metrics.series
    builds = [
        BuildRow(build_label(name), figure_row(series.totals, window_s))
        for name, series in sorted(s.builds.items(), key=_build_order)
    ]
    replicas = [
        ReplicaRow(r, build_label(r.build), figure_row(r.series.totals, window_s))
        for r in sorted(s.replicas, key=lambda r: (not r.running, r.build, r.replica))
    ]
    base = f"/projects/{view.project}/models/{view.params['model']}/monitoring"
    return {
        "title": f"Monitoring · {kit.last(model.name)}",
        "model": model,
        "model_id": kit.last(model.name),
        "window": window,
        "windows": [(key, WINDOW_WORDS[key]) for key in WINDOWS],
        "window_words": words,
        "step_s": s.step_s,
        "health": metrics.health,
        "stats": stats(s.model.totals, window_s, words),
        "charts": charts(s.model.points, s.step_s, words),
        "builds": builds,
        "replicas": replicas,
        "measured_at": datetime.fromtimestamp(s.end, UTC) if s.end else datetime.now(UTC),
        "live_url": f"{base}/live?{urlencode({'window': window})}",
    }


async def every_few_seconds(view: kit.View) -> AsyncIterator[object]:
    """The Monitoring page's refresh pace: the figures change all the time, no event says so."""
    while True:
        yield None
        await asyncio.sleep(REFRESH_S)


# ---- Logs ------------------------------------------------------------------------------------

DEFAULT_TAIL = 200
MAX_TAIL = 1000  # what one read of the API gives at most
MAX_LINES_SHOWN = 2000  # the page keeps this many lines while it follows
# A follower starts this long before the last line shown: a line stored after the page was
# rendered may carry an earlier time (another replica's, reported a moment later); the
# lines it then reads again are told apart by their numbers.
FOLLOW_MARGIN_S = 120.0


@dataclass(frozen=True)
class LogFilter:
    replica: str
    build: str  # as the query gives it: a build number ("4"), or empty
    tail: int

    @property
    def params(self) -> dict[str, str]:
        return {k: v for k, v in (("replica", self.replica), ("build", self.build)) if v}


def log_filter(view: kit.View) -> LogFilter:
    tail_text = view.query("tail", str(DEFAULT_TAIL)).strip()
    tail = int(tail_text) if tail_text.isdecimal() else DEFAULT_TAIL
    build = view.query("build").strip()
    return LogFilter(
        replica=view.query("replica").strip(),
        build=build.rsplit("/", 1)[-1] if build.startswith("projects/") else build,
        tail=min(max(tail, 1), MAX_TAIL),
    )


def build_name(view: kit.View, build: str) -> str:
    """The API's name of a build the form names by its number (a name as is)."""
    return f"{view.model}/builds/{build}" if build else ""


@dataclass(frozen=True)
class LogRow:
    """One line as the page shows it."""

    id: int
    time: str
    replica: str
    build: str
    stream: str
    request_id: str
    text: str

    @classmethod
    def of(cls, line: LogLine) -> LogRow:
        return cls(
            id=line.id,
            time=line.time.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
            replica=line.replica,
            build=build_label(line.build) if line.build else "",
            stream=line.stream,
            request_id=line.request_id,
            text=line.text,
        )


async def logs(view: kit.View) -> dict[str, Any]:
    chosen = log_filter(view)
    build = build_name(view, chosen.build)

    async def read() -> list[LogLine]:
        return [
            line
            async for line in view.client.model_logs(
                view.model, chosen.replica, build, tail=chosen.tail
            )
        ]

    model, lines, builds = await asyncio.gather(
        view.client.get_model(view.model),
        read(),
        view.client.list_builds(view.model, 50),
    )
    replicas: set[str] = {line.replica for line in lines if line.replica}
    if model.active_deployment:
        deployment = await view.client.get_deployment(model.active_deployment)
        replicas.update(r.id for r in deployment.replicas)
    after = lines[-1].id if lines else 0
    since = lines[-1].time if lines else datetime.now(UTC)
    base = f"/projects/{view.project}/models/{view.params['model']}/logs"
    follow = {**chosen.params, "after": str(after), "since": f"{since.timestamp():.6f}"}
    return {
        "title": f"Logs · {kit.last(model.name)}",
        "model": model,
        "model_id": kit.last(model.name),
        "lines": [LogRow.of(line) for line in lines],
        "chosen": chosen,
        "builds": [(str(b.version), f"build {b.version}") for b in builds.items],
        "replica_ids": sorted(replicas),
        "max_lines": MAX_LINES_SHOWN,
        "live_url": f"{base}/live?{urlencode(follow)}",
    }


def _cursor(view: kit.View) -> tuple[int, datetime]:
    """Where a follower starts: after the line numbered ``after`` (or the last one this
    stream sent before the browser reconnected), reading from ``since`` less the margin."""
    after_text = view.query("after", "0")
    after = int(after_text) if after_text.isdecimal() else 0
    resumed = view.request.headers.get("last-event-id", "")
    if resumed.isdecimal():
        after = max(after, int(resumed))
    try:
        since = datetime.fromtimestamp(float(view.query("since", "")), UTC)
    except (ValueError, OverflowError, OSError):
        since = datetime.now(UTC)
    return after, since - timedelta(seconds=FOLLOW_MARGIN_S)


def follow(console: kit.Console) -> Callable[[kit.View], AsyncIterator[str]]:
    async def lines(view: kit.View) -> AsyncIterator[str]:
        chosen = log_filter(view)
        after, since = _cursor(view)
        stream = view.client.model_logs(
            view.model,
            chosen.replica,
            build_name(view, chosen.build),
            since=since,
            follow=True,
        )
        async for line in stream:
            if line.id <= after:
                continue  # on the page already (or sent before a reconnect)
            after = line.id
            html = console.render_blocks(
                "logs.html", view, {"lines": [LogRow.of(line)]}, ("log_rows",)
            )
            # The id lets the browser resume after this line when it reconnects.
            yield f"id: {line.id}\n" + live.sse(
                "append", {"id": "log-lines", "html": html["log_rows"]}
            )

    return lines


def routes(console: kit.Console) -> list[BaseRoute]:
    model = "/projects/{project}/models/{model}"
    return [
        *live.page(
            console,
            f"{model}/monitoring",
            "monitoring.html",
            monitoring,
            watch=every_few_seconds,
            live=("monitoring_figures",),
        ),
        *live.page(console, f"{model}/logs", "logs.html", logs),
        Route(f"{model}/logs/live", live.stream_route(console, follow(console)), methods=["GET"]),
    ]
