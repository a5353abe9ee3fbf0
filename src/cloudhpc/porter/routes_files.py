"""`GET /api/v1/jobs/{id}/files?path=`: list a directory or read a file of a job's directory on
its cluster, while it runs and after it ended.

porter has no SSH: it asks the cluster's agent (`routes_agent_queries.ask_agent`), which resolves
the path on the cluster and refuses anything that leads outside the job directory
(`hpc/job_files.py`). The path's form is checked here first (422 naming `path`), so a plainly bad
one never reaches the cluster.
"""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Query, Request

from cloudhpc.domain.job_files import MAX_FILE_READ, FilesAnswer, check_browse_path
from cloudhpc.domain.queries import QueryKind
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import HttpProblem
from cloudhpc.porter.auth import UserPrincipal
from cloudhpc.porter.openapi import ErrorBody
from cloudhpc.porter.routes_agent_queries import agent_result, ask_agent
from cloudhpc.porter.routes_artifacts import _user_job
from cloudhpc.porter.state import state_of

__all__ = ["router"]

router = APIRouter(prefix="/api/v1", tags=["jobs"])

_NOT_ON_CLUSTER = {JobState.PENDING, JobState.PREPARING}


@router.get(
    "/jobs/{job_id}/files",
    response_model=FilesAnswer,
    response_model_exclude_none=True,
    responses={
        429: {
            "model": ErrorBody,
            "description": "the caller already waits for that many answers of agents (`too_many_requests`)",
        },
        502: {"model": ErrorBody, "description": "the cluster could not answer (`cluster_error`)"},
        503: {
            "model": ErrorBody,
            "description": "a cluster behind the S3 mailbox (`agent_query_unsupported`)",
        },
        504: {
            "model": ErrorBody,
            "description": "the cluster's agent did not answer in time (`agent_timeout`)",
        },
    },
)
async def job_files(
    job_id: UUID,
    request: Request,
    principal: UserPrincipal,
    path: Annotated[str, Query(max_length=4096)] = "",
    offset: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
    length: Annotated[int, Query(ge=0, le=MAX_FILE_READ)] = MAX_FILE_READ,
) -> dict[str, Any]:
    """A directory's entries (name, type, size, mtime; `.cloudhpc/` hidden), or `length` bytes of a
    file from `offset` as base64 `content`. 403 for a path that resolves outside the job directory,
    404 when it does not exist, 409 before the job reached its cluster, 504 when the agent did not
    answer."""
    try:
        path = check_browse_path(path)
    except ValueError as exc:
        raise HttpProblem(
            422, "invalid_request", f"invalid request: path: {exc}", [{"field": "path", "message": str(exc)}]
        ) from exc
    state = state_of(request)
    job = await _user_job(state, job_id, principal)
    if job.state in _NOT_ON_CLUSTER or (job.state == JobState.FAILED and job.slurm_job_id is None):
        raise HttpProblem(
            409,
            "not_on_cluster",
            f"job {job.id} is {job.state.value}: it has no directory on its cluster (yet)",
        )
    result = await ask_agent(
        state,
        job.cluster,
        QueryKind.JOB_FILES,
        {"path": path, "offset": offset, "length": length},
        job_id=job.id,
        asker=principal.user,
    )
    return agent_result(FilesAnswer, result, job.cluster).model_dump(mode="json", exclude_none=True)
