"""The last hour of every model's figures, in memory, at 10-second steps.

Fed with the replicas' cumulative figures (``workers.signals.ReplicaFigures``) and the
proxies' refused counts each time the server reads the collector; each reading adds its
difference from the one before to the step it falls in. Queried for a model, a build or
a replica over a window, with points of any multiple of the step. Nothing is written to
disk: Prometheus (the server's /metrics) keeps what must outlive the hour or the server.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from controlplane.domain.figures import (
    Figures,
    ModelSeries,
    Point,
    ReplicaSeries,
    Series,
)
from workers.signals import ProxyFigures, ReplicaFigures, bucket_bound_ms

STEP_S = 10
HORIZON_S = 3600
REPORTING_S = 10  # a replica that reported this recently runs (it reports every second)


@dataclass
class Step:
    """One replica's (or one model's proxies') figures over one step."""

    requests: int = 0
    model_errors: int = 0
    client_errors: int = 0
    server_errors: int = 0
    refused: int = 0
    latency: dict[int, int] = field(default_factory=dict)
    in_flight: int = 0  # the most seen
    queued: int = 0  # the most seen
    busy: bool = False  # the replica took as many requests as it takes at once
    cpu_seconds: float = 0.0
    rss_bytes: int = 0  # the last seen
    gpu_used: float = -1.0
    requested_cpus: float = 0.0
    requested_memory_bytes: int = 0
    requested_gpus: float = 0.0


@dataclass
class _Track:
    """One replica: its last cumulative figures and its steps."""

    last: ReplicaFigures
    steps: dict[int, Step] = field(default_factory=dict)


@dataclass
class _Proxies:
    last_refused: int | None = None
    steps: dict[int, Step] = field(default_factory=dict)


def quantile(latency: Mapping[int, int], q: float) -> float:
    """The upper bound of the bucket holding the q-quantile (within 10%), in ms."""
    total = sum(latency.values())
    if not total:
        return 0.0
    rank = q * total
    seen = 0
    for bucket in sorted(latency):
        seen += latency[bucket]
        if seen >= rank:
            return round(bucket_bound_ms(bucket), 3)
    return round(bucket_bound_ms(max(latency)), 3)


def _delta(before: ReplicaFigures, after: ReplicaFigures) -> Step:
    latency = dict(after.latency)
    for bucket, count in before.latency:
        latency[bucket] = latency.get(bucket, 0) - count
    return Step(
        requests=after.requests - before.requests,
        model_errors=after.model_errors - before.model_errors,
        client_errors=after.client_errors - before.client_errors,
        server_errors=after.server_errors - before.server_errors,
        latency={b: n for b, n in latency.items() if n > 0},
        cpu_seconds=max(0.0, after.cpu_seconds - before.cpu_seconds),
    )


def _zero(f: ReplicaFigures) -> ReplicaFigures:
    """A replica's figures when it started: nothing counted yet (read just before ``f``)."""
    at = min(f.start_time, f.time) - 1e-6
    return ReplicaFigures(f.app, f.replica, f.build, f.node, f.pid, f.start_time, at)


class Window:
    def __init__(self, clock: float | None = None, horizon_s: int = HORIZON_S) -> None:
        # Replicas that started before this server did: their counts so far are not ours
        # to place in time (the first reading is their baseline).
        self.started = time.time() if clock is None else clock
        self.horizon_s = horizon_s
        self._replicas: dict[str, dict[str, _Track]] = {}  # app -> replica -> track
        self._proxies: dict[str, _Proxies] = {}
        # Since this server started, never forgotten (Prometheus counters): by (app, build)
        # the requests by outcome and their latency buckets; by app the refused requests.
        self.counted: dict[tuple[str, str], Step] = {}
        self.refused: dict[str, int] = {}

    def apps(self) -> list[str]:
        return sorted(set(self._replicas) | set(self._proxies))

    def add(
        self,
        figures: Iterable[ReplicaFigures],
        proxies: Iterable[ProxyFigures],
        now: float | None = None,
    ) -> None:
        """Readings of replicas (each at its own time) and of proxies (read ``now``)."""
        now = time.time() if now is None else now
        for f in figures:
            tracks = self._replicas.setdefault(f.app, {})
            track = tracks.get(f.replica)
            if track is None:
                first = _zero(f) if f.start_time >= self.started else f
                track = tracks[f.replica] = _Track(first)
            if f.time <= track.last.time:
                continue  # seen already (the collector keeps each replica's newest)
            self._place(track, f)
        for p in proxies:
            self._place_proxies(p, now)
        self._forget(now - self.horizon_s)

    def _place(self, track: _Track, f: ReplicaFigures) -> None:
        if f.requests < track.last.requests:  # cannot happen; a counter reset: a new base
            track.last = _zero(f)
        step = _delta(track.last, f)
        at = int(f.time // STEP_S)
        s = track.steps.setdefault(at, Step())
        for into in (s, self.counted.setdefault((f.app, f.build), Step())):
            into.requests += step.requests
            into.model_errors += step.model_errors
            into.client_errors += step.client_errors
            into.server_errors += step.server_errors
            for b, n in step.latency.items():
                into.latency[b] = into.latency.get(b, 0) + n
        s.cpu_seconds += step.cpu_seconds
        s.in_flight = max(s.in_flight, f.in_flight)
        s.busy = s.busy or f.at_limit
        s.rss_bytes = f.rss_bytes
        s.gpu_used = f.gpu_used
        s.requested_cpus = f.requested_cpus
        s.requested_memory_bytes = f.requested_memory_bytes
        s.requested_gpus = f.requested_gpus
        track.last = f

    def _place_proxies(self, p: ProxyFigures, now: float) -> None:
        track = self._proxies.setdefault(p.app, _Proxies())
        at = int(now // STEP_S)
        s = track.steps.setdefault(at, Step())
        if track.last_refused is not None and p.refused >= track.last_refused:
            s.refused += p.refused - track.last_refused
            self.refused[p.app] = self.refused.get(p.app, 0) + p.refused - track.last_refused
        track.last_refused = p.refused
        s.queued = max(s.queued, p.queued)

    def _forget(self, horizon: float) -> None:
        oldest = int(horizon // STEP_S)
        for app, tracks in list(self._replicas.items()):
            for replica, track in list(tracks.items()):
                for at in [a for a in track.steps if a < oldest]:
                    del track.steps[at]
                if not track.steps and track.last.time < horizon:
                    del tracks[replica]
            if not tracks:
                del self._replicas[app]
        for app, proxies in list(self._proxies.items()):
            for at in [a for a in proxies.steps if a < oldest]:
                del proxies.steps[at]
            if not proxies.steps:
                del self._proxies[app]

    def query(
        self,
        app: str,
        window_s: int = HORIZON_S,
        step_s: int = STEP_S,
        now: float | None = None,
        alive: Collection[str] | None = None,
        builds: bool = True,
        replicas: bool = True,
    ) -> ModelSeries:
        """The figures of ``app`` over the last ``window_s``, in points of ``step_s``.
        ``alive``: the replicas Serve lists now, when known; a replica that reported lately
        but is not among them has stopped (its last report may be seconds old).
        ``builds``/``replicas`` False: those series are left empty (a caller that reads
        only the model's figures, as the health judge does for every model, pays for
        those alone)."""
        now = time.time() if now is None else now
        running = _running(now, alive)
        step_s, window_s, first, last = self._span(window_s, step_s, now)
        per_point = step_s // STEP_S
        count = (last - first + 1) // per_point
        tracks = self._replicas.get(app, {})
        proxies = self._proxies.get(app, _Proxies())

        def series(chosen: list[_Track], with_proxies: bool) -> Series:
            points = []
            for k in range(count):
                lo = first + k * per_point
                points.append(
                    Point(
                        lo * STEP_S,
                        _sum(chosen, proxies if with_proxies else None, lo, lo + per_point, step_s),
                    )
                )
            totals = _sum(chosen, proxies if with_proxies else None, first, last + 1, window_s)
            live = [t for t in chosen if running(t)]
            current = _current(live, proxies if with_proxies else None, last)
            totals = _with_current(totals, current)
            return Series(totals, tuple(points))

        everything = list(tracks.values())
        by_build: dict[str, list[_Track]] = {}
        for t in everything if builds else ():
            by_build.setdefault(t.last.build, []).append(t)
        per_replica = tuple(
            ReplicaSeries(
                replica=t.last.replica,
                build=t.last.build,
                node=t.last.node,
                pid=t.last.pid,
                running=running(t),
                series=series([t], False),
            )
            for t in sorted(
                everything if replicas else (), key=lambda t: (t.last.build, t.last.start_time)
            )
            if any(first <= at <= last for at in t.steps) or running(t)
        )
        return ModelSeries(
            app=app,
            start=first * STEP_S,
            end=(last + 1) * STEP_S,
            step_s=step_s,
            model=series(everything, True),
            builds={b: series(ts, False) for b, ts in sorted(by_build.items())},
            replicas=per_replica,
        )

    def brief(
        self,
        app: str,
        window_s: int,
        now: float | None = None,
        alive: Collection[str] | None = None,
    ) -> Brief:
        """What the health judge reads of ``app`` over the last ``window_s`` (points of
        ``STEP_S``), as ``query`` would give it, without making the points (the judge
        reads every model every few seconds: the points were ~95% of its cost)."""
        now = time.time() if now is None else now
        running = _running(now, alive)
        _, window_s, first, last = self._span(window_s, STEP_S, now)
        tracks = list(self._replicas.get(app, {}).values())
        proxies = self._proxies.get(app, _Proxies())
        totals = _sum(tracks, proxies, first, last + 1, window_s)
        live = [t for t in tracks if running(t)]
        totals = _with_current(totals, _current(live, proxies, last))
        by_build: dict[str, list[_Track]] = {}
        for t in tracks:
            by_build.setdefault(t.last.build, []).append(t)
        builds = {}
        for build, ts in sorted(by_build.items()):
            counted = _sum(ts, None, first, last + 1, window_s)
            failing = [
                at
                for t in ts
                for at, step in t.steps.items()
                if first <= at <= last and step.model_errors + step.server_errors > 0
            ]
            since = min(failing) * STEP_S if failing else None
            builds[build] = BuildBrief(counted.requests, counted.errors, since)
        covered = {at for t in tracks for at in t.steps if first <= at <= last}
        return Brief(totals, len(covered), builds)

    def _span(self, window_s: int, step_s: int, now: float) -> tuple[int, int, int, int]:
        """(step_s, window_s, first step, last step) of a query: the step a multiple of
        ``STEP_S``, the window at least a step and at most the horizon, ending at the step
        that holds ``now``."""
        step_s = max(STEP_S, step_s - step_s % STEP_S)
        window_s = min(max(window_s, step_s), self.horizon_s)
        last = int(now // STEP_S)
        count = -(-window_s // step_s)
        return step_s, window_s, last - count * (step_s // STEP_S) + 1, last


@dataclass(frozen=True)
class BuildBrief:
    requests: int
    errors: int
    first_error: float | None  # the start of its first step with errors, unix seconds


@dataclass(frozen=True)
class Brief:
    """A model over a window, as the health judge reads it (``Window.brief``)."""

    totals: Figures  # as ``query``'s model totals
    covered_steps: int  # steps in which some replica reported
    builds: dict[str, BuildBrief]


def _running(now: float, alive: Collection[str] | None) -> Callable[[_Track], bool]:
    """Whether a replica runs: it reported lately, and Serve lists it (when known: a
    replica that reported lately but is not among ``alive`` has stopped)."""

    def running(t: _Track) -> bool:
        recent = t.last.time >= now - REPORTING_S
        return recent and (alive is None or t.last.replica in alive)

    return running


def _sum(tracks: list[_Track], proxies: _Proxies | None, lo: int, hi: int, seconds: int) -> Figures:
    """Figures of ``tracks`` over steps [lo, hi): counts added, gauges at their most."""
    requests = model_errors = client_errors = server_errors = refused = 0
    latency: dict[int, int] = {}
    cpu = 0.0
    in_flight = queued = 0
    last_steps: list[Step] = []
    busy = 0
    for t in tracks:
        mine = [t.steps[a] for a in range(lo, hi) if a in t.steps]
        if not mine:
            continue
        last_steps.append(mine[-1])
        busy += any(s.busy for s in mine)
        in_flight += max(s.in_flight for s in mine)
        for s in mine:
            requests += s.requests
            model_errors += s.model_errors
            client_errors += s.client_errors
            server_errors += s.server_errors
            cpu += s.cpu_seconds
            for b, n in s.latency.items():
                latency[b] = latency.get(b, 0) + n
    if proxies is not None:
        for a in range(lo, hi):
            if a in proxies.steps:
                refused += proxies.steps[a].refused
                queued = max(queued, proxies.steps[a].queued)
    return Figures(
        requests=requests,
        model_errors=model_errors,
        client_errors=client_errors,
        server_errors=server_errors,
        refused=refused,
        in_flight=in_flight,
        queued=queued,
        latency_p50_ms=quantile(latency, 0.50),
        latency_p95_ms=quantile(latency, 0.95),
        latency_p99_ms=quantile(latency, 0.99),
        cpu_used=round(cpu / seconds, 4) if seconds else 0.0,
        **_resources(last_steps),
        replicas=len(last_steps),
        busy_replicas=busy,
    )


def _resources(steps: list[Step]) -> dict[str, Any]:
    measured = [s.gpu_used for s in steps if s.gpu_used >= 0]
    return {
        "cpu_requested": round(sum(s.requested_cpus for s in steps), 4),
        "memory_rss_bytes": sum(s.rss_bytes for s in steps),
        "memory_requested_bytes": sum(s.requested_memory_bytes for s in steps),
        "gpu_used": round(sum(measured), 4) if measured else -1.0,
        "gpu_requested": round(sum(s.requested_gpus for s in steps), 4),
    }


def _current(live: list[_Track], proxies: _Proxies | None, last: int) -> Figures:
    """What holds now: requests in flight and queued, replicas' memory and requests."""
    steps = [t.steps[max(t.steps)] for t in live if t.steps]
    queued = 0
    if proxies is not None and proxies.steps:
        newest = max(proxies.steps)
        queued = proxies.steps[newest].queued if newest >= last - 1 else 0
    return Figures(
        in_flight=sum(t.last.in_flight for t in live),
        queued=queued,
        **_resources(steps),
        replicas=len(live),
    )


def _with_current(totals: Figures, now: Figures) -> Figures:
    return replace(
        totals,
        in_flight=now.in_flight,
        queued=now.queued,
        cpu_requested=now.cpu_requested,
        memory_rss_bytes=now.memory_rss_bytes,
        memory_requested_bytes=now.memory_requested_bytes,
        gpu_used=now.gpu_used if now.gpu_used >= 0 else totals.gpu_used,
        gpu_requested=now.gpu_requested,
        replicas=now.replicas,
    )
