"""The agent's answers to porter's questions (`domain/queries.py`): each kind is one call of the
cluster's backend; every failure becomes an error answer with the status porter gives the user,
so porter never waits out a question the agent could not answer."""

from __future__ import annotations

import logging

from cloudhpc.domain.job_files import MAX_FILE_READ
from cloudhpc.domain.queries import AgentQuery, QueryAnswer, QueryError, QueryKind
from cloudhpc.exceptions import CloudHPCError, JobFileError
from cloudhpc.hpc.backend import JobBackend

__all__ = ["answer_query"]

log = logging.getLogger(__name__)


def _error(status: int, code: str, message: str) -> QueryAnswer:
    return QueryAnswer(error=QueryError(status=status, code=code, message=message[:4000]))


async def answer_query(backend: JobBackend, query: AgentQuery) -> QueryAnswer:
    """The answer to one question, never an exception."""
    if query.kind != QueryKind.JOB_FILES:
        return _error(
            501, "unknown_query", f"this agent does not answer {query.kind!r} queries (an older version?)"
        )
    if query.job_id is None:
        return _error(422, "invalid_request", "a job_files query names a job")
    params = query.params
    try:
        path = str(params.get("path", ""))
        offset = int(params.get("offset", 0))
        length = int(params.get("length", MAX_FILE_READ))
        found = await backend.browse(query.job_id, path, offset=offset, length=length)
    except JobFileError as exc:
        return _error(exc.status, exc.code, exc.message)
    except (ValueError, TypeError) as exc:
        return _error(422, "invalid_request", f"invalid request: path: {exc}")
    except CloudHPCError as exc:
        log.warning("job %s: files query failed on the cluster (%s)", query.job_id, exc)
        return _error(502, "cluster_error", f"the cluster could not answer: {exc}")
    return QueryAnswer(result=found.model_dump(mode="json"))
