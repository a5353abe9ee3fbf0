"""The shapes of porter's answers that are not a job: pages, clusters, the caller, artifacts,
accounting, bridges, uploads. One definition each, used by porter (as the routes'
`response_model`, so that `/openapi.json` documents every field) and by the SDK
(`cloudhpc.client`), so that a notebook gets attributes and a type checker sees the
fields instead of a `dict[str, Any]` to index by guess.

Unknown fields are kept (`extra="allow"`) rather than refused: an SDK older than the porter it
talks to must still read an answer that gained a field.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict

from cloudhpc.domain.arrays import TaskObservation
from cloudhpc.domain.billing import BilledUnits
from cloudhpc.domain.jobs import Bridge, JobSummary
from cloudhpc.domain.states import JobState

__all__ = [
    "Accounting",
    "AccountingRow",
    "Artifact",
    "ArtifactList",
    "ClusterInfo",
    "ClusterList",
    "Efficiency",
    "JobBridges",
    "JobPage",
    "Me",
    "TaskPage",
    "Upload",
]


class _Answer(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class JobPage(_Answer):
    """A page of `GET /jobs`: summaries (no spec), and the cursor of the next page (null: the last)."""

    jobs: list[JobSummary]
    next_cursor: str | None


class TaskPage(_Answer):
    """A page of `GET /jobs/{id}/tasks`, by task index; `next_cursor` (null: the last page) is
    passed back as `cursor`."""

    tasks: list[TaskObservation]
    next_cursor: str | None


class ClusterInfo(_Answer):
    """One cluster of `GET /clusters`: its backend (null when porter has no configuration for it)
    and whether its agent was heard from in the last 90 s."""

    name: str
    backend: str | None = None
    agent_last_seen: datetime | None = None
    agent_online: bool = False


class ClusterList(_Answer):
    """`GET /clusters`: the clusters the caller may use (one it may not use is not listed)."""

    clusters: list[ClusterInfo]


class Me(_Answer):
    """`GET /me`: who the token speaks for, and the URL prefixes its jobs' `files` may name (store a
    job's inputs there before submitting it)."""

    user: str
    role: Literal["user", "agent", "admin"] | str
    inputs: list[str]


class Artifact(_Answer):
    """One stored file of a job (`spec.json`, `job.sh`, `output.log`, `sacct.json`, ...): `url` is a
    presigned S3 URL, or porter's own download route (which needs the token)."""

    name: str
    key: str
    url: str


class ArtifactList(_Answer):
    """`GET /jobs/{id}/artifacts`, by name."""

    artifacts: list[Artifact]


class JobBridges(_Answer):
    """`GET /jobs/{id}/bridges`: the job's state (a long-poll ends when it is terminal) and its
    bridges, empty for a job that exposes nothing or has ended (its ports are released)."""

    job_id: UUID
    state: JobState
    bridges: list[Bridge]


class Upload(_Answer):
    """`POST /uploads`: where the bytes were stored; `url` is what a job's `files` names."""

    url: str
    key: str
    size: int


class AccountingRow(_Answer):
    """One sacct row (the allocation, or one step) as the agent stored it (the fields of the agent's
    `hpc.backend.AccountingRecord`): durations in seconds, sizes in bytes, times in UTC; `None`
    where sacct had no value (or an older agent did not send the field)."""

    job_id: str | None = None
    step: str | None = None
    name: str | None = None
    state: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    submit: datetime | None = None
    start: datetime | None = None
    end: datetime | None = None
    elapsed_seconds: int | None = None
    total_cpu_seconds: float | None = None
    alloc_cpus: int | None = None
    nodes: int | None = None
    node_list: str | None = None
    req_mem_bytes: int | None = None
    max_rss_bytes: int | None = None
    partition: str | None = None
    account: str | None = None
    timelimit_seconds: int | None = None
    alloc_tres: str | None = None
    billing: float | None = None


class Efficiency(_Answer):
    """What seff reports, or the same computed with seff's formulas from sacct (`source`: `seff` or
    `sacct`); efficiencies are fractions (0..1, memory may exceed 1 where limits are not enforced)."""

    state: str | None = None
    cpu_efficiency: float | None = None
    memory_efficiency: float | None = None
    cpu_utilized_seconds: float | None = None
    core_walltime_seconds: float | None = None
    memory_utilized_bytes: int | None = None
    memory_requested_bytes: int | None = None
    source: str | None = None


class Accounting(_Answer):
    """`GET /jobs/{id}/accounting`: the job's sacct rows and its efficiency, stored when it ended,
    and the units it was billed where its cluster has rates (`clusters.<name>.billing`)."""

    slurm_job_id: str | None = None
    final: bool = True
    """False while the scheduler has not recorded all of the job yet (SLURM: the job's own row
    comes from slurmctld's 5 s bookkeeping thread, a few seconds after a short job's end): the
    steps' figures are in, the job's name, partition and requested memory may still be
    slurmdbd's placeholder, and no units are billed. The document is replaced when final
    (documents stored before this field existed were final)."""
    records: list[AccountingRow] = []
    efficiency: Efficiency | None = None
    billed: BilledUnits | None = None
