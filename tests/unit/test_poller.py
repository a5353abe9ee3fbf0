"""The poller's own logic (batching, change detection, forgetting, interval, budget).

The backend here is an in-memory fake written for these tests only: it says what a scheduler
would say and counts the calls. Everything SLURM-specific is tested against real outputs elsewhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import pytest

from cloudhpc.config import PollConfig
from cloudhpc.domain.arrays import TaskObservation
from cloudhpc.domain.jobs import Observation
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import SSHConnectError
from cloudhpc.hpc.backend import Efficiency, JobAccounting, JobSubmission
from cloudhpc.hpc.poller import INCOMPLETE_PATIENCE, Poller, TokenBucket


def obs(state: JobState, native: str | None = None, exit_code: int | None = None) -> Observation:
    return Observation(state=state, native_state=native or state.name, exit_code=exit_code)


class FakeBackend:
    cluster = "fake"

    def __init__(self) -> None:
        self.states: dict[str, Observation] = {}
        self.calls: list[list[str]] = []
        self.fail_next = 0
        self.last_poll_commands = 1

    async def poll(self, native_ids: Sequence[str]) -> dict[str, Observation]:
        self.calls.append(list(native_ids))
        if self.fail_next:
            self.fail_next -= 1
            raise SSHConnectError("connection lost")
        return {i: self.states[i] for i in native_ids if i in self.states}

    async def submit(self, submission: JobSubmission) -> str:
        raise NotImplementedError

    async def find(self, job_id: UUID) -> str | None:
        raise NotImplementedError

    async def cancel(self, native_id: str) -> None:
        raise NotImplementedError

    async def accounting(self, native_id: str, *, job: UUID | None = None) -> JobAccounting:
        raise NotImplementedError

    async def efficiency(self, accounting: JobAccounting) -> Efficiency:
        raise NotImplementedError

    async def read_output(self, job_id: UUID, *, offset: int = 0, length: int | None = None) -> bytes:
        raise NotImplementedError

    async def close(self) -> None:
        return None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[UUID, str, Observation]] = []
        self.fail = False

    async def __call__(self, job_id: UUID, native_id: str, observation: Observation) -> None:
        if self.fail:
            raise RuntimeError("store is down")
        self.seen.append((job_id, native_id, observation))


CONFIG = PollConfig(fast_interval=1.0, slow_interval=8.0, max_commands_per_minute=600)


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def poller(backend: FakeBackend, recorder: Recorder, clock: Clock) -> Poller:
    return Poller(backend, CONFIG, recorder, clock=clock)


async def test_one_poll_per_tick_for_all_jobs(poller: Poller, backend: FakeBackend) -> None:
    ids = {uuid4(): str(n) for n in range(50)}
    for job_id, native in ids.items():
        poller.track(job_id, native)
    await poller.tick()
    assert len(backend.calls) == 1
    assert sorted(backend.calls[0], key=int) == [str(n) for n in range(50)]


async def test_reports_only_changes(poller: Poller, backend: FakeBackend, recorder: Recorder) -> None:
    job = uuid4()
    poller.track(job, "7")
    backend.states["7"] = obs(JobState.QUEUED, "PENDING")
    assert await poller.tick() == {job: backend.states["7"]}
    assert await poller.tick() == {}
    backend.states["7"] = obs(JobState.RUNNING)
    await poller.tick()
    assert [o.state for _, _, o in recorder.seen] == [JobState.QUEUED, JobState.RUNNING]
    assert recorder.seen[0][:2] == (job, "7")


async def test_terminal_jobs_are_forgotten(poller: Poller, backend: FakeBackend, recorder: Recorder) -> None:
    done, running = uuid4(), uuid4()
    poller.track(done, "1")
    poller.track(running, "2")
    backend.states = {"1": obs(JobState.FAILED, exit_code=3), "2": obs(JobState.RUNNING)}
    await poller.tick()
    assert poller.tracked == {running: "2"}
    await poller.tick()
    assert backend.calls[-1] == ["2"]
    assert [o.exit_code for j, _, o in recorder.seen if j == done] == [3]


async def test_missing_answer_means_ask_again(
    poller: Poller, backend: FakeBackend, recorder: Recorder
) -> None:
    job = uuid4()
    poller.track(job, "5", last=obs(JobState.RUNNING))
    assert await poller.tick() == {}
    assert poller.tracked == {job: "5"}
    assert poller.last_observation(job) == obs(JobState.RUNNING)
    assert recorder.seen == []


async def test_known_state_is_not_reported_twice(
    poller: Poller, backend: FakeBackend, recorder: Recorder
) -> None:
    job = uuid4()
    backend.states["5"] = obs(JobState.RUNNING)
    poller.track(job, "5", last=obs(JobState.RUNNING))
    await poller.tick()
    assert recorder.seen == []


def test_tracking_a_finished_job_is_a_no_op(poller: Poller) -> None:
    poller.track(uuid4(), "5", last=obs(JobState.COMPLETED))
    assert poller.tracked == {}


async def test_poll_errors_keep_the_last_state(
    poller: Poller, backend: FakeBackend, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    job = uuid4()
    backend.states["3"] = obs(JobState.RUNNING)
    poller.track(job, "3")
    await poller.tick()
    backend.fail_next = 1
    backend.states["3"] = obs(JobState.COMPLETED)
    assert await poller.tick() == {}
    assert "connection lost" in caplog.text
    assert poller.errors == 1
    assert poller.last_observation(job) == obs(JobState.RUNNING)
    await poller.tick()
    assert recorder.seen[-1][2].state == JobState.COMPLETED


async def test_callback_failure_offers_the_observation_again(
    poller: Poller, backend: FakeBackend, recorder: Recorder
) -> None:
    job = uuid4()
    backend.states["3"] = obs(JobState.COMPLETED)
    poller.track(job, "3")
    recorder.fail = True
    await poller.tick()
    assert poller.tracked == {job: "3"}
    recorder.fail = False
    await poller.tick()
    assert [o.state for _, _, o in recorder.seen] == [JobState.COMPLETED]
    assert poller.tracked == {}


async def test_untracked_during_poll_is_not_reported(
    backend: FakeBackend, recorder: Recorder, clock: Clock
) -> None:
    job = uuid4()

    class Slow(FakeBackend):
        async def poll(self, native_ids: Sequence[str]) -> dict[str, Observation]:
            slow.untrack(job)
            return {"1": obs(JobState.RUNNING)}

    slow = Poller(Slow(), CONFIG, recorder, clock=clock)
    slow.track(job, "1")
    await slow.tick()
    assert recorder.seen == []


async def test_interval_backs_off_and_resets(poller: Poller, backend: FakeBackend) -> None:
    job = uuid4()
    backend.states["1"] = obs(JobState.RUNNING)
    poller.track(job, "1")
    intervals = []
    for _ in range(6):
        await poller.tick()
        intervals.append(poller.interval)
    assert intervals == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    backend.states["1"] = obs(JobState.RUNNING, "COMPLETING")
    await poller.tick()
    assert poller.interval == 1.0  # changed
    await poller.tick()
    assert poller.interval == 1.0  # still ending: stay fast
    backend.states["1"] = obs(JobState.RUNNING)
    await poller.tick()
    await poller.tick()
    assert poller.interval == 2.0
    poller.track(uuid4(), "2")
    assert poller.interval == 1.0


async def test_unseen_jobs_keep_the_interval_fast(poller: Poller, backend: FakeBackend) -> None:
    poller.track(uuid4(), "1")  # sbatch just answered; squeue does not list it yet
    for _ in range(3):
        await poller.tick()
    assert poller.interval == 1.0


async def test_errors_back_off(poller: Poller, backend: FakeBackend) -> None:
    poller.track(uuid4(), "1")
    backend.fail_next = 3
    for _ in range(3):
        await poller.tick()
    assert poller.interval == 8.0


def test_next_delay_follows_interval_pokes_and_budget(
    backend: FakeBackend, recorder: Recorder, clock: Clock
) -> None:
    poller = Poller(
        backend,
        PollConfig(fast_interval=1, slow_interval=30, max_commands_per_minute=6),
        recorder,
        clock=clock,
    )
    assert poller.next_delay() is None  # nothing to follow
    poller.track(uuid4(), "1")
    assert poller.next_delay() == 0.0


async def test_budget_limits_ticks(backend: FakeBackend, recorder: Recorder, clock: Clock) -> None:
    config = PollConfig(fast_interval=0.5, slow_interval=0.5, max_commands_per_minute=6)
    poller = Poller(backend, config, recorder, clock=clock)
    poller.track(uuid4(), "1")
    backend.last_poll_commands = 2  # squeue + sacct: the whole burst capacity of 2
    await poller.tick()
    assert poller.next_delay() == pytest.approx(10.0)  # 1 token at 0.1 token/s
    clock.now += 10.0
    assert poller.next_delay() == pytest.approx(0.0)
    await poller.tick()  # overdraws to -1
    assert poller.next_delay() == pytest.approx(20.0)
    poller.poke()
    assert poller.next_delay() == pytest.approx(20.0)  # a poke never beats the budget
    clock.now += 20.0
    assert poller.next_delay() == pytest.approx(0.0)


def test_token_bucket(clock: Clock) -> None:
    bucket = TokenBucket(60, capacity=3, clock=clock)
    assert bucket.wait_time(3) == 0.0
    bucket.charge(3)
    assert bucket.wait_time(1) == pytest.approx(1.0)
    clock.now += 10
    assert bucket.tokens == pytest.approx(3.0)  # never above capacity
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(0)


async def test_run_loop_polls_until_done_and_stops(backend: FakeBackend, recorder: Recorder) -> None:
    config = PollConfig(fast_interval=0.01, slow_interval=0.02, max_commands_per_minute=6000)
    poller = Poller(backend, config, recorder)
    job = uuid4()
    backend.states["9"] = obs(JobState.RUNNING)
    poller.start()
    poller.track(job, "9")
    for _ in range(200):
        if recorder.seen:
            break
        await asyncio.sleep(0.005)
    backend.states["9"] = obs(JobState.COMPLETED, exit_code=0)
    for _ in range(200):
        if not poller.tracked:
            break
        await asyncio.sleep(0.005)
    await poller.stop()
    assert [o.state for _, _, o in recorder.seen] == [JobState.RUNNING, JobState.COMPLETED]
    calls = len(backend.calls)
    await asyncio.sleep(0.05)
    assert len(backend.calls) == calls  # stopped, and nothing is tracked anyway


async def test_poke_wakes_a_sleeping_loop(backend: FakeBackend, recorder: Recorder) -> None:
    config = PollConfig(fast_interval=30, slow_interval=60, max_commands_per_minute=6000)
    poller = Poller(backend, config, recorder)
    backend.states["1"] = obs(JobState.RUNNING)
    poller.track(uuid4(), "1")
    poller.start()
    for _ in range(100):
        if backend.calls:
            break
        await asyncio.sleep(0.005)
    assert len(backend.calls) == 1
    poller.poke()
    for _ in range(100):
        if len(backend.calls) == 2:
            break
        await asyncio.sleep(0.005)
    await poller.stop()
    assert len(backend.calls) == 2


async def test_a_job_whose_id_the_scheduler_gave_to_another_is_lost_not_the_other(
    poller: Poller, backend: FakeBackend, recorder: Recorder
) -> None:
    """slurmctld killed with -9 restarts from a state saved before it accepted `lost`, and hands its
    id to `other` (docs/reliability.md): `lost` must not take `other`'s state, exit code or end."""
    lost, other = uuid4(), uuid4()
    poller.track(lost, "2475")
    backend.states["2475"] = obs(JobState.RUNNING).model_copy(update={"owner": lost})
    await poller.tick()
    backend.states["2475"] = obs(JobState.COMPLETED, exit_code=0).model_copy(update={"owner": other})
    await poller.tick()
    seen = recorder.seen[-1][2]
    assert (seen.state, seen.native_state, seen.exit_code) == (JobState.FAILED, "LOST", None)
    assert seen.reason is not None
    assert "lost by the scheduler" in seen.reason
    assert str(other) in seen.reason
    assert poller.tracked == {}, "a lost job is not followed any more"
    # a record without an owner (a backend that cannot tell) is taken as it is
    unknown = uuid4()
    poller.track(unknown, "9")
    backend.states["9"] = obs(JobState.COMPLETED, exit_code=0)
    await poller.tick()
    assert recorder.seen[-1][2].state == JobState.COMPLETED


async def test_an_earlier_jobs_record_of_the_id_is_skipped_not_taken_for_a_loss(
    poller: Poller, backend: FakeBackend, recorder: Recorder
) -> None:
    """CI's fault run: squeue failed (slurmctld down), so the ids were asked of sacct alone, and
    sacct answered a record of the same id from an earlier controller's life (the accounting
    database outlives it) while this job's own was not stored yet. Submitted before this job, it
    cannot be the job a controller gave the id to after losing this one: ask again."""
    ours, earlier, later = uuid4(), uuid4(), uuid4()
    submitted = datetime(2026, 12, 6, 0, 45, 50, tzinfo=UTC)
    poller.track(ours, "41")
    backend.states["41"] = Observation(
        state=JobState.PENDING, native_state="PENDING", submitted_at=submitted, owner=ours
    )
    await poller.tick()
    old = Observation(
        state=JobState.FAILED,
        native_state="FAILED",
        exit_code=3,
        submitted_at=submitted - timedelta(hours=5),
        owner=earlier,
    )
    backend.states["41"] = old
    assert await poller.tick() == {}
    assert recorder.seen[-1][2].state == JobState.PENDING
    assert poller.tracked == {ours: "41"}
    # its own record, once stored, is taken
    backend.states["41"] = Observation(
        state=JobState.COMPLETED, native_state="COMPLETED", exit_code=0, submitted_at=submitted, owner=ours
    )
    await poller.tick()
    assert recorder.seen[-1][2].state == JobState.COMPLETED
    # a record of a job submitted after this one is the job that took the id: this one was lost
    lost = uuid4()
    poller.track(lost, "42")
    backend.states["42"] = Observation(
        state=JobState.RUNNING, native_state="RUNNING", submitted_at=submitted, owner=lost
    )
    await poller.tick()
    backend.states["42"] = old.model_copy(
        update={"submitted_at": submitted + timedelta(seconds=30), "owner": later}
    )
    await poller.tick()
    assert recorder.seen[-1][2].native_state == "LOST"


async def test_an_array_ends_only_once_every_task_is_accounted_for(
    poller: Poller, backend: FakeBackend, recorder: Recorder, clock: Clock
) -> None:
    """After a restart of slurmctld squeue may have forgotten an array's ended tasks while
    slurmdbd lists only some: a fault run ended an array with 1 task of 5. The end waits (and the
    poller keeps polling fast) until every index is there; a LOST job's end is taken at once."""

    def ended(*indices: int) -> Observation:
        done = [
            TaskObservation(index=i, state=JobState.COMPLETED, native_state="COMPLETED", exit_code=0)
            for i in indices
        ]
        return Observation.of_array(done)

    array, other = uuid4(), uuid4()
    poller.track(array, "40", tasks=frozenset(range(5)))
    poller.track(other, "41", tasks=frozenset(range(5)))
    backend.states["40"] = ended(4)
    backend.states["41"] = ended(1)
    assert await poller.tick() == {}
    assert recorder.seen == []
    assert set(poller.tracked) == {array, other}
    assert poller.interval == CONFIG.fast_interval
    backend.states["40"] = ended(0, 1, 2, 3, 4)
    changed = await poller.tick()
    assert set(changed) == {array}
    assert [t.index for t in changed[array].tasks or ()] == [0, 1, 2, 3, 4]
    # accounting that never lists the rest: the end is taken as it is after the patience
    clock.now += INCOMPLETE_PATIENCE + 1
    assert set(await poller.tick()) == {other}
    lost = uuid4()
    poller.track(lost, "42", tasks=frozenset(range(5)))
    backend.states["42"] = ended(0).lost_to("42")
    assert set(await poller.tick()) == {lost}
