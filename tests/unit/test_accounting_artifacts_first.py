"""The accounting artifacts are in the object store before porter hears of the accounting.

The fault suite (tests/faults, docs/reliability.md) killed the submitter between the two: porter had
the job's accounting, so the restarted agent no longer listed the job as unaccounted, and its
`sacct.json` and `efficiency.json` were never written. Whatever porter has been told, the
artifacts must already exist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast
from uuid import UUID

from cloudhpc.config import ClusterConfig
from cloudhpc.domain.jobs import Job, JobSpec
from cloudhpc.hpc.backend import AccountingRecord, Efficiency, JobBackend
from cloudhpc.hpc.slurm import Sacct
from cloudhpc.storage.artifacts import ArtifactWriter, artifact_key
from cloudhpc.storage.local import LocalObjectStore
from cloudhpc.store import Store
from cloudhpc.submitter.agent import Agent, _Tracked
from cloudhpc.submitter.channel import Channel
from tests.recordings import load_recording


class RecordedSlurm:
    """sacct's answer for an ended job, as recorded on the testbed, and seff's figures."""

    async def accounting(self, native_id: str) -> list[AccountingRecord]:
        return [row.record for row in Sacct.parse(load_recording("sacct_completed"))]

    async def efficiency(self, native_id: str) -> Efficiency:
        return Efficiency("COMPLETED", 0.5, 0.1, 1.0, 2.0, 1024, 10240, "seff")


class Porter:
    """porter's accounting route: notes which of the job's artifacts existed when it was called."""

    def __init__(self, objects: LocalObjectStore, job: Job) -> None:
        self.objects, self.job = objects, job
        self.present_at_put: list[str] = []

    async def put_accounting(self, job_id: UUID, record: dict[str, Any]) -> None:
        for name in ("sacct.json", "efficiency.json"):
            if artifact_key(self.job.owner, self.job.id, name) in self.objects.list(
                f"jobs/{self.job.owner}/"
            ):
                self.present_at_put.append(name)

    async def put_artifacts(self, job_id: UUID, keys: list[str]) -> None:
        pass


async def test_accounting_artifacts_are_written_before_porter_is_told(tmp_path: Path) -> None:
    objects = LocalObjectStore(tmp_path / "objects")
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    store.migrate()
    job, _created = store.create_job("alice", JobSpec(name="acct", cluster="testbed", script="true\n"))
    store.close()
    porter = Porter(objects, job)
    agent = Agent(
        "testbed",
        ClusterConfig(backend="local", workdir=str(tmp_path / "work")),
        cast(JobBackend, RecordedSlurm()),
        cast(Channel, porter),
        workdir=str(tmp_path / "work"),
        artifacts=ArtifactWriter(objects),
    )
    record = await agent._collect_accounting(_Tracked(job=job, native_id="42"), attempts=1)
    assert record is not None
    assert porter.present_at_put == ["sacct.json", "efficiency.json"]
