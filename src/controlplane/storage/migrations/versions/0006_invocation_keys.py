"""invocation_keys: hashed keys that call one model's endpoint

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25 14:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "invocation_keys",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("creator", sa.String(120), nullable=False),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_invocation_keys_key_id", "invocation_keys", ["key_id"], unique=True)
    op.create_index("ix_invocation_keys_model", "invocation_keys", ["model"])


def downgrade() -> None:
    op.drop_table("invocation_keys")
