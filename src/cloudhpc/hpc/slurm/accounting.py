"""sacct: the accounting record of jobs and their steps, from slurmdbd, read by field name.

It answers for jobs that have left the queue: the exit code, the final times and the resources
used. Right after a job ends some cells are placeholders for a moment, so secondary cells are read
leniently (see `_lenient`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from cloudhpc.domain.arrays import TaskObservation
from cloudhpc.domain.jobs import Observation
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import AccountingUnavailable, ParseError
from cloudhpc.hpc.backend import AccountingRecord, CommandResult, JobAccounting
from cloudhpc.hpc.slurm.commands import _EPOCH_TIMES, _require_ok
from cloudhpc.hpc.slurm.ids import check_native_id, expand_array_tasks, parse_job_id
from cloudhpc.hpc.slurm.states import SLURM_STATES, map_state, normalize_state
from cloudhpc.hpc.slurm.tables import parse_table
from cloudhpc.hpc.slurm.values import (
    _empty,
    _int_or_none,
    _tres_size,
    _tres_value,
    parse_duration,
    parse_exit_code,
    parse_size,
    parse_timestamp,
)

__all__ = [
    "SACCT_FIELDS",
    "OwnRecords",
    "Sacct",
    "SacctRow",
    "accounting_final",
    "accounting_provisional",
    "job_accounting",
    "own_records",
    "run_ended",
]

# The package logs under one name, the one it had as a single module.
logger = logging.getLogger(__package__)

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

DB_INDEX = "DBIndex"
"""slurmdbd's own key of a job record, printed on the record's step rows too: with `--duplicates`
one SLURM id may stand for several records (a requeue, or an id handed out again), and only this
column says which record a step row is of."""


@dataclass(frozen=True)
class SacctRow:
    record: AccountingRecord
    comment: str | None
    db_index: int | None = None
    """slurmdbd's record (`DB_INDEX`), where the answer has the column (`Sacct(duplicates=True)`)."""

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

    def task_observations(self) -> list[TaskObservation]:
        """This row as tasks of an array: one for `123_7`, each task of `123_[2-5%2]` (tasks
        cancelled before they started keep one row); none for a row that is not of an array."""
        observation = self.observation()
        task = parse_job_id(self.record.job_id).array_task
        if observation is None or task is None:
            return []
        return [
            TaskObservation(
                index=index,
                state=observation.state,
                native_state=observation.native_state,
                reason=observation.reason,
                exit_code=observation.exit_code,
                started_at=observation.started_at,
                ended_at=observation.ended_at,
            )
            for index in expand_array_tasks(task)
        ]


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
    db_index = row.get(DB_INDEX)
    return SacctRow(
        record=record,
        comment=None if _empty(row["Comment"]) else row["Comment"],
        db_index=None if db_index is None else _int_or_none(db_index),
    )


@dataclass(frozen=True)
class Sacct:
    """sacct for explicit job ids or one derived job name, since an explicit start time (sacct
    silently drops jobs that ended before it, `--jobs` or not)."""

    jobs: Sequence[str] = ()
    job_name: str | None = None
    starttime: str = "now-2592000"
    """SLURM time syntax; the relative form uses the cluster's own clock, immune to skew."""
    allocations_only: bool = False
    duplicates: bool = False
    """Every record of each id (`--duplicates`, with `DB_INDEX` to tell them apart), not only the
    newest: a controller restarted from an older state hands ids out again, and a requeued job has
    one record per run."""

    name = "sacct"

    def argv(self) -> list[str]:
        argv = [*_EPOCH_TIMES, "sacct", "--parsable2", f"--starttime={self.starttime}"]
        if self.allocations_only:
            argv.append("--allocations")
        if self.duplicates:
            argv.append("--duplicates")
        if self.jobs:
            argv.append("--jobs=" + ",".join(check_native_id(j) for j in self.jobs))
        if self.job_name is not None:
            argv.append(f"--name={self.job_name}")
        if not self.jobs and self.job_name is None:
            raise ValueError("sacct needs job ids or a job name")
        fields = (*SACCT_FIELDS[:-1], DB_INDEX, SACCT_FIELDS[-1]) if self.duplicates else SACCT_FIELDS
        argv.append("--format=" + ",".join(fields))
        return argv

    @staticmethod
    def parse(result: CommandResult) -> list[SacctRow]:
        _require_ok(result, "sacct could not answer", AccountingUnavailable)
        return [_sacct_row(row) for row in parse_table(result.stdout, expected=SACCT_FIELDS)]


PLACEHOLDER_JOB_NAME = "allocation"
"""The name slurmdbd gives an allocation row it made before the job's own start record arrived."""


@dataclass(frozen=True)
class OwnRecords:
    """What `sacct --duplicates` holds of one SLURM id for one job name."""

    records: list[AccountingRecord]
    """The newest record of each allocation of the id (the job's, an array's tasks) named so, with
    its steps: what plain `sacct --jobs` answers when the id was never handed out again."""
    others: list[str]
    """The names of the id's records that are not this job's, in sacct's order (another job that
    got the id, a placeholder `allocation` record whose start slurmdbd never received)."""
    runs: list[AccountingRecord] = field(default_factory=list)
    """The allocation record of every run of the job itself (not an array's tasks) named so, oldest
    first: a requeued job has one per run, and only the earlier ones say what ended them
    (`PREEMPTED`, `REQUEUED`, ...); `records` keeps the newest only."""


def own_records(
    rows: Sequence[SacctRow], native_id: str, name: str, comment: str | None = None
) -> OwnRecords:
    """The records of SLURM job `native_id` (an array: its tasks) whose job name is `name`, from a
    `Sacct(duplicates=True)` answer. Plain sacct answers the newest record of an id, which after a
    controller restarted from an older state (slurmctld killed with -9) is another job's: the lost
    job's accounting must be its own or none, never the other's. A step row belongs to the record
    with its `DB_INDEX`; of several records of one allocation with this name (a requeued job has
    one per run) only the newest counts, as plain sacct would answer. slurmdbd's placeholder for a
    job whose start record has not arrived has no name of its own (`allocation`) but carries the
    job's `--comment`: with `comment`, such a record is the job's too (the same `DB_INDEX` is
    renamed when the start record comes: tests/recordings/sacct_duplicates_placeholder_*.json)."""
    groups: dict[int, list[SacctRow]] = {}
    for row in rows:
        if parse_job_id(row.record.job_id).job != native_id:
            continue
        if row.db_index is None:
            raise ParseError(f"sacct row {row.record.job_id} lacks {DB_INDEX}: ask with duplicates=True")
        groups.setdefault(row.db_index, []).append(row)
    newest: dict[str, int] = {}
    others: list[str] = []
    runs: dict[int, AccountingRecord] = {}
    for index, group in groups.items():
        allocation_row = next((r for r in group if r.record.step is None), None)
        if allocation_row is None:
            continue  # steps whose record the answer left out: nobody's we can name
        allocation = allocation_row.record
        placeholder_of_ours = (
            comment is not None and allocation_row.comment == comment and _placeholder(allocation)
        )
        if allocation.name != name and not placeholder_of_ours:
            others.append(allocation.name)
            continue
        if index > newest.get(allocation.job_id, -1):
            newest[allocation.job_id] = index
        if allocation.job_id == native_id:
            runs[index] = allocation
    kept = set(newest.values())
    # in sacct's own order (an array's tasks by number)
    records = [row.record for index, group in groups.items() if index in kept for row in group]
    return OwnRecords(records=records, others=others, runs=[runs[i] for i in sorted(runs)])


def run_ended(run: AccountingRecord) -> bool:
    """Whether slurmdbd has recorded the end of a run of `OwnRecords.runs` (it lags slurmctld by a
    moment). `REQUEUED` is a run's end here, although the poll takes it for a job still running."""
    return normalize_state(run.state) == "REQUEUED" or not _still_active(run.state)


def job_accounting(
    native_id: str,
    records: Sequence[AccountingRecord],
    *,
    others: Sequence[str] = (),
    runs: Sequence[AccountingRecord] = (),
) -> JobAccounting:
    """sacct's records of one job as the agent is given them, judged here in SLURM's terms: whether
    they are final (`accounting_final`) or provisional (`accounting_provisional`) and which runs
    have ended (`run_ended`)."""
    final = accounting_final(records)
    return JobAccounting(
        native_id,
        list(records),
        final=final,
        provisional=not final and accounting_provisional(records),
        others=tuple(others),
        runs=tuple(runs),
        runs_ended=tuple(run_ended(run) for run in runs),
    )


def accounting_final(records: Sequence[AccountingRecord]) -> bool:
    """True once sacct shows the figures SLURM will ever give for an ended job, so that they can be
    stored for good. Two things must have reached slurmdbd:

    - the job's own record: its allocation row has ended and is not the placeholder slurmdbd shows
      for about a second after the end (JobName `allocation`, no Partition, ReqMem `16?`), and
    - the end of every step: no step row is still running (an `.extern` step, or the batch step of
      a cancelled job, may end after the allocation). slurmdbd writes a step's end state, end time
      and usage (MaxRSS, TotalCPU, TRESUsageIn*) in one update (`as_mysql_step_complete`), so an
      ended step's MaxRSS is final, empty or not. It stays empty for good when the step ended
      before its first gather sample (`JobAcctGatherFrequency`): on the testbed (task=2) a 0.5 s
      batch job's step shows no MaxRSS from the first answer after the end to 40 s later, while a
      3 s one has its MaxRSS in the first answer that shows the step ended
      (tests/recordings/sacct_short_*.json; TRESUsageInTot, which cloudhpc does not ask for, is
      `energy=0` on the 0.5 s job's step from its end on).

    A state this module does not know counts as ended (the poller has already seen the job end).
    No rows (slurmdbd does not know the job yet) is not final."""
    allocations = [r for r in records if r.step is None]
    if not allocations or any(_placeholder(r) for r in allocations):
        return False
    return not any(_still_active(r.state) for r in records)


def accounting_provisional(records: Sequence[AccountingRecord]) -> bool:
    """True once every row has ended, with at least one step, the job's own row possibly still
    slurmdbd's placeholder: the steps' figures (MaxRSS, TotalCPU, exit codes) are final, and only
    the job's name, partition and requested memory are missing. slurmctld sends a job's start
    record from a thread that wakes every 5 s (`_set_db_inx_thread`, accounting_storage/slurmdbd),
    and a job that started before its pass has no row of its own until the next one: 1.4-3.6 s
    after a 1 s job's end on the testbed, while its batch step was final 0.02-0.13 s after it
    (docs/benchmarks.md)."""
    allocations = [r for r in records if r.step is None]
    steps = len(records) - len(allocations)
    return bool(allocations) and steps > 0 and not any(_still_active(r.state) for r in records)


def _placeholder(allocation: AccountingRecord) -> bool:
    """slurmdbd's stand-in for a job whose start record has not arrived (JobName `allocation`, no
    Partition, ReqMem `16?`)."""
    return allocation.name == PLACEHOLDER_JOB_NAME and allocation.partition is None


def _still_active(raw_state: str) -> bool:
    """Pending or running in SLURM's terms (RUNNING, COMPLETING, PENDING, ...)."""
    return SLURM_STATES.get(normalize_state(raw_state)) in (JobState.QUEUED, JobState.RUNNING)
