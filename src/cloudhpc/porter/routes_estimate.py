"""`POST /api/v1/jobs:estimate`: when SLURM predicts a job would start on each partition it may go
to, and what it would cost there, without submitting it.

The body is a submission's, checked by the same function (`routes_jobs.check_spec`: what a
submission refuses, an estimate refuses). porter has no SSH: it asks the cluster's agent
(`routes_agent_queries.ask_agent`, query kind `estimate`), which runs `sbatch --test-only` with the
argv the submission would have on each allowed partition and adds the costs from the cluster's
rates (`submitter/estimates.py`). The question carries neither `env` values (secrets) nor the
`files` contents: the agent needs the resources, not them.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from cloudhpc.domain.billing import Estimate
from cloudhpc.domain.jobs import JobSpec
from cloudhpc.domain.queries import QueryKind
from cloudhpc.porter.auth import UserPrincipal
from cloudhpc.porter.openapi import ErrorBody
from cloudhpc.porter.routes_agent_queries import agent_result, ask_agent
from cloudhpc.porter.routes_jobs import check_spec
from cloudhpc.porter.state import state_of

__all__ = ["question", "router"]

router = APIRouter(prefix="/api/v1", tags=["jobs"])


def question(spec: JobSpec) -> dict[str, Any]:
    """The estimate query's params: the spec without what the estimate does not need and must not
    carry (environment values, file contents; the file names stay, a python job's `call` names one)."""
    bare = spec.model_copy(update={"env": {}, "files": dict.fromkeys(spec.files, "")})
    return {"spec": bare.model_dump(mode="json", by_alias=True, exclude_none=True)}


@router.post(
    "/jobs:estimate",
    response_model=Estimate,
    responses={
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
async def estimate_job(spec: JobSpec, request: Request, principal: UserPrincipal) -> Estimate:
    """Per partition: SLURM's predicted start (`sbatch --test-only`) or its refusal, and the cost
    in the site's units if the job ran to its time limit; `earliest` names the partition of the
    earliest start (what `resources.partition: auto` would choose). Nothing is submitted."""
    state = state_of(request)
    spec, _ = await check_spec(state, principal, spec)
    result = await ask_agent(
        state,
        spec.cluster,
        QueryKind.ESTIMATE,
        question(spec),
        instead="ask for estimates on a cluster whose agent reaches porter over HTTP; a job with "
        "`resources.partition: auto` is still placed by the agent when it submits it",
        asker=principal.user,
    )
    return agent_result(Estimate, result, spec.cluster)
