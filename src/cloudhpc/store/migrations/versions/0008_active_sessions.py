"""Warm Ray sessions opened atomically: `jobs.is_session` marks a ray-cluster opened as a session
(`POST /api/v1/ray-sessions`), and a unique index over the active ones (opened as a session, not
being cancelled, not ended) per owner, cluster and name makes two opens at the same moment one
session: the second insert fails and re-attaches to the first. Before, the SDK listed and then
submitted, and two notebook cells or pipeline steps opening `dev` together started two SLURM jobs.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# frozen here as it was written: models.ACTIVE_SESSION may change with a later migration
ACTIVE_SESSION = (
    "is_session AND NOT cancel_requested AND state IN ('pending', 'preparing', 'queued', 'running')"
)


def upgrade() -> None:
    op.add_column("jobs", sa.Column("is_session", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_index(
        "ux_jobs_active_session",
        "jobs",
        ["owner", "cluster", "name"],
        unique=True,
        sqlite_where=sa.text(ACTIVE_SESSION),
        postgresql_where=sa.text(ACTIVE_SESSION),
    )


def downgrade() -> None:
    op.drop_index("ux_jobs_active_session", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("is_session")
