"""Agent queries: a question porter asks a cluster's agent (list or read a job's files, later an
`sbatch --test-only` estimate) and the agent's answer, so a route can wait for the cluster without
porter ever talking SSH.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "agent_queries",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("cluster", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=True),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("params", sa.Text(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("expires_at", _TS, nullable=False),
        sa.Column("claimed_by", sa.String(length=128), nullable=True),
        sa.Column("claimed_at", _TS, nullable=True),
        sa.Column("answered_at", _TS, nullable=True),
        sa.Column("answer", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_agent_queries_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agent_queries")),
    )
    op.create_index(op.f("ix_agent_queries_cluster_expires_at"), "agent_queries", ["cluster", "expires_at"])
    op.create_index(op.f("ix_agent_queries_job_id"), "agent_queries", ["job_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_agent_queries_job_id"), table_name="agent_queries")
    op.drop_index(op.f("ix_agent_queries_cluster_expires_at"), table_name="agent_queries")
    op.drop_table("agent_queries")
