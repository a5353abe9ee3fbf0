"""#13 item 5, preemption: what the agent makes of a real preemption's squeue and sacct answers,
captured on the testbed (`scripts/capture_recordings.py squeue_preempted`: a default-partition job
preempted by an `urgent`-partition job, PreemptMode=REQUEUE, GraceTime 15 s). In the grace time
squeue shows the job RUNNING with its end time moved to the preemption plus GraceTime; once SLURM
requeued it, PENDING (BeginTime) with a new submit time and RestartCnt 1; its ended run is
PREEMPTED in accounting only. No state string is new: the agent follows it as any requeue.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any
from unittest.mock import patch
from uuid import UUID, uuid4

import pytest

from cloudhpc.config import ClusterConfig
from cloudhpc.domain.checkpoint import TIME_LIMIT_WARNING, requeue_cause, requeue_reason
from cloudhpc.domain.jobs import JobSpec
from cloudhpc.domain.states import JobState
from cloudhpc.hpc.slurm.accounting import Sacct, job_accounting, own_records
from cloudhpc.hpc.slurm.restarts import SqueueRestarts
from cloudhpc.retries import RetryPolicy
from cloudhpc.submitter import agent as agent_module
from cloudhpc.submitter.agent import Agent, _Tracked
from tests.jobs import job_from
from tests.recordings import load_recording
from tests.unit.test_restart_bound import Reports, follow, observed
from tests.unit.test_slurm_parsers import replay_backend


def squeue_row(name: str) -> str:
    """The one job row of a captured squeue answer (its header is the agent's own)."""
    header, row = load_recording(name).stdout.splitlines()
    assert header == "JOBID|NAME|STATE|REASON|SUBMIT_TIME|START_TIME|END_TIME|COMMENT"
    return row + "\n"


GRACE = squeue_row("squeue_preempted_grace")
REQUEUED = squeue_row("squeue_preempted_requeued")
CANCELLED = REQUEUED.replace("|PENDING|BeginTime|", "|CANCELLED|None|")
"""Derived, not captured: squeue once the agent's cancel of the waiting job took."""


async def test_a_preemption_within_max_restarts_is_followed_as_the_same_job() -> None:
    slurm, reports = await follow(1, 0, [GRACE, REQUEUED])
    assert slurm.cancelled == []
    assert reports[-1] == (JobState.RUNNING, 1, "Requeued (restart 1 of 1): PENDING")
    assert all(state == JobState.RUNNING for state, _, _ in reports)


async def test_a_preemption_beyond_max_restarts_is_cancelled_while_it_waits() -> None:
    slurm, reports = await follow(0, 0, [GRACE, REQUEUED, CANCELLED])
    assert len(slurm.cancelled) == 1  # once, while it waited out its requeue hold
    reason = "checkpoint.max_restarts (0) reached: SLURM queued it again (restart 1: PENDING); cancelled"
    assert reports[-1] == (JobState.FAILED, 1, reason)


def test_the_restart_count_counts_the_preemption() -> None:
    assert SqueueRestarts.parse(load_recording("squeue_restarts_preempted")) == {"14513823": 1}


def test_the_preempted_run_is_not_the_jobs_record() -> None:
    """sacct keeps the preempted run as PREEMPTED (a state cloudhpc maps to `failed`, for a
    preemption that cancels); the job's own record is the newest run's."""
    rows = Sacct.parse(load_recording("sacct_duplicates_preempted"))
    assert [r.record.state for r in rows if r.record.step is None] == ["PREEMPTED", "CANCELLED by 1001"]
    name = rows[0].record.name
    own = own_records(rows, "14513823", name)
    assert [r.state for r in own.records if r.step is None] == ["CANCELLED by 1001"]


# ---- the reason names the preemption (sacct --duplicates, asked once, off the polling path) --------

PREEMPTED_JOB = UUID(load_recording("squeue_preempted_requeued").stdout.split("|chpc-")[1].split("|")[0])
"""The cloudhpc job the recorded SLURM job was named for: only its own records count."""


def spec(checkpoint: dict[str, object] | None) -> JobSpec:
    fields: dict[str, object] = {
        "name": "preempted",
        "cluster": "testbed",
        "script": "sleep 100\n",
        "resources": {"time": "5"},
    }
    return JobSpec.model_validate(fields | ({"checkpoint": checkpoint} if checkpoint else {}))


async def follow_recorded(job_spec: JobSpec, sacct: str) -> tuple[list[str], list[Any]]:
    """The agent follows the recorded job through its grace time and SLURM's requeue, on a real
    `SlurmBackend` whose commands are answered with the testbed's recordings (squeue's restart
    count, `sacct`: `sacct`); returns the commands it ran and its reports."""
    backend, conn = replay_backend(squeue="squeue_restarts_preempted", sacct=sacct)
    channel = Reports()
    agent = Agent("c", ClusterConfig(backend="local"), backend=backend, channel=channel, workdir="/w")  # type: ignore[arg-type]
    job = job_from(job_spec).model_copy(update={"id": PREEMPTED_JOB})
    agent._tracked[job.id] = _Tracked(job=job, native_id="14513823")
    for row in (GRACE, REQUEUED):
        await agent._on_observation(job.id, "14513823", observed(row))
    await asyncio.gather(*agent._background)
    return conn.calls, [(r.state, r.restarts, r.reason) for r in channel.reports]


async def test_the_reason_says_the_job_was_preempted() -> None:
    calls, reports = await follow_recorded(spec(None), "sacct_duplicates_preempted")
    assert calls == ["squeue", "sacct"]  # one sacct, for the restart only
    assert reports[-2:] == [
        (JobState.RUNNING, 1, "Requeued (restart 1): PENDING"),
        (JobState.RUNNING, 1, "Preempted; requeued (restart 1): PENDING"),
    ]


async def test_a_checkpoint_jobs_reason_says_preempted_with_its_bound() -> None:
    _, reports = await follow_recorded(
        spec({"warn_before": 60, "max_restarts": 2}), "sacct_duplicates_preempted"
    )
    assert reports[-1] == (JobState.RUNNING, 1, "Preempted; requeued (restart 1 of 2): PENDING")


async def test_an_array_is_not_asked_for_the_cause_of_its_restarts() -> None:
    """sacct keeps an array's tasks, not runs of the job: nothing there would name a cause."""
    array = spec(None).model_copy(update={"array": "0-1"})
    calls, reports = await follow_recorded(array, "sacct_duplicates_preempted")
    assert calls == ["squeue"]
    assert reports[-1] == (JobState.RUNNING, 1, "Requeued (restart 1): PENDING")


async def test_another_jobs_preempted_record_is_not_this_jobs_cause() -> None:
    """The id's records are another job's (a controller restarted from an older state handed the id
    out again): nothing is said of a preemption, and the failure is logged, not hidden."""
    recording = load_recording("sacct_duplicates_preempted")
    other = dataclasses.replace(recording, stdout=recording.stdout.replace(str(PREEMPTED_JOB), str(uuid4())))
    with patch.object(agent_module, "CAUSE_RETRIES", RetryPolicy(attempts=2, delays=(0.0,))):
        calls, reports = await follow_recorded(spec(None), other)  # type: ignore[arg-type]
    assert calls == ["squeue", "sacct", "sacct"]  # asked again once, then given up
    assert reports[-1] == (JobState.RUNNING, 1, "Requeued (restart 1): PENDING")


@pytest.mark.parametrize(
    ("state", "elapsed", "limit", "warn_before", "cause"),
    [
        ("PREEMPTED", 34, 300, None, "Preempted"),  # sacct_duplicates_preempted.json
        # a 1-minute job warned 30 s before its limit, requeued by its wrapper 19 s in (testbed)
        ("REQUEUED", 19, 60, 30, "Time limit warning"),
        # the wrapper's requeue on a preemption's signal, 4 s into a 5-minute run (testbed)
        ("REQUEUED", 4, 300, 60, None),
        ("REQUEUED", 0, 300, 60, None),  # a node failure's requeue (sacct_duplicates_requeued.json)
        ("REQUEUED", 19, 60, None, None),  # no checkpoint: an operator's requeue
        ("NODE_FAIL", 10, 60, 30, None),
    ],
)
def test_requeue_cause(
    state: str, elapsed: int, limit: int, warn_before: int | None, cause: str | None
) -> None:
    assert requeue_cause(state, elapsed, limit, warn_before) == cause


def test_the_time_limit_warnings_reason() -> None:
    reason = requeue_reason(1, 1, "RUNNING", cause=TIME_LIMIT_WARNING)
    assert reason == "Time limit warning; requeued (restart 1 of 1): RUNNING"


def test_each_run_of_the_job_is_kept_oldest_first() -> None:
    rows = Sacct.parse(load_recording("sacct_duplicates_preempted"))
    own = own_records(rows, "14513823", rows[0].record.name)
    assert [r.state for r in own.runs] == ["PREEMPTED", "CANCELLED by 1001"]
    accounting = job_accounting("14513823", own.records, runs=own.runs)
    assert accounting.runs_ended == (True, True)
    assert accounting.ended_run(1) == own.runs[0]
    assert accounting.ended_run(2) == own.runs[1]
    assert accounting.ended_run(3) is None
    running = job_accounting(
        "14513823", own.records, runs=[own.runs[0], dataclasses.replace(own.runs[1], state="RUNNING")]
    )
    assert running.ended_run(2) is None  # slurmdbd has not recorded that run's end yet
    requeued = dataclasses.replace(own.runs[0], state="REQUEUED")
    assert job_accounting("14513823", own.records, runs=[requeued]).ended_run(1) == requeued
