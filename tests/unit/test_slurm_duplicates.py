"""A job's accounting is its own records, never those of another job that got its SLURM id.

The recordings `sacct_duplicates_*` are real `sacct --duplicates` answers of the multi-host testbed's
slurmdbd (captured over SSH on its login node, argv built by `Sacct`): id 2475 is one the fault
suite's slurmctld kill -9 made SLURM hand out again (the lost job's record is slurmdbd's placeholder
`allocation`, the newer one another cloudhpc job's), 2497 a job requeued once, 12 and 16 ids that
four jobs and arrays had under the fresh controller states of earlier topologies.
"""

from __future__ import annotations

from uuid import UUID, uuid4

import pytest

from cloudhpc.exceptions import AccountingUnavailable, ParseError
from cloudhpc.hpc.backend import AccountingRecord
from cloudhpc.hpc.slurm import Sacct, comment_for, job_name_for
from cloudhpc.hpc.slurm.accounting import job_accounting, own_records
from cloudhpc.hpc.slurm.ids import owner_of_name
from tests.recordings import load_recording
from tests.unit.test_slurm_parsers import replay_backend

LOST = "sacct_duplicates_lost"
REQUEUED = "sacct_duplicates_requeued"
REUSED = "sacct_duplicates_reused"
ARRAY = "sacct_duplicates_array"


def records(name: str) -> list[AccountingRecord]:
    return [row.record for row in Sacct.parse(load_recording(name))]


def allocation_owners(name: str, native_id: str) -> list[UUID]:
    """The cloudhpc jobs that have a record of `native_id` in a recording, oldest first."""
    owners = [
        owner_of_name(r.name) for r in records(name) if r.step is None and r.job_id.split("_")[0] == native_id
    ]
    return list(dict.fromkeys(o for o in owners if o is not None))


def test_the_recordings_are_what_sacct_duplicates_is_asked_with() -> None:
    for name, native_id in [(LOST, "2475"), (REQUEUED, "2497"), (REUSED, "12"), (ARRAY, "16")]:
        assert load_recording(name).argv == tuple(Sacct(jobs=[native_id], duplicates=True).argv())
    for name, native_id in [(f"{LOST}_plain", "2475"), (f"{REQUEUED}_plain", "2497")]:
        assert load_recording(name).argv == tuple(Sacct(jobs=[native_id]).argv())
    assert "--duplicates" in Sacct(jobs=["1"], duplicates=True).argv()
    assert "--duplicates" not in Sacct(jobs=["1"]).argv()


def test_a_lost_job_has_no_record_and_never_the_other_jobs() -> None:
    rows = Sacct.parse(load_recording(LOST))
    (holder,) = allocation_owners(LOST, "2475")
    lost = uuid4()
    own = own_records(rows, "2475", job_name_for(lost))
    assert own.records == []
    assert own.others == ["allocation", job_name_for(holder)]
    # the job that holds the id now gets its record and steps only: what plain sacct answers,
    # without the placeholder record (CANCELLED) that plain sacct leaves out
    held = own_records(rows, "2475", job_name_for(holder))
    assert held.records == records(f"{LOST}_plain")
    assert {r.state for r in held.records} == {"COMPLETED"}
    assert held.others == ["allocation"]


def test_a_requeued_job_keeps_its_newest_run_as_plain_sacct_does() -> None:
    rows = Sacct.parse(load_recording(REQUEUED))
    (job,) = allocation_owners(REQUEUED, "2497")
    own = own_records(rows, "2497", job_name_for(job))
    assert [r.state for r in records(REQUEUED) if r.step is None] == ["REQUEUED", "CANCELLED"]
    assert own.records == records(f"{REQUEUED}_plain")
    assert own.others == []


def test_each_job_that_had_an_id_gets_its_own_record() -> None:
    rows = Sacct.parse(load_recording(REUSED))
    jobs = allocation_owners(REUSED, "12")
    assert len(jobs) == 4
    seen: set[tuple[str, object]] = set()
    for job in jobs:
        own = own_records(rows, "12", job_name_for(job))
        (allocation,) = [r for r in own.records if r.step is None]
        assert allocation.name == job_name_for(job)
        assert [r.step for r in own.records] == [None, "batch"]
        assert len(own.others) == 3, "the other three jobs' records, not array 11's task 11_0"
        seen.add((allocation.name, allocation.start))
    assert len(seen) == 4


def test_an_array_gets_its_own_tasks_only() -> None:
    rows = Sacct.parse(load_recording(ARRAY))
    arrays = allocation_owners(ARRAY, "16")
    assert len(arrays) == 2
    for array in arrays:
        own = own_records(rows, "16", job_name_for(array))
        tasks = [r.job_id for r in own.records if r.step is None]
        assert tasks == [f"16_{i}" for i in range(5)]
        assert {r.name for r in own.records if r.step is None} == {job_name_for(array)}
        assert len(own.records) == 10  # each task with its batch step
        assert own.others.count("bash") == 4  # the topology's own srun checks that had id 16


def test_rows_without_their_record_index_are_refused() -> None:
    rows = Sacct.parse(load_recording(f"{LOST}_plain"))
    with pytest.raises(ParseError, match="DBIndex"):
        own_records(rows, "2475", job_name_for(uuid4()))


async def test_accounting_of_a_lost_job_says_whose_the_id_is() -> None:
    (holder,) = allocation_owners(LOST, "2475")
    backend, conn = replay_backend(sacct=LOST)
    with pytest.raises(AccountingUnavailable, match=f"its records are allocation, {job_name_for(holder)}'s"):
        await backend.accounting("2475", job=uuid4())
    assert (await backend.accounting("2475", job=holder)).records == records(f"{LOST}_plain")
    assert conn.calls == ["sacct", "sacct"]


async def test_efficiency_of_a_shared_id_is_computed_from_the_jobs_own_records() -> None:
    """seff answers for the newest record of an id, whoever's it is: where the id has other records,
    the figures come from the job's own."""
    jobs = allocation_owners(REUSED, "12")
    backend, conn = replay_backend(sacct=REUSED, seff="seff_completed")
    efficiency = await backend.efficiency(await backend.accounting("12", job=jobs[0]))
    assert efficiency.source == "sacct"
    assert conn.calls == ["sacct"]
    own = own_records(Sacct.parse(load_recording(REUSED)), "12", job_name_for(jobs[0])).records
    (allocation,) = [r for r in own if r.step is None]
    assert efficiency.core_walltime_seconds == allocation.elapsed_seconds
    # an id that is the job's alone keeps seff
    (job,) = allocation_owners(REQUEUED, "2497")
    backend, conn = replay_backend(sacct=REQUEUED, seff="seff_completed")
    assert (await backend.efficiency(await backend.accounting("2497", job=job))).source == "seff"
    assert conn.calls == ["sacct", "seff"]


PLACEHOLDER = "sacct_duplicates_placeholder"
"""A 1 s job of the one-host testbed right after its end (`_placeholder`) and once slurmctld's 5 s
thread sent its start record (`_final`): one `DB_INDEX`, first slurmdbd's `allocation` placeholder
with the job's `--comment`, then named for the job and in its partition."""
PLACEHOLDER_JOB = UUID("48801900-c6d9-4f12-8396-cc44848dfc8c")


def test_a_placeholder_with_the_jobs_comment_is_its_record_provisional_until_named() -> None:
    for snapshot in ("placeholder", "final"):
        recording = load_recording(f"{PLACEHOLDER}_{snapshot}")
        assert recording.argv == tuple(Sacct(jobs=["14515075"], duplicates=True).argv())
    rows = Sacct.parse(load_recording(f"{PLACEHOLDER}_placeholder"))
    name, comment = job_name_for(PLACEHOLDER_JOB), comment_for(PLACEHOLDER_JOB)
    own = own_records(rows, "14515075", name, comment)
    assert [(r.step, r.name) for r in own.records] == [(None, "allocation"), ("batch", "batch")]
    judged = job_accounting("14515075", own.records, others=own.others, runs=own.runs)
    assert (judged.final, judged.provisional) == (False, True)
    # without the comment, or with another job's, the placeholder is nobody's we can name
    assert own_records(rows, "14515075", name).records == []
    assert own_records(rows, "14515075", name, comment_for(uuid4())).others == ["allocation"]
    # the same record once named: final, and its batch step's figures as they were
    final_rows = Sacct.parse(load_recording(f"{PLACEHOLDER}_final"))
    final = own_records(final_rows, "14515075", name, comment)
    judged_final = job_accounting("14515075", final.records)
    assert (judged_final.final, judged_final.provisional) == (True, False)
    assert [r for r in final.records if r.step == "batch"] == [r for r in own.records if r.step == "batch"]
