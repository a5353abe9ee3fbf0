"""Naming our SLURM jobs, and reading SLURM's job ids (allocations, array tasks, het jobs, steps).

A cloudhpc job is found again on the cluster by two marks derived from its UUID (the job name and
the comment), so no user input ever reaches `--job-name` or `--comment`. A SLURM id is checked
against a strict pattern before it is put on a command line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from uuid import UUID

from cloudhpc.exceptions import ParseError

__all__ = [
    "COMMENT_PREFIX",
    "JOB_NAME_PREFIX",
    "SlurmJobId",
    "allocation_ids",
    "check_native_id",
    "comment_for",
    "expand_array_tasks",
    "is_step_row",
    "job_name_for",
    "owner_of_name",
    "parse_job_id",
]

JOB_NAME_PREFIX = "chpc-"
"""SLURM job names are `chpc-<uuid>`: the full id, so `--name` finds a job again after a restart."""

COMMENT_PREFIX = "cloudhpc:"
"""`--comment=cloudhpc:<uuid>`: a second, independent mark that a SLURM job is ours."""

_NATIVE_ID = re.compile(r"^[0-9]{1,12}(?:_[0-9]{1,9})?$")
_JOB_ID = re.compile(
    r"^(?P<job>[0-9]+)"
    r"(?:_(?P<task>[0-9]+|\[[0-9,%\-]+\]))?"
    r"(?:\+(?P<het>[0-9]+))?"
    r"(?:\.(?P<step>[A-Za-z0-9_+\-]+))?$"
)


def job_name_for(job_id: UUID) -> str:
    """The SLURM job name of a cloudhpc job; derived, so user input never reaches `--job-name`."""
    return f"{JOB_NAME_PREFIX}{_uuid(job_id)}"


def owner_of_name(name: str) -> UUID | None:
    """The cloudhpc job a SLURM job name belongs to (`job_name_for`'s inverse); None for a name
    that is not ours."""
    if not name.startswith(JOB_NAME_PREFIX):
        return None
    try:
        return UUID(name[len(JOB_NAME_PREFIX) :])
    except ValueError:
        return None


def comment_for(job_id: UUID) -> str:
    return f"{COMMENT_PREFIX}{_uuid(job_id)}"


def _uuid(job_id: UUID) -> UUID:
    if not isinstance(job_id, UUID):
        raise TypeError(f"a cloudhpc job id must be a UUID, not {type(job_id).__name__} {job_id!r}")
    return job_id


def check_native_id(native_id: str) -> str:
    """Refuse anything but a SLURM job id (`123`, `123_7`) before it is put on a command line."""
    if not isinstance(native_id, str) or not _NATIVE_ID.match(native_id):
        raise ValueError(f"{native_id!r} is not a SLURM job id (digits, optionally _<array task>)")
    return native_id


@dataclass(frozen=True)
class SlurmJobId:
    """A JobID cell split into its parts: `123`, `123_7`, `123_[2-4%25]`, `123.batch`, `123_7.0`."""

    job: str
    array_task: str | None = None
    """`7` for one task, `[2-4%25]` for a pending array's not-yet-split tasks."""
    het_offset: str | None = None
    step: str | None = None
    """`batch`, `extern`, `interactive` or a step number; None for the allocation row."""

    @property
    def is_step(self) -> bool:
        return self.step is not None

    @property
    def allocation(self) -> str:
        """The id of the allocation this row belongs to (what we track and scancel)."""
        return self.job if self.array_task is None else f"{self.job}_{self.array_task}"


def parse_job_id(raw: str) -> SlurmJobId:
    match = _JOB_ID.match(raw.strip())
    if match is None:
        raise ParseError(f"{raw!r} is not a SLURM job id (expected 123, 123_7, 123_[2-4], 123.batch...)")
    return SlurmJobId(job=match["job"], array_task=match["task"], het_offset=match["het"], step=match["step"])


def is_step_row(raw: str) -> bool:
    """True for step rows (`123.batch`, `123.extern`, `123.0`), which sacct lists under each job."""
    return parse_job_id(raw).is_step


def expand_array_tasks(spec: str) -> list[int]:
    """Task numbers of `7`, `[2-4]`, `[1,3,5-7]` or `[2-4%25]` (the `%25` is a concurrency limit)."""
    body = spec.strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    body = body.split("%", 1)[0]
    tasks: list[int] = []
    for part in body.split(","):
        start, sep, end = part.partition("-")
        if not start.isdigit() or (sep and not end.isdigit()):
            raise ParseError(f"{spec!r} is not a SLURM array task list")
        first, last = int(start), int(end) if sep else int(start)
        if last < first:
            raise ParseError(f"{spec!r} has a descending range")
        tasks.extend(range(first, last + 1))
    return tasks


def allocation_ids(raw: str) -> list[str]:
    """Every allocation id a row stands for: `123_[2-4]` -> `123_2`, `123_3`, `123_4`; `123` -> `123`."""
    parsed = parse_job_id(raw)
    if parsed.array_task is None or not parsed.array_task.startswith("["):
        return [parsed.allocation]
    return [f"{parsed.job}_{task}" for task in expand_array_tasks(parsed.array_task)]
