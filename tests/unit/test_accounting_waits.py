"""How the agent waits for a job's accounting after its end (`Agent._collect_accounting`): asked
again while the backend says its records are not final, each answer on `ACCOUNTING_RETRIES`'
schedule; stored as they are when the attempts are spent (a step whose end slurmdbd never got
would otherwise leave the job unaccounted for good)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, cast
from uuid import UUID, uuid4

import pytest

from cloudhpc.config import ClusterConfig
from cloudhpc.domain.jobs import JobSpec
from cloudhpc.hpc.backend import Efficiency, JobAccounting, JobBackend
from cloudhpc.hpc.slurm import Sacct
from cloudhpc.submitter import agent as agent_module
from cloudhpc.submitter.agent import Agent, _Tracked
from cloudhpc.submitter.channel import Channel
from tests.jobs import job_from
from tests.recordings import load_recording

SHIPPED = agent_module.ACCOUNTING_RETRIES
RECORDS = [row.record for row in Sacct.parse(load_recording("sacct_completed"))]


class Settling:
    """A backend whose accounting becomes final at answer number `final_at` (never: 0), and
    provisional from answer `provisional_from` on until then (never: 0)."""

    def __init__(self, final_at: int, provisional_from: int = 0) -> None:
        self.final_at = final_at
        self.provisional_from = provisional_from
        self.asked = 0

    async def accounting(self, native_id: str, *, job: UUID | None = None) -> JobAccounting:
        self.asked += 1
        final = self.asked == self.final_at
        provisional = not final and 0 < self.provisional_from <= self.asked
        return JobAccounting(native_id, RECORDS, final=final, provisional=provisional)

    async def efficiency(self, accounting: JobAccounting) -> Efficiency:
        return Efficiency("COMPLETED", 0.5, 0.1, 1.0, 2.0, 1024, 10240, "seff")


class Porter:
    def __init__(self) -> None:
        self.accounting: dict[UUID, dict[str, Any]] = {}
        self.sent: list[dict[str, Any]] = []

    async def put_accounting(self, job_id: UUID, record: dict[str, Any]) -> None:
        self.accounting[job_id] = record
        self.sent.append(record)


def collect(backend: Settling, attempts: int, tmp_path: Path) -> tuple[Agent, Porter, _Tracked]:
    porter = Porter()
    agent = Agent(
        "c",
        ClusterConfig(backend="local"),
        cast(JobBackend, backend),
        cast(Channel, porter),
        workdir=str(tmp_path),
    )
    job = job_from(JobSpec(name="acct", cluster="c", script="true\n")).model_copy(update={"id": uuid4()})
    return agent, porter, _Tracked(job=job, native_id="42")


@pytest.fixture(autouse=True)
def no_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    quick = dataclasses.replace(agent_module.ACCOUNTING_RETRIES, delays=(0.0,), not_yet_delays=(0.0,))
    monkeypatch.setattr(agent_module, "ACCOUNTING_RETRIES", quick)


async def test_records_not_final_are_asked_for_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = Settling(final_at=3)
    agent, porter, tracked = collect(backend, 5, tmp_path)
    with caplog.at_level(logging.INFO, logger="cloudhpc.retries"):
        record = await agent._collect_accounting(tracked, attempts=5)
    assert backend.asked == 3
    assert record is not None
    assert porter.accounting == {tracked.job.id: record}
    waits = [r.getMessage() for r in caplog.records]
    assert len(waits) == 2
    assert waits[0].startswith(f"job {tracked.job.id}: accounting: waiting for final records (")


async def test_records_still_not_final_after_the_last_attempt_are_stored_as_they_are(tmp_path: Path) -> None:
    backend = Settling(final_at=0)
    agent, porter, tracked = collect(backend, 4, tmp_path)
    record = await agent._collect_accounting(tracked, attempts=4)
    assert backend.asked == 4
    assert record is not None
    assert porter.accounting == {tracked.job.id: record}
    assert record["final"] is False  # porter lists the job as unaccounted to an agent that starts


async def test_provisional_records_are_stored_at_once_and_replaced_when_final(tmp_path: Path) -> None:
    """A short job on SLURM: every step has ended, the job's own row comes a few seconds later.
    Its figures are stored at the first such answer, once, and replaced by the final ones."""
    backend = Settling(final_at=5, provisional_from=2)
    agent, porter, tracked = collect(backend, 8, tmp_path)
    record = await agent._collect_accounting(tracked, attempts=8)
    assert backend.asked == 5
    assert [sent["final"] for sent in porter.sent] == [False, True]
    assert "billed" not in porter.sent[0]  # priced from the job's own row, which it lacks
    assert porter.accounting == {tracked.job.id: record}
    assert record is not None
    assert record["final"] is True


def test_the_schedule_asks_soon_after_the_end() -> None:
    """The shipped figures: bench/accounting.py and tests/e2e/test_accounting_latency.py time the
    0.5 s asks; the fault suite counts on about 100 s of failed asks before the later retry."""
    assert SHIPPED.attempts == 13
    assert [SHIPPED.pause(n, failed=False) for n in range(1, 13)] == [0.5] * 6 + [5.0] * 6
    assert [SHIPPED.pause(n) for n in range(1, 13)] == [2.0, 4.0, 6.0, 8.0] + [10.0] * 8


async def test_a_record_that_stays_not_final_is_asked_for_again_later_not_at_every_reconcile(
    tmp_path: Path,
) -> None:
    """porter lists a job whose stored accounting is not final as unaccounted at every periodic
    reconcile: the agent must pause before collecting it again, doubling, as after a failure."""
    backend = Settling(final_at=0, provisional_from=1)
    agent, _porter, tracked = collect(backend, 3, tmp_path)
    job_id = tracked.job.id
    record = await agent._collect_accounting(tracked, attempts=3)
    assert record is not None
    assert record["final"] is False
    agent._after_collection(job_id, record)
    assert not agent._may_collect(job_id)  # the next reconcile, 30 s on, does not start it
    first = agent._accounting_retry[job_id][1]
    assert first == agent_module.ACCOUNTING_RETRY_FIRST
    agent._after_collection(job_id, record)
    assert agent._accounting_retry[job_id][1] == 2 * first
    for _ in range(20):
        agent._after_collection(job_id, record)
    assert agent._accounting_retry[job_id][1] == agent_module.ACCOUNTING_RETRY_MAX


async def test_a_final_record_ends_the_asking_and_nothing_stored_pauses_it(tmp_path: Path) -> None:
    agent, _porter, tracked = collect(Settling(final_at=1), 3, tmp_path)
    job_id = tracked.job.id
    agent._after_collection(job_id, None)  # sacct failing throughout: asked again later
    assert not agent._may_collect(job_id)
    record = await agent._collect_accounting(tracked, attempts=3)
    assert record is not None
    assert record["final"] is True
    agent._after_collection(job_id, record)
    assert job_id not in agent._accounting_retry
    assert agent._may_collect(job_id)
