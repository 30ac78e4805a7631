"""models.health and model_log_lines: what a model's replicas report

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 23:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("health", sa.Text(), nullable=False, server_default=""))
    op.create_table(
        "model_log_lines",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("replica", sa.String(length=100), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("build", sa.String(length=250), nullable=False),
        sa.Column("node", sa.String(length=100), nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stream", sa.String(length=10), nullable=False),
        sa.Column("request_id", sa.String(length=100), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.UniqueConstraint("model", "replica", "seq"),
    )
    op.create_index("ix_model_log_lines_model", "model_log_lines", ["model"])


def downgrade() -> None:
    op.drop_index("ix_model_log_lines_model", table_name="model_log_lines")
    op.drop_table("model_log_lines")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("health")
