"""Follows the jobs of one cluster: one batched `poll` per tick for all of them.

Sites rate-limit scheduler RPCs per user, and the original system paid one SSH connection and one
sacct per job per check. Here a tick costs the same whatever the number of jobs, the interval
stretches while nothing happens (fast while jobs start, end or change; doubling up to the slow
interval otherwise), and a token bucket caps the commands per minute whatever the pokes ask for.
Finished jobs are reported once and forgotten: a terminal state is final, so never asked again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable
from uuid import UUID

from cloudhpc.config import PollConfig
from cloudhpc.domain.jobs import Observation
from cloudhpc.hpc.backend import JobBackend

__all__ = ["ObservationCallback", "Poller", "TokenBucket"]

logger = logging.getLogger(__name__)

ObservationCallback = Callable[[UUID, str, Observation], Awaitable[None]]
"""`callback(job_id, native_id, observation)`, awaited for every observation that differs from the last."""

# Native states during which a job is about to change again (starting or ending): poll fast.
_TRANSIENT_NATIVE = frozenset({"CONFIGURING", "COMPLETING", "SIGNALING", "STAGE_OUT", "REQUEUED", "RESIZING"})


@runtime_checkable
class _CountsCommands(Protocol):
    last_poll_commands: int


class TokenBucket:
    """`rate_per_minute` tokens a minute, bursts of at most `capacity`. Charges may overdraw it (a
    poll learns its real cost afterwards); the debt is paid by waiting longer before the next one."""

    def __init__(
        self,
        rate_per_minute: float,
        *,
        capacity: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_minute <= 0:
            raise ValueError("rate_per_minute must be positive")
        self.rate = rate_per_minute / 60.0
        self.capacity = capacity if capacity is not None else max(2.0, rate_per_minute / 10.0)
        self._clock = clock
        self._tokens = self.capacity
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
        self._updated = now

    @property
    def tokens(self) -> float:
        self._refill()
        return self._tokens

    def wait_time(self, cost: float = 1.0) -> float:
        """Seconds until `cost` tokens are available (0 when they are now)."""
        missing = cost - self.tokens
        return 0.0 if missing <= 0 else missing / self.rate

    def charge(self, cost: float) -> None:
        self._refill()
        self._tokens -= cost


INCOMPLETE_PATIENCE = 180.0
"""Seconds an array's end is held back while accounting lists only some of its tasks (slurmdbd
catching up after a restart of it or of slurmctld); then the end is taken as it stands, logged."""


@dataclass
class _Tracked:
    native_id: str
    last: Observation | None = None
    tasks: frozenset[int] | None = None
    """An array's task indices: its end counts once every one of them has been seen."""
    incomplete_since: float | None = None


def _submitted_before(record: Observation, last: Observation | None) -> bool:
    """Whether `record` (another job's, by its name) was submitted before the job last seen as
    `last`: then it cannot be the job a controller gave this job's id to after losing it, which
    is submitted later. Unknown times count as not before (the loss stands)."""
    if record.submitted_at is None or last is None or last.submitted_at is None:
        return False
    return record.submitted_at < last.submitted_at


class Poller:
    """Polls one backend for every tracked job, calling `callback` with each changed observation.

    `tick()` is one poll (tests call it directly); `run()` loops forever, `start()`/`stop()` run it
    as a task. `track` and `poke` make the next tick come soon, within the command budget.
    """

    def __init__(
        self,
        backend: JobBackend,
        config: PollConfig,
        callback: ObservationCallback,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.config = config
        self._callback = callback
        self._clock = clock
        self._bucket = TokenBucket(config.max_commands_per_minute, clock=clock)
        self._jobs: dict[UUID, _Tracked] = {}
        self.interval = config.fast_interval
        """Seconds from one tick to the next while nothing pokes the poller."""
        self._last_tick: float | None = None
        self._poked = False
        self._expecting: set[UUID] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.ticks = 0
        self.errors = 0

    # ---- what is followed

    @property
    def tracked(self) -> dict[UUID, str]:
        return {job_id: job.native_id for job_id, job in self._jobs.items()}

    def last_observation(self, job_id: UUID) -> Observation | None:
        job = self._jobs.get(job_id)
        return job.last if job is not None else None

    def track(
        self,
        job_id: UUID,
        native_id: str,
        *,
        last: Observation | None = None,
        tasks: frozenset[int] | None = None,
    ) -> None:
        """Follow a job (again). `last` is what is already known, so it is not reported twice;
        `tasks`, an array's indices, each of which its end must account for."""
        if last is not None and last.state.terminal:
            return
        self._jobs[job_id] = _Tracked(native_id=native_id, last=last, tasks=tasks)
        self.interval = self.config.fast_interval
        self.poke()

    def untrack(self, job_id: UUID) -> None:
        self._jobs.pop(job_id, None)
        self._expecting.discard(job_id)

    def expect_change(self, job_id: UUID) -> None:
        """Poll now and keep polling fast until this job's state changes: something outside SLURM
        said it is about to (a ray-job's entrypoint printed its end), and SLURM may lag behind."""
        if job_id in self._jobs:
            self._expecting.add(job_id)
            self.interval = self.config.fast_interval
            self.poke()

    def poke(self) -> None:
        """Poll as soon as the command budget allows (after a cancel, a submission...)."""
        self._poked = True
        self._wake.set()

    # ---- one tick

    async def tick(self) -> dict[UUID, Observation]:
        """Poll every tracked job once; report and return the observations that changed."""
        self._poked = False
        self._last_tick = self._clock()
        jobs = dict(self._jobs)
        if not jobs:
            return {}
        self.ticks += 1
        try:
            observed = await self.backend.poll([job.native_id for job in jobs.values()])
        except Exception as exc:  # any failure means "unknown this time": keep the last states
            self.errors += 1
            self._charge()
            self._slow_down()
            logger.warning("poll of %d jobs on %s failed: %s", len(jobs), self.backend.cluster, exc)
            return {}
        self._charge()
        changed: dict[UUID, Observation] = {}
        for job_id, job in jobs.items():
            observation = observed.get(job.native_id)
            if observation is not None and observation.owner not in (None, job_id):
                if _submitted_before(observation, job.last):
                    # an earlier job's record of this id, while this job's own is not stored yet
                    # (the accounting database outlives controllers that hand ids out from 1
                    # again; squeue, which would say whose the id is, did not answer): ask again
                    logger.info(
                        "job %s: %s on %s: skipping job %s's earlier record of this id",
                        job_id, job.native_id, self.backend.cluster, observation.owner,
                    )  # fmt: skip
                    continue
                logger.warning(
                    "job %s: %s on %s is job %s's now: the scheduler lost this job",
                    job_id, job.native_id, self.backend.cluster, observation.owner,
                )  # fmt: skip
                observation = observation.lost_to(job.native_id)
            if observation is None or observation == job.last or self._jobs.get(job_id) is not job:
                continue
            if observation.state.terminal and not self._accounts_for_every_task(job_id, job, observation):
                continue
            try:
                await self._callback(job_id, job.native_id, observation)
            except Exception:
                # Not recorded as seen: the same observation is offered again on the next tick.
                logger.exception("observation callback failed for job %s (%s)", job_id, job.native_id)
                continue
            job.last = observation
            changed[job_id] = observation
            self._expecting.discard(job_id)
            if observation.state.terminal:
                self._jobs.pop(job_id, None)
                self._expecting.discard(job_id)
        if changed or self._busy():
            self.interval = self.config.fast_interval
        else:
            self._slow_down()
        return changed

    def _accounts_for_every_task(self, job_id: UUID, job: _Tracked, observation: Observation) -> bool:
        """Whether an array's end lists every task. Right after slurmctld or slurmdbd restarted,
        squeue may have forgotten the ended tasks while accounting has only some of them: ending
        the array then would lose the others' states for good (a fault run saw 1 task of 5)."""
        if job.tasks is None or observation.native_state == "LOST":
            return True
        missing = job.tasks - {task.index for task in observation.tasks or ()}
        if not missing:
            job.incomplete_since = None
            return True
        now = self._clock()
        if job.incomplete_since is None:
            job.incomplete_since = now
        if now - job.incomplete_since < INCOMPLETE_PATIENCE:
            logger.info(
                "job %s: its end lists %d of its tasks: asking again", job_id, len(job.tasks) - len(missing)
            )
            return False
        logger.warning(
            "job %s: after %.0f s accounting still lacks %d of its tasks; taking its end as it is",
            job_id, INCOMPLETE_PATIENCE, len(missing),
        )  # fmt: skip
        return True

    def _charge(self) -> None:
        cost = self.backend.last_poll_commands if isinstance(self.backend, _CountsCommands) else 1
        self._bucket.charge(max(1, cost))

    def _slow_down(self) -> None:
        self.interval = min(self.interval * 2, self.config.slow_interval)

    def _busy(self) -> bool:
        """Some job is starting (never seen yet), in a short-lived native state, or expected to change."""
        if self._expecting or any(job.incomplete_since is not None for job in self._jobs.values()):
            return True
        for job in self._jobs.values():
            if job.last is None or job.last.native_state in _TRANSIENT_NATIVE:
                return True
        return False

    # ---- the loop

    def next_delay(self) -> float | None:
        """Seconds until the next tick is due (None: nothing to follow, wait for `track`)."""
        if not self._jobs:
            return None
        budget = self._bucket.wait_time(1.0)
        if self._poked or self._last_tick is None:
            return budget
        return max(self._last_tick + self.interval - self._clock(), budget)

    async def _wait_until_due(self) -> None:
        while True:
            delay = self.next_delay()
            if delay is not None and delay <= 0:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def run(self) -> None:
        while True:
            await self._wait_until_due()
            await self.tick()

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name=f"poller-{self.backend.cluster}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
