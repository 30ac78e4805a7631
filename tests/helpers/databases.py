"""PostgreSQL for the tests: the server (``CP_TEST_PG``) and databases of a test's own."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import psycopg

PG_ADMIN = os.environ.get("CP_TEST_PG", "postgresql://root@127.0.0.1:5432/test")


@contextlib.contextmanager
def new_postgres_database(prefix: str = "cp_own") -> Iterator[str]:
    """A new, empty database (its SQLAlchemy URL), dropped when the block ends."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
