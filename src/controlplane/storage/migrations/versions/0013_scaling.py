"""deployments.autoscaling and models.scale: autoscaling bounds, and the scale a model shows

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 08:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("autoscaling", sa.Text(), nullable=False, server_default=""))
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("scale", sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("scale")
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("autoscaling")
