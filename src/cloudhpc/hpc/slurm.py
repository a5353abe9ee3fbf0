"""Everything SLURM-specific: command builders paired with their parsers, and the SLURM backend.

Each command is a small frozen dataclass with `argv()` (an argument list, never a shell string: the
connection quotes it once) and `parse(result)` (pure, so tests run on outputs recorded from a real
cluster). Tabular output is always read by the names in its header row, never by position or
width, because SLURM's column order and widths depend on the format string and its version.

Timestamps are requested as epoch seconds (`SLURM_TIME_FORMAT=%s`, honoured by squeue and sacct)
so that the cluster's local time zone never leaks into our tz-aware UTC datetimes.

Nothing here opens connections: `SlurmBackend` is handed an object that runs commands and moves
files (`hpc/ssh.py` in production).

Why one module of about a thousand lines: it is the only place that speaks SLURM (as submitit's
`slurm/slurm.py` is), and its parts are read together: a command, its parser, the state table they
share and the backend verb that runs them. Outside it, SLURM appears only as text in a rendered job
script (`srun` in `ray/script.py`) and as `sinfo --version`, the reachability probe of
`hpc/cluster_check.py`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol, TypeVar
from uuid import UUID

from cloudhpc.domain.jobs import MEMORY_UNITS, Observation, Resources
from cloudhpc.domain.paths import resolve_path
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import (
    AccountingUnavailable,
    ParseError,
    QuotaExceeded,
    RemoteFileError,
    SchedulerCommandError,
    SubmitRejected,
)
from cloudhpc.hpc.backend import (
    AccountingRecord,
    CommandResult,
    CommandRunner,
    Efficiency,
    FileTransfer,
    JobPaths,
    JobSubmission,
)

__all__ = [
    "COMMENT_PREFIX",
    "JOB_NAME_PREFIX",
    "SACCT_FIELDS",
    "SLURM_STATES",
    "SQUEUE_FIELDS",
    "CommandObserver",
    "Sacct",
    "SacctRow",
    "Sbatch",
    "Scancel",
    "Seff",
    "SlurmBackend",
    "SlurmConnection",
    "SlurmJobId",
    "Squeue",
    "SqueueRow",
    "allocation_ids",
    "check_native_id",
    "comment_for",
    "compute_efficiency",
    "expand_array_tasks",
    "is_step_row",
    "job_name_for",
    "map_state",
    "normalize_state",
    "parse_duration",
    "parse_exit_code",
    "parse_job_id",
    "parse_size",
    "parse_table",
    "parse_timestamp",
    "resource_flags",
]

logger = logging.getLogger(__name__)

JOB_NAME_PREFIX = "chpc-"
"""SLURM job names are `chpc-<uuid>`: the full id, so `--name` finds a job again after a restart."""

COMMENT_PREFIX = "cloudhpc:"
"""`--comment=cloudhpc:<uuid>`: a second, independent mark that a SLURM job is ours."""

_EPOCH_TIMES = ("env", "SLURM_TIME_FORMAT=%s")
"""argv prefix making squeue and sacct print timestamps as epoch seconds (checked on 22.05)."""

_NATIVE_ID = re.compile(r"^[0-9]{1,12}(?:_[0-9]{1,9})?$")
_JOB_ID = re.compile(
    r"^(?P<job>[0-9]+)"
    r"(?:_(?P<task>[0-9]+|\[[0-9,%\-]+\]))?"
    r"(?:\+(?P<het>[0-9]+))?"
    r"(?:\.(?P<step>[A-Za-z0-9_+\-]+))?$"
)
_QUOTA = re.compile(
    r"QOSMax\w*|QOSGrp\w*|AssocMax\w*|AssocGrp\w*|MaxSubmitJob\w*|accounting/QOS policy|"
    r"job submit limit|Job violates accounting",
    re.IGNORECASE,
)
# scancel on a job that already ended (22.05 says nothing and exits 0, older/newer versions complain).
_ALREADY_GONE = re.compile(r"already completing or completed|Invalid job id specified|Job/step already", re.I)
_EMPTY = frozenset(
    {"", "None", "NONE", "N/A", "(null)", "Unknown", "UNLIMITED", "Partition_Limit", "INVALID"}
)


def job_name_for(job_id: UUID) -> str:
    """The SLURM job name of a cloudhpc job; derived, so user input never reaches `--job-name`."""
    return f"{JOB_NAME_PREFIX}{_uuid(job_id)}"


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


# ---------------------------------------------------------------------------------------------
# Job ids: allocations, array tasks, steps
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Cell values
# ---------------------------------------------------------------------------------------------


def _empty(value: str | None) -> bool:
    return value is None or value.strip() in _EMPTY


def parse_timestamp(value: str | None) -> datetime | None:
    """A tz-aware UTC datetime from an epoch cell; ISO cells (SLURM_TIME_FORMAT ignored) are read as UTC."""
    if _empty(value):
        return None
    assert value is not None
    text = value.strip()
    if text.isdigit():
        seconds = int(text)
        return None if seconds == 0 else datetime.fromtimestamp(seconds, tz=UTC)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ParseError(f"{value!r} is not a timestamp (expected epoch seconds or ISO 8601)") from exc
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def parse_duration(value: str | None) -> float | None:
    """Seconds in a reported duration: `MM:SS.mmm`, `HH:MM:SS`, `D-HH:MM:SS` (sacct, seff)."""
    if _empty(value):
        return None
    assert value is not None
    text = value.strip()
    days = 0
    if "-" in text:
        head, text = text.split("-", 1)
        if not head.isdigit():
            raise ParseError(f"{value!r} is not a duration")
        days = int(head)
    parts = text.split(":")
    try:
        if len(parts) == 3:
            hours, minutes, seconds = int(parts[0]), int(parts[1]), float(parts[2])
        elif len(parts) == 2:
            hours, minutes, seconds = 0, int(parts[0]), float(parts[1])
        elif len(parts) == 1:
            hours, minutes, seconds = 0, 0, float(parts[0])
        else:
            raise ValueError(value)
    except ValueError as exc:
        raise ParseError(f"{value!r} is not a duration (expected [D-][HH:]MM:SS[.mmm])") from exc
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


_UNITS = {"": 1, **MEMORY_UNITS}
"""sacct and seff print bare numbers as bytes, unlike a memory request (megabytes)."""
_SIZE = re.compile(r"^(?P<num>[0-9]+(?:\.[0-9]+)?)(?P<unit>[KMGTP]?)(?P<per>[cn]?)$")


def parse_size(value: str | None, *, alloc_cpus: int | None = None, nodes: int | None = None) -> int | None:
    """Bytes in a sacct size (`1234K`, `256M`, `1.50G`, `0`). The `c`/`n` suffixes of older ReqMem
    cells (`256Mc` per CPU, `4Gn` per node) are multiplied out to a total when counts are given."""
    if _empty(value):
        return None
    assert value is not None
    match = _SIZE.match(value.strip())
    if match is None:
        raise ParseError(f"{value!r} is not a size (expected a number with an optional K/M/G/T suffix)")
    size = int(float(match["num"]) * _UNITS[match["unit"]])
    if match["per"] == "c" and alloc_cpus:
        size *= alloc_cpus
    elif match["per"] == "n" and nodes:
        size *= nodes
    return size


def parse_exit_code(value: str | None) -> tuple[int | None, int | None]:
    """(exit status, signal) from sacct's `N:S`."""
    if _empty(value):
        return None, None
    assert value is not None
    status, _, signal = value.strip().partition(":")
    if not status.isdigit() or (signal and not signal.isdigit()):
        raise ParseError(f"{value!r} is not an exit code (expected N:S)")
    return int(status), int(signal) if signal else None


def _int_or_none(value: str | None) -> int | None:
    if _empty(value):
        return None
    assert value is not None
    try:
        return int(value.strip())
    except ValueError as exc:
        raise ParseError(f"{value!r} is not an integer") from exc


def _tres_value(tres: str | None, name: str) -> float | None:
    if _empty(tres):
        return None
    assert tres is not None
    for item in tres.split(","):
        key, _, val = item.partition("=")
        if key == name:
            try:
                return float(val)
            except ValueError:
                return None
    return None


def _tres_size(tres: str | None, name: str = "mem") -> int | None:
    """Bytes of a size-valued TRES (`mem=256M` in `billing=1,cpu=1,mem=256M,node=1`)."""
    if _empty(tres):
        return None
    assert tres is not None
    for item in tres.split(","):
        key, _, val = item.partition("=")
        if key == name:
            return parse_size(val)
    return None


# ---------------------------------------------------------------------------------------------
# States
# ---------------------------------------------------------------------------------------------

SLURM_STATES: Mapping[str, JobState] = {
    "PENDING": JobState.QUEUED,
    "CONFIGURING": JobState.QUEUED,
    "REQUEUED": JobState.QUEUED,
    "REQUEUE_FED": JobState.QUEUED,
    "REQUEUE_HOLD": JobState.QUEUED,
    "RESV_DEL_HOLD": JobState.QUEUED,
    "SPECIAL_EXIT": JobState.QUEUED,
    "RUNNING": JobState.RUNNING,
    "COMPLETING": JobState.RUNNING,
    "SUSPENDED": JobState.RUNNING,
    "STOPPED": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING,
    "STAGE_OUT": JobState.RUNNING,
    "RESIZING": JobState.RUNNING,
    "COMPLETED": JobState.COMPLETED,
    "FAILED": JobState.FAILED,
    "OUT_OF_MEMORY": JobState.FAILED,
    "NODE_FAIL": JobState.FAILED,
    "BOOT_FAIL": JobState.FAILED,
    "DEADLINE": JobState.FAILED,
    "PREEMPTED": JobState.FAILED,
    "CANCELLED": JobState.CANCELLED,
    "REVOKED": JobState.CANCELLED,
    "TIMEOUT": JobState.TIMEOUT,
}
"""The one table from SLURM's job states to ours. States not listed are "unknown, ask again"."""


def normalize_state(raw: str) -> str:
    """`CANCELLED by 1001` -> `CANCELLED`; `CANCELLED+` (a cut cell) -> `CANCELLED`."""
    words = raw.strip().split()
    return words[0].rstrip("+").upper() if words else ""


def map_state(raw: str) -> JobState | None:
    """Our state for a SLURM state, or None (logged) when SLURM says something we do not know."""
    state = SLURM_STATES.get(normalize_state(raw))
    if state is None:
        logger.warning("unknown SLURM job state %r: treated as unknown, will ask again", raw)
    return state


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def parse_table(text: str, *, expected: Sequence[str], delimiter: str = "|") -> list[dict[str, str]]:
    """Rows of a delimited table as dicts keyed by its header. A row with more cells than the header
    has the delimiter inside its last (free-text) column, so the surplus is joined back into it."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ParseError("expected a header row, got no output at all")
    header = lines[0].split(delimiter)
    missing = [name for name in expected if name not in header]
    if missing:
        raise ParseError(f"header row {lines[0]!r} lacks the columns {missing}")
    rows: list[dict[str, str]] = []
    for line in lines[1:]:
        cells = line.split(delimiter)
        if len(cells) > len(header):
            cells = [*cells[: len(header) - 1], delimiter.join(cells[len(header) - 1 :])]
        if len(cells) != len(header):
            raise ParseError(
                f"row {line!r} has {len(cells)} cells, the header {lines[0]!r} has {len(header)}"
            )
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


def _require_ok(result: CommandResult, what: str) -> None:
    if not result.ok:
        raise SchedulerCommandError(
            f"{what} failed", argv=result.argv, exit_status=result.exit_status, stderr=result.stderr
        )


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def resource_flags(resources: Resources) -> list[str]:
    """`--flag=value` argv elements for the set fields, each value re-validated by the domain model
    (defence in depth: a `model_construct`ed Resources never bypasses the patterns)."""
    checked = Resources.model_validate(resources.model_dump())
    flags: list[str] = []
    if checked.nodes is not None:
        flags.append(f"--nodes={checked.nodes}")
    if checked.ntasks_per_node is not None:
        flags.append(f"--ntasks-per-node={checked.ntasks_per_node}")
    if checked.cpus_per_task is not None:
        flags.append(f"--cpus-per-task={checked.cpus_per_task}")
    if checked.gpus_per_node:
        flags.append(f"--gpus-per-node={checked.gpus_per_node}")
    if checked.mem is not None:
        flags.append(f"--mem={checked.mem}")
    if checked.time is not None:
        flags.append(f"--time={checked.time}")
    if checked.partition is not None:
        flags.append(f"--partition={checked.partition}")
    if checked.account is not None:
        flags.append(f"--account={checked.account}")
    return flags


@dataclass(frozen=True)
class Sbatch:
    """Submit the wrapper script of one job; `parse` returns the SLURM job id."""

    job_id: UUID
    paths: JobPaths
    resources: Resources = field(default_factory=Resources)

    name = "sbatch"

    def argv(self) -> list[str]:
        return [
            "sbatch",
            "--parsable",
            f"--comment={comment_for(self.job_id)}",
            f"--job-name={job_name_for(self.job_id)}",
            f"--chdir={self.paths.jobdir}",
            f"--output={self.paths.output}",
            *resource_flags(self.resources),
            self.paths.batch_script,
        ]

    @staticmethod
    def parse(result: CommandResult) -> str:
        if not result.ok:
            error = QuotaExceeded if _QUOTA.search(result.stderr) else SubmitRejected
            raise error(
                "sbatch refused the job",
                argv=result.argv,
                exit_status=result.exit_status,
                stderr=result.stderr,
            )
        lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
        match = re.match(r"^([0-9]+)(?:;\S+)?$", lines[-1]) if lines else None
        if match is None:
            raise ParseError(
                f"sbatch --parsable printed {result.stdout!r} (stderr {result.stderr!r}); "
                "expected a job id such as `123` or `123;cluster`"
            )
        return match.group(1)


SQUEUE_FIELDS: tuple[tuple[str, str], ...] = (
    ("JOBID", "%i"),
    ("NAME", "%j"),
    ("STATE", "%T"),
    ("REASON", "%r"),
    ("SUBMIT_TIME", "%V"),
    ("START_TIME", "%S"),
    ("END_TIME", "%e"),
    ("COMMENT", "%k"),
)
"""(header squeue prints, format code). Comment is last: free text may hold the delimiter."""


@dataclass(frozen=True)
class SqueueRow:
    job_id: str
    name: str
    native_state: str
    reason: str | None
    submitted_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None
    comment: str | None

    def observation(self) -> Observation | None:
        """What this row says, or None when the state is unknown to us. squeue prints estimates for
        the start of pending jobs and the end of running ones: only facts are kept."""
        state = map_state(self.native_state)
        if state is None:
            return None
        return Observation(
            state=state,
            native_state=self.native_state,
            reason=self.native_state if state == JobState.FAILED else None,
            submitted_at=self.submitted_at,
            started_at=self.started_at if state not in (JobState.QUEUED,) else None,
            ended_at=self.ended_at if state.terminal else None,
        )


@dataclass(frozen=True)
class Squeue:
    """One squeue call for many jobs (explicit `--jobs` list) or for one derived job name."""

    jobs: Sequence[str] = ()
    job_name: str | None = None

    name = "squeue"

    def argv(self) -> list[str]:
        argv = [*_EPOCH_TIMES, "squeue", "--states=all"]
        if self.jobs:
            argv.append("--jobs=" + ",".join(check_native_id(j) for j in self.jobs))
        if self.job_name is not None:
            argv.append(f"--name={self.job_name}")
        if not self.jobs and self.job_name is None:
            raise ValueError("squeue needs job ids or a job name: cloudhpc never lists the whole queue")
        argv.append("--format=" + "|".join(code for _, code in SQUEUE_FIELDS))
        return argv

    @staticmethod
    def parse(result: CommandResult) -> list[SqueueRow]:
        if not result.ok:
            # 22.05 answers a single unknown id with an error instead of an empty table.
            if "Invalid job id specified" in result.stderr:
                return []
            _require_ok(result, "squeue")
        rows = parse_table(result.stdout, expected=[header for header, _ in SQUEUE_FIELDS])
        return [
            SqueueRow(
                job_id=row["JOBID"],
                name=row["NAME"],
                native_state=normalize_state(row["STATE"]),
                reason=None if _empty(row["REASON"]) else row["REASON"],
                submitted_at=parse_timestamp(row["SUBMIT_TIME"]),
                started_at=parse_timestamp(row["START_TIME"]),
                ended_at=parse_timestamp(row["END_TIME"]),
                comment=None if _empty(row["COMMENT"]) else row["COMMENT"],
            )
            for row in rows
        ]


SACCT_FIELDS: tuple[str, ...] = (
    "JobID",
    "JobName",
    "State",
    "ExitCode",
    "Submit",
    "Start",
    "End",
    "ElapsedRaw",
    "TotalCPU",
    "AllocCPUS",
    "NNodes",
    "NodeList",
    "ReqMem",
    "MaxRSS",
    "Partition",
    "Account",
    "TimelimitRaw",
    "AllocTRES",
    "Comment",
)
"""The sacct columns cloudhpc reads, by name. Comment is last: free text may hold the delimiter."""


@dataclass(frozen=True)
class SacctRow:
    record: AccountingRecord
    comment: str | None

    def observation(self) -> Observation | None:
        state = map_state(self.record.state)
        if state is None:
            return None
        native = normalize_state(self.record.state)
        return Observation(
            state=state,
            native_state=native,
            reason=native if state == JobState.FAILED else None,
            exit_code=self.record.exit_code if state.terminal else None,
            submitted_at=self.record.submit,
            started_at=self.record.start if state != JobState.QUEUED else None,
            ended_at=self.record.end if state.terminal else None,
        )


_V = TypeVar("_V")


def _lenient(parse: Callable[[str], _V], row: Mapping[str, str], column: str) -> _V | None:
    """A secondary cell that does not parse becomes None instead of losing the whole row: right
    after a job ends, 22.05 prints placeholders such as ReqMem `16?` and JobName `allocation`
    for about a second, while State and ExitCode are already final."""
    try:
        return parse(row[column])
    except ParseError as exc:
        logger.debug("sacct row %s: unreadable %s (%s)", row.get("JobID"), column, exc)
        return None


def _sacct_row(row: Mapping[str, str]) -> SacctRow:
    job = parse_job_id(row["JobID"])
    exit_code, signal = parse_exit_code(row["ExitCode"])
    alloc_cpus = _lenient(_int_or_none, row, "AllocCPUS")
    nodes = _lenient(_int_or_none, row, "NNodes")
    limit = _lenient(_int_or_none, row, "TimelimitRaw")
    record = AccountingRecord(
        job_id=job.allocation,
        step=job.step,
        name=row["JobName"],
        state=row["State"].strip(),
        exit_code=exit_code,
        signal=signal,
        submit=_lenient(parse_timestamp, row, "Submit"),
        start=_lenient(parse_timestamp, row, "Start"),
        end=_lenient(parse_timestamp, row, "End"),
        elapsed_seconds=_lenient(_int_or_none, row, "ElapsedRaw"),
        total_cpu_seconds=_lenient(parse_duration, row, "TotalCPU"),
        alloc_cpus=alloc_cpus,
        nodes=nodes,
        node_list=None if _empty(row["NodeList"]) or row["NodeList"] == "None assigned" else row["NodeList"],
        req_mem_bytes=_lenient(lambda v: parse_size(v, alloc_cpus=alloc_cpus, nodes=nodes), row, "ReqMem")
        or _lenient(_tres_size, row, "AllocTRES"),
        max_rss_bytes=_lenient(parse_size, row, "MaxRSS"),
        partition=None if _empty(row["Partition"]) else row["Partition"],
        account=None if _empty(row["Account"]) else row["Account"],
        timelimit_seconds=None if limit is None else limit * 60,
        alloc_tres=None if _empty(row["AllocTRES"]) else row["AllocTRES"],
        billing=_tres_value(row["AllocTRES"], "billing"),
    )
    return SacctRow(record=record, comment=None if _empty(row["Comment"]) else row["Comment"])


@dataclass(frozen=True)
class Sacct:
    """sacct for explicit job ids or one derived job name, since an explicit start time (sacct
    silently drops jobs that ended before it, `--jobs` or not)."""

    jobs: Sequence[str] = ()
    job_name: str | None = None
    starttime: str = "now-2592000"
    """SLURM time syntax; the relative form uses the cluster's own clock, immune to skew."""
    allocations_only: bool = False

    name = "sacct"

    def argv(self) -> list[str]:
        argv = [*_EPOCH_TIMES, "sacct", "--parsable2", f"--starttime={self.starttime}"]
        if self.allocations_only:
            argv.append("--allocations")
        if self.jobs:
            argv.append("--jobs=" + ",".join(check_native_id(j) for j in self.jobs))
        if self.job_name is not None:
            argv.append(f"--name={self.job_name}")
        if not self.jobs and self.job_name is None:
            raise ValueError("sacct needs job ids or a job name")
        argv.append("--format=" + ",".join(SACCT_FIELDS))
        return argv

    @staticmethod
    def parse(result: CommandResult) -> list[SacctRow]:
        if not result.ok:
            raise AccountingUnavailable(
                "sacct could not answer",
                argv=result.argv,
                exit_status=result.exit_status,
                stderr=result.stderr,
            )
        return [_sacct_row(row) for row in parse_table(result.stdout, expected=SACCT_FIELDS)]


@dataclass(frozen=True)
class Scancel:
    native_id: str

    name = "scancel"

    def argv(self) -> list[str]:
        return ["scancel", check_native_id(self.native_id)]

    @staticmethod
    def parse(result: CommandResult) -> None:
        if result.ok or _ALREADY_GONE.search(result.stderr):
            return
        _require_ok(result, "scancel")


_SEFF_MEM = re.compile(r"^(?P<num>[0-9.]+) (?P<unit>[KMGTP]?B)")
_SEFF_PERCENT = re.compile(r"^(?P<pct>[0-9.]+)% of (?P<rest>.+)$")


def _seff_bytes(text: str) -> int | None:
    match = _SEFF_MEM.match(text.strip())
    if match is None:
        return None
    return int(float(match["num"]) * _UNITS[match["unit"][:-1]])


@dataclass(frozen=True)
class Seff:
    """seff's text report, for sites that have it (it is a contrib script, often missing)."""

    native_id: str

    name = "seff"

    def argv(self) -> list[str]:
        return ["seff", check_native_id(self.native_id)]

    @staticmethod
    def parse(result: CommandResult) -> Efficiency:
        if not result.ok:
            raise AccountingUnavailable(
                "seff could not answer",
                argv=result.argv,
                exit_status=result.exit_status,
                stderr=result.stderr,
            )
        fields: dict[str, str] = {}
        for line in result.stdout.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        if "State" not in fields:
            raise ParseError(f"seff printed {result.stdout!r}; expected `Key: value` lines with a State")
        state = normalize_state(fields["State"])
        cpu_used = parse_duration(fields.get("CPU Utilized"))
        cpu_eff = _SEFF_PERCENT.match(fields.get("CPU Efficiency", ""))
        core_wall = parse_duration(cpu_eff["rest"].split()[0]) if cpu_eff else None
        mem_used = _seff_bytes(fields.get("Memory Utilized", ""))
        mem_eff = _SEFF_PERCENT.match(fields.get("Memory Efficiency", ""))
        mem_req = _seff_bytes(mem_eff["rest"]) if mem_eff else None
        return Efficiency(
            state=state,
            cpu_efficiency=float(cpu_eff["pct"]) / 100 if cpu_eff else None,
            memory_efficiency=float(mem_eff["pct"]) / 100 if mem_eff else None,
            cpu_utilized_seconds=cpu_used,
            core_walltime_seconds=core_wall,
            memory_utilized_bytes=mem_used,
            memory_requested_bytes=mem_req,
            source="seff",
        )


def compute_efficiency(records: Sequence[AccountingRecord]) -> Efficiency:
    """seff's numbers from sacct rows: CPU = TotalCPU / (Elapsed x AllocCPUS) of the allocation;
    memory = the largest MaxRSS of any step / the allocation's total ReqMem."""
    allocation = next((r for r in records if r.step is None), None)
    if allocation is None:
        raise ParseError(f"no allocation row among {len(records)} sacct rows; cannot compute efficiency")
    core_wall: float | None = None
    if allocation.elapsed_seconds is not None and allocation.alloc_cpus is not None:
        core_wall = float(allocation.elapsed_seconds * allocation.alloc_cpus)
    cpu_used = allocation.total_cpu_seconds
    peaks = [r.max_rss_bytes for r in records if r.max_rss_bytes is not None]
    mem_used = max(peaks) if peaks else 0
    mem_req = allocation.req_mem_bytes
    return Efficiency(
        state=normalize_state(allocation.state),
        cpu_efficiency=cpu_used / core_wall if cpu_used is not None and core_wall else 0.0,
        memory_efficiency=mem_used / mem_req if mem_req else None,
        cpu_utilized_seconds=cpu_used,
        core_walltime_seconds=core_wall,
        memory_utilized_bytes=mem_used,
        memory_requested_bytes=mem_req,
        source="sacct",
    )


# ---------------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------------


class SlurmConnection(CommandRunner, FileTransfer, Protocol):
    """What `SlurmBackend` needs from its connection: `hpc/ssh.py`'s `SSHConnection` provides it."""


CommandObserver = Callable[[str, CommandResult, float], None]
"""Called after every SLURM command with (command name, result, seconds): metrics and tests hook here."""


_T = TypeVar("_T")
_T_co = TypeVar("_T_co", covariant=True)


class _Command(Protocol[_T_co]):
    @property
    def name(self) -> str: ...

    def argv(self) -> list[str]: ...

    def parse(self, result: CommandResult) -> _T_co: ...


def _check_relative(path: str) -> str:
    parts = path.split("/")
    if path.startswith("/") or "\x00" in path or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"job file path {path!r} must stay inside the job directory")
    return path


class SlurmBackend:
    """`JobBackend` for one SLURM cluster reached through one connection.

    A poll costs one squeue call for every tracked job, plus one sacct call only for jobs that left
    the queue or ended: slurmctld load stays flat as the number of jobs grows.
    """

    def __init__(
        self,
        cluster: str,
        conn: SlurmConnection,
        *,
        workdir: str,
        prelude: str = "",
        on_command: CommandObserver | None = None,
        sacct_lookback: timedelta = timedelta(days=30),
        command_timeout: float | None = None,
    ) -> None:
        self.cluster = cluster
        self._conn = conn
        self._workdir = workdir
        self._resolved_workdir: str | None = None
        self._prelude = prelude
        self._on_command = on_command
        self._lookback = sacct_lookback
        self._timeout = command_timeout
        self._seff_installed: bool | None = None
        self.last_poll_commands = 0
        """Commands the last `poll` issued; the poller charges them to its command budget."""

    @property
    def _starttime(self) -> str:
        return f"now-{int(self._lookback.total_seconds())}"

    async def _exec(self, command: _Command[object], *, idempotent: bool = True) -> CommandResult:
        argv = command.argv()
        logger.debug("%s on %s: %s", command.name, self.cluster, argv)
        started = time.monotonic()
        result = await self._conn.run(
            argv, timeout=self._timeout, idempotent=idempotent, prelude=self._prelude
        )
        if self._on_command is not None:
            self._on_command(command.name, result, time.monotonic() - started)
        return result

    async def _run(self, command: _Command[_T], *, idempotent: bool = True) -> tuple[CommandResult, _T]:
        result = await self._exec(command, idempotent=idempotent)
        return result, command.parse(result)

    async def workdir(self) -> str:
        """The absolute work directory (`~/x` and relative paths resolved against the home directory),
        because sbatch's `--chdir` and `--output` must not depend on the shell's expansion."""
        if self._resolved_workdir is None:
            home = "" if self._workdir.startswith("/") else await self._conn.home()
            self._resolved_workdir = resolve_path(self._workdir, home)
        return self._resolved_workdir

    async def paths(self, job_id: UUID) -> JobPaths:
        return JobPaths(workdir=await self.workdir(), job_id=job_id)

    async def submit(self, submission: JobSubmission) -> str:
        """Stage and sbatch. `submission.resources` are complete: the agent applies the cluster's
        defaults once, before rendering, so what is submitted is what the rendered script saw."""
        paths = await self.paths(submission.job_id)
        command = Sbatch(job_id=submission.job_id, paths=paths, resources=submission.resources)
        command.argv()  # validate before anything is written on the cluster
        targets = [
            (paths.file(_check_relative(rel)), data, submission.modes.get(rel, 0o644))
            for rel, data in submission.files.items()
        ]
        targets.append((paths.batch_script, submission.batch_script.encode(), 0o700))
        await self._conn.makedirs(paths.control, mode=0o700)
        limit = asyncio.Semaphore(8)

        async def put(path: str, data: bytes, mode: int) -> None:
            async with limit:
                await self._conn.write_file(path, data, mode=mode)

        await asyncio.gather(*(put(*target) for target in targets))
        _, native_id = await self._run(command, idempotent=False)
        logger.info("job %s submitted to %s as SLURM job %s", submission.job_id, self.cluster, native_id)
        return native_id

    async def find(self, job_id: UUID) -> str | None:
        name, comment = job_name_for(job_id), comment_for(job_id)
        _, queued = await self._run(Squeue(job_name=name))
        found = [r.job_id for r in queued if r.name == name and r.comment in (comment, None)]
        if not found:
            _, rows = await self._run(Sacct(job_name=name, starttime=self._starttime, allocations_only=True))
            found = [
                r.record.job_id
                for r in rows
                if r.record.step is None and r.record.name == name and r.comment in (comment, None)
            ]
        if not found:
            return None
        ids = sorted(set(found), key=lambda j: [int(p) for p in j.split("_")])
        if len(ids) > 1:
            logger.warning(
                "job %s has several SLURM jobs on %s: %s; using the newest", job_id, self.cluster, ids
            )
        return ids[-1]

    async def poll(self, native_ids: Sequence[str]) -> dict[str, Observation]:
        ids = list(dict.fromkeys(check_native_id(i) for i in native_ids))
        self.last_poll_commands = 0
        if not ids:
            return {}
        observations: dict[str, Observation] = {}
        ask_sacct: list[str] = []
        self.last_poll_commands += 1
        try:
            _, rows = await self._run(Squeue(jobs=ids))
        except (SchedulerCommandError, ParseError) as exc:
            logger.warning(
                "squeue on %s failed (%s); asking sacct for all %d jobs", self.cluster, exc, len(ids)
            )
            rows = []
        by_id: dict[str, SqueueRow] = {}
        for row in rows:
            for alloc in allocation_ids(row.job_id):
                by_id[alloc] = row
        for native_id in ids:
            queued = by_id.get(native_id)
            if queued is None:
                ask_sacct.append(native_id)
                continue
            observation = queued.observation()
            if observation is None:
                continue
            if observation.state.terminal:
                ask_sacct.append(native_id)  # the exit code and final times live in accounting
            else:
                observations[native_id] = observation
        if ask_sacct:
            self.last_poll_commands += 1
            try:
                _, accounted = await self._run(
                    Sacct(jobs=ask_sacct, starttime=self._starttime, allocations_only=True)
                )
            except (AccountingUnavailable, ParseError) as exc:
                logger.warning(
                    "sacct on %s failed (%s): %d jobs stay unknown", self.cluster, exc, len(ask_sacct)
                )
                return observations
            wanted = set(ask_sacct)
            for sacct_row in accounted:
                if sacct_row.record.step is None and sacct_row.record.job_id in wanted:
                    observation = sacct_row.observation()
                    if observation is None:
                        continue
                    if sacct_row.record.job_id in by_id and not observation.state.terminal:
                        continue  # slurmdbd has not caught up with slurmctld yet: ask again
                    observations[sacct_row.record.job_id] = observation
        return observations

    async def cancel(self, native_id: str) -> None:
        await self._run(Scancel(native_id))

    async def accounting(self, native_id: str) -> list[AccountingRecord]:
        try:
            result, rows = await self._run(Sacct(jobs=[native_id], starttime=self._starttime))
        except ParseError as exc:
            raise AccountingUnavailable(
                f"sacct output for job {native_id} was unreadable ({exc})", argv=[], exit_status=0, stderr=""
            ) from exc
        records = [r.record for r in rows if r.record.job_id == native_id]
        if not records:
            raise AccountingUnavailable(
                f"sacct has no record of job {native_id} yet",
                argv=result.argv,
                exit_status=result.exit_status,
                stderr=result.stderr,
            )
        return records

    async def efficiency(self, native_id: str) -> Efficiency:
        if self._seff_installed is not False:
            command = Seff(native_id)
            result = await self._exec(command)
            if result.exit_status == 127:
                logger.info("seff is not installed on %s: computing efficiency from sacct", self.cluster)
                self._seff_installed = False
            else:
                self._seff_installed = True
                return command.parse(result)
        return compute_efficiency(await self.accounting(native_id))

    async def read_output(self, job_id: UUID, *, offset: int = 0, length: int | None = None) -> bytes:
        path = (await self.paths(job_id)).output
        try:
            return await self._conn.read_file(path, offset=offset, length=length)
        except RemoteFileError:
            if await self._conn.exists(path):
                raise
            return b""

    async def discard(self, job_id: UUID, relative_paths: Sequence[str]) -> None:
        if not relative_paths:
            return
        paths = await self.paths(job_id)
        argv = ["rm", "-f", "--", *(paths.file(_check_relative(p)) for p in relative_paths)]
        result = await self._conn.run(argv, timeout=self._timeout, idempotent=True)
        if not result.ok:
            logger.warning("job %s: could not delete %s: %s", job_id, relative_paths, result.stderr.strip())

    async def close(self) -> None:
        closer = getattr(self._conn, "close", None)
        if closer is not None:
            outcome = closer()
            if inspect.isawaitable(outcome):
                await outcome
