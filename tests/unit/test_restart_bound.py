"""#13 item 5: `checkpoint.max_restarts` binds every path that runs a job again, not only the
wrapper's own `scontrol requeue`. SLURM requeues a `--requeue` job by itself as well (an operator's
`scontrol requeue`, a preemption with PreemptMode=REQUEUE, a node failure with JobRequeue=1): the
agent cancels a run beyond the bound before it starts and ends the job `failed`, naming max_restarts.

The squeue rows are the testbed's SLURM 22.05 answers (the agent's `--format`, epoch times) for a
`--requeue` job through an operator's `scontrol requeue`, captured on 2026-12-05: running, completing
right after the requeue (RestartCnt already 1), pending on its requeue hold (BeginTime, new submit
time), running again, and cancelled. A real preemption's rows (PreemptMode=REQUEUE) take the same
path: tests/unit/test_preemption_rows.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

import pytest

from cloudhpc.config import ClusterConfig
from cloudhpc.domain.checkpoint import restarts_exceeded
from cloudhpc.domain.jobs import JobSpec, Observation
from cloudhpc.domain.states import JobState
from cloudhpc.hpc.backend import CommandResult, JobAccounting
from cloudhpc.hpc.slurm.accounting import Sacct, job_accounting
from cloudhpc.hpc.slurm.queue import Squeue
from cloudhpc.submitter.agent import Agent, _Tracked
from tests.jobs import job_from
from tests.recordings import load_recording

HEADER = "JOBID|NAME|STATE|REASON|SUBMIT_TIME|START_TIME|END_TIME|COMMENT\n"
RUNNING = "4198|wrap|RUNNING|None|1796501928|1796501929|1796502049|(null)\n"
COMPLETING = "4198|wrap|COMPLETING|None|1796501928|1796501929|1796502049|(null)\n"
PENDING = "4198|wrap|PENDING|BeginTime|1796501929|1796501960|1796502080|(null)\n"
RUNNING_AGAIN = "4198|wrap|RUNNING|None|1796501929|1796501968|1796502088|(null)\n"
CANCELLED = "4198|wrap|CANCELLED|None|1796501929|1796501968|1796501969|(null)\n"
WAITING = PENDING.replace("|1796501929|", "|1796501928|", 1)
"""Not captured: the job waiting for its first start, as PENDING with its first submit time."""


def observed(row: str) -> Observation:
    rows = Squeue.parse(CommandResult(argv=["squeue"], exit_status=0, stdout=HEADER + row, stderr=""))
    observation = rows[0].observation()
    assert observation is not None
    return observation


class Slurm:
    """The backend's answers the agent asks for here: SLURM's restart count, and a cancel."""

    def __init__(self, restarts: int) -> None:
        self.restarts = restarts
        self.cancelled: list[str] = []

    async def restart_counts(self, native_ids: Sequence[str]) -> Mapping[str, int]:
        return dict.fromkeys(native_ids, self.restarts)

    async def cancel(self, native_id: str) -> None:
        self.cancelled.append(native_id)

    async def accounting(self, native_id: str, *, job: UUID | None = None) -> JobAccounting:
        """What ended each run (asked once a restart is seen): requeues that name no cause, from a
        recorded `sacct --duplicates` (a node failure's requeue)."""
        rows = Sacct.parse(load_recording("sacct_duplicates_requeued"))
        return job_accounting(native_id, [], runs=[r.record for r in rows if r.record.step is None])


class Reports:
    def __init__(self) -> None:
        self.reports: list[Any] = []

    async def report(self, reports: Sequence[Any]) -> None:
        self.reports.extend(reports)


def spec(max_restarts: int) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "bound",
            "cluster": "testbed",
            "script": "sleep 100\n",
            "resources": {"time": "2"},
            "checkpoint": {"warn_before": 30, "max_restarts": max_restarts},
        }
    )


async def follow(max_restarts: int, known: int, rows: Sequence[str]) -> tuple[Slurm, list[Any]]:
    """The agent follows SLURM job 4198 (`known` restarts already counted) through `rows`."""
    slurm = Slurm(restarts=known + 1)
    channel = Reports()
    agent = Agent("c", ClusterConfig(backend="local"), backend=slurm, channel=channel, workdir="/w")  # type: ignore[arg-type]
    job = job_from(spec(max_restarts), restarts=known)
    agent._tracked[job.id] = _Tracked(job=job, native_id="4198", restarts=known)

    async def nothing(*_args: object) -> None:
        return None

    agent._collect_output = nothing  # type: ignore[method-assign]  # the end's uploads: not here
    agent._start_finish = lambda _tracked: None  # type: ignore[method-assign]
    for row in rows:
        await agent._on_observation(job.id, "4198", observed(row))
    await asyncio.gather(*agent._background)
    return slurm, [(r.state, r.restarts, r.reason) for r in channel.reports]


async def test_a_requeue_beyond_max_restarts_is_cancelled_and_the_job_fails() -> None:
    slurm, reports = await follow(1, 1, [RUNNING, COMPLETING, PENDING, CANCELLED])
    assert slurm.cancelled == ["4198"]  # once, while it waited out its requeue hold
    reason = "checkpoint.max_restarts (1) reached: SLURM queued it again (restart 2: PENDING); cancelled"
    assert reports[-1] == (JobState.FAILED, 2, reason)
    assert all(state == JobState.RUNNING for state, _, _ in reports[:-1])


async def test_a_requeue_within_max_restarts_is_followed() -> None:
    slurm, reports = await follow(1, 0, [RUNNING, COMPLETING, PENDING, RUNNING_AGAIN])
    assert slurm.cancelled == []
    assert reports[-2:] == [
        (JobState.RUNNING, 1, "Requeued (restart 1 of 1): PENDING"),
        (JobState.RUNNING, 1, "Requeued (restart 1 of 1): RUNNING"),
    ]


async def test_a_run_the_poll_missed_beyond_the_bound_is_cancelled_too() -> None:
    """The poll saw neither the requeue nor the wait, only the new run: cancelled as it runs."""
    slurm, reports = await follow(0, 0, [RUNNING, RUNNING_AGAIN])
    assert slurm.cancelled == ["4198"]
    assert reports[-1][0] == JobState.RUNNING


async def test_a_run_the_poll_never_saw_is_counted_by_its_new_submit_time() -> None:
    """Waiting, then waiting again after a run shorter than a poll that was requeued at once (the
    e2e test's operator requeued a 1-second run): a requeue sets a new submit time."""
    slurm, reports = await follow(0, 0, [WAITING, PENDING, CANCELLED])
    assert slurm.cancelled == ["4198"]
    assert reports[-1][:2] == (JobState.FAILED, 1)


@pytest.mark.parametrize(
    ("restarts", "most", "expected"),
    [
        (1, 1, None),
        (0, 0, None),
        (
            1,
            0,
            "checkpoint.max_restarts (0) reached: SLURM queued it again (restart 1: PENDING BeginTime); "
            "cancelled",
        ),
    ],
)
def test_restarts_exceeded(restarts: int, most: int, expected: str | None) -> None:
    assert restarts_exceeded(restarts, most, "PENDING", "BeginTime") == expected
