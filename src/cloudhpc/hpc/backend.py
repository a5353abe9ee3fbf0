"""The interfaces every compute backend (SLURM over SSH, local processes) offers to the agent.

Three layers, each replaceable on its own:

- `CommandRunner` + `FileTransfer`: run an argument list and move files on the machine that has the
  scheduler (`hpc/ssh/` over one SSH connection; `hpc/local.py` on this machine).
- `JobBackend`: scheduler verbs (submit, find, poll, cancel, accounting, output), in terms of our
  own job ids and `Observation`s, never SLURM words.
- Paths: where a job lives on the cluster (`JobPaths`, from `domain.paths`, re-exported here), so
  that the renderer, the backends and the artifact collector agree.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable
from uuid import UUID

from cloudhpc.domain.billing import PredictedStart
from cloudhpc.domain.job_files import FilesAnswer, OutputsReport
from cloudhpc.domain.jobs import JobSpec, Observation, Resources
from cloudhpc.domain.paths import JobPaths
from cloudhpc.exceptions import RemoteFileError
from cloudhpc.hpc.job_files import FoundOutput

__all__ = [
    "AccountingRecord",
    "CommandResult",
    "CommandRunner",
    "Efficiency",
    "FileTransfer",
    "JobAccounting",
    "JobBackend",
    "JobPaths",
    "JobSubmission",
    "read_output_file",
]


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    exit_status: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


@runtime_checkable
class CommandRunner(Protocol):
    """Runs one command from an argument list. Implementations quote; callers never build shell strings."""

    async def run(
        self,
        argv: Sequence[str],
        *,
        stdin: str | None = None,
        timeout: float | None = None,
        idempotent: bool = False,
        prelude: str = "",
    ) -> CommandResult:
        """`idempotent` commands (queries) may be re-run after a dropped connection; `prelude` is
        trusted cluster configuration run before the command (e.g. `source /appl/profile/x.sh`)."""


@runtime_checkable
class FileTransfer(Protocol):
    """Files on the scheduler's machine. Relative paths are relative to the account's home directory."""

    async def home(self) -> str: ...

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        """Create parent directories, write to a temporary name, then rename: readers never see half a file."""

    async def read_file(self, path: str, *, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes from `offset` (up to `length`); b"" at or past the end. Raises RemoteFileError if missing."""

    async def exists(self, path: str) -> bool: ...

    async def size(self, path: str) -> int | None:
        """File size in bytes, or None when the file does not exist."""

    async def makedirs(self, path: str, *, mode: int = 0o700) -> None: ...

    async def chmod(self, path: str, mode: int) -> None:
        """Set the permission bits of an existing file or directory (a job directory made private
        even when something created it wider before)."""


async def read_output_file(
    files: FileTransfer, path: str, *, offset: int = 0, length: int | None = None
) -> bytes:
    """A job's output file from `offset`, as both backends read it: a file that does not exist (yet)
    is no output; any other failure to read it is raised."""
    try:
        return await files.read_file(path, offset=offset, length=length)
    except RemoteFileError:
        if await files.exists(path):
            raise
        return b""


@dataclass(frozen=True)
class JobSubmission:
    """Everything a backend needs to start one job; rendered and validated before it gets here."""

    job_id: UUID
    spec: JobSpec
    resources: Resources = field(default_factory=Resources)
    batch_script: str = ""
    files: Mapping[str, bytes] = field(default_factory=dict)
    """Extra files to place in the job directory, keyed by path relative to it (user files, the user script)."""
    modes: Mapping[str, int] = field(default_factory=dict)
    """File modes of some `files` (the others get 0644): a private key must be 0600 for ssh to use it."""
    dependency: str | None = None
    """sbatch's `--dependency` (`Job.dependency`: the SLURM ids of the jobs waited for)."""


@dataclass(frozen=True)
class AccountingRecord:
    """One sacct row (the allocation or one step), typed. Durations in seconds, sizes in bytes."""

    job_id: str
    step: str | None
    name: str
    state: str
    exit_code: int | None
    signal: int | None
    submit: datetime | None
    start: datetime | None
    end: datetime | None
    elapsed_seconds: int | None
    total_cpu_seconds: float | None
    alloc_cpus: int | None
    nodes: int | None
    node_list: str | None
    req_mem_bytes: int | None
    max_rss_bytes: int | None
    partition: str | None
    account: str | None
    timelimit_seconds: int | None
    alloc_tres: str | None
    billing: float | None


@dataclass(frozen=True)
class JobAccounting:
    """What `JobBackend.accounting` found of one job, handed back to `JobBackend.efficiency`: the
    records it needs where the scheduler's own report cannot answer, so that an ended job costs one
    accounting query, not one per verb (an SSH round trip each on SLURM)."""

    native_id: str
    records: list[AccountingRecord]
    """All rows of the job (the allocation or an array's tasks, with their steps)."""
    final: bool
    """Whether `records` are the figures the scheduler will ever give of the ended job, so that
    they may be stored for good; the backend judges, in its scheduler's terms (SLURM: slurmdbd has
    the job's own record and the end of every step), so the agent never reads scheduler states.
    Not final: ask again a moment later (`submitter/agent.py`)."""
    provisional: bool = False
    """Not final, but every figure of the job has ended: all that is missing is a row the scheduler
    fills in late (SLURM: the job's own row, whose start record slurmctld sends from a thread that
    wakes every 5 s, so that a short job ends before it). Worth storing at once, marked provisional,
    and replacing when final: users get the job's figures within a second or two of its end."""
    others: tuple[str, ...] = ()
    """Names of the other jobs whose records the id holds too (a scheduler that lost a job handed
    its id out again): a report by id, like seff's, could be theirs, so efficiency comes from
    `records`."""
    runs: tuple[AccountingRecord, ...] = ()
    """The job's own record of each of its runs, oldest first (asked with `job`, where the scheduler
    keeps one per run): what ended a run before a requeue (a preemption, a time-limit warning)."""
    runs_ended: tuple[bool, ...] = ()
    """For each of `runs`, whether the scheduler has recorded that run's end (the backend judges:
    SLURM's accounting records it a moment after the requeue, and a `REQUEUED` run has ended)."""

    def __post_init__(self) -> None:
        if self.final and self.provisional:
            raise ValueError("JobAccounting.provisional: only for records that are not final")
        if len(self.runs_ended) != len(self.runs):
            raise ValueError("JobAccounting.runs_ended: one entry for each of `runs`")

    def ended_run(self, restart: int) -> AccountingRecord | None:
        """The record of the run that restart number `restart` (1 for the first) ended: the
        scheduler opens one record per run, so it is the `restart`-th. None while the scheduler has
        not recorded that run's end (ask again) or has no such run."""
        if 1 <= restart <= len(self.runs) and self.runs_ended[restart - 1]:
            return self.runs[restart - 1]
        return None


@dataclass(frozen=True)
class Efficiency:
    """What seff reports, computed with seff's formulas when seff is not installed."""

    state: str
    cpu_efficiency: float | None
    """CPU time used / (elapsed x allocated cores), 0..1."""
    memory_efficiency: float | None
    """Peak RSS / requested memory, 0..1 (may exceed 1 where limits are not enforced)."""
    cpu_utilized_seconds: float | None
    core_walltime_seconds: float | None
    memory_utilized_bytes: int | None
    memory_requested_bytes: int | None
    source: str
    """`seff` when parsed from seff's output, `sacct` when computed."""


class JobBackend(Protocol):
    """Scheduler verbs for one cluster. Native ids are strings (SLURM job ids, local supervisor ids)."""

    cluster: str

    async def submit(self, submission: JobSubmission) -> str:
        """Stage the job directory and submit; return the native id. Raises SubmitRejected on refusal."""

    async def estimate(
        self, submission: JobSubmission, partitions: Sequence[str | None]
    ) -> list[PredictedStart]:
        """When the scheduler predicts `submission` would start on each partition (None: the job's own
        or the default), without submitting it; a refusal is the prediction's `error`."""

    async def find(self, job_id: UUID) -> str | None:
        """Native id of a job already submitted for `job_id`, so a restarted agent never submits twice."""

    async def poll(self, native_ids: Sequence[str]) -> dict[str, Observation]:
        """Current state of many jobs with a bounded number of scheduler calls. A missing key means
        "unknown this time, ask again" (never "failed")."""

    async def cancel(self, native_id: str) -> None:
        """Request cancellation; cancelling a job that already ended is not an error."""

    async def accounting(self, native_id: str, *, job: UUID | None = None) -> JobAccounting:
        """All sacct rows of the job, with the backend's judgement of them (`JobAccounting.final`,
        `runs_ended`). Raises AccountingUnavailable when accounting cannot answer yet.
        `job`: the cloudhpc job the id was given to, whose records only are wanted (a scheduler that
        lost a job may have given its id to another since); None: whatever the id names now."""

    async def efficiency(self, accounting: JobAccounting) -> Efficiency:
        """seff's figures of the job `accounting` answered for, computed from its records where
        seff cannot answer (missing, an array, an id shared with other jobs): never a second
        accounting query."""

    async def read_output(
        self, job_id: UUID, *, offset: int = 0, length: int | None = None, task: int | None = None
    ) -> bytes:
        """The job's combined stdout/stderr from `offset` (of array task `task`); b"" before the
        file exists."""

    async def read_file(
        self, job_id: UUID, relative_path: str, *, offset: int = 0, length: int | None = None
    ) -> bytes:
        """A file of the job's directory from `offset` (a `python` job's outcome); b"" when it does
        not exist."""

    async def browse(
        self, job_id: UUID, path: str, *, offset: int = 0, length: int | None = None
    ) -> FilesAnswer:
        """List or read `path` of the job's directory, resolved on the cluster (`hpc/job_files.py`);
        raises `JobFileError` for a path outside it or missing."""

    async def find_outputs(
        self, job_id: UUID, patterns: list[str], *, max_bytes: int, max_files: int
    ) -> tuple[list[FoundOutput], OutputsReport]:
        """The files of the job's directory that `patterns` (`JobSpec.outputs`) match, bounded."""

    async def download(self, found: FoundOutput, local_path: str | os.PathLike[str]) -> int:
        """Copy one found output file to the agent's machine; returns its size."""

    async def discard(self, job_id: UUID, relative_paths: Sequence[str]) -> None:
        """Delete files of an ended job (a staged key): missing files are not an error."""

    async def close(self) -> None: ...
