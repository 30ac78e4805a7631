"""Alembic environment: uses the engine handed over by controlplane.storage.migrate."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine, create_engine
from sqlmodel import SQLModel

import controlplane.storage.tables  # noqa: F401  (registers the tables)

target_metadata = SQLModel.metadata


def run() -> None:
    engine = context.config.attributes.get("engine")
    if not isinstance(engine, Engine):
        url = context.config.get_main_option("sqlalchemy.url")
        if not url:
            raise RuntimeError("no engine or sqlalchemy.url given to alembic")
        engine = create_engine(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=engine.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


run()
