"""A model's health in a few words, from its recent figures: the rules, as data.

``judge`` is pure: it takes what the last minutes looked like (``Recent``, summed up by
``controlplane/signals.py`` from its window) and the thresholds (``HealthRules``, from
the server's settings), and says, most urgent first:

- ``errors: 12% of requests failed on build 4 since 12:03``: a build's error rate (the
  model raised, or a 5xx) over ``error_minutes``, with at least ``error_min_requests``;
- ``dropping requests: 37 refused in the last 5 min at 3/3 replicas busy``: requests
  Serve refused for want of capacity over ``dropping_minutes``; or, none refused but
  requests waiting: ``queueing: 40 requests waiting at 3/3 replicas busy``;
- ``under-provisioned: replicas use 96% of 2 CPUs requested for 10 min``;
- ``over-provisioned: replicas use 6% of 2 CPUs requested for 10 min`` (and the same for
  GPUs where they are measured), once the replicas have reported for the whole period;
- ``ok`` when none holds, and "" when there is nothing to judge (no replica reported).

``merge`` settles what a server writes when several judge the same model, each from the
window of its own memory: a server that has read for less than a rule's period cannot
judge that rule, so it keeps what the stored health says of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class HealthRules:
    error_ratio: float = 0.05  # of a build's requests that failed
    error_min_requests: int = 20  # before an error rate is judged
    error_minutes: float = 10.0
    dropping_minutes: float = 5.0
    provisioning_minutes: float = 10.0  # how long usage must stay low (or high)
    idle_ratio: float = 0.10  # used / requested below this: over-provisioned
    busy_ratio: float = 0.90  # used / requested above this: under-provisioned

    def __post_init__(self) -> None:
        for name in ("error_ratio", "idle_ratio", "busy_ratio"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"health rule {name} must be in (0, 1]")
        for name in ("error_minutes", "dropping_minutes", "provisioning_minutes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"health rule {name} must be above 0")
        if self.idle_ratio >= self.busy_ratio:
            raise ValueError("health rule idle_ratio must be below busy_ratio")


@dataclass(frozen=True)
class Usage:
    """Use against request over ``minutes`` of reports (``provisioning_minutes`` asked)."""

    minutes: float
    cpu_used: float
    cpu_requested: float
    gpu_used: float = -1.0  # -1: not measured
    gpu_requested: float = 0.0


@dataclass(frozen=True)
class BuildErrors:
    build: str  # as people say it: "build 4"
    requests: int
    errors: int
    since: datetime | None  # the first failure in the period


@dataclass(frozen=True)
class Recent:
    usage: Usage
    refused: int = 0  # over dropping_minutes
    queued: int = 0  # now
    replicas: int = 0  # reporting now
    busy_replicas: int = 0  # took as many requests as they take at once, lately
    builds: tuple[BuildErrors, ...] = ()


def _pct(ratio: float) -> str:
    return f"{ratio * 100:.0f}%"


def _minutes(m: float) -> str:
    return f"{m:g} min"


def judge(recent: Recent, rules: HealthRules) -> str:
    said: list[str] = []
    for b in recent.builds:
        if b.requests >= rules.error_min_requests and b.errors / b.requests >= rules.error_ratio:
            since = f" since {b.since:%H:%M}" if b.since is not None else ""
            said.append(
                f"errors: {_pct(b.errors / b.requests)} of requests failed on {b.build}{since}"
            )
    busy = f"{recent.busy_replicas}/{recent.replicas} replicas busy"
    if recent.refused:
        said.append(
            f"dropping requests: {recent.refused} refused in the last "
            f"{_minutes(rules.dropping_minutes)} at {busy}"
        )
    elif recent.queued:
        said.append(f"queueing: {recent.queued} requests waiting at {busy}")
    u = recent.usage
    if u.minutes >= rules.provisioning_minutes:
        for what, used, requested in (
            ("CPUs", u.cpu_used, u.cpu_requested),
            ("GPUs", u.gpu_used, u.gpu_requested),
        ):
            if requested <= 0 or used < 0:
                continue
            ratio = used / requested
            amount = f"{requested:g} {what if requested != 1 else what[:-1]}"
            use = f"replicas use {_pct(ratio)} of {amount} requested for "
            use += _minutes(rules.provisioning_minutes)
            if ratio >= rules.busy_ratio:
                said.append(f"under-provisioned: {use}")
            elif ratio < rules.idle_ratio:
                said.append(f"over-provisioned: {use}")
    if said:
        return "; ".join(said)
    return "ok" if recent.replicas else ""


# Each kind of finding, in the order they are said, and the rule period that judges it.
KINDS = ("errors", "dropping requests", "queueing", "under-provisioned", "over-provisioned")


def _period(kind: str, rules: HealthRules) -> float:
    if kind == "errors":
        return rules.error_minutes
    if kind in ("dropping requests", "queueing"):
        return rules.dropping_minutes
    return rules.provisioning_minutes


def _findings(said: str) -> list[tuple[str, str]]:
    """(kind, text) of each finding in a health text ("ok" and "" have none)."""
    found = []
    for text in said.split("; "):
        kind = text.partition(":")[0]
        if kind in KINDS:
            found.append((kind, text))
    return found


def merge(fresh: str, stored: str, read_minutes: float, rules: HealthRules) -> str:
    """What to write over ``stored`` when this server judged ``fresh`` after reading the
    replicas for ``read_minutes``: its own findings, and the stored ones of each kind it
    cannot judge yet (the kind's period is longer than it has read) and found nothing of.
    A server started again, or a second server, so neither drops nor invents a finding
    another server made from a longer window."""
    mine = _findings(fresh)
    kept = [
        (kind, text)
        for kind, text in _findings(stored)
        if read_minutes < _period(kind, rules) and kind not in {k for k, _ in mine}
    ]
    if (
        not mine
        and not kept
        and not fresh
        and stored
        and read_minutes
        < max(rules.error_minutes, rules.dropping_minutes, rules.provisioning_minutes)
    ):
        return stored  # nothing reported to this server yet: what was said stands
    both = sorted(mine + kept, key=lambda f: KINDS.index(f[0]))
    if both:
        return "; ".join(text for _, text in both)
    return fresh
