"""`POST /api/v1/ray-sessions`: open the caller's warm Ray session, atomically.

A session is a `ray-cluster` with its dashboard exposed (the agent submits the session's ray-jobs
through it), known by its owner, cluster and name. Opening one returns the caller's active session
of that name (200) or submits a new one from the body (201). The store decides in one transaction
(a unique index over the active sessions: `JobRepository.open_session`), so two notebook cells or
pipeline steps opening `dev` at the same moment, on one porter or on two replicas, get one SLURM
job; listing and then submitting from the SDK, as it was done before, started two.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from cloudhpc.domain.jobs import Job, JobKind, JobSpec
from cloudhpc.domain.redaction import redacted_job
from cloudhpc.exceptions import HttpProblem
from cloudhpc.porter.auth import UserPrincipal
from cloudhpc.porter.routes_jobs import check_spec
from cloudhpc.porter.state import cluster_key, state_of

__all__ = ["router"]

router = APIRouter(prefix="/api/v1", tags=["jobs"])


def _problem(field: str, message: str) -> HttpProblem:
    return HttpProblem(
        422, "invalid_request", f"invalid request: {field}: {message}", [{"field": field, "message": message}]
    )


def _check_session(spec: JobSpec) -> None:
    """What makes a ray-cluster a session: the kind, and the dashboard the agent submits through."""
    if spec.kind != JobKind.RAY_CLUSTER:
        raise _problem("kind", f"a session is a {JobKind.RAY_CLUSTER.value}, not a {spec.kind.value}")
    if spec.ray is None or not any(port.name == "dashboard" for port in spec.ray.expose):
        raise _problem(
            "ray.expose", "a session exposes its dashboard: the agent submits its ray-jobs through it"
        )


@router.post(
    "/ray-sessions",
    status_code=201,
    response_model=Job,
    responses={200: {"model": Job, "description": "the caller's active session of this name, re-attached"}},
)
async def open_session(spec: JobSpec, request: Request, response: Response, principal: UserPrincipal) -> Job:
    """The caller's active session `name` on `cluster` (200, as it runs: this body's size and
    environment are not applied to it), or a new one submitted from this body (201). A session
    being cancelled or ended does not count: the next open starts a new one."""
    _check_session(spec)
    state = state_of(request)
    spec, bridges = await check_spec(state, principal, spec)
    job, created = await state.store.open_session(principal.user, spec, bridges=bridges)
    if created:
        state.notifier.notify(cluster_key(job.cluster))
    else:
        response.status_code = 200
    return redacted_job(job)
