"""Autoscaling bounds and the scale a model shows (domain/scaling.py), and the rollout and
serving judgements with an autoscaler in the picture (domain/decisions.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from controlplane.domain.decisions import (
    Deployed,
    InProgress,
    Limits,
    Observation,
    Rollout,
    ServeStatus,
    ServingRecord,
    judge_rollout,
    judge_serving,
)
from controlplane.domain.errors import InvalidArgument
from controlplane.domain.scaling import (
    Autoscaling,
    Looked,
    Scale,
    judge_scale,
    scale_from_json,
    scale_to_json,
)
from controlplane.domain.states import ReplicaState
from controlplane.domain.types import Replica, Resources

T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
AS = "resources.autoscaling"
LIMITS = Limits(deploy_timeout_s=60, placement_timeout_s=30)


def replica(rid: str, state: ReplicaState = ReplicaState.RUNNING) -> Replica:
    return Replica(rid, state, 100, "n", T0)


@pytest.mark.parametrize(
    ("resources", "field"),
    [
        (
            Resources(replicas=0, autoscaling=Autoscaling(3, 2)),
            "resources.autoscaling.max_replicas",
        ),
        (
            Resources(replicas=0, autoscaling=Autoscaling(-1, 2)),
            "resources.autoscaling.min_replicas",
        ),
        (
            Resources(replicas=0, autoscaling=Autoscaling(0, 0)),
            "resources.autoscaling.max_replicas",
        ),
        (
            Resources(replicas=0, autoscaling=Autoscaling(0, 101)),
            "resources.autoscaling.max_replicas",
        ),
        (
            Resources(replicas=0, autoscaling=Autoscaling(1, 2, target_ongoing_requests=0)),
            "resources.autoscaling.target_ongoing_requests",
        ),
        (
            Resources(replicas=0, autoscaling=Autoscaling(1, 2, upscale_delay_s=-1)),
            "resources.autoscaling.upscale_delay_s",
        ),
        (
            Resources(replicas=0, autoscaling=Autoscaling(1, 2, downscale_delay_s=float("nan"))),
            "resources.autoscaling.downscale_delay_s",
        ),
        (Resources(replicas=5, autoscaling=Autoscaling(1, 2)), "resources.replicas"),
        (Resources(replicas=0), "resources.replicas"),
    ],
)
def test_bad_bounds_name_their_field(resources: Resources, field: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        resources.validate()
    assert e.value.metadata["field"] == field


def test_the_count_to_start_with() -> None:
    assert Resources(replicas=0, autoscaling=Autoscaling(0, 3)).validate().initial_replicas == 1
    assert Resources(replicas=0, autoscaling=Autoscaling(2, 3)).initial_replicas == 2
    assert Resources(replicas=3, autoscaling=Autoscaling(0, 3)).initial_replicas == 3
    assert Resources(replicas=4).initial_replicas == 4


# ---- the scale a model shows ---------------------------------------------------------------

AUTO = Autoscaling(0, 4, target_ongoing_requests=2, upscale_delay_s=0, downscale_delay_s=30)


def looked(desired: int, running: int, **kw: object) -> Looked:
    base: dict[str, object] = {
        "deployment": "projects/p/models/m/deployments/3",
        "number": 3,
        "desired": desired,
        "running": running,
        "autoscaling": AUTO,
        "in_flight": None,
    }
    return Looked(**{**base, **kw})  # type: ignore[arg-type]


def test_a_new_deployment_is_a_decision_of_its_own() -> None:
    s = judge_scale(None, looked(1, 0), T0, 2.0)
    assert s is not None and s.last is not None
    assert (s.desired, s.running, s.autoscaled) == (1, 0, True)
    assert s.last.reason == "deployment 3: autoscaling 0-4 replicas, target 2 in flight per replica"
    fixed = judge_scale(None, looked(2, 2, autoscaling=None), T0, 2.0)
    assert fixed is not None and fixed.last is not None
    assert fixed.last.reason == "deployment 3: fixed at 2 replicas" and not fixed.autoscaled


def test_the_autoscaler_s_decisions_say_the_load_they_saw() -> None:
    s0 = judge_scale(None, looked(1, 1), T0, 2.0)
    up = judge_scale(s0, looked(3, 1, in_flight=7.0), T0 + timedelta(seconds=5), 2.0)
    assert up is not None and up.last is not None
    assert (up.last.from_replicas, up.last.to_replicas) == (1, 3)
    assert up.last.reason == "autoscaler: 7.0 requests in flight per replica, above the target of 2"
    down = judge_scale(up, looked(0, 3), T0 + timedelta(seconds=60), 2.0)
    assert down is not None and down.last is not None
    assert down.last.reason == "autoscaler: idle for the downscale delay (30s)"
    cold = judge_scale(down, looked(1, 0, in_flight=1.0), T0 + timedelta(seconds=90), 2.0)
    assert cold is not None and cold.last is not None
    assert (
        cold.last.reason == "autoscaler: 1 requests waiting with no replica, above the target of 2"
    )


def test_changes_are_written_at_most_every_coalesce_s_and_the_last_one_lands() -> None:
    s0 = judge_scale(None, looked(4, 1), T0, 2.0)
    assert s0 is not None
    # Replicas start one by one within a second: nothing is written meanwhile...
    assert judge_scale(s0, looked(4, 2), T0 + timedelta(seconds=0.5), 2.0) is None
    assert judge_scale(s0, looked(4, 3), T0 + timedelta(seconds=1.0), 2.0) is None
    # ...and a step still under way is written once the window has passed.
    later = judge_scale(s0, looked(4, 3), T0 + timedelta(seconds=2.5), 2.0)
    assert later is not None and later.running == 3 and later.last == s0.last
    # The settled count is written at once.
    settled = judge_scale(later, looked(4, 4), T0 + timedelta(seconds=2.6), 2.0)
    assert settled is not None and settled.running == 4
    assert judge_scale(settled, looked(4, 4), T0 + timedelta(seconds=60), 2.0) is None


def test_the_scale_round_trips_through_json() -> None:
    s = judge_scale(None, looked(2, 1, in_flight=3.0), T0, 2.0)
    assert s is not None
    assert scale_from_json(scale_to_json(s)) == s
    assert scale_from_json(scale_to_json(Scale("d", 0, 0, False))) == Scale("d", 0, 0, False)
    assert scale_from_json("") is None


# ---- rollouts and serving with an autoscaler ------------------------------------------------


def test_an_autoscaled_rollout_is_deployed_at_the_count_serve_wants() -> None:
    rollout = Rollout(wanted=1, applied_at=T0, autoscaled=True)
    three = Observation(ServeStatus.RUNNING, replicas=(replica("a"), replica("b"), replica("c")))
    assert isinstance(judge_rollout(rollout, three, T0, LIMITS), InProgress)  # target unknown
    seen = Observation(three.status, replicas=three.replicas, target=3)
    assert isinstance(judge_rollout(rollout, seen, T0, LIMITS), Deployed)
    zero = Observation(ServeStatus.RUNNING, replicas=(), target=0)
    assert isinstance(judge_rollout(rollout, zero, T0, LIMITS), Deployed)
    fixed = Rollout(wanted=1, applied_at=T0)
    assert isinstance(judge_rollout(fixed, seen, T0, LIMITS), InProgress)


def test_replicas_the_autoscaler_stops_did_not_stop_unexpectedly() -> None:
    ran = ServingRecord(
        replicas=(replica("a"), replica("b"), replica("c")), ran=frozenset({"a", "b", "c"})
    )
    down = Observation(
        ServeStatus.RUNNING,
        replicas=(replica("a"), replica("b", ReplicaState.STOPPING)),
        target=1,
    )
    after = judge_serving(ran, down, notice_replaced=True)
    assert after.note == "" and after.awaiting == ()
    lost = Observation(ServeStatus.RUNNING, replicas=(replica("a"), replica("b")), target=3)
    crashed = judge_serving(ran, lost, notice_replaced=True)
    assert "replica c (pid 100 on n) stopped unexpectedly" in crashed.note
