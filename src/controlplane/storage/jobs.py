"""The leased job queue: jobs are rows, written in the transaction of the change that
needs them, claimed by one server at a time under a lease it renews.

A server that dies stops renewing: its jobs go back to the queue when their lease runs
out, and another server (or this one, started again) runs them. A server that stops
cleanly hands its jobs back at once. A job whose lease another server took over is that
server's now: completing it is refused (fencing).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy import ColumnElement, and_, func
from sqlmodel import Session, col, or_, select
from sqlmodel.sql.expression import SelectOfScalar

from controlplane.storage import codec
from controlplane.storage.db import Database
from controlplane.storage.tables import JobRow, OperationRow

log = logging.getLogger(__name__)


class JobKind(StrEnum):
    BUILD = "build"  # build an image (a Ray task)
    APPLY = "apply"  # apply the whole desired Serve config


class JobState(StrEnum):
    PENDING = "pending"  # waiting for a server (not before ``not_before``)
    RUNNING = "running"  # claimed by ``claimed_by`` until ``lease_until``
    DONE = "done"  # finished (``error`` says how), or cancelled before it ran


@dataclass(frozen=True)
class Job:
    """A job as its handler sees it."""

    id: int
    kind: JobKind
    model: str  # "" for a whole-set apply (at start, or after a failure)
    operation: str  # the operation it works for, or ""
    target: str  # the build or deployment (or model, for a stop) it acts on
    trace_parent: str  # the W3C traceparent of the call that made it


def _now() -> datetime:
    return datetime.now(UTC)


def _job(row: JobRow) -> Job:
    assert row.id is not None
    return Job(row.id, JobKind(row.kind), row.model, row.operation, row.target, row.trace_parent)


# ---- writing jobs, inside the transaction of a change --------------------------------------


def enqueue(
    s: Session,
    kind: JobKind,
    model: str,
    operation: str = "",
    target: str = "",
    delay_s: float = 0,
    trace_parent: str = "",
) -> None:
    """A job for the dispatcher; with ``delay_s``, not claimed before that long."""
    ts = _now()
    s.add(
        JobRow(
            kind=kind.value,
            model=model,
            operation=operation,
            target=target,
            state=JobState.PENDING.value,
            not_before=ts + timedelta(seconds=delay_s) if delay_s > 0 else None,
            trace_parent=trace_parent,
            create_time=ts,
            update_time=ts,
        )
    )


def resync(s: Session, delay_s: float = 0, trace_parent: str = "") -> None:
    """The whole desired Serve config is to be applied again, at once or after
    ``delay_s``. Every apply reads and sends the whole set when it runs, so one queued
    apply due by then serves; a queued one due later is brought forward."""
    due = _now() + timedelta(seconds=delay_s)
    queued = s.exec(
        select(JobRow).where(
            JobRow.kind == JobKind.APPLY.value, JobRow.state == JobState.PENDING.value
        )
    ).all()
    if any(job.not_before is None or codec.utc(job.not_before) <= due for job in queued):
        return
    if queued:
        queued[0].not_before = due if delay_s > 0 else None
        s.add(queued[0])
        return
    enqueue(s, JobKind.APPLY, "", delay_s=delay_s, trace_parent=trace_parent)


def cancel_pending_builds(s: Session, operation: str) -> int:
    """Marks the operation's build jobs no server runs now as done; how many there were."""
    pending = s.exec(
        select(JobRow).where(
            JobRow.operation == operation,
            JobRow.kind == JobKind.BUILD.value,
            JobRow.state == JobState.PENDING.value,
        )
    ).all()
    for row in pending:
        row.state, row.error, row.update_time = (
            JobState.DONE.value,
            "cancelled before it ran",
            _now(),
        )
        s.add(row)
    return len(pending)


def counts(s: Session) -> dict[JobState, int]:
    """Every server's queue: jobs pending and running."""
    found = {JobState.PENDING: 0, JobState.RUNNING: 0}
    query = (
        select(JobRow.state, func.count())
        .where(col(JobRow.state).in_([state.value for state in found]))
        .group_by(JobRow.state)
    )
    for state, n in s.exec(query).all():
        found[JobState(state)] = int(n)
    return found


# ---- running jobs: one server's view of the queue -------------------------------------------


class JobQueue:
    """Claim, renew, hand back and complete jobs as server ``server_id``."""

    def __init__(self, db: Database, server_id: str, lease_s: float) -> None:
        self.db = db
        self.server_id = server_id
        self.lease = timedelta(seconds=lease_s)

    def claim(self, limit: int) -> list[Job]:
        """Up to ``limit`` pending jobs that are due, oldest first (taking over those whose
        server stopped renewing their lease)."""
        if limit <= 0 or not self._claimable():
            return []
        with self.db.write() as tx:
            self._requeue_expired(tx.session)
            query = select(JobRow).where(_due()).order_by(col(JobRow.id)).limit(limit)
            if not self.db.is_sqlite:
                query = query.with_for_update(skip_locked=True)
            claimed = []
            for row in tx.session.exec(query).all():
                row.state = JobState.RUNNING.value
                row.attempts += 1
                row.claimed_by = self.server_id
                row.lease_until = _now() + self.lease
                row.update_time = _now()
                tx.session.add(row)
                claimed.append(_job(row))
            return claimed

    def renew(self) -> None:
        """Extends the leases of the jobs this server runs, so no other server takes them."""
        with self.db.write() as tx:
            for row in tx.session.exec(self._mine()).all():
                row.lease_until = _now() + self.lease
                tx.session.add(row)

    def hand_back(self) -> None:
        """This server's running jobs (an earlier run's, or its own as it stops) go back
        to the queue at once: another server, or this one started again, takes them."""
        with self.db.write() as tx:
            for row in tx.session.exec(self._mine()).all():
                _requeue(tx.session, row)

    def later(self, job_id: int, delay_s: float) -> None:
        """A job of this server's goes back to the queue, not claimed before ``delay_s``
        (what it needs, the cluster, is away for now): not failed, not counted."""
        with self.db.write() as tx:
            row = tx.session.get(JobRow, job_id)
            if row is not None and row.claimed_by == self.server_id:
                row.state = JobState.PENDING.value
                row.not_before = _now() + timedelta(seconds=delay_s)
                row.update_time = _now()
                tx.session.add(row)

    def complete(self, job_id: int, error: str) -> None:
        with self.db.write() as tx:
            row = tx.session.get(JobRow, job_id)
            # Fencing: a job whose lease another server took over is that server's now.
            if row is not None and row.claimed_by == self.server_id:
                row.state = JobState.DONE.value
                row.error = error
                row.update_time = _now()
                tx.session.add(row)

    def cancelled(self, job_ids: list[int]) -> list[int]:
        """Those of ``job_ids`` whose operation a client asked to cancel (on any server)."""
        if not job_ids:
            return []
        with self.db.read() as s:
            rows = s.exec(
                select(JobRow.id)
                .join(OperationRow, col(OperationRow.name) == col(JobRow.operation))
                .where(
                    col(JobRow.id).in_(job_ids),
                    JobRow.kind == JobKind.BUILD.value,
                    col(OperationRow.cancel_requested).is_(True),
                )
            ).all()
            return [int(r) for r in rows if r is not None]

    def _mine(self) -> SelectOfScalar[JobRow]:
        return select(JobRow).where(
            JobRow.state == JobState.RUNNING.value, JobRow.claimed_by == self.server_id
        )

    def _claimable(self) -> bool:
        """Whether a claim would find anything (a job due, or one whose lease expired):
        one read. The dispatcher claims every second; an idle queue then costs no write
        transaction (on PostgreSQL, no turn of the servers' write lock)."""
        with self.db.read() as s:
            found = s.connection().execute(_CLAIMABLE, {"now": _now()}).first()
            return found is not None

    def _requeue_expired(self, s: Session) -> None:
        """Jobs whose server stopped renewing their lease (it died) are taken over."""
        query = select(JobRow).where(_expired())
        if not self.db.is_sqlite:
            query = query.with_for_update(skip_locked=True)
        for row in s.exec(query).all():
            _requeue(s, row)


def _due(at: datetime | sa.BindParameter[Any] | None = None) -> ColumnElement[bool]:
    """A pending job whose time has come (``at``: now), of a kind this server runs (a kind
    a newer server wrote, in a rolling upgrade, waits for one)."""
    at = _now() if at is None else at
    return and_(
        col(JobRow.state) == JobState.PENDING.value,
        or_(col(JobRow.not_before).is_(None), col(JobRow.not_before) <= at),
        col(JobRow.kind).in_([kind.value for kind in JobKind]),
    )


def _expired(at: datetime | sa.BindParameter[Any] | None = None) -> ColumnElement[bool]:
    """A running job whose server stopped renewing its lease (it died) before ``at``."""
    at = _now() if at is None else at
    return and_(col(JobRow.state) == JobState.RUNNING.value, col(JobRow.lease_until) < at)


# Built once (it runs every second): the time is a parameter.
_CLAIMABLE = (
    sa.select(col(JobRow.id))
    .where(or_(_due(sa.bindparam("now")), _expired(sa.bindparam("now"))))
    .limit(1)
)


def _requeue(s: Session, row: JobRow) -> None:
    log.warning("job %s (%s) of %s goes back to the queue", row.id, row.kind, row.claimed_by)
    row.state = JobState.PENDING.value
    row.claimed_by = ""
    row.lease_until = None
    row.update_time = _now()
    s.add(row)
