"""Which models a reconciler pass looks at: one whose record and observation are as at
its last look is skipped for a while (settled: 10 s; changing: 1 s); anything new about
it, its application missing, or a split is looked at at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.config import Settings
from controlplane.domain.decisions import Observation, ServeStatus
from controlplane.domain.states import ModelState, ReplicaState
from controlplane.domain.types import Replica
from controlplane.reconciler import (
    CHANGING_REFRESH_S,
    SETTLED_REFRESH_S,
    Reconciler,
    Seen,
    Watched,
)
from controlplane.storage.db import Database
from workers.fake_backend import FakeBackend

DEPLOYED, DEPLOYING = ModelState.DEPLOYED.value, ModelState.DEPLOYING.value


def obs(*states: ReplicaState, target: int | None = None) -> Observation:
    running = all(s is ReplicaState.RUNNING for s in states)
    return Observation(
        status=ServeStatus.RUNNING if running else ServeStatus.DEPLOYING,
        replicas=tuple(Replica(f"r{i}", s, 100 + i, "n", None) for i, s in enumerate(states)),
        target=len(states) if target is None else target,
    )


ONE_RUNNING = obs(ReplicaState.RUNNING)
STARTING = obs(ReplicaState.RUNNING, ReplicaState.STARTING)


@pytest.fixture
def reconciler(tmp_path: Path) -> Reconciler:
    db = Database(Database.sqlite_url(tmp_path))
    return Reconciler(db, FakeBackend(), Settings(data_dir=tmp_path), "http://h")


def model(state: str = DEPLOYED, operation: str = "", applied: bool = True) -> Watched:
    return Watched("projects/p/models/m", state, operation, 7, applied, split=False)


def seen(w: Watched, o: Observation | None, revision: int = 7) -> Seen:
    return (revision, w.applied, o, None)


def test_a_settled_model_is_skipped_until_its_refresh(reconciler: Reconciler) -> None:
    w = model()
    assert not reconciler._unchanged(w, seen(w, ONE_RUNNING), 100.0), "first look"
    assert reconciler._unchanged(w, seen(w, ONE_RUNNING), 100.0 + SETTLED_REFRESH_S - 0.1)
    assert not reconciler._unchanged(w, seen(w, ONE_RUNNING), 100.0 + SETTLED_REFRESH_S)


def test_a_changing_model_is_skipped_only_while_nothing_moves(reconciler: Reconciler) -> None:
    w = model(DEPLOYING, operation="op")
    assert not reconciler._unchanged(w, seen(w, STARTING), 100.0)
    assert reconciler._unchanged(w, seen(w, STARTING), 100.1), "the same look again"
    both = obs(ReplicaState.RUNNING, ReplicaState.RUNNING)
    assert not reconciler._unchanged(w, seen(w, both), 100.2), "Serve moved"
    assert reconciler._unchanged(w, seen(w, both), 100.3)
    # A deadline is still judged within CHANGING_REFRESH_S, not SETTLED_REFRESH_S.
    assert not reconciler._unchanged(w, seen(w, both), 100.2 + CHANGING_REFRESH_S)


def test_a_write_or_an_apply_landing_is_looked_at_at_once(reconciler: Reconciler) -> None:
    w = model(DEPLOYING, operation="op", applied=False)
    assert not reconciler._unchanged(w, seen(w, ONE_RUNNING), 100.0)
    assert not reconciler._unchanged(w, seen(w, ONE_RUNNING, revision=8), 100.1), "a write"
    landed = w._replace(applied=True)  # a silent write: the revision stays
    assert not reconciler._unchanged(landed, seen(landed, ONE_RUNNING, revision=8), 100.2)


def test_a_missing_application_or_a_split_is_looked_at_every_time(
    reconciler: Reconciler,
) -> None:
    w = model(DEPLOYING, operation="op")
    for at in (100.0, 100.1, 100.2):
        assert not reconciler._unchanged(w, seen(w, None), at), "its grace runs on looks"
    split = w._replace(split=True)
    for at in (100.0, 100.1, 100.2):
        assert not reconciler._unchanged(split, seen(split, STARTING), at)
