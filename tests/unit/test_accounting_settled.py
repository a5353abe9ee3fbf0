"""The agent stores accounting only once SLURM's figures are final (recordings from the testbed).

`sacct_short_*_t{0,5,15,40}` are one 0.5 s and one 3 s batch job, shorter than or close to the
testbed's gather interval (`JobAcctGatherFrequency=task=2`), captured at the first sacct answer
showing the end and 5, 15 and 40 s later (`scripts/capture_recordings.py sacct_short`).
"""

from __future__ import annotations

import dataclasses

import pytest

from cloudhpc.hpc.backend import AccountingRecord
from cloudhpc.hpc.slurm import Sacct
from cloudhpc.hpc.slurm.accounting import accounting_final, accounting_provisional, job_accounting
from tests.recordings import load_recording

SNAPSHOTS = (0, 5, 15, 40)


def records(recording: str) -> list[AccountingRecord]:
    return [row.record for row in Sacct.parse(load_recording(recording))]


@pytest.mark.parametrize(
    ("recording", "final"),
    [
        ("sacct_just_ended", False),  # placeholder allocation row (JobName `allocation`, ReqMem `16?`)
        ("sacct_short_half_second_t0", False),  # the same placeholder, right after a 0.5 s job
        ("sacct_short_half_second_t5", True),  # no MaxRSS on the batch step, and never one later
        ("sacct_short_half_second_t15", True),
        ("sacct_short_half_second_t40", True),
        ("sacct_short_3s_t0", True),  # the batch step's MaxRSS is in the first answer after the end
        ("sacct_short_3s_t5", True),
        ("sacct_short_3s_t15", True),
        ("sacct_short_3s_t40", True),
        ("sacct_completed", True),
        ("sacct_failed", True),
        ("sacct_cancelled", True),
        ("sacct_timeout", True),
        ("sacct_multistep", True),  # step 10.1 (`true`, 0 s) has no MaxRSS, and that is final
        ("sacct_array", True),  # cancelled while held: no step at all
    ],
)
def test_accounting_is_final_only_with_final_figures(recording: str, final: bool) -> None:
    assert accounting_final(records(recording)) is final


@pytest.mark.parametrize("job", ["sacct_short_half_second", "sacct_short_3s"])
def test_figures_judged_final_never_change_later(job: str) -> None:
    """The protection the rule exists for: once a snapshot is judged final, every later sacct
    answer for the job holds exactly the same records (no MaxRSS appears or changes)."""
    snapshots = [records(f"{job}_t{after}") for after in SNAPSHOTS]
    first_final = next(i for i, snap in enumerate(snapshots) if accounting_final(snap))
    for later in snapshots[first_final + 1 :]:
        assert later == snapshots[first_final]


def test_short_job_without_a_sample_keeps_an_empty_max_rss() -> None:
    """Captured fact the rule relies on: a 0.5 s step never gets a MaxRSS; a 3 s one has it at once."""
    for after in SNAPSHOTS:
        (batch,) = [r for r in records(f"sacct_short_half_second_t{after}") if r.step == "batch"]
        assert batch.max_rss_bytes is None
        (batch,) = [r for r in records(f"sacct_short_3s_t{after}") if r.step == "batch"]
        assert batch.max_rss_bytes == 4840 * 1024


def _with_state(recording: str, step: str | None, state: str) -> list[AccountingRecord]:
    """A recording's records with one row's state replaced (a moment the capture did not catch)."""
    return [
        dataclasses.replace(r, state=state, max_rss_bytes=None, end=None) if r.step == step else r
        for r in records(recording)
    ]


def test_a_step_still_running_is_not_final() -> None:
    """slurmdbd writes a step's state and usage in one update: until the step has ended (e.g. the
    batch step of a cancelled job, or an .extern step), its figures may still come."""
    assert not accounting_final(_with_state("sacct_short_3s_t40", "batch", "RUNNING"))
    assert not accounting_final(_with_state("sacct_multistep", "0", "COMPLETING"))


def test_an_allocation_slurmdbd_has_not_ended_is_not_final() -> None:
    assert not accounting_final(_with_state("sacct_short_3s_t40", None, "RUNNING"))
    assert not accounting_final(_with_state("sacct_short_3s_t40", None, "PENDING"))


def test_no_rows_or_only_steps_is_not_final() -> None:
    assert not accounting_final([])
    assert not accounting_final([r for r in records("sacct_completed") if r.step is not None])


def test_unknown_sacct_answer_is_empty() -> None:
    assert not accounting_final(records("sacct_unknown"))


@pytest.mark.parametrize(
    ("recording", "provisional"),
    [
        ("sacct_just_ended", True),  # the placeholder row has ended, and the batch step
        ("sacct_short_half_second_t0", True),
        ("sacct_placeholder", False),  # no step yet: nothing to show
        ("sacct_running_pending", False),  # nothing has ended
    ],
)
def test_a_placeholder_row_that_ended_is_provisional(recording: str, provisional: bool) -> None:
    """What the agent stores at once, marked provisional: every row has ended, only the job's own
    row is still slurmdbd's placeholder (slurmctld sends it from its 5 s thread)."""
    assert accounting_provisional(records(recording)) is provisional
    judged = job_accounting("1", records(recording))
    assert not judged.final
    assert judged.provisional is provisional


def test_final_records_are_not_provisional() -> None:
    judged = job_accounting("1", records("sacct_short_half_second_t5"))
    assert judged.final
    assert not judged.provisional
    assert not job_accounting("1", _with_state("sacct_short_3s_t40", "batch", "RUNNING")).provisional
