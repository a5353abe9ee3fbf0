"""Job arrays and dependencies in the pure layers (#13 items 3, 4): the `array` syntax and its
refusals, the array's state from its tasks, `after` to sbatch's `--dependency`, the directives,
the sbatch argv, and squeue's rows of an array read as tasks (rows as the testbed's 22.05 prints)."""

from __future__ import annotations

from uuid import uuid4

import pytest
from pydantic import ValidationError

from cloudhpc.domain.arrays import (
    Dependency,
    DependencyOn,
    TaskObservation,
    array_indices,
    dependency_option,
    derive_array_state,
)
from cloudhpc.domain.directives import apply_directives
from cloudhpc.domain.jobs import JobSpec, Observation
from cloudhpc.domain.states import JobState
from cloudhpc.hpc.backend import AccountingRecord, CommandResult, JobPaths
from cloudhpc.hpc.slurm import Sbatch, Squeue, compute_efficiency

Q, R, C, F, X, T = (
    JobState.QUEUED,
    JobState.RUNNING,
    JobState.COMPLETED,
    JobState.FAILED,
    JobState.CANCELLED,
    JobState.TIMEOUT,
)


@pytest.mark.parametrize(
    ("value", "indices"),
    [
        ("0-4", [0, 1, 2, 3, 4]),
        ("0-99%10", list(range(100))),
        ("1,3,5-7", [1, 3, 5, 6, 7]),
        ("0-20:5", [0, 5, 10, 15, 20]),
        ("7", [7]),
        ("3,1,3", [1, 3]),
    ],
)
def test_array_indices(value: str, indices: list[int]) -> None:
    assert array_indices(value) == indices


@pytest.mark.parametrize(
    "bad",
    ["", "0-", "-3", "5-1", "0-9%0", "0-9%", "a", "0-20:0", "1,,2", "0-200000", "0-9%x", "0 -9", "0-9;ls"],
)
def test_bad_arrays_are_refused_naming_the_field(bad: str) -> None:
    with pytest.raises(ValidationError) as refused:
        JobSpec(name="a", cluster="c", script="x", array=bad)
    assert refused.value.errors()[0]["loc"] == ("array",)


def test_array_is_for_batch_and_python_jobs_only() -> None:
    with pytest.raises(ValidationError, match="`array` is for batch and python jobs"):
        JobSpec.model_validate(
            {"name": "a", "cluster": "c", "kind": "ray-job", "ray": {"entrypoint": "x"}, "array": "0-3"}
        )


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        ([Q, Q, Q], Q),
        ([R, Q, Q], R),
        ([C, Q, Q], R),  # started: never back to queued while later tasks wait for the % limit
        ([C, C, C], C),
        ([C, F, X], F),
        ([C, T, X], T),
        ([C, X], X),
        ([F, R], R),
    ],
)
def test_the_array_state_from_its_tasks(states: list[JobState], expected: JobState) -> None:
    assert derive_array_state(states) == expected


def test_the_array_observation_names_the_first_task_that_did_not_complete() -> None:
    tasks = [
        TaskObservation(index=i, state=s, native_state=n, exit_code=e)
        for i, s, n, e in [(2, C, "COMPLETED", 0), (0, F, "FAILED", 7), (1, X, "CANCELLED", 0)]
    ]
    seen = Observation.of_array(tasks)
    assert (seen.state, seen.reason, seen.exit_code) == (F, "task 0: FAILED", 7)
    assert [t.index for t in seen.tasks or ()] == [0, 1, 2]


def test_after_becomes_sbatchs_dependency() -> None:
    a, b, c = (Dependency(job=uuid4(), on=on) for on in (DependencyOn.OK, DependencyOn.ANY, DependencyOn.OK))
    assert dependency_option([(a, "12"), (b, "14"), (c, "13")]) == "afterok:12:13,afterany:14"
    assert dependency_option([]) is None


def test_after_names_each_job_once() -> None:
    job = str(uuid4())
    with pytest.raises(ValidationError, match="once in `after`"):
        JobSpec.model_validate(
            {"name": "a", "cluster": "c", "script": "x", "after": [{"job": job}, {"job": job}]}
        )


def test_array_directive_goes_to_the_spec_and_dependency_is_refused() -> None:
    spec = JobSpec(name="a", cluster="c", script="#!/bin/bash\n#SBATCH -a 0-3%2 --time=5\necho")
    merged = apply_directives(spec)
    assert (merged.array, merged.resources.time) == ("0-3%2", "5")
    explicit = apply_directives(spec.model_copy(update={"array": "1-2"}))
    assert explicit.array == "1-2"  # the spec's own field wins
    with pytest.raises(ValueError, match=r"line 2 .*--array: .*'0-' is not an index"):
        apply_directives(JobSpec(name="a", cluster="c", script="#!/bin/bash\n#SBATCH --array=0-\necho"))
    with pytest.raises(ValueError, match=r"line 2 .*--dependency is set by cloudhpc .*`after`"):
        apply_directives(JobSpec(name="a", cluster="c", script="#!/bin/bash\n#SBATCH -d afterok:1\necho"))


def test_sbatch_argv_of_an_array_with_a_dependency() -> None:
    paths = JobPaths(workdir="/home/u/.cloudhpc", job_id=uuid4())
    argv = Sbatch(paths.job_id, paths, array="0-9%2", dependency="afterok:12:13,afterany:14").argv()
    assert f"--output={paths.control}/output-%a.log" in argv
    assert argv[-3:] == ["--array=0-9%2", "--dependency=afterok:12:13,afterany:14", paths.batch_script]
    assert paths.task_output(3) == f"{paths.control}/output-3.log"
    for forged in ("afterok:1;ls", "singleton", "afterok:$(id)", "after:1"):
        with pytest.raises(ValueError, match="not a dependency"):
            Sbatch(paths.job_id, paths, dependency=forged).argv()
    with pytest.raises(ValueError, match="not an index"):
        Sbatch(paths.job_id, paths, array="0-9 --wrap=x").argv()


def test_squeue_rows_of_an_array_are_its_tasks() -> None:
    stdout = (
        "JOBID|NAME|STATE|REASON|SUBMIT_TIME|START_TIME|END_TIME|COMMENT\n"
        "1744_[3-5%2]|chpc-x|PENDING|JobArrayTaskLimit|1764943000|0|0|cloudhpc:x\n"
        "1744_1|chpc-x|RUNNING|None|1764943000|1764943001|1764943301|cloudhpc:x\n"
        "1744_0|chpc-x|COMPLETED|None|1764943000|1764943001|1764943002|cloudhpc:x\n"
        "1745|chpc-y|PENDING|DependencyNeverSatisfied|1764943000|0|0|cloudhpc:y\n"
    )
    rows = Squeue.parse(CommandResult(argv=("squeue",), exit_status=0, stdout=stdout, stderr=""))
    pending = rows[0].task_observation(4)
    assert pending is not None
    assert (pending.state, pending.reason) == (Q, "JobArrayTaskLimit")
    done = rows[2].task_observation(0)
    assert done is not None
    assert (done.state, done.ended_at is not None) == (C, True)
    never = rows[3].observation()
    assert never is not None
    assert (never.state, never.reason) == (Q, "DependencyNeverSatisfied")


def _row(
    job_id: str, state: str, elapsed: int, cpu: float, rss: int | None, step: str | None = None
) -> AccountingRecord:
    return AccountingRecord(
        job_id=job_id,
        step=step,
        name="chpc-x",
        state=state,
        exit_code=0,
        signal=None,
        submit=None,
        start=None,
        end=None,
        elapsed_seconds=elapsed,
        total_cpu_seconds=cpu,
        alloc_cpus=2,
        nodes=1,
        node_list="n1",
        req_mem_bytes=1000 if step is None else None,
        max_rss_bytes=rss,
        partition="debug",
        account="a",
        timelimit_seconds=60,
        alloc_tres=None,
        billing=None,
    )


def test_an_arrays_efficiency_is_its_tasks_together() -> None:
    records = [
        _row("9_0", "COMPLETED", 10, 5.0, None),
        _row("9_0", "COMPLETED", 10, 5.0, 300, step="batch"),
        _row("9_1", "FAILED", 30, 15.0, None),
        _row("9_1", "FAILED", 30, 15.0, 600, step="batch"),
    ]
    eff = compute_efficiency(records)
    assert (eff.core_walltime_seconds, eff.cpu_utilized_seconds, eff.cpu_efficiency) == (80.0, 20.0, 0.25)
    assert (eff.memory_utilized_bytes, eff.memory_requested_bytes, eff.state) == (600, 1000, "FAILED")
    single = compute_efficiency(records[:2])  # one job: as before
    assert (single.core_walltime_seconds, single.state) == (20.0, "COMPLETED")
