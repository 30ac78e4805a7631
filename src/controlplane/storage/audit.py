"""An RPC's audit record, written in the same transaction as the change it records.

The auth interceptor says, before a mutation's handler runs, what the record will say
(``expect``); the first write transaction of that call adds the record before it commits
(``Database.write`` calls ``add_to``), naming the operation or the token or key it made.
A crash can then never keep a change and lose its record. A call that wrote nothing (it
was refused, or failed before a change) is recorded apart by the interceptor, after it.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import event
from sqlmodel import Session

from controlplane.storage.tables import AuditRow, InvocationKeyRow, OperationRow, TokenRow

CREATED = "audit_created"  # Session.info: the rows this transaction added


@dataclass
class Pending:
    principal: str
    method: str
    resource: str
    project: str
    peer: str
    written: bool = False  # by a committed transaction of the call
    operation: str = ""


_pending: contextvars.ContextVar[Pending | None] = contextvars.ContextVar(
    "pending_audit", default=None
)


def expect(p: Pending) -> contextvars.Token[Pending | None]:
    return _pending.set(p)


def done(token: contextvars.Token[Pending | None]) -> None:
    _pending.reset(token)


def pending() -> Pending | None:
    p = _pending.get()
    return None if p is None or p.written else p


def row_for(p: Pending, code: str, operation: str = "", resource: str = "") -> AuditRow:
    return AuditRow(
        time=datetime.now(UTC),
        principal=p.principal,
        project=p.project[:63],  # the column's size
        method=p.method,
        resource=(resource or p.resource)[:250],
        code=code,
        peer=p.peer[:120],
        operation=operation,
    )


def add_to(session: Session, p: Pending) -> None:
    """The call's record (code OK) into this transaction, naming what it made."""
    session.flush()  # every row added so far goes through before_flush
    operation, resource = "", ""
    for row in session.info.get(CREATED, ()):
        if isinstance(row, OperationRow) and not operation:
            operation = row.name
        elif isinstance(row, TokenRow):
            resource = f"projects/{row.project}/tokens/{row.token_id}"
        elif isinstance(row, InvocationKeyRow):
            resource = f"{row.model}/keys/{row.key_id}"
    p.operation = operation
    session.add(row_for(p, "OK", operation, resource))


@event.listens_for(Session, "before_flush")
def _collect(session: Session, _context: Any, _instances: Any) -> None:
    if _pending.get() is not None:
        session.info.setdefault(CREATED, []).extend(session.new)
