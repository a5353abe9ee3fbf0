"""The agent protocol over HTTP: the submitter pulls work and pushes what it observes.

The agent never receives an inbound connection. It long-polls `GET /agent/work`, reports observed
state with sequence numbers (porter ignores stale ones), uploads job output by offset (idempotent,
so a retried upload never duplicates bytes) and stores accounting when a job ends.
"""

from __future__ import annotations

import json
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cloudhpc.domain.api import Accounting
from cloudhpc.domain.jobs import Job, Name
from cloudhpc.domain.reports import JobReport
from cloudhpc.exceptions import HttpProblem
from cloudhpc.porter.auth import AgentPrincipal, agent_job, require_agent_for
from cloudhpc.porter.limits import read_capped
from cloudhpc.porter.state import PorterState, cluster_key, job_key, state_of

__all__ = ["router"]

router = APIRouter(prefix="/api/v1/agent", tags=["agent"])

MAX_WAIT_SECONDS = 60.0
MAX_OUTPUT_CHUNK = 8 << 20
"""The largest output upload; the agent sends 4 MiB chunks."""
MAX_ACCOUNTING_BYTES = 1 << 20
"""sacct rows and seff figures of one job: a few KiB even for a large job with many steps."""
MAX_OFFSET = 2**63 - 1
"""Byte offsets are stored as SQL BIGINT."""
AGENT_NAME = r"^[^\x00-\x1f\x7f]{1,128}$"
"""An agent's name (host:pid:nonce) is stored as text: no control characters (PostgreSQL refuses NUL)."""
# How long a cluster stays with the agent that last called: a live agent calls every second or so
# (its long-poll re-checks), so this is also how soon a restarted agent takes over from a dead one.
AGENT_HOLD_SECONDS = 10.0


class ReportBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reports: list[JobReport] = Field(max_length=1000)


def _invalid_body(message: str) -> HttpProblem:
    return HttpProblem(
        422,
        "invalid_request",
        f"invalid request: (body): {message}",
        [{"field": "(body)", "message": message}],
    )


async def _serve_as(state: PorterState, cluster: str, agent: str) -> None:
    """Let `agent` act for `cluster` only if no other agent does (see `Store.take_agent_slot`)."""
    held = await state.store.take_agent_slot(cluster, agent, hold_seconds=AGENT_HOLD_SECONDS)
    if held is not None:
        other, silent = held
        raise HttpProblem(
            409,
            "agent_conflict",
            f"cluster {cluster!r} is served by another submitter ({other}, heard from {silent:.0f} s ago): "
            f"run one submitter per cluster; a restarted one takes over {AGENT_HOLD_SECONDS:.0f} s after "
            "its predecessor's last call",
        )


@router.get("/work")
async def claim_work(
    request: Request,
    principal: AgentPrincipal,
    cluster: Annotated[Name, Query()],
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_SECONDS)] = 0,
    agent: Annotated[str, Query(pattern=AGENT_NAME)] = "agent",
) -> dict[str, Any]:
    """Jobs that need the agent (new ones, cancel requests), waiting up to `wait` s for some."""
    require_agent_for(principal, cluster)
    state = state_of(request)

    async def claim() -> list[Job]:
        # each re-check also renews the agent's hold on the cluster: 5 s at most, under the 10 s hold
        await _serve_as(state, cluster, agent)
        return await state.store.claim_work(cluster, agent)

    jobs = await state.long_poll(cluster_key(cluster), wait, claim, bool, request=request)
    return {"jobs": [j.model_dump(mode="json", by_alias=True) for j in jobs]}


@router.get("/jobs")
async def active_jobs(
    request: Request,
    principal: AgentPrincipal,
    cluster: Annotated[Name, Query()],
    agent: Annotated[str, Query(pattern=AGENT_NAME)] = "agent",
) -> dict[str, Any]:
    """What a (re)started agent reconciles against SLURM: every non-terminal job of the cluster
    (`jobs`), recently ended jobs whose accounting never arrived (`unaccounted`), and the highest
    report seq applied for the cluster (`seq_floor`)."""
    require_agent_for(principal, cluster)
    await _serve_as(state_of(request), cluster, agent)
    view = await state_of(request).store.reconciliation(cluster)
    return view.model_dump(mode="json", by_alias=True)


@router.post("/reports")
async def post_reports(batch: ReportBatch, request: Request, principal: AgentPrincipal) -> dict[str, Any]:
    state = state_of(request)
    applied = ignored = 0
    for report in batch.reports:
        await agent_job(state, report.job_id, principal)
        job = await state.store.apply_report(report, actor=principal.user)
        if job is None:
            ignored += 1
            continue
        applied += 1
        state.notifier.notify(job_key(report.job_id))
    return {"applied": applied, "ignored": ignored}


@router.post("/jobs/{job_id}/output")
async def post_output(
    job_id: UUID,
    request: Request,
    principal: AgentPrincipal,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)],
) -> dict[str, int]:
    """The body (raw bytes) is the job's output from `offset`, at most 8 MiB per request."""
    state = state_of(request)
    await agent_job(state, job_id, principal)
    data = await read_capped(request, MAX_OUTPUT_CHUNK, "an output chunk (send output in chunks)")
    size = await state.store.append_output(job_id, offset, data)
    state.notifier.notify(job_key(job_id))
    return {"size": size}


@router.put(
    "/jobs/{job_id}/accounting",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object", "additionalProperties": True}}},
        }
    },
)
async def put_accounting(job_id: UUID, request: Request, principal: AgentPrincipal) -> dict[str, bool]:
    """The body is the job's accounting document (a JSON object of at most 1 MiB: sacct rows and
    seff figures), read with that cap rather than whole. A provisional one (`"final": false`) never
    replaces a final one: `stored` is then False."""
    state = state_of(request)
    await agent_job(state, job_id, principal)
    raw = await read_capped(request, MAX_ACCOUNTING_BYTES, "the accounting document")
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than Python parses
        raise _invalid_body(f"not JSON: {exc}") from exc
    if not isinstance(record, dict):
        raise _invalid_body("the accounting document must be a JSON object")
    try:
        # the document users read back as `Accounting` (GET /jobs/{id}/accounting): a field of
        # the wrong type is refused here, naming it, rather than stored and answered with a 500
        Accounting.model_validate(record)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from exc
    # False: a provisional document after the final one (an agent that restarted), dropped
    return {"stored": await state.store.set_accounting(job_id, record)}
