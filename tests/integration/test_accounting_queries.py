"""An ended job's accounting costs one sacct on the real testbed (over SSH), not one per verb.

The agent stores a job's sacct records and seff's figures together. Efficiency needs the job's own
records (seff cannot answer for an array or an id other jobs held too) and used to fetch them again
with a second `sacct --duplicates`: one more SSH round trip for every ended job. It now takes them
from the accounting answer (`JobAccounting`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any, cast
from uuid import UUID

import pytest

from cloudhpc.config import ClusterConfig, SSHConfig
from cloudhpc.domain.jobs import Job, JobSpec
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import AccountingUnavailable
from cloudhpc.hpc.slurm import SlurmBackend
from cloudhpc.store import Store
from cloudhpc.submitter.agent import Agent, _Tracked
from cloudhpc.submitter.channel import Channel
from tests.integration.test_slurm import CommandLog, follow, make_backend, submit
from tests.testbed import Testbed

pytestmark = pytest.mark.testbed


class Porter:
    """porter's accounting route, keeping what the agent sent."""

    def __init__(self) -> None:
        self.accounting: dict[UUID, dict[str, Any]] = {}

    async def put_accounting(self, job_id: UUID, record: dict[str, Any]) -> None:
        self.accounting[job_id] = record


def job_record(tmp_path: Path, job_id: UUID) -> Job:
    """The cloudhpc job as the agent tracks it, with the id the submission was made for."""
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    store.migrate()
    job, _created = store.create_job("alice", JobSpec(name="acct", cluster="testbed", script="true\n"))
    store.close()
    return job.model_copy(update={"id": job_id})


async def wait_final(backend: SlurmBackend, native_id: str, job_id: UUID, timeout: float = 40) -> None:
    """Until slurmdbd has the job's final records, so that the agent's first attempt takes them."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(AccountingUnavailable):  # only slurmdbd's placeholder record yet
            if (await backend.accounting(native_id, job=job_id)).final:
                return
        assert time.monotonic() < deadline, f"accounting of {native_id} not final after {timeout} s"
        await asyncio.sleep(0.5)


async def test_an_ended_jobs_accounting_costs_one_sacct(
    testbed_ssh: SSHConfig, testbed: Testbed, tmp_path: Path
) -> None:
    log = CommandLog()
    backend = make_backend(testbed_ssh, testbed, log)
    try:
        job_id, native_id = await submit(backend, "true\n")
        assert (await follow(backend, {job_id: native_id}))[job_id][-1].state == JobState.COMPLETED
        await wait_final(backend, native_id, job_id)
        porter = Porter()
        agent = Agent(
            "testbed",
            ClusterConfig(backend="slurm", ssh=testbed_ssh, workdir="~/.cloudhpc-test"),
            backend,
            cast(Channel, porter),
            workdir=str(tmp_path / "work"),
        )
        log.names.clear()
        record = await agent._collect_accounting(
            _Tracked(job=job_record(tmp_path, job_id), native_id=native_id), attempts=1
        )
        assert log.names == ["sacct", "seff"]  # was sacct, sacct, seff
        assert record is not None
        assert porter.accounting[job_id] == record
        assert record["efficiency"]["source"] == "seff"
        assert record["efficiency"]["state"] == "COMPLETED"
        assert {r["job_id"] for r in record["records"]} >= {native_id}
    finally:
        await backend.close()
