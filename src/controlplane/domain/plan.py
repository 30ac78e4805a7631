"""What a change will do to a model's replicas, and whether the cluster has room for it.

Pure functions over typed snapshots: the deployment that runs now (with its replicas and
the nodes they are on), the one the change asks for, and each node's free resources.
``plan`` returns the change class and its causes (which field makes it roll), the
replicas kept, replaced, removed and added, and a ``Fit``: the new replicas placed node
by node (a replica is never split over nodes; replicas of one deployment are all alike,
so counting how many fit on each node decides it exactly).

A rolling change (Serve with ``max_surge_percent=100``) starts new replicas before old
ones stop and stops an old one only once a new one runs: it needs room for one new
replica beside all the old ones to start, and room for all the new ones once the old
ones are gone to finish.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from controlplane.domain.scaling import Autoscaling


class ChangeClass(StrEnum):
    IN_PLACE = "IN_PLACE"  # replicas kept; their count, bounds or keys change
    ROLLING = "ROLLING"  # every replica replaced (build, resources, environment)
    RESTART = "RESTART"  # every replica re-initialized, nothing else changes
    REBUILD = "REBUILD"  # a new build from source, then rolled out
    STOP = "STOP"  # every replica stops
    START = "START"  # nothing served: every replica is new


@dataclass(frozen=True)
class Cause:
    field: str
    before: str
    after: str


@dataclass(frozen=True)
class Node:
    node: str
    cpus_total: float
    cpus_free: float
    gpus_total: float
    gpus_free: float
    memory_total_mib: int
    memory_free_mib: int


@dataclass(frozen=True)
class Need:
    """What one replica reserves."""

    cpus: float
    gpus: float
    memory_mib: int

    def words(self) -> str:
        parts = [f"{self.cpus:g} CPU"]
        if self.gpus:
            parts.append(f"{self.gpus:g} GPU")
        if self.memory_mib:
            parts.append(f"{self.memory_mib} MiB")
        return ", ".join(parts)

    def fits_in(self, cpus: float, gpus: float, memory_mib: float) -> int:
        """How many replicas fit in that much (a large number when it asks for nothing)."""
        counts = [
            math.floor(have / want + 1e-9) if want > 0 else 10**6
            for have, want in ((cpus, self.cpus), (gpus, self.gpus), (memory_mib, self.memory_mib))
        ]
        return max(0, min(counts))


@dataclass(frozen=True)
class NodeFit:
    node: Node  # as it is now, plus what the stopped replicas give back
    new_replicas: int  # placed here by the plan


@dataclass(frozen=True)
class Fit:
    fits: bool
    reason: str
    need: Need
    to_place: int
    placed: int
    nodes: tuple[NodeFit, ...]
    room_for: int = 0  # an autoscaled deployment: replicas it can have at most now


@dataclass(frozen=True)
class Side:
    """A deployment as it runs, or as a change would run it."""

    build: str
    replicas: int  # a fixed count, or to start with (autoscaling)
    need: Need
    autoscaling: Autoscaling | None
    environment: Mapping[str, str]
    secrets: Mapping[str, str]  # name -> value id (never the value)
    restart_generation: int


@dataclass(frozen=True)
class Running:
    side: Side
    replicas: tuple[tuple[str, str], ...]  # (id, node) of each replica running now


@dataclass(frozen=True)
class Plan:
    change_class: ChangeClass
    causes: tuple[Cause, ...]
    current: tuple[str, ...]  # ids of the replicas running now
    kept: int
    replaced: int
    removed: int
    added: int
    after: int  # replicas once done
    fit: Fit | None
    summary: str
    notes: tuple[str, ...] = field(default_factory=tuple)


# ---- what changes ---------------------------------------------------------------------------


def _count(s: Side) -> str:
    a = s.autoscaling
    return str(s.replicas) if a is None else f"autoscaling {a.min_replicas}-{a.max_replicas}"


def causes(before: Side, after: Side) -> tuple[tuple[Cause, ...], tuple[Cause, ...]]:
    """The fields that differ: those that roll every replica, and those changed in place."""
    rolling: list[Cause] = []
    if before.build != after.build:
        rolling.append(Cause("build", before.build, after.build))
    for name, b, a in (
        ("resources.cpus", before.need.cpus, after.need.cpus),
        ("resources.gpus", before.need.gpus, after.need.gpus),
        ("resources.memory_mib", before.need.memory_mib, after.need.memory_mib),
    ):
        if b != a:
            rolling.append(Cause(name, f"{b:g}", f"{a:g}"))
    for key in sorted(set(before.environment) | set(after.environment)):
        b_env, a_env = before.environment.get(key), after.environment.get(key)
        if b_env != a_env:
            rolling.append(Cause(f"environment[{key}]", b_env or "(unset)", a_env or "(unset)"))
    for key in sorted(set(before.secrets) | set(after.secrets)):
        b_sec, a_sec = before.secrets.get(key), after.secrets.get(key)
        if b_sec != a_sec:
            was = "(unset)" if b_sec is None else "(set)"
            now = "(unset)" if a_sec is None else ("(changed)" if b_sec is not None else "(set)")
            rolling.append(Cause(f"secret_environment[{key}]", was, now))
    in_place: list[Cause] = []
    if _count(before) != _count(after) or (
        before.autoscaling is None and before.replicas != after.replicas
    ):
        in_place.append(Cause("resources.replicas", _count(before), _count(after)))
    ba, aa = before.autoscaling, after.autoscaling
    if ba is not None and aa is not None and ba != aa and _count(before) == _count(after):
        in_place.append(Cause("resources.autoscaling", ba.words(), aa.words()))
    return tuple(rolling), tuple(in_place)


def replicas_after(before: int | None, after: Side) -> int:
    """How many replicas the deployment has once the change is done: the count; an
    autoscaled one keeps how many run now within its bounds (or starts with its
    initial count)."""
    a = after.autoscaling
    if a is None:
        return after.replicas
    if before is None:
        return a.initial(after.replicas)
    return min(max(before, a.min_replicas), a.max_replicas)


# ---- room on the nodes ----------------------------------------------------------------------


def _given_back(
    nodes: Sequence[Node], stopped: Sequence[str], need: Need | None
) -> tuple[Node, ...]:
    """The nodes with what the ``stopped`` replicas (their node names) give back."""
    if need is None or not stopped:
        return tuple(nodes)
    out = []
    for n in nodes:
        k = sum(1 for where in stopped if where == n.node)
        out.append(
            Node(
                n.node,
                n.cpus_total,
                min(n.cpus_total, n.cpus_free + k * need.cpus),
                n.gpus_total,
                min(n.gpus_total, n.gpus_free + k * need.gpus),
                n.memory_total_mib,
                min(n.memory_total_mib, n.memory_free_mib + k * need.memory_mib),
            )
        )
    return tuple(out)


def _room(n: Node, need: Need) -> int:
    return need.fits_in(n.cpus_free, n.gpus_free, n.memory_free_mib)


def _free_words(nodes: Sequence[Node], need: Need) -> str:
    def one(n: Node) -> str:
        parts = [f"{n.cpus_free:g}/{n.cpus_total:g} CPU"]
        if need.gpus or n.gpus_total:
            parts.append(f"{n.gpus_free:g}/{n.gpus_total:g} GPU")
        if need.memory_mib:
            parts.append(f"{n.memory_free_mib}/{n.memory_total_mib} MiB")
        return f"{n.node} {' '.join(parts)}"

    return "; ".join(one(n) for n in nodes) or "no live node"


def place(
    nodes: Sequence[Node],
    need: Need,
    to_place: int,
    stopped: Sequence[str] = (),
    stopped_need: Need | None = None,
    surge: bool = False,
    autoscaling: Autoscaling | None = None,
    staying: int = 0,
) -> Fit:
    """Places ``to_place`` replicas of ``need`` on ``nodes`` once the ``stopped`` replicas
    (the nodes they run on, each reserving ``stopped_need``) are gone. With ``surge``
    (a rolling change), one of them must also fit before any old one stops.
    ``staying``: replicas of the deployment that keep running (an autoscaled one's room
    counts them)."""
    after = _given_back(nodes, stopped, stopped_need)
    left = to_place
    placed: list[NodeFit] = []
    for n in sorted(after, key=lambda n: -_room(n, need)):
        k = min(left, _room(n, need))
        left -= k
        placed.append(NodeFit(n, k))
    by_name = {p.node.node: p for p in placed}
    fits_nodes = tuple(by_name[n.node] for n in after)
    room = staying + sum(_room(n, need) for n in after)
    room_for = min(room, autoscaling.max_replicas) if autoscaling is not None else 0
    reason = ""
    if left:
        reason = (
            f"{left} of {to_place} new replicas ({need.words()} each) fit on no node; "
            f"free now: {_free_words(after, need)}"
        )
    elif surge and to_place and stopped and not any(_room(n, need) for n in nodes):
        reason = (
            "a rolling change starts a new replica before an old one stops, and no node "
            f"has room for one more of {need.words()}; free now: {_free_words(nodes, need)}"
        )
    return Fit(
        fits=not reason,
        reason=reason,
        need=need,
        to_place=to_place,
        placed=to_place - left,
        nodes=fits_nodes,
        room_for=room_for,
    )


# ---- the plan -------------------------------------------------------------------------------


def _summary(cls: ChangeClass, p: Plan, fit: Fit | None) -> str:
    what = {
        ChangeClass.IN_PLACE: "in place",
        ChangeClass.ROLLING: "rolling",
        ChangeClass.RESTART: "restart",
        ChangeClass.REBUILD: "rebuild, then rolling",
        ChangeClass.STOP: "stop",
        ChangeClass.START: "start",
    }[cls]
    counts = []
    for n, word in (
        (p.kept, "kept"),
        (p.replaced, "replaced"),
        (p.removed, "stopped"),
        (p.added, "added"),
    ):
        if n:
            counts.append(f"{n} {word}")
    why = ", ".join(f"{c.field} {c.before} -> {c.after}" for c in p.causes[:3])
    text = f"{what}: " + (", ".join(counts) or "no replica changes")
    text += f"; {p.after} replica{'s' if p.after != 1 else ''} after"
    if why:
        text += f" ({why})"
    if fit is not None:
        text += "; fits" if fit.fits else f"; does not fit: {fit.reason}"
    return text


def plan(
    before: Running | None,
    after: Side | None,
    nodes: Sequence[Node] | None,
    restart: bool = False,
    rebuild: bool = False,
    candidate: bool = False,
) -> Plan:
    """The plan of one change. ``before``: the deployment serving now (None: nothing
    serves); ``after``: the deployment the change runs (None: a stop); ``restart``:
    RestartModel; ``rebuild``: CreateBuild with deploy (``after.build`` is the build to
    come); ``candidate``: a canary or shadow, whose replicas run beside the serving ones
    until it is promoted. ``nodes``: None when the cluster could not be asked (no fit)."""
    current = tuple(rid for rid, _ in before.replicas) if before is not None else ()
    where = tuple(node for _, node in before.replicas) if before is not None else ()
    n_now = len(current)
    if after is None:
        p = Plan(ChangeClass.STOP, (), current, 0, 0, n_now, 0, 0, None, "")
        need = before.side.need if before is not None else Need(0, 0, 0)
        return _done(p, place(nodes, need, 0) if nodes else None)
    if before is None:
        cls = ChangeClass.REBUILD if rebuild else ChangeClass.START
        count = replicas_after(None, after)
        cause = (Cause("build", "(none serving)", after.build),)
        p = Plan(cls, cause, (), 0, 0, 0, count, count, None, "")
        fit = place(nodes, after.need, count, autoscaling=after.autoscaling) if nodes else None
        return _done(p, fit)
    rolling, in_place = causes(before.side, after)
    if rebuild:
        rolling = (Cause("build", before.side.build, "a new build from source"), *rolling[1:])
    count = replicas_after(n_now, after)
    if candidate:
        p = Plan(ChangeClass.ROLLING, rolling, current, n_now, 0, 0, count, count, None, "")
        fit = place(nodes, after.need, count, autoscaling=after.autoscaling) if nodes else None
        note = (
            "the new build runs beside the serving replicas until it is promoted; the "
            "promotion starts its replicas once more, before the old ones stop"
        )
        return _done(p, fit, (note,))
    if restart or rolling:
        cls = ChangeClass.RESTART if restart and not rolling else ChangeClass.ROLLING
        if rebuild:
            cls = ChangeClass.REBUILD
        if restart and not rolling:
            rolling = (
                Cause(
                    "restart_generation",
                    str(before.side.restart_generation),
                    str(before.side.restart_generation + 1),
                ),
            )
        p = Plan(
            cls,
            (*rolling, *in_place),
            current,
            0,
            min(n_now, count),
            max(0, n_now - count),
            max(0, count - n_now),
            count,
            None,
            "",
        )
        fit = None
        if nodes:
            fit = place(
                nodes,
                after.need,
                count,
                stopped=where,
                stopped_need=before.side.need,
                surge=True,
                autoscaling=after.autoscaling,
            )
        return _done(p, fit)
    kept = min(n_now, count)
    p = Plan(
        ChangeClass.IN_PLACE,
        in_place,
        current,
        kept,
        0,
        n_now - kept,
        max(0, count - n_now),
        count,
        None,
        "",
    )
    fit = None
    if nodes:
        fit = place(
            nodes, after.need, max(0, count - n_now), autoscaling=after.autoscaling, staying=kept
        )
    return _done(p, fit)


def _done(p: Plan, fit: Fit | None, notes: tuple[str, ...] = ()) -> Plan:
    out = replace(p, fit=fit, notes=notes)
    summary = "; ".join((_summary(p.change_class, out, fit), *notes))
    return replace(out, summary=summary)
