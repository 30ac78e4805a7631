"""Plans (domain/plan.py): the change class and its causes, the replicas counted, and the
fit node by node, for every kind of change."""

from __future__ import annotations

from dataclasses import replace

import pytest

from controlplane.domain.plan import (
    ChangeClass,
    Need,
    Node,
    Running,
    Side,
    causes,
    place,
    plan,
    replicas_after,
)
from controlplane.domain.scaling import Autoscaling


def side(**kw: object) -> Side:
    base: dict[str, object] = {
        "build": "projects/p/models/m/builds/1",
        "replicas": 2,
        "need": Need(0.5, 0.0, 0),
        "autoscaling": None,
        "environment": {},
        "secrets": {},
        "restart_generation": 0,
    }
    return Side(**{**base, **kw})  # type: ignore[arg-type]


def node(name: str, cpus: float, gpus: float = 0.0, mem: int = 8192, total: float = 4) -> Node:
    return Node(name, total, cpus, max(gpus, 2.0) if gpus else 0.0, gpus, 16384, mem)


HEAD = node("10.0.0.1", 2.0)
WORKER = node("10.0.0.2", 1.0, gpus=2.0)
NODES = (HEAD, WORKER)


def running(s: Side, *where: str) -> Running:
    return Running(s, tuple((f"r{i}", w) for i, w in enumerate(where)))


def test_more_replicas_is_in_place_and_adds_only_the_difference() -> None:
    before = running(side(), "10.0.0.1", "10.0.0.2")
    p = plan(before, side(replicas=3), NODES)
    assert p.change_class is ChangeClass.IN_PLACE
    assert (p.kept, p.replaced, p.removed, p.added, p.after) == (2, 0, 0, 1, 3)
    assert [c.field for c in p.causes] == ["resources.replicas"]
    assert p.current == ("r0", "r1")
    assert p.fit is not None and p.fit.fits and p.fit.to_place == 1


def test_fewer_replicas_stops_the_difference_and_needs_no_room() -> None:
    before = running(side(replicas=3), "a", "a", "a")
    p = plan(before, side(replicas=1), (node("a", 0.0),))
    assert p.change_class is ChangeClass.IN_PLACE
    assert (p.kept, p.removed, p.added, p.after) == (1, 2, 0, 1)
    assert p.fit is not None and p.fit.fits and p.fit.to_place == 0


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"build": "projects/p/models/m/builds/2"}, "build"),
        ({"need": Need(1.0, 0.0, 0)}, "resources.cpus"),
        ({"need": Need(0.5, 1.0, 0)}, "resources.gpus"),
        ({"need": Need(0.5, 0.0, 512)}, "resources.memory_mib"),
        ({"environment": {"MODE": "fast"}}, "environment[MODE]"),
        ({"secrets": {"TOKEN": "x"}}, "secret_environment[TOKEN]"),
    ],
)
def test_what_rolls_names_its_cause(change: dict[str, object], field: str) -> None:
    before = running(side(), "10.0.0.1", "10.0.0.1")
    p = plan(before, replace(side(), **change), NODES)  # type: ignore[arg-type]
    assert p.change_class is ChangeClass.ROLLING
    assert [c.field for c in p.causes] == [field]
    assert (p.kept, p.replaced, p.added, p.after) == (0, 2, 0, 2)


def test_a_secret_value_never_appears_in_a_cause() -> None:
    rolling, _ = causes(side(secrets={"K": "old-secret"}), side(secrets={"K": "new-secret"}))
    assert [(c.field, c.before, c.after) for c in rolling] == [
        ("secret_environment[K]", "(set)", "(changed)")
    ]


def test_switching_to_autoscaling_and_changing_bounds_are_in_place() -> None:
    a = Autoscaling(1, 4, 2.0, 0.0, 60.0)
    before = running(side(), "10.0.0.1", "10.0.0.1")
    p = plan(before, side(autoscaling=a, replicas=0), NODES)
    assert p.change_class is ChangeClass.IN_PLACE
    assert p.after == 2 and p.kept == 2  # the count it has, within the bounds
    assert [(c.field, c.before, c.after) for c in p.causes] == [
        ("resources.replicas", "2", "autoscaling 1-4")
    ]
    narrower = replace(a, target_ongoing_requests=5.0)
    p2 = plan(running(side(autoscaling=a), "x", "x"), side(autoscaling=narrower), NODES)
    assert p2.change_class is ChangeClass.IN_PLACE
    assert [c.field for c in p2.causes] == ["resources.autoscaling"]
    assert plan(running(side(autoscaling=a), "x"), side(autoscaling=a), NODES).causes == ()


def test_an_autoscaled_count_follows_its_bounds() -> None:
    a = Autoscaling(0, 3)
    assert replicas_after(None, side(autoscaling=a, replicas=0)) == 1  # proves the build
    assert replicas_after(None, side(autoscaling=a, replicas=2)) == 2
    assert replicas_after(5, side(autoscaling=a)) == 3
    assert replicas_after(0, side(autoscaling=a)) == 0


def test_restart_replaces_every_replica_and_needs_room_for_one_more() -> None:
    s = side(need=Need(1.0, 0.0, 0))
    before = running(s, "10.0.0.1", "10.0.0.1")
    full = (node("10.0.0.1", 0.0, total=2),)
    p = plan(before, s, full, restart=True)
    assert p.change_class is ChangeClass.RESTART
    assert [c.field for c in p.causes] == ["restart_generation"]
    assert (p.replaced, p.after) == (2, 2)
    assert p.fit is not None and not p.fit.fits
    assert "no node has room for one more of 1 CPU" in p.fit.reason
    roomy = (node("10.0.0.1", 1.0, total=3),)
    assert plan(before, s, roomy, restart=True).fit.fits  # type: ignore[union-attr]


def test_a_rolling_change_counts_what_the_old_replicas_give_back() -> None:
    # Two replicas of 1 CPU on a 3-CPU node with 1 free: 2 new ones of 1.5 CPU fit once
    # the old ones are gone, and the first starts beside them.
    old = side(need=Need(1.0, 0.0, 0))
    before = running(old, "n", "n")
    p = plan(before, replace(old, need=Need(1.5, 0.0, 0)), (node("n", 1.0, total=3),))
    assert p.fit is not None and not p.fit.fits  # 1.5 > 1 free: the first cannot start
    p = plan(before, replace(old, need=Need(0.5, 0.0, 0)), (node("n", 1.0, total=3),))
    assert p.fit is not None and p.fit.fits


def test_a_gpu_replica_is_never_split_over_nodes() -> None:
    # 1 GPU free on each of two nodes: a replica of 2 GPUs fits on neither.
    nodes = (node("a", 4.0, gpus=1.0), node("b", 4.0, gpus=1.0))
    p = plan(None, side(replicas=1, need=Need(0.5, 2.0, 0)), nodes)
    assert p.change_class is ChangeClass.START
    assert p.fit is not None and not p.fit.fits
    assert p.fit.placed == 0 and "1 of 1 new replicas (0.5 CPU, 2 GPU each)" in p.fit.reason
    assert "a 4/4 CPU 1/2 GPU" in p.fit.reason


def test_gpu_replicas_go_to_the_node_with_gpus() -> None:
    p = plan(None, side(replicas=2, need=Need(0.5, 1.0, 0)), NODES)
    assert p.fit is not None and p.fit.fits
    placed = {n.node.node: n.new_replicas for n in p.fit.nodes}
    assert placed == {"10.0.0.1": 0, "10.0.0.2": 2}
    three = plan(None, side(replicas=3, need=Need(0.2, 1.0, 0)), NODES)
    assert three.fit is not None and not three.fit.fits and three.fit.placed == 2


def test_memory_counts_too() -> None:
    p = plan(None, side(replicas=1, need=Need(0.1, 0.0, 9000)), (node("a", 4.0, mem=8192),))
    assert p.fit is not None and not p.fit.fits and "9000 MiB" in p.fit.reason


def test_a_stop_removes_every_replica() -> None:
    p = plan(running(side(), "a", "b"), None, NODES)
    assert p.change_class is ChangeClass.STOP
    assert (p.removed, p.after, p.added) == (2, 0, 0)
    assert p.fit is not None and p.fit.fits


def test_a_new_build_is_a_rebuild_of_what_serves() -> None:
    p = plan(running(side(), "a", "a"), side(), NODES, rebuild=True)
    assert p.change_class is ChangeClass.REBUILD
    assert p.causes[0].field == "build" and p.causes[0].after == "a new build from source"
    assert p.replaced == 2
    first = plan(None, side(), NODES, rebuild=True)
    assert first.change_class is ChangeClass.REBUILD and first.added == 2


def test_a_canary_adds_its_replicas_beside_the_serving_ones() -> None:
    s = side(need=Need(1.0, 0.0, 0))
    p = plan(running(s, "10.0.0.1"), replace(s, build="b2"), NODES, candidate=True)
    assert p.change_class is ChangeClass.ROLLING
    assert (p.kept, p.added, p.replaced) == (1, 2, 0)  # its own count, beside
    assert p.fit is not None and p.fit.fits and p.fit.to_place == 2
    assert "promoted" in p.summary


def test_without_nodes_there_is_no_fit() -> None:
    p = plan(running(side(), "a"), side(replicas=3), None)
    assert p.fit is None and "fits" not in p.summary


def test_room_for_an_autoscaled_deployment() -> None:
    a = Autoscaling(1, 10)
    fit = place((node("a", 2.0), node("b", 1.0)), Need(0.5, 0.0, 0), 1, autoscaling=a, staying=1)
    assert fit.fits and fit.room_for == 7  # 1 running + 6 more fit


def test_the_summary_says_it_in_a_line() -> None:
    before = running(side(), "a", "a")
    p = plan(before, side(replicas=3), (node("a", 4.0),))
    assert p.summary == (
        "in place: 2 kept, 1 added; 3 replicas after (resources.replicas 2 -> 3); fits"
    )
