"""Serve's proxies' metrics pages are read at every reading while something presses, and
every ten seconds otherwise (a page holds every replica's metrics: megabytes)."""

from __future__ import annotations

from workers.signals import ProxyFigures, ProxyPace, ReplicaFigures


def replica(in_flight: int, busy_limit: int = 4) -> ReplicaFigures:
    return ReplicaFigures(
        app="p.m",
        replica="r1",
        build="projects/p/models/m/builds/1",
        node="10.0.0.1",
        pid=100,
        start_time=0.0,
        time=1.0,
        in_flight=in_flight,
        busy_limit=busy_limit,
    )


def test_read_first_then_every_idle_period_while_nothing_presses() -> None:
    pace = ProxyPace(idle_s=10)
    assert pace.due(0.0, [])
    pace.read(0.0, [ProxyFigures("p.m", refused=3, queued=0)])
    assert not pace.due(1.0, [replica(1)])
    assert not pace.due(9.9, [replica(3)])
    assert pace.due(10.0, [])


def test_a_busy_replica_makes_every_reading_due() -> None:
    pace = ProxyPace(idle_s=10)
    pace.read(0.0, [])
    assert pace.due(1.0, [replica(1), replica(4)])  # one at its limit
    assert not pace.due(1.0, [replica(5, busy_limit=0)])  # no limit known


def test_queued_or_newly_refused_requests_keep_the_readings_coming() -> None:
    pace = ProxyPace(idle_s=10)
    pace.read(0.0, [ProxyFigures("p.m", refused=3, queued=0)])
    pace.read(10.0, [ProxyFigures("p.m", refused=3, queued=2)])
    assert pace.due(11.0, [])  # queued at the last reading
    pace.read(11.0, [ProxyFigures("p.m", refused=5, queued=0)])
    assert pace.due(12.0, [])  # refused since the reading before
    pace.read(12.0, [ProxyFigures("p.m", refused=5, queued=0)])
    assert not pace.due(13.0, [])  # calm again
    pace.read(20.0, [ProxyFigures("p.m", refused=5, queued=0), ProxyFigures("p.n", 7, 0)])
    assert not pace.due(21.0, [])  # an application seen first: its count is no news
