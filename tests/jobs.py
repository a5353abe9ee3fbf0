"""A job as porter's store holds it, built from its spec, for tests that hand one to the agent, a
channel or a pipeline step without going through porter; and a job's whole log read back from porter."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

from cloudhpc.client import Client
from cloudhpc.domain.jobs import Job, JobSpec
from cloudhpc.domain.states import JobState

__all__ = ["job_from", "stored_log"]


def job_from(
    spec: JobSpec, *, owner: str = "alice", state: JobState = JobState.PENDING, **fields: Any
) -> Job:
    """`spec` as `owner`'s job in `state`, created now unless `created_at` says otherwise; `fields`
    set the rest (bridges, cancel_requested, timestamps...)."""
    return Job(
        id=uuid4(),
        name=spec.name,
        owner=owner,
        cluster=spec.cluster,
        kind=spec.kind,
        state=state,
        created_at=fields.pop("created_at", None) or datetime.now(UTC),
        spec=spec,
        **fields,
    )


def stored_log(client: Client, job: Job) -> bytes:
    """The job's whole log as porter serves it."""
    data = b""
    while True:
        chunk = client.logs(job, offset=len(data))
        if not chunk.data:
            return data
        data += chunk.data
