"""Alembic, driven from code: the server upgrades its schema at start.

Migrations (``migrations/versions``) only add, so that servers of the previous release
keep working beside a new one during a rollout, and going back to the previous binary
needs no downgrade: new tables, and new columns that are nullable or have a server
default (a server that does not know a column must still be able to insert rows). A
new table's foreign keys to an existing table delete with it (``ON DELETE CASCADE`` or
``SET NULL``), so an older server can still delete what it knows. Never drop, rename or
retype a column in the release that stops using it; do that in a later release, once no
supported older binary reads it.

When the database is at a revision this binary does not know (a newer release migrated
it), ``upgrade`` leaves it as it is: it checks that the schema still has every table and
column this binary uses and nothing it could not write to, logs a warning naming both
revisions and returns; a schema that breaks the rule above stops the server instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, Engine, Table, text
from sqlmodel import SQLModel

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
# PostgreSQL advisory lock key: servers that start together migrate one after another.
MIGRATE_LOCK = 0x6D69677261  # "migra"


class IncompatibleSchema(RuntimeError):
    """The database was migrated by a release this binary cannot work beside."""


def alembic_config(engine: Engine | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if engine is not None:
        cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Brings the schema to ``revision``, or leaves a newer one as it is (see the module's
    doc). On PostgreSQL, under a lock held on a connection of its own, so that servers
    starting at once do not run the same migration twice (the second finds the schema
    already there)."""
    if engine.dialect.name != "postgresql":
        _upgrade(engine, revision)
        return
    with engine.connect() as lock:
        lock.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATE_LOCK})
        try:
            _upgrade(engine, revision)
        finally:
            lock.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATE_LOCK})
            lock.commit()


def _upgrade(engine: Engine, revision: str) -> None:
    cfg = alembic_config(engine)
    script = ScriptDirectory.from_config(cfg)
    known = {s.revision for s in script.walk_revisions()}
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_heads()
    unknown = sorted(set(current) - known)
    if not unknown:
        command.upgrade(cfg, revision)
        return
    ours = script.get_current_head() or "none"
    problems = incompatibilities(engine)
    if problems:
        raise IncompatibleSchema(
            f"the database schema is at revision {', '.join(unknown)}, which this binary "
            f"(newest revision {ours}) does not know, and it cannot work with it: "
            + "; ".join(problems)
        )
    log.warning(
        "the database schema is at revision %s, newer than this binary's newest revision "
        "%s: not migrating; running on it (newer releases only add to the schema)",
        ", ".join(unknown),
        ours,
    )


def incompatibilities(engine: Engine) -> list[str]:
    """How the database's schema breaks what this binary needs of it: a table or column
    the code uses that is missing or different, a column it does not know and could not
    insert a row without, a unique index or foreign key that could refuse its writes.
    Empty when the schema is this binary's own or one that only added to it."""
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    ours = set(SQLModel.metadata.tables)
    problems: list[str] = []
    for diff in diffs:
        problem = _problem(diff, ours)
        if problem:
            problems.append(problem)
    return problems


def _problem(diff: Any, ours: set[str]) -> str:
    if isinstance(diff, list):  # modify_type, modify_nullable, ... of one column
        return "; ".join(_modified(d) for d in diff)
    kind = diff[0]
    if kind == "remove_table":  # a table only the newer release uses
        table: Table = diff[1]
        for fk in table.foreign_keys:
            ondelete = (fk.ondelete or "").upper()
            if fk.column.table.name in ours and ondelete not in ("CASCADE", "SET NULL"):
                return (
                    f"table {table.name} references {fk.column.table.name} without "
                    "ON DELETE CASCADE or SET NULL"
                )
        return ""
    if kind == "remove_column":  # a column only the newer release uses
        column: Column[Any] = diff[3]
        if column.nullable or column.server_default is not None:
            return ""
        return f"column {diff[2]}.{column.name} is NOT NULL without a server default"
    if kind == "remove_index":
        return f"unique index {diff[1].name}" if diff[1].unique else ""
    if kind == "add_index":  # an index of ours the newer release dropped or renamed
        return ""
    if kind == "add_table":
        return f"table {diff[1].name} is missing"
    if kind == "add_column":
        return f"column {diff[2]}.{diff[3].name} is missing"
    return f"{kind} {diff[1:]}"


def _modified(diff: tuple[Any, ...]) -> str:
    kind, _schema, table, column = diff[:4]
    return f"{kind} {table}.{column}: {diff[-2]!r} in the database, {diff[-1]!r} here"
