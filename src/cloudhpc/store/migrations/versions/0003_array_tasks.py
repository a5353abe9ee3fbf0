"""Job arrays: each job's tasks as the agent last reported them, and the tasks whose
cancellation was asked for and not yet carried out.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # JSON text of [TaskObservation, ...]: read whole, paged in porter (at most 10 000 small rows)
    op.add_column("jobs", sa.Column("tasks", sa.Text(), nullable=True))
    # JSON list of task indices; NULL when none is asked for (what `claim_work` looks at)
    op.add_column("jobs", sa.Column("cancel_tasks", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("cancel_tasks")
        batch.drop_column("tasks")
