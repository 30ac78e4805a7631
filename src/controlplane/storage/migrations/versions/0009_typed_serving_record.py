"""deployments: typed fields for what was kept as prose or hidden flags

ran_replica_ids (was a "ran" flag inside observed_replicas), serve_health (was a note
appended to message), awaiting_replacement (was the end of message). Existing rows are
split accordingly.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 20:30:00
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SERVE_REPORTS = "Serve reports the application "


def upgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("ran_replica_ids", sa.Text(), nullable=False, server_default="[]"))
        batch.add_column(
            sa.Column("awaiting_replacement", sa.Text(), nullable=False, server_default="[]")
        )
        batch.add_column(sa.Column("serve_health", sa.Text(), nullable=False, server_default=""))
    deployments = sa.table(
        "deployments",
        sa.column("id", sa.Integer),
        sa.column("observed_replicas", sa.Text),
        sa.column("ran_replica_ids", sa.Text),
        sa.column("message", sa.Text),
        sa.column("serve_health", sa.Text),
    )
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(deployments.c.id, deployments.c.observed_replicas, deployments.c.message)
    ).all()
    for id_, observed, message in rows:
        replicas = json.loads(observed or "[]")
        ran = sorted(r["id"] for r in replicas if r.pop("ran", False))
        at = (message or "").find(SERVE_REPORTS)
        note, health = (message, "") if at < 0 else (message[:at].removesuffix("; "), message[at:])
        conn.execute(
            deployments.update()
            .where(deployments.c.id == id_)
            .values(
                observed_replicas=json.dumps(replicas, sort_keys=True),
                ran_replica_ids=json.dumps(ran),
                message=note,
                serve_health=health,
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("serve_health")
        batch.drop_column("awaiting_replacement")
        batch.drop_column("ran_replica_ids")
