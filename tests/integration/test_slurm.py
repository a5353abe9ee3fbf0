"""SlurmBackend + Poller against the real testbed (SLURM 22.05 + slurmdbd + seff, over SSH as hpcuser).

The time-limit job takes ~90 s to be killed by SLURM, so it is submitted by a module fixture
requested by the first test and checked by the last one: the other tests run while it waits.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from uuid import UUID, uuid4

import pytest
import pytest_asyncio
from pydantic import ValidationError

from cloudhpc.config import PollConfig, SSHConfig
from cloudhpc.domain.jobs import JobSpec, Observation, Resources
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import AccountingUnavailable, SubmitRejected
from cloudhpc.hpc.backend import CommandResult
from cloudhpc.hpc.poller import Poller
from cloudhpc.hpc.slurm import SlurmBackend, compute_efficiency, job_name_for
from cloudhpc.hpc.ssh import SSHConnection
from tests.conftest import HOSTILE_STRINGS
from tests.slurm_jobs import make_submission
from tests.testbed import Testbed, load_testbed

pytestmark = pytest.mark.testbed

WORKDIR = "~/.cloudhpc-test"
FAST = PollConfig(fast_interval=0.3, slow_interval=1.0, max_commands_per_minute=1000)
MARKER = Path("/tmp/pwned")  # what HOSTILE_STRINGS would create if a shell ever ran them


class CommandLog:
    def __init__(self) -> None:
        self.names: list[str] = []

    def __call__(self, name: str, result: CommandResult, seconds: float) -> None:
        self.names.append(name)

    def count(self) -> Counter[str]:
        return Counter(self.names)


def make_backend(cfg: SSHConfig, testbed: Testbed, log: CommandLog | None = None) -> SlurmBackend:
    return SlurmBackend(
        "testbed",
        SSHConnection(cfg, cluster="testbed"),
        workdir=WORKDIR,
        on_command=log,
    )


def cluster_defaults() -> Resources:
    """The cluster's `defaults`: the agent applies them before a backend sees a submission."""
    return Resources(partition=load_testbed().partition, time="00:05:00")


async def submit(backend: SlurmBackend, script: str, **kwargs: object) -> tuple[UUID, str]:
    submission = make_submission(
        await backend.workdir(),
        script,
        defaults=cluster_defaults(),
        **kwargs,  # type: ignore[arg-type]
    )
    return submission.job_id, await backend.submit(submission)


async def follow(
    backend: SlurmBackend, jobs: dict[UUID, str], *, timeout: float = 60.0
) -> dict[UUID, list[Observation]]:
    """Every observation the poller reports for `jobs`, until all are terminal."""
    seen: dict[UUID, list[Observation]] = defaultdict(list)

    async def record(job_id: UUID, native_id: str, observation: Observation) -> None:
        seen[job_id].append(observation)

    poller = Poller(backend, FAST, record)
    for job_id, native_id in jobs.items():
        poller.track(job_id, native_id)
    deadline = time.monotonic() + timeout
    while poller.tracked:
        assert time.monotonic() < deadline, f"jobs still not finished: {poller.tracked}"
        await poller.tick()
        await asyncio.sleep(poller.interval)
    return seen


@pytest.fixture
async def log() -> CommandLog:
    return CommandLog()


@pytest.fixture
async def backend(testbed_ssh: SSHConfig, testbed: Testbed, log: CommandLog) -> AsyncIterator[SlurmBackend]:
    b = make_backend(testbed_ssh, testbed, log)
    yield b
    await b.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def timeout_job(testbed_ssh: SSHConfig, testbed: Testbed) -> AsyncIterator[tuple[UUID, str]]:
    """A job with a 1-minute limit sleeping longer, submitted early so its wait overlaps the others."""
    b = make_backend(testbed_ssh, testbed)
    try:
        job = await submit(b, "sleep 600", resources=Resources(time="1"))
        yield job
        await b.cancel(job[1])
    finally:
        await b.close()


async def wait_for_state(backend: SlurmBackend, native_id: str, state: JobState, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        observation = (await backend.poll([native_id])).get(native_id)
        if observation is not None and observation.state == state:
            return
        assert time.monotonic() < deadline, f"job {native_id} never became {state}: {observation}"
        await asyncio.sleep(0.3)


# ------------------------------------------------------------------------------------ tests


async def test_submit_runs_to_completed_with_exit_code_0(
    backend: SlurmBackend, timeout_job: tuple[UUID, str]
) -> None:
    job_id, native_id = await submit(backend, "echo hello from $CLOUDHPC_JOB_ID\necho to stderr >&2\n")
    assert native_id.isdigit()
    seen = await follow(backend, {job_id: native_id})
    final = seen[job_id][-1]
    assert final.state == JobState.COMPLETED
    assert final.exit_code == 0
    assert final.reason is None
    assert final.started_at is not None
    assert final.ended_at is not None
    assert final.started_at.tzinfo is not None
    assert final.ended_at >= final.started_at
    output = await backend.read_output(job_id)
    assert f"hello from {job_id}\n".encode() in output
    assert b"to stderr\n" in output
    assert await backend.read_output(job_id, offset=6, length=4) == b"from"


async def test_exit_code_3_is_failed(backend: SlurmBackend) -> None:
    job_id, native_id = await submit(backend, "echo failing\nexit 3\n")
    final = (await follow(backend, {job_id: native_id}))[job_id][-1]
    assert final.state == JobState.FAILED
    assert final.exit_code == 3
    assert final.reason == "FAILED"
    assert final.native_state == "FAILED"


async def test_cancel(backend: SlurmBackend) -> None:
    job_id, native_id = await submit(backend, "sleep 300\n")
    await wait_for_state(backend, native_id, JobState.RUNNING)
    await backend.cancel(native_id)
    final = (await follow(backend, {job_id: native_id}))[job_id][-1]
    assert final.state == JobState.CANCELLED
    assert final.native_state == "CANCELLED"
    await backend.cancel(native_id)  # already gone: not an error


async def test_fifty_jobs_one_squeue_per_tick(backend: SlurmBackend, log: CommandLog) -> None:
    submissions = await asyncio.gather(*(submit(backend, "sleep 1\n") for _ in range(50)))
    jobs = dict(submissions)
    assert len(set(jobs.values())) == 50
    log.names.clear()
    seen: dict[UUID, Observation] = {}
    per_tick: list[Counter[str]] = []

    async def record(job_id: UUID, native_id: str, observation: Observation) -> None:
        seen[job_id] = observation

    poller = Poller(backend, FAST, record)
    for job_id, native_id in jobs.items():
        poller.track(job_id, native_id)
    deadline = time.monotonic() + 90
    while poller.tracked:
        assert time.monotonic() < deadline, f"{len(poller.tracked)} jobs still not finished"
        before = len(log.names)
        await poller.tick()
        per_tick.append(Counter(log.names[before:]))
        await asyncio.sleep(poller.interval)
    assert {o.state for o in seen.values()} == {JobState.COMPLETED}
    assert len(seen) == 50
    assert all(tick["squeue"] == 1 for tick in per_tick)
    assert all(tick["sacct"] <= 1 for tick in per_tick)
    assert set(log.names) <= {"squeue", "sacct"}
    assert log.count()["squeue"] == len(per_tick)


async def test_restarted_backend_finds_the_submitted_job(
    backend: SlurmBackend, testbed_ssh: SSHConfig, testbed: Testbed
) -> None:
    job_id, native_id = await submit(backend, "sleep 2\n")
    restarted = make_backend(testbed_ssh, testbed)
    try:
        assert await restarted.find(job_id) == native_id
        assert await restarted.find(uuid4()) is None
        await follow(restarted, {job_id: native_id})
        assert await restarted.find(job_id) == native_id  # finished, still found
    finally:
        await restarted.close()


@pytest.mark.parametrize("hostile", HOSTILE_STRINGS)
def test_hostile_job_names_are_rejected_before_submission(hostile: str) -> None:
    with pytest.raises(ValidationError):
        JobSpec(name=hostile, cluster="testbed", script="true")


async def test_hostile_env_values_and_file_names_are_carried_literally(
    backend: SlurmBackend, testbed_ssh: SSHConfig
) -> None:
    await asyncio.to_thread(MARKER.unlink, missing_ok=True)
    env = {f"HOSTILE_{n}": value for n, value in enumerate(HOSTILE_STRINGS)}
    names = [v.replace("\n", "_") for v in HOSTILE_STRINGS if ".." not in v and "\\" not in v]
    files = {f"in/{name}": f"content of {name}" for name in names}
    script = (
        f'for n in $(seq 0 {len(HOSTILE_STRINGS) - 1}); do v=HOSTILE_$n; printf "%s\\0" "${{!v}}"; done\n'
        "find in -type f -print0 | sort -z\n"
    )
    job_id, native_id = await submit(backend, script, env=env, files=files)
    final = (await follow(backend, {job_id: native_id}))[job_id][-1]
    assert final.state == JobState.COMPLETED
    fields = (await backend.read_output(job_id)).decode().split("\0")
    assert fields[: len(HOSTILE_STRINGS)] == HOSTILE_STRINGS
    assert sorted(fields[len(HOSTILE_STRINGS) : -1]) == sorted(files)
    paths = await backend.paths(job_id)
    async with SSHConnection(testbed_ssh, cluster="testbed") as conn:
        for path, content in files.items():
            assert await conn.read_file(paths.file(path)) == content.encode()
    assert not await asyncio.to_thread(MARKER.exists)


async def test_accounting_and_efficiency_of_a_finished_job(backend: SlurmBackend) -> None:
    script = (
        'python3 -c \'import time; x = bytearray(120 * 2**20); x[::4096] = b"x" * len(x[::4096]); '
        "time.sleep(5)'\n"
    )
    job_id, native_id = await submit(backend, script, resources=Resources(mem="300M"))
    assert (await follow(backend, {job_id: native_id}))[job_id][-1].state == JobState.COMPLETED
    accounting = await backend.accounting(native_id)
    records = accounting.records
    allocation = next(r for r in records if r.step is None)
    assert allocation.job_id == native_id
    assert allocation.state == "COMPLETED"
    assert allocation.exit_code == 0
    assert allocation.req_mem_bytes == 300 * 2**20
    assert allocation.elapsed_seconds is not None
    assert allocation.elapsed_seconds >= 5
    assert allocation.start is not None
    assert allocation.start.tzinfo is not None
    assert allocation.partition is not None
    assert "batch" in {r.step for r in records}
    peak = max(r.max_rss_bytes or 0 for r in records)
    assert peak > 100 * 2**20
    efficiency = await backend.efficiency(accounting)
    assert efficiency.source == "seff"
    assert efficiency.state == "COMPLETED"
    assert efficiency.memory_requested_bytes == 300 * 2**20
    computed = compute_efficiency(records)
    assert efficiency.memory_efficiency is not None
    assert computed.memory_efficiency is not None
    assert computed.memory_efficiency == pytest.approx(efficiency.memory_efficiency, abs=0.01)
    assert computed.memory_efficiency > 0.3
    # the job's own records (`sacct --duplicates`, kept to its name, as the agent asks): the same
    # as the id's newest here; a job whose id this is not gets none, never this one's
    own_accounting = await backend.accounting(native_id, job=job_id)
    assert own_accounting.records == (await backend.accounting(native_id)).records
    assert own_accounting.others == ()
    with pytest.raises(AccountingUnavailable, match=f"{job_name_for(job_id)}'s"):
        await backend.accounting(native_id, job=uuid4())
    own = await backend.efficiency(own_accounting)
    assert own.memory_requested_bytes == 300 * 2**20
    assert own.memory_efficiency == pytest.approx(efficiency.memory_efficiency, abs=0.01)


async def test_poll_answers_known_ids_beside_unknown_ones(backend: SlurmBackend) -> None:
    job_id, native_id = await submit(backend, "sleep 1\n")
    assert await backend.poll(["999999"]) == {}  # squeue errors on one unknown id; sacct has none
    answer = await backend.poll([native_id, "999999"])
    assert set(answer) == {native_id}
    await follow(backend, {job_id: native_id})


async def test_rejected_submission_keeps_the_evidence(backend: SlurmBackend) -> None:
    submission = make_submission(
        await backend.workdir(),
        "true\n",
        resources=Resources(partition="nosuchpart"),
        defaults=cluster_defaults(),
    )
    with pytest.raises(SubmitRejected) as info:
        await backend.submit(submission)
    assert "Invalid partition name" in info.value.stderr
    assert info.value.argv[0] == "sbatch"
    assert await backend.find(submission.job_id) is None
    assert await backend.read_output(submission.job_id) == b""


async def test_time_limit_gives_timeout(backend: SlurmBackend, timeout_job: tuple[UUID, str]) -> None:
    job_id, native_id = timeout_job
    final = (await follow(backend, {job_id: native_id}, timeout=150))[job_id][-1]
    assert final.state == JobState.TIMEOUT
    assert final.native_state == "TIMEOUT"
