"""Index agent queries by `expires_at` alone: the sweep of finished questions that every new
question runs (`store/queries.py`, `DELETE ... WHERE expires_at < now - KEEP`) could not use the
(cluster, expires_at) index, whose first column it does not name, and scanned the whole table
(67.5 ms per question with 240,000 rows on SQLite; `bench/agent_queries.py`).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_agent_queries_expires_at", "agent_queries", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_agent_queries_expires_at", table_name="agent_queries")
