"""`SlurmBackend.estimate` on the testbed (#15 item 3): `sbatch --test-only` is the submission's own
sbatch (the argv SLURM received differs from the real submission's only by `--test-only` and the
script read from stdin), submits nothing, answers per partition with SLURM's refusal as an error;
and a finished job's billed units from sacct's billing TRES (`billing_tres_hour`) and from the rates."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from cloudhpc.config import ClusterConfig, SSHConfig
from cloudhpc.domain.jobs import Resources
from cloudhpc.domain.states import JobState
from cloudhpc.hpc.backend import CommandResult
from cloudhpc.hpc.slurm import SlurmBackend
from cloudhpc.submitter.estimates import billed_from_accounting
from tests.e2e.harness import slurm_jobs_named
from tests.integration.test_slurm import cluster_defaults, follow, make_backend
from tests.slurm_jobs import make_submission
from tests.testbed import Testbed


class Argvs:
    """Every command's argv, by command name, as the backend ran them."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, CommandResult]] = []

    def __call__(self, name: str, result: CommandResult, seconds: float) -> None:
        self.seen.append((name, result))

    def of(self, name: str) -> list[list[str]]:
        return [list(r.argv) for n, r in self.seen if n == name]


@pytest.fixture
async def watched(testbed_ssh: SSHConfig, testbed: Testbed) -> AsyncIterator[tuple[SlurmBackend, Argvs]]:
    argvs = Argvs()
    backend = make_backend(testbed_ssh, testbed, argvs)  # type: ignore[arg-type]
    yield backend, argvs
    await backend.close()


async def test_test_only_asks_with_the_submissions_own_argv(watched: tuple[SlurmBackend, Argvs]) -> None:
    backend, argvs = watched
    submission = make_submission(
        await backend.workdir(),
        "true",
        resources=Resources(cpus_per_task=2, mem="300M", time="00:03:00"),
        defaults=cluster_defaults(),
    )
    asked = datetime.now(UTC)
    default, refused = await backend.estimate(submission, [None, "nosuchpartition"])
    assert default.error is None, default
    assert default.partition == cluster_defaults().partition
    assert default.processors == 2
    assert default.start is not None
    assert default.start - asked < timedelta(minutes=15)  # a shared node: some wait is possible
    assert refused.start is None
    assert refused.error is not None
    assert "invalid partition" in refused.error.lower()
    assert slurm_jobs_named(f"chpc-{submission.job_id}") == []  # nothing submitted

    native = await backend.submit(submission)
    [real] = argvs.of("sbatch")
    [tested] = [a for a in argvs.of("sbatch --test-only") if "--partition=nosuchpartition" not in a]
    assert tested[:5] == ["env", "SLURM_TIME_FORMAT=%s", "TZ=UTC", "sbatch", "--test-only"]
    assert tested[5:] == real[1:-1]  # the same options; the script came on stdin
    assert real[-1].endswith("/.cloudhpc/job.sh")
    await backend.cancel(native)


async def test_billed_units_from_sacct_billing_tres_and_from_the_rates(
    watched: tuple[SlurmBackend, Argvs],
) -> None:
    backend, _ = watched
    submission = make_submission(
        await backend.workdir(), "sleep 3", resources=Resources(cpus_per_task=2), defaults=cluster_defaults()
    )
    native = await backend.submit(submission)
    seen = await follow(backend, {submission.job_id: native})
    assert seen[submission.job_id][-1].state == JobState.COMPLETED
    records = (await backend.accounting(native)).records
    allocation = next(r for r in records if r.step is None)
    assert allocation.billing is not None  # the testbed's SLURM reports billing= in AllocTRES
    assert allocation.elapsed_seconds is not None
    assert allocation.alloc_cpus == 2
    hours = allocation.elapsed_seconds / 3600
    partition = allocation.partition
    billing = {"unit": "BU", "partitions": {partition: {"cpu_hour": 1.0, "mem_gib_hour": 0.1}}}
    by_tres = ClusterConfig.model_validate(
        {"backend": "local", "billing": billing | {"billing_tres_hour": 2.0}}
    )
    by_rates = ClusterConfig.model_validate({"backend": "local", "billing": billing})

    from_sacct = billed_from_accounting(records, by_tres)
    assert from_sacct is not None
    assert from_sacct.source == "sacct"
    assert from_sacct.units == pytest.approx(allocation.billing * hours * 2.0, abs=1e-6)

    from_rates = billed_from_accounting(records, by_rates)
    assert from_rates is not None
    assert from_rates.source == "rates"
    mem_gib = (allocation.req_mem_bytes or 0) / 2**30
    assert from_rates.units == pytest.approx((2 * 1.0 + mem_gib * 0.1) * hours, abs=1e-6)
    assert from_rates.units > 0
