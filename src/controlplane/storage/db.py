"""The database: engine, migrations, and transactions.

Every write runs in ``Database.write()``: it takes the single ``revision``
counter row first (``SELECT ... FOR UPDATE`` on PostgreSQL; an in-process lock
on SQLite, which has one writer anyway), so writers are serialized and event
revisions are assigned in commit order: a watcher that reads ``revision > N``
never misses a row that commits later with a smaller number.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event, select, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.pool import StaticPool
from sqlmodel import Session, create_engine

from controlplane import failpoints
from controlplane.domain.errors import Unavailable, disk_full, is_disk_full
from controlplane.storage import audit, notify
from controlplane.storage.secretbox import SecretBox
from controlplane.storage.tables import CounterRow

REVISION = "revision"


class DatabaseClosed(RuntimeError):
    """A worker thread outlived the server's stop; its work is redone at the next start."""


@dataclass(frozen=True)
class FinishedOperation:
    """An operation a transaction finished, reported once it commits (metrics)."""

    name: str
    model: str
    kind: str
    error_code: str  # empty: it succeeded
    seconds: float  # from its creation


class WriteTx:
    """One write transaction: a session plus revision assignment."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._revision: int | None = None
        self.last_revision = 0
        self.finished_operations: list[FinishedOperation] = []

    def _counter(self) -> CounterRow:
        row = self.session.exec(  # type: ignore[call-overload]
            select(CounterRow).where(CounterRow.name == REVISION).with_for_update()  # type: ignore[arg-type]
        ).scalar_one()
        assert isinstance(row, CounterRow)
        return row

    def lock(self) -> None:
        """Takes the writers' lock (the revision row) before anything else is written."""
        self._counter()

    def next_revision(self) -> int:
        row = self._counter()
        row.value += 1
        self.session.add(row)
        self.last_revision = row.value
        return row.value


def _connection_lost(e: DBAPIError) -> bool:
    """The server went away or restarted (PostgreSQL), or SQLite's disk is full: not a
    bug in a query. A lost connection is dropped from the pool, so the next call gets
    a fresh one once the server is back."""
    if e.connection_invalidated:
        return True
    text = str(e.orig or e).lower()
    return any(
        s in text
        for s in (
            "terminating connection",
            "server closed the connection",
            "connection refused",
            "connection is closed",
            "the database system is",  # starting up, shutting down, in recovery
            "could not connect",
            "consuming input failed",
        )
    )


class Database:
    def __init__(self, url: str, echo: bool = False, secrets: SecretBox | None = None) -> None:
        self.url = url
        # Seals and opens the deployments' secret values (secretbox.py).
        self.secrets = secrets or SecretBox.ephemeral()
        self.is_sqlite = url.startswith("sqlite")
        self.engine = self._make_engine(url, echo)
        self._write_lock = threading.Lock()
        self._listeners: list[Callable[[int], None]] = []
        self._finished_listeners: list[Callable[[FinishedOperation], None]] = []
        # Sessions open right now (worker threads may outlive a cancelled task).
        self._open = 0
        self._closed = False
        self._idle = threading.Condition()
        self._listener: notify.Listener | None = None

    @staticmethod
    def sqlite_url(data_dir: Path) -> str:
        return f"sqlite:///{data_dir / 'controlplane.db'}"

    def _make_engine(self, url: str, echo: bool) -> Engine:
        if not url.startswith("sqlite"):
            return create_engine(url, echo=echo, pool_size=10, max_overflow=20, pool_pre_ping=True)
        memory = url in ("sqlite://", "sqlite:///:memory:")
        kwargs: dict[str, Any] = {"poolclass": StaticPool} if memory else {}
        engine = create_engine(
            url, echo=echo, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            if not memory:
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine

    def migrate(self) -> None:
        """Brings the schema to the newest Alembic revision (idempotent)."""
        from controlplane.storage.migrate import upgrade

        upgrade(self.engine)
        with Session(self.engine) as s:
            if s.get(CounterRow, REVISION) is None:
                s.add(CounterRow(name=REVISION, value=0))
                s.commit()

    def on_commit(self, listener: Callable[[int], None]) -> None:
        """Calls ``listener(last_revision)`` after every write that emitted events: this
        process's own writes and, on PostgreSQL once ``listen()`` ran, other servers'."""
        self._listeners.append(listener)

    def on_operation_finished(self, listener: Callable[[FinishedOperation], None]) -> None:
        """Calls ``listener`` for each operation this process's writes finished, after they
        commit (once per operation: other servers' commits are theirs to count)."""
        self._finished_listeners.append(listener)

    def listen(self) -> None:
        """On PostgreSQL, starts hearing other servers' commits (no-op on SQLite)."""
        if self.is_sqlite or self._listener is not None:
            return
        self._listener = notify.Listener(self.url, self._changed)
        self._listener.start()

    def _changed(self, revision: int) -> None:
        for listener in self._listeners:
            listener(revision)

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._idle:
            if self._closed:
                raise DatabaseClosed("the database is closed (the server is stopping)")
            self._open += 1
        try:
            with Session(self.engine, expire_on_commit=False) as s:
                yield s
        except (OperationalError, InterfaceError) as e:
            if "database or disk is full" in str(e.orig or e).lower():  # SQLite
                raise disk_full("the database", OSError(errno.ENOSPC, str(e.orig))) from e
            if not _connection_lost(e):
                raise
            raise Unavailable(
                message="the database does not answer now (its connection was lost); "
                "nothing was changed: try again",
                reason="DATABASE_UNAVAILABLE",
            ) from e
        except OSError as e:
            if not is_disk_full(e):
                raise
            raise disk_full("the database", e) from e
        finally:
            with self._idle:
                self._open -= 1
                self._idle.notify_all()

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._session() as s:
            yield s

    @contextmanager
    def write(self) -> Iterator[WriteTx]:
        record = audit.pending()  # the mutation RPC this transaction serves, if any
        with self._write_lock, self._session() as s:
            tx = WriteTx(s)
            tx.lock()
            try:
                yield tx
                if record is not None:  # committed with the change, or not at all
                    audit.add_to(s, record)
                if tx.last_revision and not self.is_sqlite:
                    # Delivered at commit to every server LISTENing (notify.py).
                    s.execute(
                        text("SELECT pg_notify(:channel, :revision)"),
                        {"channel": notify.CHANNEL, "revision": str(tx.last_revision)},
                    )
                s.commit()
            except BaseException:
                s.rollback()
                raise
        if record is not None:
            record.written = True
            failpoints.hit("rpc.committed")
        if tx.last_revision:
            self._changed(tx.last_revision)
        for finished in tx.finished_operations:
            for listener in self._finished_listeners:
                listener(finished)

    def try_lock(self, key: int) -> Callable[[], None] | None:
        """Takes the cluster-wide lock ``key`` if free: its release, or None if held.

        PostgreSQL: a session advisory lock on a connection of its own, so two servers
        never interleave (say) two applies of the whole Serve config; it is released if
        the process dies. SQLite serves one process: nothing to take. Never blocks, so
        a caller that is cancelled never leaves a thread waiting for the lock.
        """
        if self.is_sqlite:
            return lambda: None
        conn = self.engine.connect()
        try:
            taken = conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar()
            conn.commit()
        except BaseException:
            conn.invalidate()
            conn.close()
            raise
        if not taken:
            conn.close()
            return None

        def release() -> None:
            try:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                conn.commit()
            except Exception:
                conn.invalidate()  # closing the session releases the lock
            finally:
                conn.close()

        return release

    def head_revision(self) -> int:
        with self.read() as s:
            row = s.get(CounterRow, REVISION)
            return row.value if row else 0

    def close(self, wait_s: float = 10.0) -> None:
        """Waits for sessions still open in worker threads, then closes every connection."""
        if self._listener is not None:
            self._listener.stop()
        with self._idle:
            self._closed = True
            self._idle.wait_for(lambda: self._open == 0, timeout=wait_s)
        self.engine.dispose()
