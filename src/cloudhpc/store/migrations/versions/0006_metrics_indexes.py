"""Indexes for a metrics scrape that reads only what changed: the restarted jobs (restart counts)
and the accounting documents stored since the scrape before (billed units). Without them each
scrape read every job row and every accounting document: 17 ms of a 50 ms scrape of 10,500 jobs.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_jobs_restarts_cluster", "jobs", ["restarts", "cluster"])
    op.create_index("ix_job_accounting_updated_at", "job_accounting", ["updated_at"])


def downgrade() -> None:
    op.drop_index("ix_job_accounting_updated_at", table_name="job_accounting")
    op.drop_index("ix_jobs_restarts_cluster", table_name="jobs")
