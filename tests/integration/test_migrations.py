"""The schema the migrations make is the one the code reads and writes, on SQLite and
PostgreSQL; servers that start at once on a new PostgreSQL database both come up."""

from __future__ import annotations

import threading

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect
from sqlmodel import SQLModel

from controlplane.storage import tables  # noqa: F401 (registers every table)
from controlplane.storage.db import Database
from controlplane.storage.migrate import upgrade


def test_migrations_make_exactly_the_tables_of_the_code(fresh_db: str) -> None:
    db = Database(fresh_db)
    try:
        db.migrate()
        with db.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
        # Server-side defaults and index names are the migrations' own business.
        assert [d for d in diff if d[0] not in ("remove_index", "add_index")] == []
        assert "trace_parent" in {c["name"] for c in inspect(db.engine).get_columns("jobs")}
    finally:
        db.close()


def test_servers_starting_together_migrate_once(fresh_postgres: str) -> None:
    engines = [create_engine(fresh_postgres) for _ in range(3)]
    errors: list[BaseException] = []

    def start(i: int) -> None:
        try:
            upgrade(engines[i])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for engine in engines:
        engine.dispose()
    assert errors == []
