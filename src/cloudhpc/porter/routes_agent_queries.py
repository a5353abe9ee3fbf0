"""Agent queries over HTTP: porter asks a cluster's agent a question and waits a bounded time for
the answer; the agent long-polls for questions and posts answers (`domain/queries.py`).

The question is a row in the store (`store/queries.py`), so the route that asks and the agent's
poll may be on different replicas: the write wakes the agent's poll (`queries:<cluster>`), the
answer wakes the asking route (`query:<id>`), on PostgreSQL across replicas, and both re-read the
store at the usual re-check interval as a safety net. No answer within the wait is a 504 that says
the agent did not answer, never a 500.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar
from uuid import UUID

from fastapi import APIRouter, Body, Query, Request
from pydantic import BaseModel, ValidationError

from cloudhpc.domain.jobs import Name
from cloudhpc.domain.queries import AgentQuery, QueryAnswer
from cloudhpc.exceptions import HttpProblem
from cloudhpc.porter.auth import AgentPrincipal, require_agent_for
from cloudhpc.porter.routes_agent import AGENT_NAME, MAX_WAIT_SECONDS
from cloudhpc.porter.state import PorterState, state_of
from cloudhpc.store.queries import answer_key, queries_key

__all__ = ["agent_result", "ask_agent", "router"]

M = TypeVar("M", bound=BaseModel)

router = APIRouter(prefix="/api/v1/agent", tags=["agent"])

_FILES_INSTEAD = (
    "list and read a job's files on a cluster whose agent reaches porter over HTTP, or name them "
    "in the job's `outputs` to have them collected when it ends"
)


MAX_OPEN_QUESTIONS = 8
"""Questions one user may wait for at once on one replica. An agent answers over its cluster's one
SSH connection (one SFTP channel, served one request at a time): without a cap, one user's parallel
files requests kept that queue full, so everyone else's questions to the cluster waited behind them
and answered 504 (tests/integration/test_review_queries.py)."""


async def ask_agent(
    state: PorterState,
    cluster: str,
    kind: str,
    params: dict[str, Any],
    *,
    job_id: UUID | None = None,
    wait: float | None = None,
    instead: str = _FILES_INSTEAD,
    asker: str | None = None,
) -> dict[str, Any]:
    """Ask `cluster`'s agent and return its result; its error becomes the caller's answer, and no
    answer within `wait` seconds a 504 (503 for a cluster whose agent uses the S3 mailbox, which
    does not carry queries: `instead` says what the user can do there). `asker`, the user the
    question is for, may wait for at most `MAX_OPEN_QUESTIONS` answers at once (429 beyond)."""
    if asker is None:
        return await _ask(state, cluster, kind, params, job_id=job_id, wait=wait, instead=instead)
    with state.user_slots.take("questions", asker, MAX_OPEN_QUESTIONS, "requests that wait for an agent"):
        return await _ask(state, cluster, kind, params, job_id=job_id, wait=wait, instead=instead)


async def _ask(
    state: PorterState,
    cluster: str,
    kind: str,
    params: dict[str, Any],
    *,
    job_id: UUID | None,
    wait: float | None,
    instead: str,
) -> dict[str, Any]:
    if cluster in state.settings.porter.mailbox_clusters:
        raise HttpProblem(
            503,
            "agent_query_unsupported",
            f"cluster {cluster!r} is served through the S3 mailbox, which carries no queries to its agent: "
            + instead,
        )
    wait = wait if wait is not None else state.settings.porter.agent_query_wait
    query_id = await state.store.ask_agent(cluster, kind, params, job_id=job_id, ttl=wait + 5.0)
    state.notifier.notify(queries_key(cluster))
    try:
        answer = await state.long_poll(
            answer_key(query_id),
            wait,
            lambda: state.store.query_answer(query_id),
            lambda seen: seen is not None,
        )
    finally:
        await state.store.forget_query(query_id)
    if answer is None:
        raise HttpProblem(
            504,
            "agent_timeout",
            f"the agent of cluster {cluster!r} did not answer within {wait:.0f} s (is its submitter "
            "running? `cloudhpc clusters list` shows when it was last seen)",
        )
    if answer.error is not None:
        raise HttpProblem(answer.error.status, answer.error.code, answer.error.message)
    return answer.result or {}


def agent_result(model: type[M], result: dict[str, Any], cluster: str) -> M:
    """The agent's `result` read as `model`; a 502 when it is not one (an agent of another version, or
    one that answers nonsense), where reading it unchecked answered the user with a 500."""
    try:
        return model.model_validate(result)
    except ValidationError as exc:
        raise HttpProblem(
            502,
            "cluster_error",
            f"the agent of cluster {cluster!r} gave an answer porter cannot read ({exc.error_count()} "
            "errors; is the submitter of another cloudhpc version?)",
        ) from exc


@router.get("/queries")
async def claim_queries(
    request: Request,
    principal: AgentPrincipal,
    cluster: Annotated[Name, Query()],
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_SECONDS)] = 0,
    agent: Annotated[str, Query(pattern=AGENT_NAME)] = "agent",
) -> dict[str, Any]:
    """Questions for the cluster's agent, waiting up to `wait` s for some."""
    require_agent_for(principal, cluster)
    state = state_of(request)
    queries: list[AgentQuery] = await state.long_poll(
        queries_key(cluster), wait, lambda: state.store.claim_queries(cluster, agent), bool, request=request
    )
    return {"queries": [q.model_dump(mode="json") for q in queries]}


@router.post("/queries/{query_id}/answer")
async def answer_query(
    query_id: UUID, request: Request, principal: AgentPrincipal, body: Annotated[QueryAnswer, Body()]
) -> dict[str, bool]:
    """The agent's answer to one question (`result` or `error`)."""
    state = state_of(request)
    cluster = await state.store.query_cluster(query_id)
    if cluster is None:
        raise HttpProblem(404, "not_found", f"no query {query_id} (it expired)")
    require_agent_for(principal, cluster)
    if (body.result is None) == (body.error is None):
        raise HttpProblem(
            422,
            "invalid_request",
            "invalid request: (body): exactly one of `result` and `error`",
            [{"field": "(body)", "message": "exactly one of `result` and `error`"}],
        )
    stored = await state.store.answer_query(query_id, body)
    state.notifier.notify(answer_key(query_id))
    return {"stored": stored}
