"""tokens (hashed access tokens) and audit_records (one row per mutation)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 13:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "tokens",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("token_id", sa.String(32), nullable=False),
        sa.Column("project", sa.String(63), nullable=False),
        sa.Column("role", sa.Integer(), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("creator", sa.String(120), nullable=False),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expire_time", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_tokens_token_id", "tokens", ["token_id"], unique=True)
    op.create_index("ix_tokens_project", "tokens", ["project"])
    op.create_table(
        "audit_records",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("principal", sa.String(120), nullable=False),
        sa.Column("project", sa.String(63), nullable=False),
        sa.Column("method", sa.String(120), nullable=False),
        sa.Column("resource", sa.String(250), nullable=False),
        sa.Column("code", sa.String(40), nullable=False),
        sa.Column("peer", sa.String(120), nullable=False),
        sa.Column("operation", sa.String(80), nullable=False),
    )
    op.create_index("ix_audit_records_time", "audit_records", ["time"])
    op.create_index("ix_audit_records_project", "audit_records", ["project"])


def downgrade() -> None:
    op.drop_table("audit_records")
    op.drop_table("tokens")
