"""`SlurmBackend`: the `JobBackend` verbs (submit, find, poll, cancel, accounting, efficiency,
output) as runs of the command objects of this package.

Nothing here opens connections: `SlurmBackend` is handed an object that runs commands and moves
files (`hpc/ssh/` in production).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Protocol, TypeVar
from uuid import UUID

from cloudhpc.domain.arrays import TaskObservation
from cloudhpc.domain.billing import PredictedStart
from cloudhpc.domain.job_files import FilesAnswer, OutputsReport
from cloudhpc.domain.jobs import Observation
from cloudhpc.domain.paths import resolve_path
from cloudhpc.exceptions import AccountingUnavailable, ParseError, SchedulerCommandError
from cloudhpc.hpc import job_files
from cloudhpc.hpc.backend import (
    CommandResult,
    CommandRunner,
    Efficiency,
    FileTransfer,
    JobAccounting,
    JobPaths,
    JobSubmission,
    read_output_file,
)
from cloudhpc.hpc.job_files import DirectoryAccess, FoundOutput
from cloudhpc.hpc.slurm.accounting import OwnRecords, Sacct, SacctRow, job_accounting, own_records
from cloudhpc.hpc.slurm.cancel import Scancel
from cloudhpc.hpc.slurm.commands import _Command
from cloudhpc.hpc.slurm.efficiency import Seff, compute_efficiency
from cloudhpc.hpc.slurm.estimate import STUB_SCRIPT, SbatchTestOnly
from cloudhpc.hpc.slurm.ids import (
    allocation_ids,
    check_native_id,
    comment_for,
    job_name_for,
    owner_of_name,
    parse_job_id,
)
from cloudhpc.hpc.slurm.queue import Squeue, SqueueRow
from cloudhpc.hpc.slurm.restarts import SqueueRestarts
from cloudhpc.hpc.slurm.submit import Sbatch

__all__ = ["CommandObserver", "SlurmBackend", "SlurmConnection"]

# The package logs under one name, the one it had as a single module.
logger = logging.getLogger(__package__)


class SlurmConnection(CommandRunner, FileTransfer, DirectoryAccess, Protocol):
    """What `SlurmBackend` needs from its connection: `cloudhpc.hpc.ssh.SSHConnection` provides it."""


CommandObserver = Callable[[str, CommandResult, float], None]
"""Called after every SLURM command with (command name, result, seconds): metrics and tests hook here."""


_T = TypeVar("_T")

_SEFF_ARRAY = re.compile(r"^Array Job ID:|array jobid", re.MULTILINE | re.IGNORECASE)


def _owned(observation: Observation, name: str | None) -> Observation:
    """`observation` with the cloudhpc job its record names: a controller restarted from an older
    state hands lost jobs' ids out again, and the poller must not take another job for ours."""
    owner = owner_of_name(name) if name is not None else None
    return observation if owner is None else observation.model_copy(update={"owner": owner})


def _unavailable(message: str, result: CommandResult) -> AccountingUnavailable:
    """sacct answered, but not with this job's records (yet): the agent asks again later."""
    return AccountingUnavailable(
        message, argv=result.argv, exit_status=result.exit_status, stderr=result.stderr
    )


def _check_relative(path: str) -> str:
    parts = path.split("/")
    if path.startswith("/") or "\x00" in path or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"job file path {path!r} must stay inside the job directory")
    return path


def _sbatch(submission: JobSubmission, paths: JobPaths) -> Sbatch:
    """The one sbatch of a submission: what `submit` runs and what `estimate` asks with --test-only."""
    return Sbatch(
        job_id=submission.job_id,
        paths=paths,
        resources=submission.resources,
        array=submission.spec.array,
        dependency=submission.dependency,
        checkpoint=submission.spec.checkpoint,
    )


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

    async def _exec(
        self, command: _Command[object], *, idempotent: bool = True, stdin: str | None = None
    ) -> CommandResult:
        argv = command.argv()
        logger.debug("%s on %s: %s", command.name, self.cluster, argv)
        started = time.monotonic()
        result = await self._conn.run(
            argv, stdin=stdin, timeout=self._timeout, idempotent=idempotent, prelude=self._prelude
        )
        if self._on_command is not None:
            self._on_command(command.name, result, time.monotonic() - started)
        return result

    async def _run(
        self, command: _Command[_T], *, idempotent: bool = True, stdin: str | None = None
    ) -> tuple[CommandResult, _T]:
        result = await self._exec(command, idempotent=idempotent, stdin=stdin)
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
        command = _sbatch(submission, paths)
        command.argv()  # validate before anything is written on the cluster
        targets = [
            (paths.file(_check_relative(rel)), data, submission.modes.get(rel, 0o644))
            for rel, data in submission.files.items()
        ]
        targets.append((paths.batch_script, submission.batch_script.encode(), 0o700))
        await self._conn.makedirs(paths.control, mode=0o700)
        # private to the HPC account, also when it existed before (created wider by hand or by an
        # older version), before any file of the job is written into it
        await self._conn.chmod(paths.jobdir, 0o700)
        limit = asyncio.Semaphore(8)

        async def put(path: str, data: bytes, mode: int) -> None:
            async with limit:
                await self._conn.write_file(path, data, mode=mode)

        await asyncio.gather(*(put(*target) for target in targets))
        _, native_id = await self._run(command, idempotent=False)
        logger.info("job %s submitted to %s as SLURM job %s", submission.job_id, self.cluster, native_id)
        return native_id

    async def estimate(
        self, submission: JobSubmission, partitions: Sequence[str | None]
    ) -> list[PredictedStart]:
        """SLURM's predicted start of `submission` on each partition (`sbatch --test-only` with the
        submission's own argv, nothing written or submitted); a partition SLURM would refuse the job
        on has the refusal as its `error`."""
        command = _sbatch(submission, await self.paths(submission.job_id))
        asked = [SbatchTestOnly(command, partition) for partition in partitions]
        answers = await asyncio.gather(*(self._run(a, stdin=STUB_SCRIPT) for a in asked))
        return [prediction for _, prediction in answers]

    async def find(self, job_id: UUID) -> str | None:
        name, comment = job_name_for(job_id), comment_for(job_id)
        _, queued = await self._run(Squeue(job_name=name))
        # an array's rows are its tasks (`123_4`, `123_[5-9]`): the job is the array, `123`
        found = [
            parse_job_id(r.job_id).job for r in queued if r.name == name and r.comment in (comment, None)
        ]
        if not found:
            _, rows = await self._run(Sacct(job_name=name, starttime=self._starttime, allocations_only=True))
            found = [
                parse_job_id(r.record.job_id).job
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
        """One squeue for every job (an array's tasks included: `--jobs=<array id>` lists them all),
        and one sacct only for jobs that left the queue or ended (an array: once no task is left
        queued or running, so a 100-task array costs what one job costs)."""
        ids = list(dict.fromkeys(check_native_id(i) for i in native_ids))
        self.last_poll_commands = 0
        if not ids:
            return {}
        observations: dict[str, Observation] = {}
        names: dict[str, str] = {}
        """The job name of each id's record: whose job it is (an id may be handed out again)."""
        submits: dict[str, datetime | None] = {}
        """squeue's submit time of each id: the job a record is of, whatever the record's name."""
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
        arrays: dict[str, dict[int, TaskObservation]] = {}
        for row in rows:
            parsed = parse_job_id(row.job_id)
            names[parsed.job] = row.name
            submits[parsed.job] = row.submitted_at
            for alloc in allocation_ids(row.job_id):
                by_id[alloc] = row
                if parsed.array_task is not None:
                    task = row.task_observation(int(alloc.rpartition("_")[2]))
                    if task is not None:
                        arrays.setdefault(parsed.job, {})[task.index] = task
        for native_id in ids:
            tasks = arrays.get(native_id)
            if tasks is not None:
                if all(t.state.terminal for t in tasks.values()):
                    ask_sacct.append(native_id)  # exit codes and final times live in accounting
                else:
                    observations[native_id] = Observation.of_array(tasks.values())
                continue
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
            accounted_tasks: dict[str, dict[int, TaskObservation]] = {}
            for sacct_row in accounted:
                if sacct_row.record.step is not None:
                    continue
                parsed = parse_job_id(sacct_row.record.job_id)
                if names.setdefault(
                    parsed.job, sacct_row.record.name
                ) != sacct_row.record.name and sacct_row.record.submit != submits.get(parsed.job):
                    # squeue holds this id under another name and submit time: the record is an
                    # earlier job's (a controller started from a fresh state hands ids out again,
                    # and the database keeps every record), and this job's own is not stored yet:
                    # ask again. (slurmdbd's first record of a job is named `allocation` for a
                    # moment: its submit time says whose it is.)
                    continue
                if parsed.array_task is not None and parsed.job in wanted:
                    for task in sacct_row.task_observations():
                        accounted_tasks.setdefault(parsed.job, {})[task.index] = task
                    continue
                if sacct_row.record.job_id in wanted and sacct_row.record.job_id not in arrays:
                    # (an array's first record may show as `123`, without its task, right after
                    # its end: squeue said it is an array, so only task rows count for it)
                    observation = sacct_row.observation()
                    if observation is None:
                        continue
                    queued = by_id.get(sacct_row.record.job_id)
                    if queued is not None and not observation.state.terminal:
                        continue  # slurmdbd has not caught up with slurmctld yet: ask again
                    if observation.ended_at is None and queued is not None and queued.ended_at:
                        # right after slurmdbd comes back, a job that ended meanwhile is COMPLETED
                        # with End `Unknown` for a moment; slurmctld knows when it ended
                        observation = observation.model_copy(update={"ended_at": queued.ended_at})
                    observations[sacct_row.record.job_id] = observation
            for native_id, tasks in accounted_tasks.items():
                observation = Observation.of_array(tasks.values())
                queued_tasks = arrays.get(native_id, {})
                if not observation.state.terminal or not queued_tasks.keys() <= tasks.keys():
                    # squeue saw every task end; slurmdbd has not recorded them all yet (right
                    # after the end it may know one task only): ask again rather than judge the
                    # array by a part of it
                    continue
                observations[native_id] = observation
        return {native_id: _owned(o, names.get(native_id)) for native_id, o in observations.items()}

    async def restart_counts(self, native_ids: Sequence[str]) -> dict[str, int]:
        """SLURM's restart count of the jobs squeue still knows (`hpc.requeue.CountsRestarts`)."""
        if not native_ids:
            return {}
        _, counts = await self._run(SqueueRestarts(jobs=list(native_ids)))
        return counts

    async def cancel(self, native_id: str) -> None:
        await self._run(Scancel(native_id))

    async def accounting(self, native_id: str, *, job: UUID | None = None) -> JobAccounting:
        """sacct's rows of `native_id`; with `job`, only those of that cloudhpc job's records
        (`_own_accounting`): the id may have been handed out again since."""
        if job is not None:
            own = await self._own_accounting(native_id, job)
            return job_accounting(native_id, own.records, others=own.others, runs=own.runs)
        result, rows = await self._sacct(native_id)
        # an array's rows are its tasks' (`123_0`, `123_1`...)
        records = [r.record for r in rows if parse_job_id(r.record.job_id).job == native_id]
        if not records:
            raise _unavailable(f"sacct has no record of job {native_id} yet", result)
        return job_accounting(native_id, records)

    async def _sacct(
        self, native_id: str, *, duplicates: bool = False
    ) -> tuple[CommandResult, list[SacctRow]]:
        """sacct of one id since the lookback; an unreadable answer is "not available yet"."""
        try:
            return await self._run(Sacct(jobs=[native_id], starttime=self._starttime, duplicates=duplicates))
        except ParseError as exc:
            raise AccountingUnavailable(
                f"sacct output for job {native_id} was unreadable ({exc})", argv=[], exit_status=0, stderr=""
            ) from exc

    async def _own_accounting(self, native_id: str, job: UUID) -> OwnRecords:
        """Every record sacct holds of `native_id` (`--duplicates`), kept to those named for `job`.
        A controller restarted from an older state gives a lost job's id to the next job, and plain
        sacct answers the newest record of an id: the lost job's `sacct.json` was the other job's.
        None of its own (slurmdbd never heard of its start, or not yet) is `AccountingUnavailable`,
        naming the jobs whose records the id has."""
        result, rows = await self._sacct(native_id, duplicates=True)
        try:
            own = own_records(rows, native_id, job_name_for(job), comment_for(job))
        except ParseError as exc:
            raise _unavailable(f"sacct output for job {native_id} was unreadable ({exc})", result) from exc
        if not own.records:
            held = f": its records are {', '.join(own.others)}'s" if own.others else ""
            raise _unavailable(
                f"sacct has no record of job {native_id} named {job_name_for(job)}{held}", result
            )
        return own

    async def efficiency(self, accounting: JobAccounting) -> Efficiency:
        """seff's report, or the same figures from `accounting`'s records where seff is missing or
        cannot answer for the job: an array, or an id that has records of other jobs too, since seff
        reports the newest record of an id, whoever's it is; or records that are provisional, since
        seff reads the same placeholder row (its requested memory `16?`) and costs a round trip."""
        if accounting.others or accounting.provisional:
            return compute_efficiency(accounting.records)
        if self._seff_installed is not False:
            command = Seff(accounting.native_id)
            result = await self._exec(command)
            if result.exit_status == 127:
                logger.info("seff is not installed on %s: computing efficiency from sacct", self.cluster)
                self._seff_installed = False
            elif _SEFF_ARRAY.search(result.stdout + result.stderr):
                # seff reports one task of an array (`Array Job ID: 123_5`), or refuses an array
                # whose tasks never started: the array's figures are its tasks' together
                self._seff_installed = True
            else:
                self._seff_installed = True
                return command.parse(result)
        return compute_efficiency(accounting.records)

    async def read_output(
        self, job_id: UUID, *, offset: int = 0, length: int | None = None, task: int | None = None
    ) -> bytes:
        paths = await self.paths(job_id)
        path = paths.output if task is None else paths.task_output(task)
        return await read_output_file(self._conn, path, offset=offset, length=length)

    async def read_file(
        self, job_id: UUID, relative_path: str, *, offset: int = 0, length: int | None = None
    ) -> bytes:
        paths = await self.paths(job_id)
        path = paths.file(_check_relative(relative_path))
        return await read_output_file(self._conn, path, offset=offset, length=length)

    async def browse(
        self, job_id: UUID, path: str, *, offset: int = 0, length: int | None = None
    ) -> FilesAnswer:
        jobdir = (await self.paths(job_id)).jobdir
        return await job_files.browse(self._conn, jobdir, path, offset=offset, length=length)

    async def find_outputs(
        self, job_id: UUID, patterns: list[str], *, max_bytes: int, max_files: int
    ) -> tuple[list[FoundOutput], OutputsReport]:
        jobdir = (await self.paths(job_id)).jobdir
        return await job_files.find_outputs(
            self._conn, jobdir, patterns, max_bytes=max_bytes, max_files=max_files
        )

    async def download(self, found: FoundOutput, local_path: str | os.PathLike[str]) -> int:
        return await self._conn.download(found.real, local_path)

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
