"""Two builds live at once: the split between them, a rollout's strategy, and its judgement.

Pure data and functions (no database, clock or cluster): the caller hands in what was
recorded (``Split`` on the model, ``RolloutRecord`` on the operation) and the figures
the new build and the serving build answered with during the current step, and gets a
``Verdict``: wait, go to the next step, promote, or roll back naming the gate, the value
observed and its threshold. Both records are JSON in the database (``to_json`` /
``from_json``), so a restarted server resumes a rollout at the same step with the same
weights.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from controlplane.domain import names
from controlplane.domain.errors import FieldViolation, invalid_field

MAX_BAKE_S = 24 * 3600.0
DEFAULT_MIN_REQUESTS = 20


class StrategyKind(StrEnum):
    IMMEDIATE = "IMMEDIATE"  # every replica of the new deployment, then all traffic
    CANARY = "CANARY"  # a share of traffic in steps, each baked and judged
    SHADOW = "SHADOW"  # a copy of a share of traffic, answers discarded, then judged
    MANUAL = "MANUAL"  # weights set by hand (SetTraffic): no steps, no gates


class Phase(StrEnum):
    STARTING = "STARTING"  # the new build's replicas are starting; it takes no traffic yet
    BAKING = "BAKING"  # a step's share goes to it; its figures are judged
    PROMOTING = "PROMOTING"  # it takes over: the model's own replicas roll to it


@dataclass(frozen=True)
class Gates:
    """What the new build must hold to go on. None: not checked."""

    max_error_rate: float | None = None  # share of requests failed (model errors, 5xx), 0..1
    max_p99_ms: float | None = None
    max_p99_ratio: float | None = None  # of the serving build's p99 over the same time
    min_requests: int = DEFAULT_MIN_REQUESTS  # answered by the new build before judging

    def violations(self, prefix: str) -> list[FieldViolation]:
        out = []
        if self.max_error_rate is not None and not 0 <= self.max_error_rate <= 1:
            out.append(FieldViolation(f"{prefix}.max_error_rate", "must be within 0..1"))
        if self.max_p99_ms is not None and not 0 < self.max_p99_ms < math.inf:
            out.append(FieldViolation(f"{prefix}.max_p99_ms", "must be > 0"))
        if self.max_p99_ratio is not None and not 0 < self.max_p99_ratio < math.inf:
            out.append(FieldViolation(f"{prefix}.max_p99_ratio", "must be > 0"))
        if not 0 <= self.min_requests <= 1_000_000_000:
            out.append(FieldViolation(f"{prefix}.min_requests", "must be within 0..1e9"))
        return out


@dataclass(frozen=True)
class Strategy:
    kind: StrategyKind = StrategyKind.IMMEDIATE
    steps: tuple[int, ...] = ()  # CANARY: percent of traffic at each step, increasing
    bake_s: float = 0.0  # CANARY: each step; SHADOW: how long the copy runs
    gates: Gates = field(default_factory=Gates)

    @property
    def judged(self) -> bool:
        return self.kind in (StrategyKind.CANARY, StrategyKind.SHADOW)

    def percent_at(self, step: int) -> int:
        return self.steps[min(step, len(self.steps) - 1)] if self.steps else 0

    def violations(self, prefix: str = "rollout") -> list[FieldViolation]:
        out: list[FieldViolation] = []
        if self.kind is StrategyKind.CANARY:
            if not self.steps:
                out.append(FieldViolation(f"{prefix}.canary.steps", "at least one step"))
            elif any(not 1 <= s <= 100 for s in self.steps):
                out.append(FieldViolation(f"{prefix}.canary.steps", "each within 1..100"))
            elif list(self.steps) != sorted(set(self.steps)):
                out.append(FieldViolation(f"{prefix}.canary.steps", "must increase"))
            where = "canary"
        elif self.kind is StrategyKind.SHADOW:
            if len(self.steps) != 1 or not 1 <= self.steps[0] <= 100:
                out.append(FieldViolation(f"{prefix}.shadow.percent", "must be within 1..100"))
            where = "shadow"
        else:
            return out
        name = "bake" if self.kind is StrategyKind.CANARY else "duration"
        if not 0 <= self.bake_s <= MAX_BAKE_S:
            out.append(FieldViolation(f"{prefix}.{where}.{name}", "must be within 0s..24h"))
        return out + self.gates.violations(f"{prefix}.{where}.gates")


@dataclass(frozen=True)
class Split:
    """A model's traffic while two deployments are live (``ModelRow.traffic``).

    The model's own Serve application runs ``stable``'s replicas (or, while promoting, rolls
    to ``candidate``'s); those of ``stable``'s build send ``percent`` of requests to the
    candidate's application (or, with ``shadow``, a copy of them, its answers discarded).
    """

    stable: str  # deployment name
    candidate: str  # deployment name
    stable_build: str = ""
    candidate_build: str = ""
    percent: int = 0  # of requests to the candidate, 0..100
    shadow: bool = False
    sticky_header: str = ""  # requests with the same value of it go to the same build
    promoting: bool = False


@dataclass(frozen=True)
class StepFigures:
    """A build's requests during the current step."""

    requests: int = 0
    errors: int = 0  # model errors and 5xx
    p99_ms: float = 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class RolloutRecord:
    """A judged rollout's progress (``OperationRow.rollout``)."""

    strategy: Strategy
    phase: Phase = Phase.STARTING
    step: int = 0  # index into strategy.steps
    step_start: datetime | None = None  # when the current step's share began
    candidate: StepFigures = field(default_factory=StepFigures)
    current: StepFigures = field(default_factory=StepFigures)

    @property
    def percent(self) -> int:
        return self.strategy.percent_at(self.step) if self.phase is Phase.BAKING else 0


# ---- verdicts -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Wait:
    why: str  # for the progress line: what the step waits for


@dataclass(frozen=True)
class Advance:
    step: int


@dataclass(frozen=True)
class Promote:
    pass


@dataclass(frozen=True)
class RollBack:
    gate: str
    observed: str
    threshold: str

    @property
    def message(self) -> str:
        return f"gate {self.gate} failed: observed {self.observed}, threshold {self.threshold}"


Verdict = Wait | Advance | Promote | RollBack


def judge(
    record: RolloutRecord, elapsed_s: float, candidate: StepFigures, current: StepFigures
) -> Verdict:
    """The current step after ``elapsed_s`` of it. A gate that fails rolls back at once
    (once the new build answered ``min_requests``); the step passes when the bake is over
    and every gate held; the last step passing promotes."""
    s = record.strategy
    g = s.gates
    if candidate.requests >= max(1, g.min_requests):
        failed = _failed_gate(g, candidate, current)
        if failed is not None:
            return failed
    if elapsed_s < s.bake_s:
        return Wait(f"baked {int(elapsed_s)} of {s.bake_s:g} s")
    if candidate.requests < g.min_requests:
        return Wait(f"waiting for {g.min_requests - candidate.requests} more requests")
    if record.step + 1 < len(s.steps) and s.kind is StrategyKind.CANARY:
        return Advance(record.step + 1)
    return Promote()


def _failed_gate(g: Gates, candidate: StepFigures, current: StepFigures) -> RollBack | None:
    if g.max_error_rate is not None and candidate.error_rate > g.max_error_rate:
        return RollBack(
            "max_error_rate",
            f"{_pct(candidate.error_rate)} ({candidate.errors} of {candidate.requests} requests)",
            _pct(g.max_error_rate),
        )
    if g.max_p99_ms is not None and candidate.p99_ms > g.max_p99_ms:
        return RollBack("max_p99", _ms(candidate.p99_ms), _ms(g.max_p99_ms))
    if g.max_p99_ratio is not None and current.requests and current.p99_ms > 0:
        ratio = candidate.p99_ms / current.p99_ms
        if ratio > g.max_p99_ratio:
            return RollBack(
                "max_p99_ratio",
                f"{ratio:.2f}x ({_ms(candidate.p99_ms)} against {_ms(current.p99_ms)})",
                f"{g.max_p99_ratio:g}x",
            )
    return None


def _ms(value: float) -> str:
    """A latency for people: three figures at most ("10.7 ms", "250 ms", "1234 ms")."""
    return f"{value:.0f} ms" if value >= 100 else f"{value:.3g} ms"


def _pct(rate: float) -> str:
    return f"{rate * 100:.3g}%"


def progress(record: RolloutRecord, candidate_build: str, current_build: str, why: str) -> str:
    """The operation's progress line for people."""
    s = record.strategy
    if record.phase is Phase.STARTING:
        return f"starting the replicas of build {candidate_build}"
    if record.phase is Phase.PROMOTING:
        return f"promoting build {candidate_build}: the model's replicas roll to it"
    c, cur = record.candidate, record.current
    share = "a copy of " if s.kind is StrategyKind.SHADOW else ""
    head = (
        f"step {record.step + 1}/{len(s.steps)}: {share}{record.percent}% "
        f"to build {candidate_build}"
    )
    figures = f"build {candidate_build}: {c.requests} requests, {_pct(c.error_rate)} errors"
    if c.requests:
        figures += f", p99 {_ms(c.p99_ms)}"
    if cur.requests:
        figures += f" (build {current_build}: p99 {_ms(cur.p99_ms)})"
    return f"{head}; {why}; {figures}"


# ---- records as JSON ------------------------------------------------------------------------


def split_to_json(split: Split | None) -> str:
    return json.dumps(asdict(split), sort_keys=True) if split is not None else ""


def split_from_json(text: str) -> Split | None:
    return Split(**json.loads(text)) if text else None


def record_to_json(record: RolloutRecord | None) -> str:
    if record is None:
        return ""
    data = asdict(record)
    data["step_start"] = record.step_start.isoformat() if record.step_start else None
    return json.dumps(data, sort_keys=True)


def record_from_json(text: str) -> RolloutRecord | None:
    if not text:
        return None
    d: dict[str, Any] = json.loads(text)
    s = d["strategy"]
    strategy = Strategy(
        kind=StrategyKind(s["kind"]),
        steps=tuple(s["steps"]),
        bake_s=float(s["bake_s"]),
        gates=Gates(**s["gates"]),
    )
    return RolloutRecord(
        strategy=strategy,
        phase=Phase(d["phase"]),
        step=int(d["step"]),
        step_start=datetime.fromisoformat(d["step_start"]) if d["step_start"] else None,
        candidate=StepFigures(**d["candidate"]),
        current=StepFigures(**d["current"]),
    )


def figures_changed(record: RolloutRecord, candidate: StepFigures, current: StepFigures) -> bool:
    return (record.candidate, record.current) != (candidate, current)


def with_figures(
    record: RolloutRecord, candidate: StepFigures, current: StepFigures
) -> RolloutRecord:
    return replace(record, candidate=candidate, current=current)


HEADER = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,100}")


def check_weights(model: str, weights: Sequence[tuple[str, int]]) -> dict[str, int]:
    """{build: percent}: builds of ``model``, each named once, percents adding up to 100."""
    wanted: dict[str, int] = {}
    for i, (build, percent) in enumerate(weights):
        b = names.parse_build(build, f"weights[{i}].build")
        if str(b.parent) != model:
            raise invalid_field(
                f"weights[{i}].build",
                f"{build} is not a build of {model}",
                "BUILD_OF_ANOTHER_MODEL",
            )
        if build in wanted:
            raise invalid_field(f"weights[{i}].build", f"{build} is named twice")
        if not 0 <= percent <= 100:
            raise invalid_field(f"weights[{i}].percent", "must be within 0..100")
        wanted[build] = percent
    if not 1 <= len(wanted) <= 2 or sum(wanted.values()) != 100:
        raise invalid_field("weights", "one or two builds whose percents add up to 100")
    return {b: p for b, p in wanted.items() if p or len(wanted) == 1} or wanted
