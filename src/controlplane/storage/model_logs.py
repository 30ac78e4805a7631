"""Models' log lines: what their replicas wrote and one access line per request.

Every server reads the cluster's collector and writes what it read here; a line is
identified by (model, replica, seq), so two servers writing the same line keep one. The
newest ``max_bytes`` of text of each model are kept (``trim``): lines outlive their
replicas, restarts, re-deploys and the control plane itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col

from controlplane.domain.types import LogLine
from controlplane.storage import codec
from controlplane.storage.tables import ModelLogLineRow

ROW_OVERHEAD = 64  # bytes counted per line beside its text (time, ids)
INSERT_ROWS = 1000  # lines per INSERT statement (10 values each)


@dataclass(frozen=True)
class LogQuery:
    model: str
    replica: str = ""
    build: str = ""
    since: datetime | None = None
    after_id: int = 0  # only lines written after this one (a follower's cursor)
    tail: int = 0  # only the last N lines (0: all)
    limit: int = 1000


def insert(session: Session, rows: Sequence[dict[str, object]]) -> None:
    """Writes lines (dicts of ModelLogLineRow's columns); a line already here is skipped."""
    table = ModelLogLineRow.__table__  # type: ignore[attr-defined]
    dialect = session.get_bind().dialect.name
    make = postgresql.insert if dialect == "postgresql" else sqlite.insert
    for start in range(0, len(rows), INSERT_ROWS):  # SQLite takes 32,766 values at most
        chunk = list(rows[start : start + INSERT_ROWS])
        session.execute(make(table).values(chunk).on_conflict_do_nothing())


def _filtered(q: LogQuery) -> Select[Any]:
    query = select(ModelLogLineRow).where(col(ModelLogLineRow.model) == q.model)
    if q.replica:
        query = query.where(col(ModelLogLineRow.replica) == q.replica)
    if q.build:
        query = query.where(col(ModelLogLineRow.build) == q.build)
    if q.since is not None:
        query = query.where(col(ModelLogLineRow.time) >= q.since)
    if q.after_id:
        query = query.where(col(ModelLogLineRow.id) > q.after_id)
    return query


def read(session: Session, q: LogQuery) -> list[LogLine]:
    """Lines in the order they were written (by id); with ``tail``, the last ones."""
    query = _filtered(q)
    if q.tail:
        query = query.order_by(col(ModelLogLineRow.id).desc()).limit(min(q.tail, q.limit))
        rows = list(reversed(session.scalars(query).all()))
    else:
        rows = list(session.scalars(query.order_by(col(ModelLogLineRow.id)).limit(q.limit)).all())
    return [_line(r) for r in rows]


def _line(r: ModelLogLineRow) -> LogLine:
    assert r.id is not None
    return LogLine(
        id=r.id,
        model=r.model,
        replica=r.replica,
        seq=r.seq,
        build=r.build,
        node=r.node,
        time=codec.utc(r.time),
        stream=r.stream,
        request_id=r.request_id,
        text=r.text,
    )


def trim(session: Session, model: str, max_bytes: int) -> int:
    """Removes a model's oldest lines beyond its newest ``max_bytes``; returns how many."""
    size = func.length(ModelLogLineRow.text) + ROW_OVERHEAD
    newer = func.sum(size).over(order_by=col(ModelLogLineRow.id).desc()).label("newer")
    ranked = (
        select(col(ModelLogLineRow.id).label("id"), newer)
        .where(col(ModelLogLineRow.model) == model)
        .subquery()
    )
    cut = session.execute(
        select(func.max(ranked.c.id)).where(ranked.c.newer > max_bytes)
    ).scalar_one_or_none()
    if cut is None:
        return 0
    result = session.execute(
        delete(ModelLogLineRow).where(
            col(ModelLogLineRow.model) == model, col(ModelLogLineRow.id) <= cut
        )
    )
    return int(getattr(result, "rowcount", 0) or 0)


def delete_model(session: Session, model: str) -> None:
    session.execute(delete(ModelLogLineRow).where(col(ModelLogLineRow.model) == model))
