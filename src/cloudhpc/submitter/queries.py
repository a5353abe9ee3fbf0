"""The agent's answers to porter's questions (`domain/queries.py`): one function per kind, each a
call of the cluster's backend; every failure becomes an error answer with the status porter gives
the user, so porter never waits out a question the agent could not answer.

A new kind is a `QueryKind`, a function here taking the backend, the question and the cluster's
configuration, and a route that calls `porter/routes_agent_queries.ask_agent`: `estimate` (issue 15,
`sbatch --test-only`, `porter/routes_estimate.py`) is the second."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError

from cloudhpc.config import ClusterConfig
from cloudhpc.domain.job_files import MAX_FILE_READ
from cloudhpc.domain.jobs import JobSpec
from cloudhpc.domain.queries import AgentQuery, QueryAnswer, QueryError, QueryKind
from cloudhpc.exceptions import CloudHPCError, HttpProblem
from cloudhpc.hpc.backend import JobBackend
from cloudhpc.submitter.estimates import estimate_spec

__all__ = ["answer_query"]

log = logging.getLogger(__name__)


def _error(status: int, code: str, message: str) -> QueryAnswer:
    return QueryAnswer(error=QueryError(status=status, code=code, message=message[:4000]))


async def _job_files(backend: JobBackend, query: AgentQuery, config: ClusterConfig | None) -> dict[str, Any]:
    if query.job_id is None:
        raise HttpProblem(422, "invalid_request", "a job_files query names a job")
    params = query.params
    path = str(params.get("path", ""))
    offset = int(params.get("offset", 0))
    length = int(params.get("length", MAX_FILE_READ))
    found = await backend.browse(query.job_id, path, offset=offset, length=length)
    return found.model_dump(mode="json")


async def _estimate(backend: JobBackend, query: AgentQuery, config: ClusterConfig | None) -> dict[str, Any]:
    """`sbatch --test-only` on each partition the job may go to, with the costs (`submitter/estimates.py`)."""
    if config is None:
        raise HttpProblem(501, "unknown_query", "this agent has no cluster configuration to estimate with")
    try:
        spec = JobSpec.model_validate(query.params.get("spec"))
    except ValidationError as exc:
        raise ValueError(f"spec: {exc.errors()[0]['msg']}") from exc
    found = await estimate_spec(backend, config, spec, query.id)
    return found.model_dump(mode="json")


_ANSWERS: dict[str, Callable[[JobBackend, AgentQuery, ClusterConfig | None], Awaitable[dict[str, Any]]]] = {
    QueryKind.JOB_FILES: _job_files,
    QueryKind.ESTIMATE: _estimate,
}


async def answer_query(
    backend: JobBackend, query: AgentQuery, config: ClusterConfig | None = None
) -> QueryAnswer:
    """The answer to one question, never an exception; `config` is the cluster's (defaults, limits,
    billing), which some kinds need."""
    answer = _ANSWERS.get(query.kind)
    if answer is None:
        return _error(
            501, "unknown_query", f"this agent does not answer {query.kind!r} queries (an older version?)"
        )
    try:
        return QueryAnswer(result=await answer(backend, query, config))
    except HttpProblem as exc:  # JobFileError among them: the cluster side's own refusal
        return _error(exc.status, exc.code, exc.message)
    except (ValueError, TypeError) as exc:
        return _error(422, "invalid_request", f"invalid request: {exc}")
    except CloudHPCError as exc:
        log.warning("query %s (%s): the cluster could not answer (%s)", query.id, query.kind, exc)
        return _error(502, "cluster_error", f"the cluster could not answer: {exc}")
