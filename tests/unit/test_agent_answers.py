"""The agent's answers to porter's questions (#13 item 8): every failure is an answer with the
status porter will give, never an exception that leaves porter waiting for its 504."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from cloudhpc.domain.job_files import EntryType, FilesAnswer
from cloudhpc.domain.queries import AgentQuery, QueryAnswer
from cloudhpc.exceptions import JobFileError, SSHConnectError
from cloudhpc.submitter.queries import answer_query


class Browsing:
    """A backend whose `browse` answers (or raises) what a test sets."""

    def __init__(self, outcome: FilesAnswer | Exception) -> None:
        self.outcome = outcome
        self.calls: list[tuple[Any, ...]] = []

    async def browse(
        self, job_id: uuid.UUID, path: str, *, offset: int = 0, length: int | None = None
    ) -> FilesAnswer:
        self.calls.append((job_id, path, offset, length))
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


def ask(backend: Browsing, kind: str = "job_files", job: bool = True, **params: Any) -> QueryAnswer:
    query = AgentQuery(
        id=uuid.uuid4(), cluster="c", kind=kind, job_id=uuid.uuid4() if job else None, params=params
    )
    return asyncio.run(answer_query(backend, query))  # type: ignore[arg-type]


def test_a_listing_is_the_result() -> None:
    backend = Browsing(FilesAnswer(path="r", type=EntryType.DIRECTORY, entries=[]))
    answer = ask(backend, path="r", offset=3, length=9)
    assert answer.result == {"path": "r", "type": "directory", "entries": [], "truncated": False} | {
        k: None for k in ("size", "mtime", "offset", "content", "eof")
    }
    assert backend.calls[0][1:] == ("r", 3, 9)


@pytest.mark.parametrize(
    ("outcome", "status", "code"),
    [
        (JobFileError(403, "outside_job_directory", "'etc' resolves outside"), 403, "outside_job_directory"),
        (ValueError("path '../x' has an empty, '.' or '..' segment"), 422, "invalid_request"),
        (SSHConnectError("login node unreachable"), 502, "cluster_error"),
    ],
)
def test_failures_are_answers(outcome: Exception, status: int, code: str) -> None:
    answer = ask(Browsing(outcome), path="x")
    assert answer.error is not None
    assert (answer.error.status, answer.error.code) == (status, code)
    assert answer.result is None


def test_an_unknown_kind_or_a_question_without_its_job_is_refused() -> None:
    backend = Browsing(FilesAnswer(path="", type=EntryType.DIRECTORY))
    unknown = ask(backend, kind="sbatch_test_only")
    assert unknown.error is not None
    assert unknown.error.status == 501
    jobless = ask(backend, job=False)
    assert jobless.error is not None
    assert jobless.error.status == 422
    assert backend.calls == []
