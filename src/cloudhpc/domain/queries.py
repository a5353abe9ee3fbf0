"""Agent queries: questions porter asks a cluster's agent and waits for, because only the agent can
reach the cluster (porter never talks SSH).

Generic on purpose: a `kind` and JSON `params` in, a JSON `result` or an `error` out. `job_files`
(list or read a job's directory) is the first kind; `estimate` (`sbatch --test-only` on each
partition, `domain/billing.py`) the second, without a new table or channel call.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["AgentQuery", "QueryAnswer", "QueryError", "QueryKind"]


class QueryKind(StrEnum):
    JOB_FILES = "job_files"
    """params: {path, offset, length}; result: a `FilesAnswer`."""
    ESTIMATE = "estimate"
    """params: {spec}; result: an `Estimate` (`sbatch --test-only` per partition, costs)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AgentQuery(_Model):
    id: UUID
    cluster: str
    kind: str = Field(description="a `QueryKind`; an agent answers one it does not know with an error")
    job_id: UUID | None = None
    params: dict[str, Any] = Field(default_factory=dict)


class QueryError(_Model):
    """Why the agent could not answer: porter answers the caller with this status (4xx or 5xx)."""

    status: int = Field(ge=400, le=599)
    code: str = Field(max_length=64)
    message: str = Field(max_length=4000)


class QueryAnswer(_Model):
    """Exactly one of `result` and `error`."""

    result: dict[str, Any] | None = None
    error: QueryError | None = None
