"""The SLURM backend with job arrays on the testbed (#13 item 3): a restarted agent finds an array
by its cloudhpc id as the array's id (not one task's, not a pending `123_[2-5]` row), cancelling
the job cancels every task, and following an array costs one squeue per tick like one job."""

from __future__ import annotations

import dataclasses
from uuid import UUID

import pytest

from cloudhpc.config import SSHConfig
from cloudhpc.domain.jobs import Resources
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import SubmitRejected
from cloudhpc.hpc.slurm import SlurmBackend
from tests.integration.test_slurm import (  # noqa: F401  (backend, log: the fixtures)
    CommandLog,
    backend,
    cluster_defaults,
    follow,
    log,
    make_backend,
    wait_for_state,
)
from tests.slurm_jobs import make_submission
from tests.testbed import Testbed


async def submit_array(to: SlurmBackend, script: str, array: str) -> tuple[UUID, str]:
    submission = make_submission(await to.workdir(), script, defaults=cluster_defaults())
    spec = submission.spec.model_copy(update={"array": array})
    submission = dataclasses.replace(submission, spec=spec)
    return submission.job_id, await to.submit(submission)


async def test_an_array_is_found_again_and_cancelled_whole(
    backend: SlurmBackend,  # noqa: F811
    testbed_ssh: SSHConfig,
    testbed: Testbed,
    log: CommandLog,  # noqa: F811
) -> None:
    # 2 run at once, 4 wait as one pending row `<id>_[2-5%2]`
    job_id, native_id = await submit_array(backend, "sleep 300\n", "0-5%2")
    await wait_for_state(backend, native_id, JobState.RUNNING)
    restarted = make_backend(testbed_ssh, testbed)
    try:
        assert await restarted.find(job_id) == native_id
    finally:
        await restarted.close()
    seen = (await backend.poll([native_id]))[native_id]
    assert [t.index for t in seen.tasks or ()] == [0, 1, 2, 3, 4, 5]
    assert [t.state for t in seen.tasks or ()] == [JobState.RUNNING] * 2 + [JobState.QUEUED] * 4
    assert {t.reason for t in (seen.tasks or ())[2:]} == {"JobArrayTaskLimit"}
    await backend.cancel(native_id)
    before = log.count()
    observations = await follow(backend, {job_id: native_id})
    last = observations[job_id][-1]
    assert last.state == JobState.CANCELLED
    assert {t.state for t in last.tasks or ()} == {JobState.CANCELLED}
    assert len(last.tasks or ()) == 6
    # seff refuses an array whose tasks never started: the figures come from sacct, every task's
    efficiency = await backend.efficiency(await backend.accounting(native_id))
    assert (efficiency.source, efficiency.state) == ("sacct", "CANCELLED")
    commands = log.count() - before
    # every tick one squeue for all six tasks; sacct only once they had all ended
    assert commands["squeue"] >= 1
    assert commands["sacct"] <= commands["squeue"]


async def test_an_index_over_max_array_size_is_sbatchs_refusal(backend: SlurmBackend) -> None:  # noqa: F811
    """Indices above the site's MaxArraySize (1001 on the testbed) pass cloudhpc's check and are
    refused by sbatch: a SubmitRejected with sbatch's words (the agent fails the job with them)."""
    submission = make_submission(await backend.workdir(), "true\n", defaults=cluster_defaults())
    submission = dataclasses.replace(
        submission,
        spec=submission.spec.model_copy(update={"array": "5000"}),
        resources=Resources(partition=cluster_defaults().partition, time="1"),
    )
    with pytest.raises(SubmitRejected, match=r"(?i)array"):
        await backend.submit(submission)
