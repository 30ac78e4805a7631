"""The schema the migrations make is the one the code reads and writes, on SQLite and
PostgreSQL; servers that start at once on a new PostgreSQL database both come up; a
server starts on a database a newer release migrated (a rollback, or an old server
restarted mid-rollout) when that release only added to the schema, and refuses to when
it did not."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import grpc
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, inspect, text
from sqlmodel import SQLModel

from controlplane.storage import tables  # noqa: F401 (registers every table)
from controlplane.storage.db import Database
from controlplane.storage.migrate import IncompatibleSchema, alembic_config, upgrade
from tests.helpers.api import MODEL_V1, Stub, build, create_model, fake_settings, running

FUTURE = "9999_from_a_newer_release"


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


def upgrade_together(engines: list[Engine]) -> list[BaseException]:
    """Servers starting at the same time: each engine's upgrade in a thread of its own."""
    errors: list[BaseException] = []

    def start(engine: Engine) -> None:
        try:
            upgrade(engine)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=start, args=(engine,)) for engine in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return errors


def test_servers_starting_together_migrate_once(fresh_postgres: str) -> None:
    engines = [create_engine(fresh_postgres) for _ in range(3)]
    errors = upgrade_together(engines)
    for engine in engines:
        engine.dispose()
    assert errors == []


def migrated_by_a_newer_release(url: str, *changes: str) -> Engine:
    """A database at this binary's head, changed by ``changes`` (SQL) and stamped with a
    revision this binary does not know, as a newer release would leave it."""
    db = Database(url)
    db.migrate()
    db.close()
    engine = create_engine(url)
    with engine.begin() as conn:
        for change in changes:
            conn.execute(text(change))
        conn.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": FUTURE})
    return engine


def schema_revision(engine: Engine) -> str:
    with engine.connect() as conn:
        return str(conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one())


@pytest.mark.timeout(60)
async def test_a_server_starts_on_a_schema_a_newer_release_added_to(
    fresh_db: str, tmp_path: Path, project: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = migrated_by_a_newer_release(
        fresh_db,
        "CREATE TABLE future_things (id INTEGER PRIMARY KEY, note TEXT NOT NULL)",
        "CREATE INDEX ix_future_things_note ON future_things (note)",
        "ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE models ADD COLUMN labels TEXT",
    )
    ours = ScriptDirectory.from_config(alembic_config()).get_current_head()
    try:
        caplog.set_level(logging.WARNING, logger="controlplane.storage.migrate")
        async with (
            running(fake_settings(fresh_db, tmp_path)) as srv,
            grpc.aio.insecure_channel(srv.grpc_address) as channel,
        ):
            stub = Stub(channel)
            model = (await create_model(stub, project, "after-rollback")).name
            op = await build(stub, model, MODEL_V1)
            assert op.done and not op.HasField("error"), op
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(FUTURE in m and f"revision {ours}" in m for m in warned), warned
        assert schema_revision(engine) == FUTURE, "the newer release's schema is left as is"
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM jobs WHERE priority = 0")).scalar()
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "change, problem",
    [
        ("ALTER TABLE deployments DROP COLUMN secret_environment", "secret_environment"),
        ("DROP TABLE invocation_keys", "invocation_keys is missing"),
        (
            "CREATE TABLE model_notes (id INTEGER PRIMARY KEY,"
            " model_id INTEGER REFERENCES models (id))",
            "model_notes references models",
        ),
    ],
)
def test_a_newer_schema_this_binary_cannot_use_stops_it(
    fresh_db: str, change: str, problem: str
) -> None:
    engine = migrated_by_a_newer_release(fresh_db, change)
    try:
        with pytest.raises(IncompatibleSchema, match=problem) as raised:
            upgrade(engine)
        assert FUTURE in str(raised.value)
        assert schema_revision(engine) == FUTURE
    finally:
        engine.dispose()


def test_a_newer_column_this_binary_could_not_insert_without_stops_it(
    fresh_postgres: str,
) -> None:
    """(SQLite cannot add a NOT NULL column without a default at all.)"""
    engine = migrated_by_a_newer_release(
        fresh_postgres, "ALTER TABLE models ADD COLUMN owner TEXT NOT NULL"
    )
    try:
        with pytest.raises(IncompatibleSchema, match=r"models\.owner is NOT NULL"):
            upgrade(engine)
    finally:
        engine.dispose()


def test_servers_starting_together_on_a_newer_schema_all_start(fresh_postgres: str) -> None:
    migrated_by_a_newer_release(fresh_postgres, "ALTER TABLE jobs ADD COLUMN note TEXT").dispose()
    engines = [create_engine(fresh_postgres) for _ in range(3)]
    assert upgrade_together(engines) == []
    assert schema_revision(engines[0]) == FUTURE
    for engine in engines:
        engine.dispose()
