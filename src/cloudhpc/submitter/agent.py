"""The submitter agent: for one cluster, turn porter's desired state into SLURM actions and report
what SLURM does.

The agent keeps nothing that a restart can lose. On start it asks porter for every active job of
its cluster and asks SLURM for each one it has no SLURM id for (find-by-id: the cloudhpc id is in
the SLURM job's name and comment), so a job is never lost and never submitted twice. Reports carry
increasing sequence numbers so porter can drop stale ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from cloudhpc.config import BridgeConfig, ClusterConfig
from cloudhpc.domain.arrays import DEPENDENCY_NEVER_SATISFIED, array_indices
from cloudhpc.domain.checkpoint import requeue_cause, requeue_reason, restarts_exceeded
from cloudhpc.domain.job_files import OutputsReport, SkippedOutput
from cloudhpc.domain.jobs import AUTO_PARTITION, Job, JobKind, Observation
from cloudhpc.domain.queries import AgentQuery
from cloudhpc.domain.reports import JobReport, Reconciliation
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import (
    ChannelError,
    CloudHPCError,
    SchedulerError,
    SSHConnectError,
    StagingError,
    SubmitRejected,
)
from cloudhpc.hpc.backend import AccountingRecord, JobAccounting, JobBackend, JobSubmission
from cloudhpc.hpc.envs import EnvironmentCache
from cloudhpc.hpc.jobscript import ENV_FILE, python_result_path
from cloudhpc.hpc.poller import Poller
from cloudhpc.hpc.requeue import CountsRestarts
from cloudhpc.ray.jobs_api import SESSION_TOKEN_FILE
from cloudhpc.ray.script import (
    ENTRYPOINT_END_MARKER,
    KEY_FILE,
)
from cloudhpc.retries import RetryPolicy
from cloudhpc.storage.artifacts import ArtifactWriter
from cloudhpc.submitter.channel import Channel
from cloudhpc.submitter.estimates import billed_from_accounting, choose_partition
from cloudhpc.submitter.queries import answer_query
from cloudhpc.submitter.ray_sessions import SessionJobs, is_session_job
from cloudhpc.submitter.staging import Stager

__all__ = ["Agent"]

log = logging.getLogger(__name__)

OUTPUT_CHUNK = 4 << 20
ARTIFACT_RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0)
"""Pauses between attempts to store a job's artifacts (about a minute in all)."""
ACCOUNTING_RETRIES = RetryPolicy(
    attempts=13,
    delays=(2.0, 4.0, 6.0, 8.0, 10.0),
    not_yet_delays=(0.5,) * 6 + (5.0,),
    level=logging.INFO,
)
"""How a job's accounting is asked for after its end (`_collect_accounting`). Records not final
yet: slurmdbd usually has them within a second or two of the end, so every 0.5 s for 3 s, then
every 5 s (33 s of pauses in all), so that a short job's accounting is stored soon after it
(bench/accounting.py, tests/e2e/test_accounting_latency.py). sacct (or storing) failing: after 2,
4, 6, 8, then 10 s (100 s of pauses in all: a slurmdbd restart is over by then)."""
# After giving up on a job's accounting (sacct failing for ~100 s), ask again this much later,
# doubling up to the maximum: slurmdbd outages end, and a job's figures are worth the wait.
ACCOUNTING_RETRY_FIRST = 120.0
ACCOUNTING_RETRY_MAX = 3600.0
CAUSE_RETRIES = RetryPolicy(attempts=6, delays=(0.5, 1.0, 2.0, 4.0, 8.0), level=logging.INFO)
"""How the accounting of a job's run before a restart is asked for (`_ended_run`): again after
each pause while slurmdbd has not recorded that run's end yet (it lags the requeue by a moment)
or sacct does not answer."""


class _Sequence:
    """Report sequence numbers that keep increasing across agent restarts (wall-clock nanoseconds)."""

    def __init__(self) -> None:
        self._last = 0

    def next(self) -> int:
        self._last = max(self._last + 1, time.time_ns())
        return self._last

    def advance_past(self, floor: int) -> None:
        """Never number a report at or below what porter already applied (a clock set back, or an
        agent moved to a machine whose clock is behind): porter would drop it as stale."""
        self._last = max(self._last, floor)


@dataclasses.dataclass
class _Tracked:
    """A job the agent follows in SLURM. Its output has one writer at a time (`output_lock`): the
    periodic collection and the end-of-job collection both upload it, and two uploads reading from
    the same offset at once stored a chunk twice (issue 12, item 5)."""

    job: Job
    native_id: str
    output_offset: int = 0
    output_lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    restarts: int = 0
    """SLURM's restart count as last learnt (from porter on adoption, then from squeue)."""
    started_at: datetime | None = None
    """When the current run started: a later start, or a wait after a start, is a restart."""
    submitted_at: datetime | None = None
    """SLURM's submit time as last seen: a requeue sets it anew, so a later one is a restart even
    when the poll never saw the run it ended (a run shorter than a poll interval)."""
    tasks_storing: set[int] = dataclasses.field(default_factory=set)
    """Array tasks whose output is being stored (or was) since they ended, while others still run."""
    tasks_stored: set[int] = dataclasses.field(default_factory=set)
    """...and those whose store succeeded: the end of the array does not store them again."""
    observation: Observation | None = None
    """The latest observation: what a report made between polls (`_learn_cause`) describes."""
    cause: str | None = None
    """What ended the run before restart `cause_for` (`requeue_cause`), where accounting said so."""
    cause_for: int = 0
    cause_asked: int = 0
    """The highest restart count whose cause was asked of accounting: asked once per restart."""

    def requeue_reason(self, restarts: int | None, observation: Observation) -> str | None:
        """`requeue_reason` of this job as of `observation`, naming the cause of its latest restart
        once it is known; None where the job's own reason stands."""
        checkpoint = self.job.spec.checkpoint
        most = checkpoint.max_restarts if checkpoint is not None else None
        cause = self.cause if restarts and self.cause_for == restarts else None
        return requeue_reason(restarts or 0, most, observation.native_state, observation.reason, cause=cause)


def _must_end(tracked: _Tracked | None, reason: str | None, observation: Observation) -> str | None:
    """Why the agent must cancel a job SLURM still holds, or None: a dependency that can never be
    met (SLURM would keep the job queued forever), or a checkpointed job that SLURM queued again
    more often than its `max_restarts` (`tracked.restarts` is the count just learnt)."""
    if reason == DEPENDENCY_NEVER_SATISFIED:
        return (
            f"{DEPENDENCY_NEVER_SATISFIED}: a job it waited for ended in a way that can never "
            "satisfy its `after`; cancelled instead of left queued"
        )
    checkpoint = tracked.job.spec.checkpoint if tracked is not None else None
    if tracked is None or checkpoint is None:
        return None
    return restarts_exceeded(
        tracked.restarts, checkpoint.max_restarts, observation.native_state, observation.reason
    )


class Agent:
    def __init__(
        self,
        cluster: str,
        config: ClusterConfig,
        backend: JobBackend,
        channel: Channel,
        *,
        envs: EnvironmentCache | None = None,
        workdir: str,
        work_wait: float = 20.0,
        output_interval: float = 1.0,
        reconcile_interval: float = 30.0,
        artifacts: ArtifactWriter | None = None,
        bridge: BridgeConfig | None = None,
        fetch_file: Callable[[str, Job], bytes] | None = None,
    ) -> None:
        self.cluster = cluster
        self.config = config
        self.backend = backend
        self.channel = channel
        self.workdir = workdir
        self.work_wait = work_wait
        self.output_interval = output_interval
        self.reconcile_interval = reconcile_interval
        self.artifacts = artifacts
        self.staging = Stager(config, envs=envs, workdir=workdir, bridge=bridge, fetch_file=fetch_file)
        self._seq = _Sequence()
        self._tracked: dict[UUID, _Tracked] = {}
        self._busy: set[UUID] = set()
        self._preparing: dict[UUID, asyncio.Task[JobSubmission]] = {}
        self._cancel_asked: set[UUID] = set()
        self._finishing: set[UUID] = set()
        self._accounting_retry: dict[UUID, tuple[float, float]] = {}  # job -> (not before, next delay)
        self._ending: dict[UUID, str] = {}
        """Jobs the agent cancelled for a reason of its own (`_must_end`): the reason they end with."""
        self._poller = Poller(backend, config.poll, self._on_observation)
        self._sessions = SessionJobs(
            cluster,
            channel,
            report=self._report,
            file_content=self.staging._file_content,
            read_session_file=lambda job_id, path: self.backend.read_file(job_id, path),
            cancel_asked=self._cancel_asked.__contains__,
        )
        """ray-jobs on a warm session (`ray.session`): Ray jobs, not SLURM jobs (`ray_sessions.py`)."""
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self._reconcile()
        self._poller.start()
        self._tasks = [
            asyncio.create_task(self._work_loop(), name=f"agent-work-{self.cluster}"),
            asyncio.create_task(self._output_loop(), name=f"agent-output-{self.cluster}"),
            asyncio.create_task(self._query_loop(), name=f"agent-queries-{self.cluster}"),
        ]

    async def stop(self) -> None:
        self._stopping.set()
        await self._poller.stop()
        for task in [*self._tasks, *self._background]:
            task.cancel()
        for task in [*self._tasks, *self._background]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []

    @property
    def healthy(self) -> bool:
        """The agent's loops are running (the submitter's `/healthz`)."""
        return bool(self._tasks) and not any(task.done() for task in self._tasks)

    async def run_forever(self) -> None:
        await self.start()
        await self._stopping.wait()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Background work the agent owns: referenced until done, cancelled on stop."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ---- reconciliation --------------------------------------------------------------------

    async def _reconcile(self) -> None:
        """Rebuild the agent's view from porter (desired state) and SLURM (observed state)."""
        while not self._stopping.is_set():
            try:
                view = await self.channel.reconciliation(self.cluster)
                break
            except ChannelError as exc:
                log.warning("cluster %s: cannot reach porter to reconcile (%s); retrying", self.cluster, exc)
                await asyncio.sleep(2)
        else:
            return
        await self._adopt(view)
        log.info(
            "cluster %s: reconciled %d active job(s), %d ended without accounting",
            self.cluster,
            len(view.jobs),
            len(view.unaccounted),
        )

    async def _adopt(self, view: Reconciliation) -> None:
        """Track every active job this agent is not already handling, and finish the collection of
        ended jobs whose accounting porter never received (the agent stopped in between)."""
        self._seq.advance_past(view.seq_floor)
        listed = {job.id for job in view.unaccounted}
        self._accounting_retry = {k: v for k, v in self._accounting_retry.items() if k in listed}
        for job in view.unaccounted:
            if job.slurm_job_id and self._may_collect(job.id):
                self._start_finish(_Tracked(job=job, native_id=job.slurm_job_id))
        for job in view.jobs:
            if job.id in self._tracked or job.id in self._busy:
                continue
            if job.slurm_job_id:
                self._track(job, job.slurm_job_id)
            elif is_session_job(job):  # followed for as long as it runs: not inline
                self._busy.add(job.id)
                self._spawn(self._submit(job)).add_done_callback(self._done_with(job.id))
            elif job.state != JobState.PENDING:
                # It was being submitted when the agent stopped (or the connection broke during
                # sbatch): SLURM knows whether it got there.
                self._busy.add(job.id)
                try:
                    await self._resume_submission(job)
                finally:
                    self._busy.discard(job.id)

    async def _resume_submission(self, job: Job) -> None:
        try:
            native = await self.backend.find(job.id)
        except CloudHPCError as exc:
            log.warning("job %s: find-by-id failed (%s); will retry from the work loop", job.id, exc)
            return
        if native is not None:
            await self._report(job.id, JobState.QUEUED, slurm_job_id=native)
            self._track(job, native)
        else:
            await self._submit(job)

    # ---- work ------------------------------------------------------------------------------

    async def _work_loop(self) -> None:
        last_reconcile = time.monotonic()
        while not self._stopping.is_set():
            if time.monotonic() - last_reconcile > self.reconcile_interval:
                last_reconcile = time.monotonic()
                try:
                    await self._adopt(await self.channel.reconciliation(self.cluster))
                except ChannelError as exc:
                    log.warning("cluster %s: periodic reconcile failed (%s)", self.cluster, exc)
            try:
                jobs = await self.channel.claim_work(self.cluster, wait=self.work_wait)
            except ChannelError as exc:
                log.warning("cluster %s: work poll failed (%s)", self.cluster, exc)
                await asyncio.sleep(2)
                continue
            for job in jobs:
                if job.id in self._busy:
                    if job.cancel_requested:
                        self._cancel_while_busy(job.id)
                    continue
                self._busy.add(job.id)
                task = self._spawn(self._handle(job))
                task.add_done_callback(self._done_with(job.id))

    def _cancel_while_busy(self, job_id: UUID) -> None:
        """A cancel request for a job being submitted: stop its preparation (an environment build
        can take many minutes) now; one that is past it is cancelled as soon as sbatch answered."""
        self._cancel_asked.add(job_id)
        preparing = self._preparing.get(job_id)
        if preparing is not None and not preparing.done():
            log.info("job %s: cancel requested while it is being prepared; stopping that", job_id)
            preparing.cancel()

    def _done_with(self, job_id: UUID) -> Callable[[asyncio.Task[None]], None]:
        def done(_task: asyncio.Task[None]) -> None:
            self._busy.discard(job_id)
            self._cancel_asked.discard(job_id)  # asked while a cancel of it ran: nothing left to do

        return done

    async def _handle(self, job: Job) -> None:
        try:
            if is_session_job(job):  # a cancel stops its Ray job, not a SLURM job
                await self._submit(job)
            elif job.cancel_requested:
                await self._cancel(job)
            elif job.state == JobState.PENDING:
                await self._submit(job)
            elif job.cancel_tasks:
                await self._cancel_tasks(job)
        except Exception:
            log.exception("job %s: unexpected error; it will be retried", job.id)

    async def _cancel(self, job: Job) -> None:
        tracked = self._tracked.get(job.id)
        native = tracked.native_id if tracked else job.slurm_job_id
        if native is None:
            native = await self.backend.find(job.id)
        if native is None:
            await self._report(job.id, JobState.CANCELLED, reason="cancelled before submission")
            return
        await self.backend.cancel(native)
        if tracked is None:
            self._track(job, native)
        self._poller.poke()

    async def _cancel_tasks(self, job: Job) -> None:
        """scancel the array tasks asked for (`<array id>_<index>`), then tell porter they are done."""
        tracked = self._tracked.get(job.id)
        native = tracked.native_id if tracked else job.slurm_job_id
        if native is None:
            return  # not in SLURM yet: offered again once it is
        for index in job.cancel_tasks:
            await self.backend.cancel(f"{native}_{index}")
        seen = self._poller.last_observation(job.id)  # a report never moves the state back
        state = seen.state if seen is not None else job.state
        await self._report(job.id, state, cancelled_tasks=list(job.cancel_tasks))
        self._poller.poke()

    async def _submit(self, job: Job) -> None:
        try:
            if is_session_job(job):
                await self._sessions.run(job)
                return
            await self._submit_once(job)
        finally:
            self._cancel_asked.discard(job.id)

    async def _submit_once(self, job: Job) -> None:
        await self._report(job.id, JobState.PREPARING)
        stored: asyncio.Task[None] | None = None
        chosen: str | None = None  # the partition `auto` chose, and why (the queued report's reason)
        try:
            # find first: porter may re-offer a job whose sbatch succeeded just before a crash
            native = await self.backend.find(job.id)
            if native is None:
                submission = await self._prepare_unless_cancelled(job)
                if submission is None:
                    await self._report(
                        job.id, JobState.CANCELLED, reason="cancelled while being prepared (before sbatch)"
                    )
                    return
                if job.dependency is not None:  # porter resolved `after` to SLURM ids
                    submission = dataclasses.replace(submission, dependency=job.dependency)
                if submission.resources.partition == AUTO_PARTITION:  # sbatch --test-only decides
                    submission, chosen = await choose_partition(
                        self.backend, self.config, self.cluster, submission
                    )
                # The script is kept while sbatch runs, so a job refused by sbatch still has it.
                stored = self._spawn(self._store_artifacts(job, self._save_submission(job, submission)))
                native = await self.backend.submit(submission)
        except (SubmitRejected, StagingError) as exc:
            log.warning("job %s: rejected: %s", job.id, exc)
            if stored is None:
                await self._store_artifacts(job, self._save_submission(job, None))
            else:
                await stored
            message = str(exc)
            await self._store_artifacts(job, lambda: self._writer().save_error(job, message))
            await self._report(job.id, JobState.FAILED, reason=str(exc)[:2000])
            return
        except (SSHConnectError, SchedulerError) as exc:
            # Transport trouble: the job stays `preparing`; reconciliation (find-by-id) decides later.
            log.warning("job %s: submission interrupted (%s); will reconcile", job.id, exc)
            return
        await self._report(job.id, JobState.QUEUED, slurm_job_id=native, reason=chosen)
        self._track(job, native)
        if job.id in self._cancel_asked:  # asked while sbatch ran: no need to wait for the next offer
            await self._cancel(job)

    async def _prepare_unless_cancelled(self, job: Job) -> JobSubmission | None:
        """`Stager.prepare`, or None when the job's cancel request stopped it (`_cancel_while_busy`)."""
        if job.id in self._cancel_asked:
            return None
        task = asyncio.create_task(self.staging.prepare(job))
        self._preparing[job.id] = task
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                return None  # the preparation was cancelled, not this agent's own work
            raise
        finally:
            self._preparing.pop(job.id, None)

    # ---- observation -----------------------------------------------------------------------

    def _track(self, job: Job, native_id: str) -> None:
        # A job followed already (a cancel of a running job) keeps its `_Tracked`, output offset and
        # lock: a second one would be a second writer of the job's output.
        tracked = self._tracked.get(job.id)
        if tracked is None or tracked.native_id != native_id:
            self._tracked[job.id] = _Tracked(
                job=job, native_id=native_id, restarts=job.restarts, started_at=job.started_at
            )
        tasks = frozenset(array_indices(job.spec.array)) if job.spec.array is not None else None
        self._poller.track(job.id, native_id, tasks=tasks)

    async def _on_observation(self, job_id: UUID, native_id: str, observation: Observation) -> None:
        tracked = self._tracked.get(job_id)
        if observation.state.terminal and tracked is not None:
            await self._collect_output(tracked)
        elif tracked is not None and observation.tasks is not None:
            self._store_ended_tasks(tracked, observation)
        state, reason = observation.state, observation.reason
        if tracked is not None:
            tracked.observation = observation
        restarts = await self._restarts(tracked, observation) if tracked is not None else None
        if tracked is not None and (restarts or tracked.job.spec.checkpoint is not None):
            reason = tracked.requeue_reason(restarts, observation) or reason
            if restarts and state == JobState.QUEUED:
                state = JobState.RUNNING  # states only move forward: pending again is a restart
            if (
                restarts
                and restarts > tracked.cause_asked
                and not observation.state.terminal
                and tracked.job.spec.array is None  # an array's records are its tasks', not runs
            ):
                tracked.cause_asked = restarts
                self._spawn(self._learn_cause(tracked, restarts))
        ending = None if state.terminal or job_id in self._ending else _must_end(tracked, reason, observation)
        if ending is not None:
            # SLURM would keep it queued (or run it again): end it, and remember why for its last report
            log.info("job %s: %s; cancelling SLURM job %s", job_id, ending, native_id)
            await self.backend.cancel(native_id)
            self._ending[job_id] = ending
            self._poller.poke()
        elif state.terminal and job_id in self._ending:
            state = JobState.FAILED
            reason = self._ending.pop(job_id)
        await self._report(
            job_id,
            state,
            slurm_job_id=native_id,
            reason=reason,
            exit_code=observation.exit_code,
            # a requeue resets SLURM's submit and start times: the job keeps its first ones
            submitted_at=None if restarts else observation.submitted_at,
            started_at=None if restarts else observation.started_at,
            ended_at=observation.ended_at,
            tasks=list(observation.tasks) if observation.tasks is not None else None,
            restarts=restarts,
        )
        if observation.state.terminal and tracked is not None:
            self._tracked.pop(job_id, None)
            self._start_finish(tracked)

    async def _restarts(self, tracked: _Tracked, observation: Observation) -> int | None:
        """SLURM's restart count of the job when this observation shows a restart (waiting again
        after it had started, started again at another time, or submitted again: a requeue sets a
        new submit time) or the end of a checkpointed job;
        None when nothing changed it. The count is asked of SLURM (one squeue, only then): the
        poll may have missed whole runs. Without an answer, one restart more than known."""
        before, submitted = tracked.started_at, tracked.submitted_at
        if observation.started_at is not None:
            tracked.started_at = observation.started_at
        if observation.submitted_at is not None:
            tracked.submitted_at = observation.submitted_at
        restarted = (
            before is not None
            and (
                observation.state == JobState.QUEUED
                or (observation.started_at is not None and observation.started_at != before)
            )
        ) or (
            submitted is not None
            and observation.submitted_at is not None
            and observation.submitted_at > submitted
        )
        if restarted and observation.state == JobState.QUEUED:
            tracked.started_at = None  # counted once: its next start is this restart's run
        final = observation.state.terminal and tracked.job.spec.checkpoint is not None
        if not (restarted or final):
            return tracked.restarts or None
        count = tracked.restarts + 1 if restarted else tracked.restarts
        if isinstance(self.backend, CountsRestarts):
            try:
                counts = await self.backend.restart_counts([tracked.native_id])
            except CloudHPCError as exc:
                log.warning("job %s: could not ask SLURM for its restart count (%s)", tracked.job.id, exc)
            else:
                count = max(tracked.restarts, counts.get(tracked.native_id, count))
        if restarted and count > tracked.restarts:
            log.info("job %s: SLURM runs it again (restart %d)", tracked.job.id, count)
        tracked.restarts = count
        return count or None

    async def _learn_cause(self, tracked: _Tracked, restart: int) -> None:
        """Ask accounting once what ended the run before restart `restart` (squeue shows a preempted
        job only PENDING again; sacct keeps the run `PREEMPTED`, or `REQUEUED` by the wrapper on its
        time-limit warning) and report the job's reason naming it. Off the polling path: spawned,
        so that sacct's round trip (and slurmdbd's lag, waited out with `CAUSE_RETRIES`) never
        holds up other jobs' observations. Only the job's own records count (`accounting(job=...)`:
        the id may be another job's too). A job that ended meanwhile keeps the reason of its end."""
        job = tracked.job
        checkpoint = job.spec.checkpoint
        run = await self._ended_run(tracked, restart)
        if run is None:
            return
        cause = requeue_cause(
            run.state,
            run.elapsed_seconds,
            run.timelimit_seconds,
            checkpoint.warn_before if checkpoint is not None else None,
        )
        log.info(
            "job %s: its run before restart %d ended %s (%s)", job.id, restart, run.state, cause or "requeued"
        )
        if restart < tracked.cause_for:
            return  # a later restart's cause is known already
        tracked.cause, tracked.cause_for = cause, restart
        observation = tracked.observation
        if cause is None or observation is None or observation.state.terminal:
            return
        if self._tracked.get(job.id) is not tracked or job.id in self._ending or tracked.restarts != restart:
            return  # no longer followed, being ended, or restarted again: its next report says it
        state = JobState.RUNNING if observation.state == JobState.QUEUED else observation.state
        await self._report(
            job.id,
            state,
            slurm_job_id=tracked.native_id,
            reason=tracked.requeue_reason(restart, observation),
            restarts=restart,
        )

    async def _ended_run(self, tracked: _Tracked, restart: int) -> AccountingRecord | None:
        """The job's own accounting record of the run restart `restart` ended, asked again
        (`CAUSE_RETRIES`) while sacct fails or has not recorded that run's end; None (logged) when
        it never did."""
        awaited = f"the end of its run before restart {restart} (accounting records it after the requeue)"

        async def ask() -> AccountingRecord | None:
            accounting = await self.backend.accounting(tracked.native_id, job=tracked.job.id)
            return accounting.ended_run(restart)

        try:
            run = await CAUSE_RETRIES.until(
                ask,
                lambda run: run is not None,
                retry_on=lambda exc: isinstance(exc, CloudHPCError),
                what=f"job {tracked.job.id}: accounting",
                awaited=awaited,
            )
        except CloudHPCError as exc:
            problem = str(exc)
        else:
            if run is not None:
                return run
            problem = f"accounting has no record of {awaited}"
        log.warning(
            "job %s: could not learn what ended its run before restart %d (%s)",
            tracked.job.id,
            restart,
            problem,
        )
        return None

    async def _discard_secrets(self, job: Job) -> None:
        """Delete the job's secret files on the cluster: its `env` values, its bridge key."""
        secrets = ([ENV_FILE] if job.spec.env else []) + ([KEY_FILE] if job.spec.ray is not None else [])
        if job.spec.ray is not None and job.spec.ray.idle_timeout is not None:
            secrets.append(SESSION_TOKEN_FILE)  # a session's copy of Ray's token
        try:
            await self.backend.discard(job.id, secrets)
        except CloudHPCError as exc:
            log.warning("job %s: could not delete the staged secrets %s (%s)", job.id, secrets, exc)

    def _may_collect(self, job_id: UUID) -> bool:
        """Not already being collected, and not in the pause after a failed attempt."""
        if job_id in self._finishing:
            return False
        not_before, _delay = self._accounting_retry.get(job_id, (0.0, 0.0))
        return time.monotonic() >= not_before

    def _start_finish(self, tracked: _Tracked) -> None:
        job_id = tracked.job.id
        self._finishing.add(job_id)
        task = self._spawn(self._finish(tracked))
        task.add_done_callback(lambda _task: self._finishing.discard(job_id))
        if tracked.job.spec.ray is not None or tracked.job.spec.env:
            # the Ray script deletes the bridge key itself, unless it never ran (cancelled while
            # queued) or was killed; the `env` file is sourced by every run of the script (a requeued
            # job runs it again): whatever happened, neither outlives the job
            self._spawn(self._discard_secrets(tracked.job))

    async def _finish(self, tracked: _Tracked) -> None:
        """After the end: the output to the object store at once and, meanwhile, the accounting
        (once slurmdbd's records are final) to the object store and then to porter.

        Run again for a job porter still lists as unaccounted after an agent restart, so every
        step here must be safe to repeat (artifacts are overwritten under the same keys)."""
        record, *_ = await asyncio.gather(
            self._collect_accounting(tracked),
            # an array's tasks each write their own output (those stored as they ended are kept)
            *(
                self._store_task(tracked, i)
                for i in self._task_indices(tracked.job)
                if i is None or i not in tracked.tasks_stored
            ),
            self._store_outputs(tracked.job),
        )
        self._after_collection(tracked.job.id, record)

    def _after_collection(self, job_id: UUID, record: dict[str, Any] | None) -> None:
        """When to ask again for a job's accounting: never once a final record is stored; later,
        doubling the pause, when nothing was stored or only a record that is not final. porter
        lists such a job as unaccounted at every periodic reconcile (30 s), and without the pause
        a job whose own row never reaches slurmdbd would be collected again, output and all, for
        as long as porter lists it."""
        if record is not None and record["final"]:
            self._accounting_retry.pop(job_id, None)
            return
        _not_before, delay = self._accounting_retry.get(job_id, (0.0, ACCOUNTING_RETRY_FIRST / 2))
        delay = min(delay * 2, ACCOUNTING_RETRY_MAX)
        self._accounting_retry[job_id] = (time.monotonic() + delay, delay)
        if record is None:
            log.warning("job %s: accounting still unavailable; asking again in %.0f s", job_id, delay)
        else:
            log.info("job %s: accounting stored, not final; asking again in %.0f s", job_id, delay)

    def _store_ended_tasks(self, tracked: _Tracked, observation: Observation) -> None:
        """While an array runs, store each task's output (and a `python` task's result) as soon as
        the task ended, so `GET /jobs/{id}/logs?task=` answers for it without waiting for the
        slowest task of the array."""
        for task in observation.tasks or ():
            if task.state.terminal and task.index not in tracked.tasks_storing:
                tracked.tasks_storing.add(task.index)
                self._spawn(self._store_task(tracked, task.index))

    async def _store_task(self, tracked: _Tracked, task: int | None) -> None:
        """The output of the job (`task` None) or of one array task, and its `python` result."""
        stored = await asyncio.gather(
            self._store_output(tracked, task=task),
            *([self._store_result(tracked, task=task)] if tracked.job.spec.kind == JobKind.PYTHON else []),
        )
        if task is not None and all(stored):
            tracked.tasks_stored.add(task)

    async def _collect_output(self, tracked: _Tracked) -> None:
        """Upload what the job printed since the last upload. Serialised per job, and the offset a
        chunk is uploaded at is the one it was read from, taken before the read. An array job has
        no output of its own (each task writes its own file, stored at the end): nothing to read."""
        if tracked.job.spec.array is not None:
            return
        async with tracked.output_lock:
            await self._upload_new_output(tracked)

    async def _upload_new_output(self, tracked: _Tracked) -> None:
        while True:
            try:
                offset = tracked.output_offset
                data = await self.backend.read_output(tracked.job.id, offset=offset, length=OUTPUT_CHUNK)
                if not data:
                    return
                tracked.output_offset = await self.channel.upload_output(tracked.job.id, offset, data)
                if tracked.job.spec.kind == JobKind.RAY_JOB and ENTRYPOINT_END_MARKER.encode() in data:
                    self._poller.expect_change(tracked.job.id)  # the job ends now: no waiting for a tick
            except (CloudHPCError, ChannelError) as exc:
                log.warning("job %s: output upload failed (%s); retrying later", tracked.job.id, exc)
                return

    async def _output_loop(self) -> None:
        while not self._stopping.is_set():
            await asyncio.sleep(self.output_interval)
            for tracked in list(self._tracked.values()):
                await self._collect_output(tracked)

    async def _collect_accounting(
        self, tracked: _Tracked, attempts: int = ACCOUNTING_RETRIES.attempts
    ) -> dict[str, Any] | None:
        """Store the job's accounting once its records are final, asked again (`ACCOUNTING_RETRIES`)
        while they are not or while sacct or storing fails ("unavailable" is "not yet": sacct lags
        slurmctld by a few seconds). Right after the end, slurmdbd may still hold a running step:
        figures stored then would be wrong for good. Records that the backend calls provisional
        (every step ended, the job's own row not yet there) are stored at once, marked
        `final: false`, and replaced when final, so that a short job's figures do not wait for
        the scheduler's slowest bookkeeping. When the attempts are spent with records that are
        still not final (a step whose end slurmdbd never got), they are stored as they are, marked
        the same way (porter lists the job as unaccounted again to an agent that starts). None
        (logged) when no attempt stored anything: `_finish` asks later."""
        job = tracked.job
        stored: list[JobAccounting] = []  # the provisional records stored, to store them only once

        async def attempt() -> dict[str, Any] | JobAccounting:
            accounting = await self.backend.accounting(tracked.native_id, job=job.id)
            if accounting.final:
                return await self._store_accounting(tracked, accounting)
            if accounting.provisional and not stored:
                await self._store_accounting(tracked, accounting)
                stored.append(accounting)
            return accounting  # asked again; stored as it is after the last attempt

        try:
            answer = await dataclasses.replace(ACCOUNTING_RETRIES, attempts=attempts).until(
                attempt,
                lambda answer: not isinstance(answer, JobAccounting),
                retry_on=lambda exc: isinstance(exc, CloudHPCError | ChannelError),
                what=f"job {job.id}: accounting",
                awaited="final records (figures stored before the scheduler settled them would be wrong for good)",
            )
            if isinstance(answer, JobAccounting):
                log.info(
                    "job %s: accounting still not final after %d attempts; storing it as it is",
                    job.id,
                    attempts,
                )
                answer = await self._store_accounting(tracked, answer)
        except (CloudHPCError, ChannelError) as exc:
            log.info("job %s: accounting not stored (%s)", job.id, exc)
            return None
        return answer

    async def _store_accounting(self, tracked: _Tracked, accounting: JobAccounting) -> dict[str, Any]:
        """The job's accounting record (sacct's rows, seff's figures, the units billed), to the
        object store first and then to porter. A record that is not final says so (`final`) and
        carries no units billed: they are priced from the job's own row (its partition), which a
        provisional record lacks, and a billed counter must never go back."""
        records = accounting.records
        efficiency = await self.backend.efficiency(accounting)  # seff, or these records: no 2nd sacct
        record: dict[str, Any] = {
            "slurm_job_id": tracked.native_id,
            "final": accounting.final,
            "records": [_jsonable(dataclasses.asdict(r)) for r in records],
            "efficiency": _jsonable(dataclasses.asdict(efficiency)),
        }
        billed = billed_from_accounting(records, self.config) if accounting.final else None
        if billed is not None:
            record["billed"] = billed.model_dump(mode="json")
        # the artifacts first: once porter has the accounting, a restarted agent no longer lists
        # the job as unaccounted, and artifacts not yet written would never be (the fault suite's
        # submitter kill found sacct.json missing, docs/reliability.md)
        await self._store_artifacts(tracked.job, lambda: self._writer().save_accounting(tracked.job, record))
        await self.channel.put_accounting(tracked.job.id, record)
        return record

    # ---- artifacts -------------------------------------------------------------------------

    def _writer(self) -> ArtifactWriter:
        assert self.artifacts is not None  # callers go through _store_artifacts, which checks
        return self.artifacts

    def _save_submission(self, job: Job, submission: JobSubmission | None) -> Callable[[], list[str]]:
        script = submission.batch_script if submission is not None else None
        return lambda: self._writer().save_submission(job, batch_script=script)

    async def _store_artifacts(self, job: Job, save: Callable[[], list[str]]) -> None:
        """`_stored_artifacts`, for callers that go on whatever happened."""
        await self._stored_artifacts(job, save)

    async def _stored_artifacts(self, job: Job, save: Callable[[], list[str]]) -> bool:
        """Write artifacts (blocking object-store calls, in a thread) and report their keys.

        Best effort: a job's outcome never depends on its artifacts, so a failing object store is
        logged and the job goes on. Retried for about a minute first (ARTIFACT_RETRY_DELAYS): an
        object store or a porter store restarting (the fault suite, docs/reliability.md) is gone
        longer than the channel's own retries, and a submission's artifacts are written only once."""
        if self.artifacts is None:
            return True
        for delay in (*ARTIFACT_RETRY_DELAYS, None):
            try:
                keys = await asyncio.to_thread(save)
                await self.channel.put_artifacts(job.id, keys)
                return True
            except (CloudHPCError, ChannelError) as exc:
                if delay is None or self._stopping.is_set():
                    log.warning("job %s: could not store artifacts (%s)", job.id, exc)
                    return False
                log.info("job %s: could not store artifacts (%s); retrying in %.0f s", job.id, exc, delay)
                await asyncio.sleep(delay)
        return False  # not reached: the last attempt returns

    @staticmethod
    def _task_indices(job: Job) -> list[int | None]:
        """The outputs a job has: one per array task, or the job's own (None)."""
        return list(array_indices(job.spec.array)) if job.spec.array is not None else [None]

    async def _store_output(self, tracked: _Tracked, task: int | None = None) -> bool:
        """Copy the whole output file (of array task `task`: `tasks/<index>/output.log`) through a
        local temporary file, so a large log is uploaded in parts and never held in memory."""

        def read(offset: int) -> Coroutine[Any, Any, bytes]:
            return self.backend.read_output(tracked.job.id, offset=offset, length=OUTPUT_CHUNK, task=task)

        return await self._copy_to_artifact(
            tracked.job,
            "the output",
            read,
            lambda path: self._writer().save_output(tracked.job, path, task=task),
        )

    async def _store_result(self, tracked: _Tracked, task: int | None = None) -> bool:
        """A `python` job's outcome (`hpc/python_runner.py`), as `result.pkl` (of array task `task`:
        `tasks/<index>/result.pkl`); nothing when the runner wrote none (killed, never started)."""
        relative = python_result_path(task)

        def read(offset: int) -> Coroutine[Any, Any, bytes]:
            return self.backend.read_file(tracked.job.id, relative, offset=offset, length=OUTPUT_CHUNK)

        return await self._copy_to_artifact(
            tracked.job,
            "the python result",
            read,
            lambda path: self._writer().save_result(tracked.job, path, task=task),
            skip_empty=True,
        )

    async def _copy_to_artifact(
        self,
        job: Job,
        what: str,
        read: Callable[[int], Coroutine[Any, Any, bytes]],
        save: Callable[[Path], list[str]],
        *,
        skip_empty: bool = False,
    ) -> bool:
        """Copy a job file chunk by chunk (`read(offset)`) into a local temporary file, then store it
        (`save(path)`), so that a large file is uploaded in parts and never held in memory. False
        when it could not be read or stored (logged); an empty file skipped is done."""
        if self.artifacts is None:
            return True
        with tempfile.TemporaryDirectory(prefix="cloudhpc-output-") as tmp:
            path = Path(tmp) / "copy"
            offset = 0
            try:
                with path.open("wb") as handle:
                    while data := await read(offset):
                        handle.write(data)
                        offset += len(data)
            except CloudHPCError as exc:
                log.warning("job %s: could not read %s to store it (%s)", job.id, what, exc)
                return False
            if offset == 0 and skip_empty:
                return True
            return await self._stored_artifacts(job, lambda: save(path))

    async def _store_outputs(self, job: Job) -> None:
        """The files the job's `outputs` patterns match, as artifacts `outputs/<path>`, with
        `outputs.json` saying what was collected and what was left out and why. One file at a time
        through a local temporary copy (the cluster's `outputs.max_bytes` bounds them all)."""
        if not job.spec.outputs or self.artifacts is None:
            return
        limits = self.config.outputs
        try:
            found, report = await self.backend.find_outputs(
                job.id, list(job.spec.outputs), max_bytes=limits.max_bytes, max_files=limits.max_files
            )
        except CloudHPCError as exc:
            log.warning("job %s: could not look for its outputs (%s)", job.id, exc)
            found, report = (
                [],
                OutputsReport(
                    patterns=list(job.spec.outputs),
                    skipped=[SkippedOutput(path="", reason=f"not searched: {exc}")],
                ),
            )
        keys: list[str] = []
        failed: list[SkippedOutput] = []
        with tempfile.TemporaryDirectory(prefix="cloudhpc-outputs-") as tmp:
            for found_file in found:
                local = Path(tmp) / "copy"
                try:
                    await self.backend.download(found_file, local)
                    keys += await asyncio.to_thread(
                        self._writer().save_output_file, job, found_file.relative, local
                    )
                except CloudHPCError as exc:
                    log.warning("job %s: output %r not collected (%s)", job.id, found_file.relative, exc)
                    failed.append(
                        SkippedOutput(path=found_file.relative, reason=f"could not be copied: {exc}")
                    )
        if failed:
            gone = {f.path for f in failed}
            report = report.model_copy(
                update={
                    "collected": [p for p in report.collected if p not in gone],
                    "bytes": sum(f.size for f in found if f.relative not in gone),
                    "skipped": [*report.skipped, *failed],
                }
            )
        final = report
        await self._store_artifacts(job, lambda: [*keys, *self._writer().save_outputs_report(job, final)])

    async def _query_loop(self) -> None:
        """Porter's questions (a job's files), each answered in the background as it comes."""
        while not self._stopping.is_set():
            try:
                queries = await self.channel.claim_queries(self.cluster, wait=self.work_wait)
            except ChannelError as exc:
                log.warning("cluster %s: query poll failed (%s)", self.cluster, exc)
                await asyncio.sleep(2)
                continue
            for query in queries:
                self._spawn(self._answer(query))

    async def _answer(self, query: AgentQuery) -> None:
        answer = await answer_query(self.backend, query, self.config)
        try:
            await self.channel.answer_query(query.id, answer)
        except ChannelError as exc:
            log.warning("cluster %s: could not answer query %s (%s)", self.cluster, query.id, exc)

    async def _report(self, job_id: UUID, state: JobState, **fields: Any) -> None:
        report = JobReport(job_id=job_id, seq=self._seq.next(), state=state, **fields)
        delay = 0.5
        while True:
            try:
                await self.channel.report([report])
                return
            except ChannelError as exc:
                if self._stopping.is_set():
                    raise
                log.warning("job %s: report failed (%s); retrying", job_id, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    return value
