"""LISTEN/NOTIFY: a commit in one server wakes another server's listeners (PostgreSQL)."""

from __future__ import annotations

import threading

from controlplane.storage.db import Database
from controlplane.storage.tables import CounterRow


def test_a_commit_on_one_database_object_wakes_the_other(fresh_postgres: str) -> None:
    writer, reader = Database(fresh_postgres), Database(fresh_postgres)
    writer.migrate()
    heard: list[int] = []
    woke = threading.Event()

    def on_change(revision: int) -> None:
        heard.append(revision)
        woke.set()

    reader.on_commit(on_change)
    reader.listen()
    try:
        with writer.write() as tx:
            revision = tx.next_revision()
        assert woke.wait(10), "the other server was not notified"
        assert revision in heard
        # A rolled-back write notifies nobody.
        woke.clear()
        try:
            with writer.write() as tx:
                tx.next_revision()
                tx.session.add(CounterRow(name="revision", value=-1))  # duplicate key
                tx.session.flush()
        except Exception:
            pass
        assert not woke.wait(1.0)
    finally:
        reader.close()
        writer.close()
