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

import pytest

from cloudhpc.config import ClusterConfig
from cloudhpc.domain.jobs import Job, JobSpec
from cloudhpc.exceptions import StorageError
from cloudhpc.hpc.backend import Efficiency, JobAccounting, JobBackend
from cloudhpc.hpc.slurm import Sacct
from cloudhpc.hpc.slurm.accounting import job_accounting
from cloudhpc.storage.artifacts import ArtifactWriter, artifact_key
from cloudhpc.storage.local import LocalObjectStore
from cloudhpc.store import Store
from cloudhpc.submitter import agent as agent_module
from cloudhpc.submitter.agent import Agent, _Tracked
from cloudhpc.submitter.channel import Channel
from tests.recordings import load_recording


class RecordedSlurm:
    """sacct's answer for an ended job, as recorded on the testbed, and seff's figures."""

    async def accounting(self, native_id: str, *, job: UUID | None = None) -> JobAccounting:
        return job_accounting(
            native_id, [row.record for row in Sacct.parse(load_recording("sacct_completed"))]
        )

    async def efficiency(self, accounting: JobAccounting) -> Efficiency:
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


def agent_and_job(tmp_path: Path, objects: LocalObjectStore) -> tuple[Agent, Porter, Job]:
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
    return agent, porter, job


async def test_accounting_artifacts_are_written_before_porter_is_told(tmp_path: Path) -> None:
    objects = LocalObjectStore(tmp_path / "objects")
    agent, porter, job = agent_and_job(tmp_path, objects)
    record = await agent._collect_accounting(_Tracked(job=job, native_id="42"), attempts=1)
    assert record is not None
    assert porter.present_at_put == ["sacct.json", "efficiency.json"]


class Restarting(LocalObjectStore):
    """An object store (or porter's store behind the artifact route) that is down for its first
    `down` writes, as while it restarts."""

    def __init__(self, root: Path, down: int) -> None:
        super().__init__(root)
        self.down = down

    def put(self, key: str, data: bytes, *, content_type: str | None = None) -> None:
        if self.down > 0:
            self.down -= 1
            raise StorageError(f"{key}: connection refused")
        super().put(key, data, content_type=content_type)


async def test_artifacts_are_stored_once_the_store_is_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A submission's artifacts are written once: a store down for longer than one attempt lost them."""
    monkeypatch.setattr(agent_module, "ARTIFACT_RETRY_DELAYS", (0.01,) * 7)
    objects = Restarting(tmp_path / "objects", down=3)
    agent, _porter, job = agent_and_job(tmp_path, objects)
    await agent._store_artifacts(job, agent._save_submission(job, None))
    assert objects.down == 0
    assert objects.list(f"jobs/{job.owner}/") == [artifact_key(job.owner, job.id, "spec.json")]
