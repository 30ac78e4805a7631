"""A rollout's judgement between two live builds, every branch: no database, no clock.

Each test builds the recorded strategy and step, hands in the figures the new build and the
serving build answered with, and checks the verdict, the progress line, the JSON record or
the weights a caller may set by hand.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from controlplane.domain.errors import InvalidArgument
from controlplane.domain.traffic import (
    DEFAULT_MIN_REQUESTS,
    MAX_BAKE_S,
    Advance,
    Gates,
    Phase,
    Promote,
    RollBack,
    RolloutRecord,
    Split,
    StepFigures,
    Strategy,
    StrategyKind,
    Wait,
    check_weights,
    judge,
    progress,
    record_from_json,
    record_to_json,
    split_from_json,
    split_to_json,
)

MODEL = "projects/p/models/m"
B2 = f"{MODEL}/builds/2"
B3 = f"{MODEL}/builds/3"
B4 = f"{MODEL}/builds/4"
T0 = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)

GATES = Gates(max_error_rate=0.01, max_p99_ms=500.0, max_p99_ratio=1.5, min_requests=20)
HEALTHY = StepFigures(requests=100, errors=0, p99_ms=120.0)
SERVING = StepFigures(requests=1000, errors=1, p99_ms=100.0)


def canary(
    steps: tuple[int, ...] = (5, 25, 100), bake_s: float = 60.0, gates: Gates = GATES
) -> Strategy:
    return Strategy(kind=StrategyKind.CANARY, steps=steps, bake_s=bake_s, gates=gates)


def baking(strategy: Strategy, step: int = 0) -> RolloutRecord:
    return RolloutRecord(strategy=strategy, phase=Phase.BAKING, step=step, step_start=T0)


# ---- judge: gates ---------------------------------------------------------------------------


def test_error_rate_over_the_gate_rolls_back_before_the_bake_ends() -> None:
    bad = StepFigures(requests=40, errors=2, p99_ms=120.0)
    verdict = judge(baking(canary()), 5.0, bad, SERVING)
    assert isinstance(verdict, RollBack)
    assert verdict.gate == "max_error_rate"
    assert "5%" in verdict.observed
    assert "2 of 40 requests" in verdict.observed
    assert verdict.threshold == "1%"


def test_error_rate_over_the_gate_waits_until_min_requests() -> None:
    bad = StepFigures(requests=19, errors=10, p99_ms=120.0)
    assert isinstance(judge(baking(canary()), 5.0, bad, SERVING), Wait)
    after_bake = judge(baking(canary()), 600.0, bad, SERVING)
    assert after_bake == Wait("waiting for 1 more requests")


def test_error_rate_is_judged_exactly_at_min_requests() -> None:
    bad = StepFigures(requests=20, errors=1, p99_ms=120.0)
    verdict = judge(baking(canary()), 0.0, bad, SERVING)
    assert isinstance(verdict, RollBack)
    assert verdict.gate == "max_error_rate"
    assert "1 of 20 requests" in verdict.observed


def test_error_rate_at_the_gate_holds() -> None:
    exactly = StepFigures(requests=100, errors=1, p99_ms=120.0)
    assert judge(baking(canary()), 60.0, exactly, SERVING) == Advance(1)


def test_max_error_rate_zero_allows_no_error() -> None:
    strict = canary(gates=Gates(max_error_rate=0.0, min_requests=20))
    one_error = StepFigures(requests=1000, errors=1, p99_ms=120.0)
    verdict = judge(baking(strict), 1.0, one_error, SERVING)
    assert isinstance(verdict, RollBack)
    assert verdict.gate == "max_error_rate"
    assert verdict.threshold == "0%"
    none = StepFigures(requests=1000, errors=0, p99_ms=120.0)
    assert judge(baking(strict), 60.0, none, SERVING) == Advance(1)


def test_max_p99_is_absolute() -> None:
    slow = StepFigures(requests=50, errors=0, p99_ms=750.0)
    gates = Gates(max_p99_ms=500.0)
    verdict = judge(baking(canary(gates=gates)), 1.0, slow, SERVING)
    assert verdict == RollBack("max_p99", "750 ms", "500 ms")
    at_limit = StepFigures(requests=50, errors=0, p99_ms=500.0)
    assert judge(baking(canary(gates=gates)), 60.0, at_limit, SERVING) == Advance(1)


def test_max_p99_ratio_is_relative_to_the_current_build() -> None:
    gates = Gates(max_p99_ratio=1.5)
    slower = StepFigures(requests=50, errors=0, p99_ms=200.0)
    current = StepFigures(requests=500, errors=0, p99_ms=100.0)
    verdict = judge(baking(canary(gates=gates)), 1.0, slower, current)
    assert isinstance(verdict, RollBack)
    assert verdict.gate == "max_p99_ratio"
    assert verdict.observed.startswith("2.00x")
    assert "200 ms against 100 ms" in verdict.observed
    assert verdict.threshold == "1.5x"
    # The same p99 holds when the current build is slow too.
    slow_current = StepFigures(requests=500, errors=0, p99_ms=150.0)
    assert judge(baking(canary(gates=gates)), 60.0, slower, slow_current) == Advance(1)


@pytest.mark.parametrize(
    "current",
    [StepFigures(requests=0, errors=0, p99_ms=0.0), StepFigures(requests=0, p99_ms=10.0)],
    ids=["no-figures", "no-requests"],
)
def test_max_p99_ratio_not_judged_without_current_requests(current: StepFigures) -> None:
    gates = Gates(max_p99_ratio=1.1)
    slow = StepFigures(requests=50, errors=0, p99_ms=10_000.0)
    assert judge(baking(canary(gates=gates)), 60.0, slow, current) == Advance(1)


def test_gates_left_none_are_not_checked() -> None:
    awful = StepFigures(requests=100, errors=100, p99_ms=1e9)
    open_gates = canary(gates=Gates())
    assert judge(baking(open_gates), 60.0, awful, SERVING) == Advance(1)


def test_error_rate_is_checked_before_latency() -> None:
    both = StepFigures(requests=100, errors=50, p99_ms=9999.0)
    verdict = judge(baking(canary()), 0.0, both, SERVING)
    assert isinstance(verdict, RollBack)
    assert verdict.gate == "max_error_rate"


# ---- judge: bake and steps ------------------------------------------------------------------


def test_bake_not_over_waits_saying_how_long_it_baked() -> None:
    verdict = judge(baking(canary(bake_s=60.0)), 30.7, HEALTHY, SERVING)
    assert isinstance(verdict, Wait)
    assert verdict.why == "baked 30 of 60 s"


def test_bake_over_but_too_few_requests_waits_for_more() -> None:
    few = StepFigures(requests=5, errors=0, p99_ms=120.0)
    verdict = judge(baking(canary()), 60.0, few, SERVING)
    assert verdict == Wait("waiting for 15 more requests")


def test_no_requests_after_bake_waits_for_all_of_them() -> None:
    verdict = judge(baking(canary()), 61.0, StepFigures(), StepFigures())
    assert verdict == Wait(f"waiting for {DEFAULT_MIN_REQUESTS} more requests")


@pytest.mark.parametrize(("step", "expected"), [(0, Advance(1)), (1, Advance(2)), (2, Promote())])
def test_all_gates_hold_after_the_bake(step: int, expected: Advance | Promote) -> None:
    assert judge(baking(canary(), step=step), 60.0, HEALTHY, SERVING) == expected


def test_single_step_canary_promotes() -> None:
    assert judge(baking(canary(steps=(50,))), 60.0, HEALTHY, SERVING) == Promote()


def test_zero_bake_judges_at_once() -> None:
    assert judge(baking(canary(bake_s=0.0)), 0.0, HEALTHY, SERVING) == Advance(1)


def test_min_requests_zero_passes_without_requests_but_judges_any() -> None:
    gates = Gates(max_error_rate=0.0, min_requests=0)
    assert judge(baking(canary(gates=gates)), 60.0, StepFigures(), StepFigures()) == Advance(1)
    one_failed = StepFigures(requests=1, errors=1, p99_ms=1.0)
    verdict = judge(baking(canary(gates=gates)), 0.0, one_failed, StepFigures())
    assert isinstance(verdict, RollBack)
    assert "1 of 1 requests" in verdict.observed


def test_shadow_promotes_after_its_duration() -> None:
    shadow = Strategy(kind=StrategyKind.SHADOW, steps=(10,), bake_s=300.0, gates=GATES)
    assert judge(baking(shadow), 299.0, HEALTHY, SERVING) == Wait("baked 299 of 300 s")
    assert judge(baking(shadow), 300.0, HEALTHY, SERVING) == Promote()


def test_shadow_rolls_back_on_a_failing_gate() -> None:
    shadow = Strategy(kind=StrategyKind.SHADOW, steps=(10,), bake_s=300.0, gates=GATES)
    slow = StepFigures(requests=100, errors=0, p99_ms=600.0)
    verdict = judge(baking(shadow), 10.0, slow, SERVING)
    assert isinstance(verdict, RollBack)
    assert verdict.gate == "max_p99"


def test_rollback_message_names_gate_observed_and_threshold() -> None:
    bad = StepFigures(requests=40, errors=2, p99_ms=120.0)
    verdict = judge(baking(canary()), 5.0, bad, SERVING)
    assert isinstance(verdict, RollBack)
    assert verdict.message == (
        "gate max_error_rate failed: observed 5% (2 of 40 requests), threshold 1%"
    )
    assert RollBack("max_p99", "750 ms", "500 ms").message == (
        "gate max_p99 failed: observed 750 ms, threshold 500 ms"
    )


# ---- Strategy.violations --------------------------------------------------------------------


def test_valid_strategies_have_no_violations() -> None:
    assert canary().violations() == []
    shadow = Strategy(kind=StrategyKind.SHADOW, steps=(100,), bake_s=MAX_BAKE_S, gates=GATES)
    assert shadow.violations() == []


@pytest.mark.parametrize("kind", [StrategyKind.IMMEDIATE, StrategyKind.MANUAL])
def test_unjudged_strategies_have_no_violations(kind: StrategyKind) -> None:
    odd = Strategy(kind=kind, steps=(0, 500), bake_s=-1.0, gates=Gates(max_error_rate=5.0))
    assert odd.violations() == []
    assert not odd.judged


@pytest.mark.parametrize(
    ("steps", "description"),
    [
        ((), "at least one step"),
        ((0, 50), "each within 1..100"),
        ((5, 101), "each within 1..100"),
        ((-5,), "each within 1..100"),
        ((50, 25), "must increase"),
        ((25, 25, 100), "must increase"),
    ],
)
def test_canary_step_violations(steps: tuple[int, ...], description: str) -> None:
    found = canary(steps=steps).violations()
    assert [(v.field, v.description) for v in found] == [("rollout.canary.steps", description)]


@pytest.mark.parametrize("steps", [(), (0,), (101,), (10, 20)])
def test_shadow_percent_violations(steps: tuple[int, ...]) -> None:
    shadow = Strategy(kind=StrategyKind.SHADOW, steps=steps, bake_s=60.0)
    assert [v.field for v in shadow.violations()] == ["rollout.shadow.percent"]


@pytest.mark.parametrize("bake_s", [-1.0, MAX_BAKE_S + 1, float("nan"), float("inf")])
def test_bake_out_of_range(bake_s: float) -> None:
    assert [v.field for v in canary(bake_s=bake_s).violations()] == ["rollout.canary.bake"]
    shadow = Strategy(kind=StrategyKind.SHADOW, steps=(10,), bake_s=bake_s)
    assert [v.field for v in shadow.violations()] == ["rollout.shadow.duration"]


@pytest.mark.parametrize(
    ("gates", "name"),
    [
        (Gates(max_error_rate=-0.1), "max_error_rate"),
        (Gates(max_error_rate=1.5), "max_error_rate"),
        (Gates(max_error_rate=float("nan")), "max_error_rate"),
        (Gates(max_p99_ms=0.0), "max_p99_ms"),
        (Gates(max_p99_ms=-3.0), "max_p99_ms"),
        (Gates(max_p99_ms=float("inf")), "max_p99_ms"),
        (Gates(max_p99_ratio=0.0), "max_p99_ratio"),
        (Gates(max_p99_ratio=float("nan")), "max_p99_ratio"),
        (Gates(min_requests=-1), "min_requests"),
        (Gates(min_requests=1_000_000_001), "min_requests"),
    ],
)
def test_bad_gate_values(gates: Gates, name: str) -> None:
    assert [v.field for v in canary(gates=gates).violations()] == [f"rollout.canary.gates.{name}"]
    shadow = Strategy(kind=StrategyKind.SHADOW, steps=(10,), bake_s=1.0, gates=gates)
    assert [v.field for v in shadow.violations("spec")] == [f"spec.shadow.gates.{name}"]


def test_gate_edges_are_valid() -> None:
    edges = Gates(max_error_rate=0.0, max_p99_ms=0.001, max_p99_ratio=0.5, min_requests=0)
    assert canary(gates=edges).violations() == []
    assert canary(gates=Gates(max_error_rate=1.0, min_requests=1_000_000_000)).violations() == []


def test_several_violations_are_all_reported() -> None:
    bad = canary(steps=(), bake_s=-1.0, gates=Gates(max_p99_ms=-1.0))
    assert [v.field for v in bad.violations("r")] == [
        "r.canary.steps",
        "r.canary.bake",
        "r.canary.gates.max_p99_ms",
    ]


# ---- records ------------------------------------------------------------------------------


@pytest.mark.parametrize(("phase", "percent"), [(Phase.STARTING, 0), (Phase.PROMOTING, 0)])
def test_percent_is_zero_outside_baking(phase: Phase, percent: int) -> None:
    record = RolloutRecord(strategy=canary(), phase=phase, step=1)
    assert record.percent == percent


@pytest.mark.parametrize(("step", "percent"), [(0, 5), (1, 25), (2, 100)])
def test_percent_is_the_current_steps_while_baking(step: int, percent: int) -> None:
    assert baking(canary(), step=step).percent == percent


def test_split_json_round_trip() -> None:
    split = Split(
        stable="m-1",
        candidate="m-2",
        stable_build=B2,
        candidate_build=B3,
        percent=25,
        shadow=True,
        sticky_header="x-user",
        promoting=True,
    )
    text = split_to_json(split)
    assert split_from_json(text) == split
    assert split_from_json(split_to_json(Split(stable="a", candidate="b"))) == Split("a", "b")


def test_empty_json_is_none() -> None:
    assert split_to_json(None) == ""
    assert split_from_json("") is None
    assert record_to_json(None) == ""
    assert record_from_json("") is None


@pytest.mark.parametrize(
    "step_start",
    [None, T0, datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=-5)))],
    ids=["none", "utc", "offset"],
)
def test_record_json_round_trip(step_start: datetime | None) -> None:
    record = RolloutRecord(
        strategy=canary(steps=(1, 10, 50, 100), bake_s=90.5),
        phase=Phase.BAKING,
        step=2,
        step_start=step_start,
        candidate=StepFigures(requests=40, errors=1, p99_ms=130.5),
        current=StepFigures(requests=400, errors=2, p99_ms=110.0),
    )
    back = record_from_json(record_to_json(record))
    assert back == record
    assert back is not None
    assert back.step_start == step_start
    if step_start is not None:
        assert back.step_start is not None
        assert back.step_start.utcoffset() == step_start.utcoffset()
    assert back.percent == 50


@pytest.mark.parametrize("kind", list(StrategyKind))
def test_record_json_round_trip_of_every_kind(kind: StrategyKind) -> None:
    record = RolloutRecord(strategy=Strategy(kind=kind, steps=(10,), gates=Gates()))
    assert record_from_json(record_to_json(record)) == record


# ---- check_weights ------------------------------------------------------------------------


def test_two_builds_adding_to_100() -> None:
    assert check_weights(MODEL, [(B2, 90), (B3, 10)]) == {B2: 90, B3: 10}


def test_one_build_at_100() -> None:
    assert check_weights(MODEL, [(B3, 100)]) == {B3: 100}


@pytest.mark.parametrize(
    "weights", [[(B2, 0), (B3, 100)], [(B3, 100), (B2, 0)]], ids=["zero-first", "zero-last"]
)
def test_zero_weight_beside_100_returns_only_the_100(weights: list[tuple[str, int]]) -> None:
    assert check_weights(MODEL, weights) == {B3: 100}


@pytest.mark.parametrize(
    ("weights", "field"),
    [
        ([("projects/p/models/other/builds/3", 100)], "weights[0].build"),
        ([(B2, 50), ("projects/q/models/m/builds/3", 50)], "weights[1].build"),
        ([(B3, 50), (B3, 50)], "weights[1].build"),
        ([(B2, 50), (B3, 40)], "weights"),
        ([(B3, 90)], "weights"),
        ([(B2, 110), (B3, -10)], "weights[0].percent"),
        ([(B2, 100), (B3, -1)], "weights[1].percent"),
        ([(B2, 50), (B3, 30), (B4, 20)], "weights"),
        ([], "weights"),
        ([("projects/p/models/m", 100)], "weights[0].build"),
        ([(f"{MODEL}/builds/0", 100)], "weights[0].build"),
    ],
    ids=[
        "another-model",
        "another-project",
        "named-twice",
        "not-100",
        "one-not-100",
        "percent-over-100",
        "percent-negative",
        "three-builds",
        "none",
        "not-a-build",
        "bad-version",
    ],
)
def test_bad_weights_raise(weights: list[tuple[str, int]], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_weights(MODEL, weights)
    assert caught.value.metadata["field"] == field
    assert str(caught.value).startswith(f"{field}: ")


def test_bad_weight_messages() -> None:
    with pytest.raises(InvalidArgument, match="is not a build of projects/p/models/m") as other:
        check_weights(MODEL, [("projects/p/models/other/builds/3", 100)])
    assert other.value.reason == "BUILD_OF_ANOTHER_MODEL"
    with pytest.raises(InvalidArgument, match="named twice"):
        check_weights(MODEL, [(B3, 50), (B3, 50)])
    with pytest.raises(InvalidArgument, match="add up to 100"):
        check_weights(MODEL, [(B2, 50), (B3, 30), (B4, 20)])
    with pytest.raises(InvalidArgument, match=r"within 0\.\.100"):
        check_weights(MODEL, [(B2, 101)])


# ---- progress -----------------------------------------------------------------------------


def test_progress_while_starting() -> None:
    record = RolloutRecord(strategy=canary())
    line = progress(record, B3, B2, "ignored")
    assert line == f"starting the replicas of build {B3}"


def test_progress_while_promoting() -> None:
    record = RolloutRecord(strategy=canary(), phase=Phase.PROMOTING, step=2)
    line = progress(record, B3, B2, "ignored")
    assert line == f"promoting build {B3}: the model's replicas roll to it"


def test_progress_while_baking() -> None:
    record = RolloutRecord(
        strategy=canary(),
        phase=Phase.BAKING,
        step=0,
        step_start=T0,
        candidate=StepFigures(requests=40, errors=2, p99_ms=130.0),
        current=StepFigures(requests=400, errors=0, p99_ms=110.0),
    )
    line = progress(record, B3, B2, "baked 30 of 60 s")
    assert "step 1/3" in line
    assert "5%" in line
    assert B3 in line
    assert B2 in line
    assert "baked 30 of 60 s" in line
    assert "40 requests" in line
    assert "p99 130 ms" in line
    assert "p99 110 ms" in line
    assert line == (
        f"step 1/3: 5% to build {B3}; baked 30 of 60 s; "
        f"build {B3}: 40 requests, 5% errors, p99 130 ms (build {B2}: p99 110 ms)"
    )


def test_progress_while_baking_without_requests_leaves_out_p99() -> None:
    line = progress(baking(canary(), step=1), B3, B2, "waiting")
    assert line == f"step 2/3: 25% to build {B3}; waiting; build {B3}: 0 requests, 0% errors"


def test_progress_of_a_shadow_says_a_copy() -> None:
    shadow = Strategy(kind=StrategyKind.SHADOW, steps=(10,), bake_s=300.0)
    line = progress(baking(shadow), B3, B2, "baked 1 of 300 s")
    assert line.startswith(f"step 1/1: a copy of 10% to build {B3}; ")
