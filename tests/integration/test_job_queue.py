"""The leased job queue on SQLite and PostgreSQL: claims, leases, hand-back, fencing.

Two ``JobQueue`` objects stand for two servers on one database; a lease of a few
milliseconds stands for a server that died (it stopped renewing).
"""

from __future__ import annotations

from datetime import timedelta

from sqlmodel import select

from controlplane.storage import jobs
from controlplane.storage.changes import now
from controlplane.storage.db import Database
from controlplane.storage.jobs import JobKind, JobQueue, JobState
from controlplane.storage.tables import JobRow, OperationRow


def enqueue(db: Database, kind: JobKind = JobKind.APPLY, **kw: object) -> None:
    with db.write() as tx:
        jobs.enqueue(tx.session, kind, "projects/p/models/m", **kw)  # type: ignore[arg-type]


def states(db: Database) -> list[tuple[str, str, str]]:
    with db.read() as s:
        rows = s.exec(select(JobRow).order_by(JobRow.id)).all()  # type: ignore[arg-type]
        return [(row.state, row.claimed_by, row.error) for row in rows]


def test_jobs_are_claimed_once_oldest_first_up_to_the_limit(db: Database) -> None:
    for _ in range(3):
        enqueue(db)
    one, two = JobQueue(db, "one", 60), JobQueue(db, "two", 60)
    first = one.claim(2)
    assert [j.kind for j in first] == [JobKind.APPLY, JobKind.APPLY]
    assert [j.id for j in first] == sorted(j.id for j in first)
    rest = two.claim(5)
    assert len(rest) == 1 and rest[0].id not in {j.id for j in first}
    assert one.claim(5) == [] and two.claim(0) == []
    assert [state for state, _, _ in states(db)] == [JobState.RUNNING.value] * 3


def test_a_job_is_not_claimed_before_it_is_due(db: Database) -> None:
    enqueue(db, delay_s=60)
    assert JobQueue(db, "one", 60).claim(5) == []
    with db.write() as tx:
        jobs.resync(tx.session)  # a whole-set apply wanted now: the queued one comes forward
    assert len(JobQueue(db, "one", 60).claim(5)) == 1


def test_a_lease_that_runs_out_is_taken_over_and_the_old_holder_is_fenced(db: Database) -> None:
    enqueue(db)
    dead, alive = JobQueue(db, "dead", 0.001), JobQueue(db, "alive", 60)
    (job,) = dead.claim(1)
    with db.write() as tx:  # its lease ran out (the server stopped renewing it)
        row = tx.session.get(JobRow, job.id)
        assert row is not None
        row.lease_until = now() - timedelta(seconds=1)
        tx.session.add(row)
    (again,) = alive.claim(1)
    assert again.id == job.id
    dead.complete(job.id, "too late")  # fenced: the job is the other server's now
    assert states(db) == [(JobState.RUNNING.value, "alive", "")]
    alive.complete(job.id, "")
    assert states(db) == [(JobState.DONE.value, "alive", "")]


def test_renewing_keeps_a_job_and_hand_back_returns_it_at_once(db: Database) -> None:
    enqueue(db)
    mine = JobQueue(db, "mine", 0.5)
    (job,) = mine.claim(1)
    mine.renew()
    with db.read() as s:
        row = s.get(JobRow, job.id)
        assert row is not None and row.lease_until is not None
    assert JobQueue(db, "other", 60).claim(1) == []
    mine.hand_back()  # the server stops: its jobs go back now, not at lease expiry
    assert states(db) == [(JobState.PENDING.value, "", "")]
    assert [j.id for j in JobQueue(db, "other", 60).claim(1)] == [job.id]


def test_a_kind_this_server_does_not_know_is_left_for_one_that_does(db: Database) -> None:
    with db.write() as tx:
        ts = now()
        tx.session.add(
            JobRow(kind="canary-step", model="m", state="pending", create_time=ts, update_time=ts)
        )
    enqueue(db, JobKind.BUILD)
    claimed = JobQueue(db, "one", 60).claim(5)
    assert [j.kind for j in claimed] == [JobKind.BUILD]
    assert states(db)[0] == (JobState.PENDING.value, "", "")


def test_cancelled_operations_and_pending_builds(db: Database) -> None:
    with db.write() as tx:
        ts = now()
        for name, cancel in (("operations/a", True), ("operations/b", False)):
            tx.session.add(
                OperationRow(
                    name=name,
                    model="m",
                    kind="CREATE_BUILD",
                    target="t",
                    cancel_requested=cancel,
                    create_time=ts,
                    update_time=ts,
                )
            )
    enqueue(db, JobKind.BUILD, operation="operations/a")
    enqueue(db, JobKind.BUILD, operation="operations/b")
    enqueue(db, JobKind.BUILD, operation="operations/a")
    queue = JobQueue(db, "one", 60)
    running = queue.claim(2)
    assert queue.cancelled([j.id for j in running]) == [running[0].id]
    with db.write() as tx:  # the third, never claimed, ends where it stands
        assert jobs.cancel_pending_builds(tx.session, "operations/a") == 1
    assert states(db)[2] == (JobState.DONE.value, "", "cancelled before it ran")
    with db.read() as s:
        assert jobs.counts(s) == {JobState.PENDING: 0, JobState.RUNNING: 2}
