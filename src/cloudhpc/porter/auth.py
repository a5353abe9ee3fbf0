"""Bearer-token authentication and the role rules of the API.

Tokens are looked up by their SHA-256 in the store, so porter never holds a plaintext token beyond
the request; a verified token is remembered (by its hash) for a few seconds (`TokenCache`), so a
revocation takes effect within that time. Roles: `user` acts on its own jobs, `agent` only on the
agent routes of the clusters it is bound to, `admin` on everything.
"""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import Depends, Request

from cloudhpc.domain.jobs import Job
from cloudhpc.exceptions import HttpProblem
from cloudhpc.porter.state import PorterState, state_of
from cloudhpc.store import Principal

__all__ = [
    "AgentPrincipal",
    "UserPrincipal",
    "agent_job",
    "authenticate",
    "require_agent_for",
    "require_user",
]


async def authenticate(request: Request) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HttpProblem(
            401,
            "unauthorized",
            "missing bearer token: send `Authorization: Bearer <token>` "
            "(create one with `cloudhpc tokens create --user NAME`)",
        )
    state = state_of(request)
    key = state.tokens.key(token.strip())
    known, principal = state.tokens.get(key)
    if not known:
        principal = await state.store.verify_token(token.strip())
        state.tokens.put(key, principal)
    if principal is None:
        raise HttpProblem(401, "unauthorized", "invalid or revoked token")
    return principal


async def require_user(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
    """User routes: people and admins. Agent tokens are for the agent protocol only."""
    if principal.role not in ("user", "admin"):
        raise HttpProblem(403, "forbidden", f"a {principal.role} token cannot use the user API")
    return principal


async def require_agent(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
    if principal.role not in ("agent", "admin"):
        raise HttpProblem(403, "forbidden", "the agent API needs an agent token")
    return principal


def require_agent_for(principal: Principal, cluster: str) -> None:
    """An agent acts only for the clusters its token is bound to."""
    if principal.role == "admin":
        return
    if cluster not in (principal.clusters or []):
        raise HttpProblem(403, "forbidden", f"this agent token is not bound to cluster {cluster!r}")


async def agent_job(state: PorterState, job_id: UUID, principal: Principal) -> Job:
    """The job `job_id`, for an agent bound to its cluster: 404 when there is no such job."""
    job = await state.store.get_job(job_id)
    if job is None:
        raise HttpProblem(404, "not_found", f"no job {job_id}")
    require_agent_for(principal, job.cluster)
    return job


UserPrincipal = Annotated[Principal, Depends(require_user)]
AgentPrincipal = Annotated[Principal, Depends(require_agent)]
