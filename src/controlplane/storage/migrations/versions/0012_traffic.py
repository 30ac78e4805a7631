"""models.traffic and operations.rollout: two builds live, and a judged rollout's step

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 04:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("traffic", sa.Text(), nullable=False, server_default=""))
    with op.batch_alter_table("operations") as batch:
        batch.add_column(sa.Column("rollout", sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("operations") as batch:
        batch.drop_column("rollout")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("traffic")
