"""The in-memory hour of figures, fed with made-up replica readings."""

from __future__ import annotations

import itertools
import time
from dataclasses import replace
from pathlib import Path
from typing import cast

from controlplane.config import Settings
from controlplane.domain.health import HealthRules, Recent
from controlplane.series import STEP_S, Window, quantile
from controlplane.signals import Signals
from controlplane.storage.db import Database
from workers.backend import Backend
from workers.signals import ProxyFigures, ReplicaFigures, latency_bucket

T0 = float(int(time.time()) // 10 * 10 - 300)  # a step boundary, a few minutes ago
BUILD1 = "projects/p/models/m/builds/1"
BUILD2 = "projects/p/models/m/builds/2"


def reading(replica: str, at: float, **kw: object) -> ReplicaFigures:
    base = ReplicaFigures(
        app="p.m",
        replica=replica,
        build=BUILD1,
        node="10.0.0.1",
        pid=100,
        start_time=T0,
        time=at,
        requested_cpus=1.0,
        busy_limit=4,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def lat(ms: float, n: int) -> tuple[tuple[int, int], ...]:
    return ((latency_bucket(ms), n),)


def test_counts_are_differences_between_readings_placed_in_their_step() -> None:
    w = Window(clock=T0 - 1)
    w.add([reading("r1", T0 + 1, requests=5, latency=lat(2, 5))], [], now=T0 + 1)
    w.add([reading("r1", T0 + 11, requests=12, model_errors=2, latency=lat(2, 12))], [])
    s = w.query("p.m", window_s=60, step_s=10, now=T0 + 15)
    by_time = {p.time: p.figures.requests for p in s.model.points}
    assert by_time[T0] == 5 and by_time[T0 + 10] == 7
    assert s.model.totals.requests == 12 and s.model.totals.model_errors == 2
    assert s.model.totals.errors == 2
    assert [r.replica for r in s.replicas] == ["r1"] and s.replicas[0].running


def test_a_replica_that_started_before_the_server_counts_from_its_first_reading() -> None:
    w = Window(clock=T0 + 100)  # the server started after the replica
    w.add([reading("r1", T0 + 101, requests=1000)], [])
    w.add([reading("r1", T0 + 111, requests=1010)], [])
    s = w.query("p.m", window_s=60, now=T0 + 115)
    assert s.model.totals.requests == 10


def test_the_same_reading_twice_counts_once() -> None:
    w = Window(clock=T0 - 1)
    r = reading("r1", T0 + 1, requests=5)
    w.add([r], [])
    w.add([r], [])
    assert w.query("p.m", 60, now=T0 + 5).model.totals.requests == 5


def test_builds_and_replicas_are_apart_and_the_model_is_their_sum() -> None:
    w = Window(clock=T0 - 1)
    w.add(
        [
            reading("old", T0 + 5, requests=100, model_errors=0, latency=lat(3, 100)),
            reading("new", T0 + 5, build=BUILD2, requests=30, model_errors=10, latency=lat(40, 30)),
        ],
        [],
    )
    s = w.query("p.m", 60, now=T0 + 6)
    assert s.builds[BUILD1].totals.requests == 100 and s.builds[BUILD1].totals.errors == 0
    assert s.builds[BUILD2].totals.requests == 30 and s.builds[BUILD2].totals.errors == 10
    assert s.model.totals.requests == 130
    assert s.builds[BUILD2].totals.latency_p50_ms > 36 > s.builds[BUILD1].totals.latency_p99_ms


def test_a_query_for_the_model_alone_gives_the_same_model_figures() -> None:
    """The health judge asks for the model's series only (no builds, no replicas): the
    same model figures, for a fraction of the work."""
    w = Window(clock=T0 - 1)
    w.add(
        [
            reading("old", T0 + 5, requests=100, latency=lat(3, 100)),
            reading("new", T0 + 5, build=BUILD2, requests=30, model_errors=10),
        ],
        [],
    )
    whole = w.query("p.m", 60, now=T0 + 6)
    alone = w.query("p.m", 60, now=T0 + 6, builds=False, replicas=False)
    assert alone.model == whole.model and alone.model.totals.requests == 130
    assert alone.builds == {} and alone.replicas == ()
    builds_only = w.query("p.m", 60, now=T0 + 6, replicas=False)
    assert builds_only.builds == whole.builds and builds_only.replicas == ()


def test_cpu_use_is_cores_on_average_beside_what_was_requested() -> None:
    w = Window(clock=T0 - 1)
    for i in range(7):  # a replica burning half a core for a minute
        w.add([reading("r1", T0 + 10 * i, cpu_seconds=5.0 * i, requested_cpus=2.0)], [])
    s = w.query("p.m", window_s=60, step_s=60, now=T0 + 60)
    assert abs(s.model.totals.cpu_used - 0.5) < 0.01
    assert s.model.totals.cpu_requested == 2.0


def test_refused_requests_come_from_the_proxies_and_belong_to_the_model() -> None:
    w = Window(clock=T0 - 1)
    w.add([reading("r1", T0 + 1, in_flight=4)], [ProxyFigures("p.m", 3, 0)], now=T0 + 1)
    w.add([], [ProxyFigures("p.m", refused=40, queued=9)], now=T0 + 12)
    s = w.query("p.m", 60, now=T0 + 13)
    assert s.model.totals.refused == 37  # the first reading is the base
    assert s.model.totals.queued == 9
    assert s.model.totals.busy_replicas == 1  # 4 in flight of 4 it takes at once
    assert all(b.totals.refused == 0 for b in s.builds.values())


def test_quantiles_come_from_the_buckets() -> None:
    latency = {latency_bucket(1.0): 90, latency_bucket(100.0): 10}
    assert 1.0 <= quantile(latency, 0.5) <= 1.1
    assert 100 <= quantile(latency, 0.95) <= 110
    assert quantile({}, 0.99) == 0.0


def test_steps_older_than_the_horizon_are_forgotten() -> None:
    w = Window(clock=T0 - 1, horizon_s=60)
    w.add([reading("gone", T0 + 1, requests=5)], [], now=T0 + 1)
    w.add([], [], now=T0 + 600)
    assert w.apps() == []
    assert w.query("p.m", 60, now=T0 + 600).replicas == ()


def test_a_query_has_whole_points_of_the_step_asked() -> None:
    w = Window(clock=T0 - 1)
    s = w.query("p.m", window_s=600, step_s=60, now=T0 + 5)
    assert len(s.model.points) == 10 and s.step_s == 60
    assert all(b.time - a.time == 60 for a, b in itertools.pairwise(s.model.points))
    assert s.end - s.start == 600 and s.end > T0 + 5 >= s.end - STEP_S


def test_the_health_judge_reads_the_same_figures_with_one_query_or_two(tmp_path: Path) -> None:
    """With the default rules the errors' window is the usage's, and one query gives both;
    with another usage window, a query of its own: the same errors either way."""
    now = time.time()
    first = float(int(now) // 10 * 10 - 120)

    def recent(rules: HealthRules) -> Recent:
        db, backend = cast(Database, None), cast(Backend, None)  # recent() reads neither
        signals = Signals(db, backend, Settings(data_dir=tmp_path, health_rules=rules))
        signals.window = Window(clock=first - 1)
        for k in range(0, 12):
            at = first + k * 10 + 1
            signals.window.add(
                [
                    reading("r1", at, requests=10 * k, model_errors=k, latency=lat(2, 10 * k)),
                    reading("r2", at, build=BUILD2, requests=5 * k, latency=lat(3, 5 * k)),
                ],
                [],
                now=at,
            )
        return signals.recent("projects/p/models/m")

    one = recent(HealthRules())
    two = recent(HealthRules(provisioning_minutes=20))
    assert one.builds == two.builds
    by_label = {b.build: (b.requests, b.errors) for b in one.builds}
    assert by_label == {"build 1": (110, 11), "build 2": (55, 0)}, one.builds


def test_the_judge_s_brief_says_what_the_full_query_says() -> None:
    """Window.brief (totals, steps covered, each build's errors and its first failing
    step) against the same figures read from a query's points: two builds, errors in
    some steps only, a step nobody reported in, a replica Serve no longer lists, refusals."""
    w = Window(clock=T0 - 1)
    for k in range(0, 24):
        if k == 7:
            continue  # no reading in this step
        at = T0 + k * 10 + 1
        errs = 3 * sum(1 for failed in (9, 15) if failed <= k)  # counters: cumulative
        figures = [
            reading("r1", at, requests=10 * k, model_errors=errs, latency=lat(2, 10 * k)),
            reading("r2", at, build=BUILD2, requests=5 * k, server_errors=k // 12, cpu_seconds=k),
        ]
        if k < 20:
            figures.append(reading("r3", at, requests=k, requested_gpus=1.0, gpu_used=0.5))
        w.add(figures, [ProxyFigures(app="p.m", refused=k // 5, queued=k % 3)], now=at)
    now = T0 + 24 * 10 + 3
    for window_s in (60, 120, 600, 3600):
        for alive in (None, frozenset({"r1", "r2"})):
            brief = w.brief("p.m", window_s, now=now, alive=alive)
            full = w.query("p.m", window_s, STEP_S, now=now, alive=alive, replicas=False)
            assert brief.totals == full.model.totals, window_s
            assert brief.covered_steps == sum(1 for p in full.model.points if p.figures.replicas)
            assert set(brief.builds) == set(full.builds) == {BUILD1, BUILD2}
            for build, series in full.builds.items():
                failing = [p.time for p in series.points if p.figures.errors]
                got = brief.builds[build]
                assert (got.requests, got.errors) == (series.totals.requests, series.totals.errors)
                assert got.first_error == (failing[0] if failing else None), (window_s, build)
    assert w.brief("p.m", 600, now=now).builds[BUILD1].first_error == T0 + 90
    assert w.brief("other.app", 600, now=now).covered_steps == 0
