"""How many replicas: autoscaling bounds, and the scale status a model shows.

Pure data and functions. ``Autoscaling`` is what a deployment asks for (Ray Serve's
autoscaler does the scaling); ``judge_scale`` turns what Serve reports (the replicas it
wants and those running) into the ``Scale`` recorded on the model, with the last
decision and its reason, and says when to write it: at once when the count settles
(running = wanted), else at most every ``coalesce_s`` while replicas come and go, so
that watchers see each settled count and not every step.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import Any

from controlplane.domain.errors import FieldViolation

MAX_DELAY_S = 24 * 3600.0
MAX_TARGET = 10_000.0
DEFAULT_TARGET = 2.0  # Ray Serve's defaults
DEFAULT_UPSCALE_DELAY_S = 30.0
DEFAULT_DOWNSCALE_DELAY_S = 600.0


@dataclass(frozen=True)
class Autoscaling:
    """Replicas follow the load between ``min_replicas`` and ``max_replicas``."""

    min_replicas: int
    max_replicas: int
    target_ongoing_requests: float = DEFAULT_TARGET
    upscale_delay_s: float = DEFAULT_UPSCALE_DELAY_S
    downscale_delay_s: float = DEFAULT_DOWNSCALE_DELAY_S

    def violations(self, prefix: str, top: int) -> list[FieldViolation]:
        out: list[FieldViolation] = []

        def bad(name: str, msg: str) -> None:
            out.append(FieldViolation(f"{prefix}.{name}", msg))

        if not 0 <= self.min_replicas <= top:
            bad("min_replicas", f"must be between 0 and {top}, got {self.min_replicas}")
        if not max(1, self.min_replicas) <= self.max_replicas <= top:
            bad(
                "max_replicas",
                f"must be between max(1, min_replicas) and {top}, got {self.max_replicas}",
            )
        t = self.target_ongoing_requests
        if math.isnan(t) or not 0 < t <= MAX_TARGET:
            bad("target_ongoing_requests", f"must be > 0 and <= {MAX_TARGET:g}, got {t}")
        for name, value in (
            ("upscale_delay_s", self.upscale_delay_s),
            ("downscale_delay_s", self.downscale_delay_s),
        ):
            if math.isnan(value) or not 0 <= value <= MAX_DELAY_S:
                bad(name, f"must be between 0 and {MAX_DELAY_S:g}, got {value}")
        return out

    def initial(self, replicas: int) -> int:
        """Replicas a new deployment starts with: ``replicas`` when given (0: none given),
        else one at least, so that a deploy proves its build loads even with
        ``min_replicas`` 0 (it scales to zero once idle)."""
        return replicas if replicas else max(1, self.min_replicas)

    def words(self) -> str:
        return (
            f"autoscaling {self.min_replicas}-{self.max_replicas} replicas, target "
            f"{self.target_ongoing_requests:g} in flight per replica"
        )


def autoscaling_to_json(a: Autoscaling | None) -> str | None:
    return None if a is None else json.dumps(asdict(a), sort_keys=True)


def autoscaling_from_json(text: str | None) -> Autoscaling | None:
    return None if not text else Autoscaling(**json.loads(text))


# ---- the scale a model shows ----------------------------------------------------------------


@dataclass(frozen=True)
class ScaleDecision:
    time: datetime
    from_replicas: int
    to_replicas: int
    reason: str


@dataclass(frozen=True)
class Scale:
    deployment: str  # the deployment it is about (a new one: a decision of its own)
    desired: int
    running: int
    autoscaled: bool
    last: ScaleDecision | None = None
    update_time: datetime | None = None  # when it was last written


@dataclass(frozen=True)
class Looked:
    """One look at the serving deployment: what Serve wants and runs now."""

    deployment: str
    number: int  # the deployment's number, for reasons ("deployment 4: ...")
    desired: int
    running: int
    autoscaling: Autoscaling | None
    in_flight: float | None = None  # requests in flight on the model now, if known


def _reason(before: Scale | None, now: Looked) -> str:
    a = now.autoscaling
    if before is None or before.deployment != now.deployment:
        fixed = f"fixed at {now.desired} replicas" if a is None else a.words()
        return f"deployment {now.number}: {fixed}"
    if a is None:
        return f"deployment {now.number}: fixed at {now.desired} replicas"
    if now.desired == a.min_replicas and now.desired < before.desired:
        idle = "idle" if now.desired == 0 else "load below the target"
        return f"autoscaler: {idle} for the downscale delay ({a.downscale_delay_s:g}s)"
    load = ""
    if now.in_flight is not None and now.running:
        per = now.in_flight / now.running
        load = f"{per:.1f} requests in flight per replica, "
    elif now.in_flight is not None:
        load = f"{now.in_flight:.0f} requests waiting with no replica, "
    way = "above" if now.desired > before.desired else "below"
    return f"autoscaler: {load}{way} the target of {a.target_ongoing_requests:g}"


def judge_scale(before: Scale | None, now: Looked, at: datetime, coalesce_s: float) -> Scale | None:
    """The scale to record after this look, or None when nothing is to be written yet.

    A new desired count is a decision (its reason: the deployment that set it, or the
    autoscaler and the load it saw). A settled count is written at once; while replicas
    start or stop, changes are written at most every ``coalesce_s`` (the newest decision
    wins); what is not written yet is written by a later look, since it is computed
    afresh each time.
    """
    decided = before is None or before.deployment != now.deployment or before.desired != now.desired
    last = before.last if before is not None else None
    if decided:
        was = before.desired if before is not None else now.running
        last = ScaleDecision(at, was, now.desired, _reason(before, now))
    after = Scale(
        deployment=now.deployment,
        desired=now.desired,
        running=now.running,
        autoscaled=now.autoscaling is not None,
        last=last,
        update_time=at,
    )
    if before is not None and replace(before, update_time=at) == after:
        return None  # nothing changed
    if (
        after.running != after.desired  # settled counts are written at once
        and before is not None
        and before.update_time is not None
        and (at - before.update_time).total_seconds() < coalesce_s
    ):
        return None  # written a moment ago: the next look writes what is true then
    return after


def scale_to_json(s: Scale | None) -> str | None:
    if s is None:
        return None
    out: dict[str, Any] = asdict(s)
    out["update_time"] = s.update_time.isoformat() if s.update_time else None
    if s.last is not None:
        out["last"]["time"] = s.last.time.isoformat()
    return json.dumps(out, sort_keys=True)


def scale_from_json(text: str | None) -> Scale | None:
    if not text:
        return None
    raw = json.loads(text)
    last = raw.get("last")
    return Scale(
        deployment=raw["deployment"],
        desired=raw["desired"],
        running=raw["running"],
        autoscaled=raw["autoscaled"],
        last=None
        if last is None
        else ScaleDecision(
            datetime.fromisoformat(last["time"]),
            last["from_replicas"],
            last["to_replicas"],
            last["reason"],
        ),
        update_time=datetime.fromisoformat(raw["update_time"]) if raw["update_time"] else None,
    )
