"""#13 item 5, preemption: what the agent makes of a real preemption's squeue and sacct answers,
captured on the testbed (`scripts/capture_recordings.py squeue_preempted`: a default-partition job
preempted by an `urgent`-partition job, PreemptMode=REQUEUE, GraceTime 15 s). In the grace time
squeue shows the job RUNNING with its end time moved to the preemption plus GraceTime; once SLURM
requeued it, PENDING (BeginTime) with a new submit time and RestartCnt 1; its ended run is
PREEMPTED in accounting only. No state string is new: the agent follows it as any requeue.
"""

from __future__ import annotations

from cloudhpc.domain.states import JobState
from cloudhpc.hpc.slurm.accounting import Sacct, own_records
from cloudhpc.hpc.slurm.restarts import SqueueRestarts
from tests.recordings import load_recording
from tests.unit.test_restart_bound import follow


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
