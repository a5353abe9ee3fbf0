"""`GET /api/v1/jobs/{id}/bridges`: where a job's exposed ports are reachable, and whether they answer.

With `?wait=SECONDS` the answer comes as soon as every bridge is ready (or the job has ended, or
the time is up): what `Client.wait_bridges` and `Client.ray_dashboard_url` long-poll on.
"""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Query, Request

from cloudhpc.domain.api import JobBridges
from cloudhpc.domain.jobs import Job
from cloudhpc.exceptions import HttpProblem
from cloudhpc.porter.auth import UserPrincipal
from cloudhpc.porter.state import PorterState, job_key, state_of
from cloudhpc.store import Principal

__all__ = ["router"]

router = APIRouter(prefix="/api/v1", tags=["bridges"])

MAX_WAIT_SECONDS = 60.0


async def _owned(state: PorterState, job_id: UUID, principal: Principal) -> Job:
    job = await state.store.get_job(job_id)
    if job is None or (principal.role != "admin" and job.owner != principal.user):
        raise HttpProblem(404, "not_found", "no such job (or it is not yours)")
    return job


def _settled(job: Job) -> bool:
    return job.state.terminal or all(b.ready for b in job.bridges)


@router.get("/jobs/{job_id}/bridges", response_model=JobBridges)
async def job_bridges(
    job_id: UUID,
    request: Request,
    principal: UserPrincipal,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_SECONDS)] = 0,
) -> JobBridges:
    """The job's bridges: `{name, remote_port, bridge_host, bridge_port, url, service_dns, ready}`
    each; empty for a job that exposes nothing or has ended (its ports are released)."""
    state = state_of(request)
    job = await state.long_poll(job_key(job_id), wait, lambda: _owned(state, job_id, principal), _settled)
    return JobBridges(job_id=job.id, state=job.state, bridges=list(job.bridges))
