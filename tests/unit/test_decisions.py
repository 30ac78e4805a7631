"""The reconciler's judgement, every branch, with made-up replicas: no server, no clock.

After Ray Serve's test_deployment_state.py: each test builds what was recorded and what
Serve reports, and checks the verdict or the record the lifecycle would write.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from controlplane.domain.decisions import (
    REPLACING,
    RUNNING_AGAIN,
    Deployed,
    Failed,
    FallbackKind,
    InProgress,
    Limits,
    Observation,
    Rollout,
    ServeStatus,
    ServingRecord,
    choose_fallback,
    compose_message,
    judge_rollout,
    judge_serving,
    observe_replicas,
    state_before_pending,
)
from controlplane.domain.states import ModelState, ReplicaState
from controlplane.domain.types import Replica

T0 = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
LIMITS = Limits(deploy_timeout_s=60, placement_timeout_s=10)
RUNNING = ReplicaState.RUNNING
STARTING = ReplicaState.STARTING
STOPPING = ReplicaState.STOPPING


def replica(id_: str, state: ReplicaState = RUNNING, pid: int = 0) -> Replica:
    return Replica(id=id_, state=state, pid=pid or 100 + ord(id_[0]), node="n1", start_time=T0)


def seen(
    status: ServeStatus, *replicas: Replica, message: str = "", unplaceable: str = ""
) -> Observation:
    return Observation(status, message, tuple(replicas), unplaceable)


def later(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# ---- a rollout ------------------------------------------------------------------------------


def test_deployed_when_exactly_the_wanted_replicas_of_the_rollout_run() -> None:
    rollout = Rollout(wanted=2, applied_at=T0)
    obs = seen(ServeStatus.RUNNING, replica("a"), replica("b"))
    assert judge_rollout(rollout, obs, later(1), LIMITS) == Deployed()


def test_replicas_the_rollout_replaces_never_count_as_its_own() -> None:
    rollout = Rollout(wanted=2, replaced=frozenset({"a", "b"}), applied_at=T0)
    # Serve reads RUNNING for a moment with only the old replicas.
    obs = seen(ServeStatus.RUNNING, replica("a"), replica("b"))
    assert judge_rollout(rollout, obs, later(1), LIMITS) == InProgress(0, 2)
    # A surge: new replicas beside the old ones: not yet (too many replicas).
    obs = seen(ServeStatus.RUNNING, replica("a"), replica("b"), replica("c"), replica("d"))
    assert judge_rollout(rollout, obs, later(2), LIMITS) == InProgress(2, 2)
    obs = seen(ServeStatus.RUNNING, replica("c"), replica("d"))
    assert judge_rollout(rollout, obs, later(3), LIMITS) == Deployed()


def test_in_progress_counts_running_replicas_and_words_it() -> None:
    rollout = Rollout(wanted=3, applied_at=T0)
    obs = seen(ServeStatus.DEPLOYING, replica("a"), replica("b", STARTING), replica("c", STARTING))
    verdict = judge_rollout(rollout, obs, later(5), LIMITS)
    assert verdict == InProgress(1, 3)
    assert isinstance(verdict, InProgress) and verdict.progress == "1/3 replicas running"


def test_running_status_with_too_few_replicas_is_not_deployed() -> None:
    obs = seen(ServeStatus.RUNNING, replica("a"))
    assert judge_rollout(Rollout(wanted=2, applied_at=T0), obs, later(1), LIMITS) == InProgress(
        1, 2
    )


def test_serve_reporting_deploy_failed_fails_at_once_with_its_words() -> None:
    obs = seen(ServeStatus.DEPLOY_FAILED, message="ImportError in model.py line 1: boom")
    verdict = judge_rollout(Rollout(wanted=1, applied_at=T0), obs, later(0), LIMITS)
    assert verdict == Failed(
        "ImportError in model.py line 1: boom", "FAILED_PRECONDITION", "DEPLOY_FAILED"
    )
    bare = judge_rollout(Rollout(wanted=1), seen(ServeStatus.DEPLOY_FAILED), T0, LIMITS)
    assert isinstance(bare, Failed) and bare.message == "Serve reported DEPLOY_FAILED"


def test_no_deadline_before_the_rollout_is_applied() -> None:
    verdict = judge_rollout(Rollout(wanted=1), None, later(10_000), LIMITS)
    assert verdict == InProgress(0, 1)


def test_unplaceable_replicas_fail_after_the_placement_deadline() -> None:
    obs = seen(ServeStatus.DEPLOYING, unplaceable="each needs 8 GPU; the cluster has 2 GPU")
    rollout = Rollout(wanted=1, applied_at=T0)
    assert judge_rollout(rollout, obs, later(10), LIMITS) == InProgress(0, 1)
    verdict = judge_rollout(rollout, obs, later(10.5), LIMITS)
    assert verdict == Failed(
        "0/1 replicas running after 10s: each needs 8 GPU; the cluster has 2 GPU",
        "DEADLINE_EXCEEDED",
        "PLACEMENT_TIMEOUT",
    )


def test_replicas_that_never_become_healthy_fail_after_the_deploy_deadline() -> None:
    obs = seen(ServeStatus.DEPLOYING, replica("a", STARTING), message="health check failing")
    rollout = Rollout(wanted=1, applied_at=T0)
    assert isinstance(judge_rollout(rollout, obs, later(59), LIMITS), InProgress)
    verdict = judge_rollout(rollout, obs, later(61), LIMITS)
    assert isinstance(verdict, Failed)
    assert (verdict.code, verdict.reason) == ("DEADLINE_EXCEEDED", "STARTUP_TIMEOUT")
    assert verdict.message == (
        "0/1 replicas running after 60s (replicas could not be placed or never became "
        "healthy): health check failing"
    )


def test_an_application_missing_past_the_deadline_fails_without_details() -> None:
    verdict = judge_rollout(Rollout(wanted=1, applied_at=T0), None, later(61), LIMITS)
    assert isinstance(verdict, Failed) and verdict.message.endswith("never became healthy)")


# ---- what a failure falls back to -----------------------------------------------------------


def test_a_failed_rollout_serves_the_last_good_deployment_again() -> None:
    fb = choose_fallback("d/2", "boom", False, "d/1", False, frozenset({"a"}), ())
    assert fb.kind is FallbackKind.SERVE_LAST_GOOD
    assert fb.deployment_note == "boom"
    assert fb.model_note == "d/2 failed: boom; serving d/1 again"
    cancelled = choose_fallback(
        "d/2", "cancelled on request (op)", True, "d/1", False, frozenset(), ()
    )
    assert cancelled.model_note == "d/2: cancelled on request (op); serving d/1 again"


def test_a_failed_restart_keeps_the_replicas_from_before_it() -> None:
    observed = (replica("a"), replica("b"), replica("x", STARTING))
    fb = choose_fallback("d/1", "boom", False, "", True, frozenset({"a", "b"}), observed)
    assert fb.kind is FallbackKind.KEEP_PREVIOUS_REPLICAS
    assert [r.id for r in fb.kept] == ["a", "b"]
    assert fb.deployment_note == "restart failed: boom; the replicas from before it keep serving"
    assert fb.model_note == "restart failed: boom"
    cancelled = choose_fallback("d/1", "cancelled", True, "", True, frozenset({"a"}), observed)
    assert cancelled.model_note == "restart cancelled"


def test_a_failed_first_deploy_fails_the_model() -> None:
    fb = choose_fallback("d/1", "boom", False, "", False, frozenset(), ())
    assert (fb.kind, fb.deployment_note, fb.model_note) == (FallbackKind.FAIL_MODEL, "boom", "boom")
    # A restart of a model that had no replicas (stopped) has nothing to keep either.
    assert choose_fallback("d/1", "boom", False, "", True, frozenset(), ()).kind is (
        FallbackKind.FAIL_MODEL
    )


@pytest.mark.parametrize(
    ("before", "stopped", "expected"),
    [
        (None, False, ModelState.NOT_DEPLOYED),
        ("d/1", True, ModelState.STOPPED),
        ("d/1", False, ModelState.FAILED),
    ],
)
def test_a_pending_model_whose_build_never_deploys_goes_back(
    before: str | None, stopped: bool, expected: ModelState
) -> None:
    assert state_before_pending(before, stopped) is expected


# ---- a deployment that serves ---------------------------------------------------------------

A, B = replica("a", pid=11), replica("b", pid=12)
C = replica("c", STARTING, pid=13)


def serving(
    *replicas: Replica, note: str = "", health: str = "", awaiting: tuple[Replica, ...] = ()
) -> ServingRecord:
    ran = frozenset(r.id for r in replicas if r.state is RUNNING)
    return ServingRecord(tuple(replicas), ran, awaiting, note, health)


def test_replicas_seen_running_are_remembered_while_listed() -> None:
    record = observe_replicas(ServingRecord(), seen(ServeStatus.DEPLOYING, C))
    assert record.ran == frozenset()
    record = observe_replicas(record, seen(ServeStatus.RUNNING, replica("c", pid=13)))
    assert record.ran == {"c"}
    record = observe_replicas(record, seen(ServeStatus.RUNNING, replica("c", STOPPING, 13)))
    assert record.ran == {"c"}, "it ran, even while it stops"
    assert observe_replicas(record, seen(ServeStatus.RUNNING)).ran == frozenset()


def test_a_replica_gone_and_its_replacement_in_one_look() -> None:
    after = judge_serving(serving(A, B), seen(ServeStatus.RUNNING, B, C), notice_replaced=True)
    assert (
        after.note
        == "replica a (pid 11 on n1) stopped unexpectedly; Serve replaced it with c (pid 13 on n1)"
    )
    assert after.awaiting == ()
    assert [r.id for r in after.replicas] == ["b", "c"]


def test_the_replacement_is_named_when_serve_lists_it_later() -> None:
    stopping = replica("a", STOPPING, 11)
    first = judge_serving(serving(A, B), seen(ServeStatus.RUNNING, stopping, B), True)
    assert first.note == f"replica a (pid 11 on n1) stopped unexpectedly; {REPLACING}"
    assert [r.id for r in first.awaiting] == ["a"]
    gone = judge_serving(first, seen(ServeStatus.RUNNING, B), True)
    assert gone.note == first.note and gone.awaiting == first.awaiting
    then = judge_serving(gone, seen(ServeStatus.RUNNING, B, C), True)
    assert (
        then.note
        == "replica a (pid 11 on n1) stopped unexpectedly; Serve replaced it with c (pid 13 on n1)"
    )
    assert then.awaiting == ()


def test_replicas_that_never_ran_did_not_stop_unexpectedly() -> None:
    # A failed rollout's replicas go away while the ones from before keep serving.
    failing = replica("x", STOPPING, 21)
    record = ServingRecord((A, B, failing, C), frozenset({"a", "b"}))
    after = judge_serving(record, seen(ServeStatus.RUNNING, A, B), True)
    assert after.note == "" and [r.id for r in after.replicas] == ["a", "b"]
    # New replicas with no loss to explain (another attempt of a failed rollout).
    after = judge_serving(
        serving(A, B, note="restart failed: boom"), seen(ServeStatus.RUNNING, A, B, C), True
    )
    assert after.note == "restart failed: boom"


def test_an_empty_list_while_serve_updates_says_nothing() -> None:
    record = serving(A, B)
    assert judge_serving(record, seen(ServeStatus.RUNNING), notice_replaced=True) == record


def test_with_a_change_of_ours_in_flight_losses_are_not_reported() -> None:
    after = judge_serving(serving(A, B), seen(ServeStatus.RUNNING, B, C), notice_replaced=False)
    assert after.note == "" and [r.id for r in after.replicas] == ["b", "c"]
    # An empty list is then recorded as it is (the app updates under our change).
    assert judge_serving(serving(A), seen(ServeStatus.RUNNING), False).replicas == ()


@pytest.mark.parametrize("status", [ServeStatus.UNHEALTHY, ServeStatus.DEPLOY_FAILED])
def test_serve_health_is_said_after_the_note_and_goes_once_running(status: ServeStatus) -> None:
    record = serving(
        A,
        note="replica z (pid 9 on n1) stopped unexpectedly; "
        "Serve replaced it with a (pid 11 on n1)",
    )
    sick = judge_serving(record, seen(status, A, message="replica crashed"), True)
    assert sick.health == f"Serve reports the application {status.value}: replica crashed"
    assert sick.message == f"{record.note}; {sick.health}"
    well = judge_serving(sick, seen(ServeStatus.RUNNING, A), True)
    assert (well.health, well.message) == ("", record.note)


def test_health_with_no_note_says_running_again() -> None:
    sick = judge_serving(serving(A), seen(ServeStatus.UNHEALTHY, A), True)
    assert sick.message == "Serve reports the application UNHEALTHY"
    well = judge_serving(sick, seen(ServeStatus.RUNNING, A), True)
    assert well.message == RUNNING_AGAIN
    assert judge_serving(well, seen(ServeStatus.RUNNING, A), True) == well
    # Deploying (an update of ours) leaves the note as it was.
    assert judge_serving(sick, seen(ServeStatus.DEPLOYING, A), True).health == sick.health


def test_a_new_note_drops_what_serve_said_before_unless_it_still_says_it() -> None:
    well_again = serving(A, B, health=RUNNING_AGAIN)
    after = judge_serving(well_again, seen(ServeStatus.RUNNING, B, C), True)
    assert after.health == "" and after.message == after.note
    sick = serving(A, B, health="Serve reports the application UNHEALTHY")
    after = judge_serving(sick, seen(ServeStatus.UNHEALTHY, B, C), True)
    assert after.message == f"{after.note}; Serve reports the application UNHEALTHY"


def test_compose_message() -> None:
    assert compose_message("", "") == ""
    assert compose_message("a", "") == "a"
    assert compose_message("", "b") == "b"
    assert compose_message("a", "b") == "a; b"


def test_a_replica_lost_with_its_node_says_so_and_names_its_replacement() -> None:
    before = replace(ServingRecord(), replicas=(replica("a", pid=11),), ran=frozenset({"a"}))
    moved = replace(replica("c", pid=13), node="head")
    lost = Observation(ServeStatus.RUNNING, "", (moved,), lost_nodes=frozenset({"n1"}))
    after = judge_serving(before, lost, notice_replaced=True)
    assert after.message == (
        "replica a (pid 11 on n1) was lost with its node n1; "
        "Serve replaced it with c (pid 13 on head)"
    )


def test_a_note_written_before_ray_declared_the_node_dead_is_told_again() -> None:
    before = replace(ServingRecord(), replicas=(replica("a", pid=11),), ran=frozenset({"a"}))
    moved = replace(replica("c", pid=13), node="head")
    first = judge_serving(before, Observation(ServeStatus.RUNNING, "", (moved,)), True)
    assert "a (pid 11 on n1) stopped unexpectedly" in first.note
    later = Observation(ServeStatus.RUNNING, "", (moved,), lost_nodes=frozenset({"n1"}))
    then = judge_serving(first, later, True)
    assert then.note.startswith("replica a (pid 11 on n1) was lost with its node n1; ")
