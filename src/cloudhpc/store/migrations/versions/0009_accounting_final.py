"""Provisional accounting: `job_accounting.final` is False for a document the agent stored before
the scheduler had recorded all of the job (SLURM: the job's own row, which slurmctld sends from a
thread that wakes every 5 s, arrives a few seconds after a short job's end). porter lists such a
job as unaccounted until its final document replaces it, so that an agent that restarts in between
finishes it. Documents stored before are final.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "job_accounting", sa.Column("final", sa.Boolean(), nullable=False, server_default=sa.true())
    )


def downgrade() -> None:
    with op.batch_alter_table("job_accounting") as batch:
        batch.drop_column("final")
