"""builds: runtime, resolved packages, cache hit, size (GetBuild shows them), no_cache

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 07:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("builds") as batch:
        batch.add_column(sa.Column("runtime", sa.String(100), nullable=False, server_default=""))
        batch.add_column(sa.Column("packages", sa.Text(), nullable=False, server_default="[]"))
        batch.add_column(
            sa.Column("cache_hit", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("size_bytes", sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(
            sa.Column("no_cache", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("builds") as batch:
        for column in ("no_cache", "size_bytes", "cache_hit", "packages", "runtime"):
            batch.drop_column(column)
