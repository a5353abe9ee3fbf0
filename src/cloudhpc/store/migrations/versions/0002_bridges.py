"""Bridges: the ports on the bridge VM held by live jobs.

Revision ID: 0002
Revises: 0001
Create Date: 2026-01-15
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "bridges",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("remote_port", sa.Integer(), nullable=False),
        sa.Column("bridge_host", sa.String(length=255), nullable=False),
        sa.Column("bridge_port", sa.Integer(), nullable=False),
        sa.Column("url", sa.Text(), nullable=True),
        sa.Column("service_dns", sa.String(length=255), nullable=True),
        sa.Column("ready", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("ready_at", _TS, nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_bridges_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bridges")),
        sa.UniqueConstraint("bridge_host", "bridge_port", name=op.f("uq_bridges_bridge_host_bridge_port")),
        sa.UniqueConstraint("job_id", "name", name=op.f("uq_bridges_job_id_name")),
    )
    op.create_index(op.f("ix_bridges_job_id"), "bridges", ["job_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_bridges_job_id"), table_name="bridges")
    op.drop_table("bridges")
