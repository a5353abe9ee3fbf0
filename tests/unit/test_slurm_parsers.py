"""SLURM command builders and parsers, on outputs recorded from the real testbed (22.05)."""

from __future__ import annotations

import logging
import shlex
from collections.abc import Sequence
from datetime import UTC, datetime
from uuid import UUID, uuid4

import pytest
from pydantic import ValidationError

from cloudhpc.domain.jobs import Resources
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import (
    AccountingUnavailable,
    ParseError,
    QuotaExceeded,
    SchedulerCommandError,
    SubmitRejected,
)
from cloudhpc.hpc.backend import CommandResult, JobPaths
from cloudhpc.hpc.slurm import (
    SACCT_FIELDS,
    SLURM_STATES,
    SQUEUE_FIELDS,
    Sacct,
    Sbatch,
    Scancel,
    Seff,
    SlurmBackend,
    Squeue,
    allocation_ids,
    check_native_id,
    comment_for,
    compute_efficiency,
    expand_array_tasks,
    is_step_row,
    job_name_for,
    map_state,
    normalize_state,
    parse_duration,
    parse_exit_code,
    parse_job_id,
    parse_size,
    parse_table,
    parse_timestamp,
    resource_flags,
)
from tests.conftest import HOSTILE_STRINGS
from tests.recordings import load_recording, recording_meta, recording_names

JOB = UUID("11111111-2222-3333-4444-555555555555")
PATHS = JobPaths("/home/u/.cloudhpc", JOB)
MiB = 1024**2


def result(stdout: str = "", stderr: str = "", exit_status: int = 0) -> CommandResult:
    return CommandResult(argv=("x",), exit_status=exit_status, stdout=stdout, stderr=stderr)


# ------------------------------------------------------------------------------------ recordings


@pytest.mark.parametrize("name", recording_names())
def test_recordings_are_real_captures(name: str) -> None:
    meta = recording_meta(name)
    assert meta["slurm_version"].startswith("22.05.")
    assert meta["captured_with"]
    loaded = load_recording(name)
    assert loaded.argv == tuple(meta["argv"])


def test_recordings_were_built_by_our_commands() -> None:
    """The recorded argv is exactly what the command classes build today (else: re-capture)."""
    assert load_recording("squeue_unknown").argv == tuple(Squeue(jobs=["999999"]).argv())
    assert load_recording("sacct_unknown").argv == tuple(Sacct(jobs=["999999"]).argv())
    assert load_recording("seff_unknown").argv == tuple(Seff("999999").argv())


# ------------------------------------------------------------------------------------ sbatch


def test_sbatch_argv_is_one_flag_per_element() -> None:
    resources = Resources(
        nodes=2,
        ntasks_per_node=4,
        cpus_per_task=2,
        gpus_per_node=1,
        mem="16G",
        time="01:00:00",
        partition="gpu",
        account="project_1",
    )
    argv = Sbatch(JOB, PATHS, resources).argv()
    assert argv == [
        "sbatch",
        "--parsable",
        f"--comment=cloudhpc:{JOB}",
        f"--job-name=chpc-{JOB}",
        f"--chdir={PATHS.jobdir}",
        f"--output={PATHS.jobdir}/.cloudhpc/output.log",
        "--open-mode=append",
        "--nodes=2",
        "--ntasks-per-node=4",
        "--cpus-per-task=2",
        "--gpus-per-node=1",
        "--mem=16G",
        "--time=01:00:00",
        "--partition=gpu",
        "--account=project_1",
        PATHS.batch_script,
    ]


def test_sbatch_leaves_unset_resources_to_slurm() -> None:
    assert Sbatch(JOB, PATHS).argv()[7:] == [PATHS.batch_script]
    assert resource_flags(Resources(gpus_per_node=0)) == []


def test_sbatch_recorded_ok() -> None:
    recorded = load_recording("sbatch_ok")
    assert Sbatch.parse(recorded) == recorded.stdout.strip()
    assert recorded.argv[0] == "sbatch"
    assert "--parsable" in recorded.argv


@pytest.mark.parametrize(
    ("stdout", "native_id"), [("123\n", "123"), ("4567;mahti\n", "4567"), ("warning line\n89\n", "89")]
)
def test_sbatch_parsable_forms(stdout: str, native_id: str) -> None:
    assert Sbatch.parse(result(stdout)) == native_id


@pytest.mark.parametrize("stdout", ["", "Submitted batch job 12\n", "abc;def\n"])
def test_sbatch_unparsable_output_is_quoted(stdout: str) -> None:
    with pytest.raises(ParseError) as info:
        Sbatch.parse(result(stdout))
    assert repr(stdout) in str(info.value)


def test_sbatch_rejected_partition_keeps_evidence() -> None:
    recorded = load_recording("sbatch_rejected_partition")
    with pytest.raises(SubmitRejected) as info:
        Sbatch.parse(recorded)
    assert type(info.value) is SubmitRejected
    assert info.value.exit_status == 1
    assert info.value.argv == list(recorded.argv)
    assert "Invalid partition name specified" in info.value.stderr
    assert "Invalid partition name specified" in str(info.value)


def test_sbatch_without_its_controller_is_not_a_refusal() -> None:
    """The controller down (recorded on the topology) is transient: the job must stay to be
    submitted again, not fail for good as a refused one does (the fault suite caught that)."""
    recorded = load_recording("sbatch_controller_down")
    with pytest.raises(SchedulerCommandError) as info:
        Sbatch.parse(recorded)
    assert not isinstance(info.value, SubmitRejected)
    assert "Unable to contact slurm controller" in info.value.stderr


def test_sbatch_recorded_quota_rejections() -> None:
    """Captured only where the testbed enforces limits (AccountingStorageEnforce); see the script."""
    for name in (n for n in recording_names() if n.startswith("sbatch_quota")):
        recorded = load_recording(name)
        assert recorded.exit_status != 0
        with pytest.raises(QuotaExceeded):
            Sbatch.parse(recorded)


@pytest.mark.parametrize(
    "stderr",
    [
        "sbatch: error: QOSMaxSubmitJobPerUserLimit\nsbatch: error: Batch job submission failed: "
        "Job violates accounting/QOS policy (job submit limit, user's size and/or time limits)\n",
        "sbatch: error: AssocMaxSubmitJobLimit\n",
        "sbatch: error: Batch job submission failed: Job violates accounting/QOS policy\n",
    ],
)
def test_sbatch_quota_messages(stderr: str) -> None:
    with pytest.raises(QuotaExceeded):
        Sbatch.parse(result(stderr=stderr, exit_status=1))


@pytest.mark.parametrize("hostile", HOSTILE_STRINGS)
@pytest.mark.parametrize("field", ["partition", "account", "mem", "time"])
def test_hostile_resource_strings_are_rejected_by_the_domain(field: str, hostile: str) -> None:
    with pytest.raises(ValidationError):
        Resources(**{field: hostile})


@pytest.mark.parametrize("hostile", HOSTILE_STRINGS)
def test_constructed_hostile_resources_never_reach_argv(hostile: str) -> None:
    """`model_construct` skips validation; the command builder validates again."""
    sneaky = Resources.model_construct(partition=hostile)
    with pytest.raises(ValidationError):
        Sbatch(JOB, PATHS, sneaky).argv()


@pytest.mark.parametrize("hostile", HOSTILE_STRINGS)
def test_job_name_and_comment_come_only_from_a_uuid(hostile: str) -> None:
    with pytest.raises(TypeError):
        job_name_for(hostile)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        comment_for(hostile)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Sbatch(hostile, PATHS).argv()  # type: ignore[arg-type]


def test_sbatch_argv_survives_quoting_with_odd_workdir() -> None:
    paths = JobPaths("/home/u/dir with 'quotes' $(x)", JOB)
    argv = Sbatch(JOB, paths).argv()
    assert shlex.split(shlex.join(argv)) == argv


# ------------------------------------------------------------------------------------ ids


@pytest.mark.parametrize("hostile", [*HOSTILE_STRINGS, "", "12 13", "12,13", "-1", "12.batch", "1_[1-3]"])
def test_native_ids_are_checked_before_any_command(hostile: str) -> None:
    with pytest.raises(ValueError, match="not a SLURM job id"):
        check_native_id(hostile)
    with pytest.raises(ValueError, match="not a SLURM job id"):
        Squeue(jobs=["1", hostile]).argv()
    with pytest.raises(ValueError, match="not a SLURM job id"):
        Scancel(hostile).argv()


@pytest.mark.parametrize(
    ("raw", "job", "task", "step", "allocation"),
    [
        ("123", "123", None, None, "123"),
        ("123.batch", "123", None, "batch", "123"),
        ("123.extern", "123", None, "extern", "123"),
        ("123.0", "123", None, "0", "123"),
        ("123_7", "123", "7", None, "123_7"),
        ("123_7.batch", "123", "7", "batch", "123_7"),
        ("123_[2-4%25]", "123", "[2-4%25]", None, "123_[2-4%25]"),
        ("123+1.0", "123", None, "0", "123"),
    ],
)
def test_parse_job_id(raw: str, job: str, task: str | None, step: str | None, allocation: str) -> None:
    parsed = parse_job_id(raw)
    assert (parsed.job, parsed.array_task, parsed.step, parsed.allocation) == (job, task, step, allocation)
    assert is_step_row(raw) is (step is not None)


@pytest.mark.parametrize("raw", ["", "abc", "123.", "12 3", "123_[x]"])
def test_parse_job_id_rejects(raw: str) -> None:
    with pytest.raises(ParseError):
        parse_job_id(raw)


@pytest.mark.parametrize(
    ("spec", "tasks"),
    [("7", [7]), ("[2-4]", [2, 3, 4]), ("[2-4%25]", [2, 3, 4]), ("[1,3,5-7]", [1, 3, 5, 6, 7]), ("[0]", [0])],
)
def test_expand_array_tasks(spec: str, tasks: list[int]) -> None:
    assert expand_array_tasks(spec) == tasks


@pytest.mark.parametrize("spec", ["[a-b]", "[4-2]", "[1-]"])
def test_expand_array_tasks_rejects(spec: str) -> None:
    with pytest.raises(ParseError):
        expand_array_tasks(spec)


@pytest.mark.parametrize(
    ("raw", "ids"),
    [("123", ["123"]), ("123_7", ["123_7"]), ("123_[2-4%25]", ["123_2", "123_3", "123_4"])],
)
def test_allocation_ids(raw: str, ids: list[str]) -> None:
    assert allocation_ids(raw) == ids


# ------------------------------------------------------------------------------------ values


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        ("00:00.124", 0.124),
        ("00:00:00", 0.0),
        ("01:02:03", 3723.0),
        ("2-01:00:00", 176400.0),
        ("12:34", 754.0),
        ("", None),
        ("INVALID", None),
    ],
)
def test_parse_duration(raw: str, seconds: float | None) -> None:
    assert parse_duration(raw) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("raw", "cpus", "nodes", "size"),
    [
        ("164944K", None, None, 164944 * 1024),
        ("400M", None, None, 400 * MiB),
        ("1.50G", None, None, int(1.5 * 1024 * MiB)),
        ("0", None, None, 0),
        ("", None, None, None),
        ("256Mc", 4, 1, 1024 * MiB),
        ("4Gn", 4, 2, 8 * 1024 * MiB),
    ],
)
def test_parse_size(raw: str, cpus: int | None, nodes: int | None, size: int | None) -> None:
    assert parse_size(raw, alloc_cpus=cpus, nodes=nodes) == size


def test_parse_size_rejects_garbage() -> None:
    with pytest.raises(ParseError, match="12Q"):
        parse_size("12Q")


@pytest.mark.parametrize(
    ("raw", "parsed"), [("0:0", (0, 0)), ("3:0", (3, 0)), ("0:15", (0, 15)), ("", (None, None))]
)
def test_parse_exit_code(raw: str, parsed: tuple[int | None, int | None]) -> None:
    assert parse_exit_code(raw) == parsed


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1795927163", datetime(2026, 11, 29, 4, 39, 23, tzinfo=UTC)),
        ("2026-11-29T04:39:23", datetime(2026, 11, 29, 4, 39, 23, tzinfo=UTC)),
        ("N/A", None),
        ("NONE", None),
        ("Unknown", None),
        ("0", None),
    ],
)
def test_parse_timestamp(raw: str, expected: datetime | None) -> None:
    parsed = parse_timestamp(raw)
    assert parsed == expected
    assert parsed is None or parsed.tzinfo is not None


# ------------------------------------------------------------------------------------ states


@pytest.mark.parametrize(
    ("raw", "state"),
    [
        ("PENDING", JobState.QUEUED),
        ("CONFIGURING", JobState.QUEUED),
        ("REQUEUED", JobState.QUEUED),
        ("RUNNING", JobState.RUNNING),
        ("COMPLETING", JobState.RUNNING),
        ("SUSPENDED", JobState.RUNNING),
        ("COMPLETED", JobState.COMPLETED),
        ("FAILED", JobState.FAILED),
        ("OUT_OF_MEMORY", JobState.FAILED),
        ("NODE_FAIL", JobState.FAILED),
        ("BOOT_FAIL", JobState.FAILED),
        ("DEADLINE", JobState.FAILED),
        ("PREEMPTED", JobState.FAILED),
        ("CANCELLED", JobState.CANCELLED),
        ("CANCELLED by 1001", JobState.CANCELLED),
        ("CANCELLED+", JobState.CANCELLED),
        ("TIMEOUT", JobState.TIMEOUT),
    ],
)
def test_state_map(raw: str, state: JobState) -> None:
    assert map_state(raw) == state


def test_unknown_state_is_logged_and_unknown(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="cloudhpc.hpc.slurm"):
        assert map_state("FROBNICATED") is None
    assert "FROBNICATED" in caplog.text


def test_state_table_is_upper_case_and_complete_for_terminal_states() -> None:
    assert all(key == normalize_state(key) for key in SLURM_STATES)
    assert {state for state in SLURM_STATES.values() if state.terminal} == {
        JobState.COMPLETED,
        JobState.FAILED,
        JobState.CANCELLED,
        JobState.TIMEOUT,
    }


# ------------------------------------------------------------------------------------ tables


def test_parse_table_zips_by_name_not_position() -> None:
    a = parse_table("A|B|C\n1|2|3\n", expected=["A", "C"])
    b = parse_table("C|A|B\n3|1|2\n", expected=["A", "C"])
    assert a == b == [{"A": "1", "B": "2", "C": "3"}]


def test_parse_table_joins_delimiters_of_the_last_column() -> None:
    assert parse_table("A|Comment\n1|x|y|z\n", expected=["A"]) == [{"A": "1", "Comment": "x|y|z"}]


@pytest.mark.parametrize(
    ("text", "match"), [("", "no output"), ("A|B\n1|2\n", "lacks the columns"), ("A|C|D\n1|2\n", "cells")]
)
def test_parse_table_errors_quote_what_was_seen(text: str, match: str) -> None:
    with pytest.raises(ParseError, match=match):
        parse_table(text, expected=["A", "C"])


# ------------------------------------------------------------------------------------ squeue


def test_squeue_argv_batches_ids_and_asks_for_epoch_times() -> None:
    argv = Squeue(jobs=["1", "2", "3_4"]).argv()
    assert argv[:3] == ["env", "SLURM_TIME_FORMAT=%s", "squeue"]
    assert "--jobs=1,2,3_4" in argv
    assert "--states=all" in argv
    assert argv[-1] == "--format=" + "|".join(code for _, code in SQUEUE_FIELDS)
    with pytest.raises(ValueError, match="never lists the whole queue"):
        Squeue().argv()


def test_squeue_recorded_states() -> None:
    recorded = load_recording("squeue_states")
    rows = {row.job_id: row for row in Squeue.parse(recorded)}
    asked = next(a for a in recorded.argv if a.startswith("--jobs=")).removeprefix("--jobs=").split(",")
    listed = {alloc.split("_")[0] for job_id in rows for alloc in allocation_ids(job_id)}
    assert listed == set(asked)
    states = {row.native_state for row in rows.values()}
    assert states == {"RUNNING", "PENDING", "COMPLETED", "FAILED", "CANCELLED"}
    observations = {job_id: row.observation() for job_id, row in rows.items()}
    for job_id, row in rows.items():
        obs = observations[job_id]
        assert obs is not None
        assert obs.native_state == row.native_state
        assert row.submitted_at is not None
        assert row.submitted_at.tzinfo is not None
        if obs.state == JobState.QUEUED:
            assert obs.started_at is None
            assert obs.ended_at is None
        if obs.state == JobState.RUNNING:
            assert obs.started_at is not None
            assert obs.ended_at is None
        if obs.state == JobState.FAILED:
            assert obs.reason == "FAILED"
    ours = [row for row in rows.values() if row.name.startswith("chpc-")]
    assert ours
    assert all(row.comment == "cloudhpc:" + row.name.removeprefix("chpc-") for row in ours)
    array = next(job_id for job_id in rows if "[" in job_id)
    assert len(allocation_ids(array)) == 3


def test_squeue_single_unknown_id_is_an_empty_answer() -> None:
    recorded = load_recording("squeue_unknown")
    assert recorded.exit_status == 1
    assert "Invalid job id specified" in recorded.stderr
    assert Squeue.parse(recorded) == []


def test_squeue_unknown_id_among_others_is_left_out() -> None:
    recorded = load_recording("squeue_states_with_unknown")
    assert "999999" in recorded.argv[4]
    rows = Squeue.parse(recorded)
    assert len(rows) == len(Squeue.parse(load_recording("squeue_states")))
    assert "999999" not in {row.job_id for row in rows}


def test_squeue_by_name_finds_the_derived_name() -> None:
    recorded = load_recording("squeue_by_name")
    name = next(a for a in recorded.argv if a.startswith("--name=")).removeprefix("--name=")
    (row,) = Squeue.parse(recorded)
    assert row.name == name
    assert row.comment == "cloudhpc:" + name.removeprefix("chpc-")


def test_squeue_other_errors_raise() -> None:
    with pytest.raises(SchedulerCommandError, match="Unable to contact"):
        Squeue.parse(
            result(stderr="slurm_load_jobs error: Unable to contact slurm controller", exit_status=1)
        )


# ------------------------------------------------------------------------------------ sacct


def test_sacct_argv() -> None:
    argv = Sacct(jobs=["5", "6"], starttime="now-3600", allocations_only=True).argv()
    assert argv[:3] == ["env", "SLURM_TIME_FORMAT=%s", "sacct"]
    assert "--parsable2" in argv
    assert "--starttime=now-3600" in argv
    assert "--allocations" in argv
    assert "--jobs=5,6" in argv
    assert argv[-1] == "--format=" + ",".join(SACCT_FIELDS)
    assert "--noheader" not in argv
    assert "-n" not in argv


def test_sacct_recorded_completed() -> None:
    rows = Sacct.parse(load_recording("sacct_completed"))
    allocation, batch = (row.record for row in rows)
    assert allocation.step is None
    assert batch.step == "batch"
    assert batch.job_id == allocation.job_id
    assert allocation.state == "COMPLETED"
    assert allocation.exit_code == 0
    assert allocation.req_mem_bytes == 400 * MiB
    assert batch.max_rss_bytes == 164944 * 1024
    assert allocation.elapsed_seconds == 6
    assert allocation.alloc_cpus == 1
    assert allocation.nodes == 1
    assert allocation.total_cpu_seconds == pytest.approx(0.124)
    assert allocation.billing == 1.0
    assert allocation.partition == "debug"
    assert allocation.account == "default"
    assert allocation.timelimit_seconds is None  # UNLIMITED
    assert allocation.submit is not None
    assert allocation.start is not None
    assert allocation.end is not None
    assert allocation.end - allocation.start == (allocation.end - allocation.start)
    assert allocation.start.tzinfo is not None
    assert rows[0].comment == "cloudhpc:" + allocation.name.removeprefix("chpc-")
    obs = rows[0].observation()
    assert obs is not None
    assert obs.state == JobState.COMPLETED
    assert obs.exit_code == 0
    assert obs.reason is None


def test_sacct_recorded_failed_exit_code() -> None:
    rows = Sacct.parse(load_recording("sacct_failed"))
    obs = rows[0].observation()
    assert obs is not None
    assert (obs.state, obs.native_state, obs.reason, obs.exit_code) == (
        JobState.FAILED,
        "FAILED",
        "FAILED",
        3,
    )
    assert obs.ended_at is not None
    assert obs.started_at is not None


def test_sacct_recorded_cancelled() -> None:
    rows = Sacct.parse(load_recording("sacct_cancelled"))
    assert rows[0].record.state.startswith("CANCELLED by ")
    assert rows[1].record.signal == 15
    obs = rows[0].observation()
    assert obs is not None
    assert obs.state == JobState.CANCELLED
    assert obs.native_state == "CANCELLED"


def test_sacct_recorded_timeout() -> None:
    rows = Sacct.parse(load_recording("sacct_timeout"))
    allocation = rows[0].record
    assert allocation.timelimit_seconds == 60
    assert allocation.elapsed_seconds is not None
    assert allocation.elapsed_seconds >= 60
    obs = rows[0].observation()
    assert obs is not None
    assert obs.state == JobState.TIMEOUT


def test_sacct_recorded_multistep() -> None:
    records = [row.record for row in Sacct.parse(load_recording("sacct_multistep"))]
    assert [r.step for r in records] == [None, "batch", "0", "1"]
    assert {r.job_id for r in records} == {records[0].job_id}
    assert records[2].name == "sleep"
    assert records[0].alloc_cpus == 2
    assert records[0].req_mem_bytes == 512 * MiB


def test_sacct_recorded_running_and_pending() -> None:
    rows = {row.record.job_id: row for row in Sacct.parse(load_recording("sacct_running_pending"))}
    states = {job_id: row.observation() for job_id, row in rows.items()}
    running = [o for o in states.values() if o is not None and o.state == JobState.RUNNING]
    queued = [o for o in states.values() if o is not None and o.state == JobState.QUEUED]
    assert len(running) == 1
    assert len(queued) == 2
    assert running[0].ended_at is None
    assert running[0].exit_code is None
    assert all(o.started_at is None for o in queued)
    array = next(row for job_id, row in rows.items() if "[" in job_id)
    assert array.record.node_list is None
    assert array.record.timelimit_seconds is None


def test_sacct_right_after_the_end_has_placeholders_but_a_final_state() -> None:
    """Recorded: for ~1 s after the end, ReqMem reads `16?` and JobName `allocation`."""
    recorded = load_recording("sacct_just_ended")
    assert "|16?|" in recorded.stdout
    rows = Sacct.parse(recorded)
    allocation = rows[0].record
    assert allocation.name == "allocation"
    assert allocation.req_mem_bytes == 256 * MiB  # from AllocTRES mem= when ReqMem is unreadable
    obs = rows[0].observation()
    assert obs is not None
    assert (obs.state, obs.exit_code) == (JobState.FAILED, 3)


def test_sacct_by_name() -> None:
    recorded = load_recording("sacct_by_name")
    (row,) = Sacct.parse(recorded)
    assert f"--name={row.record.name}" in recorded.argv


def test_sacct_unknown_id_is_empty_not_an_error() -> None:
    assert Sacct.parse(load_recording("sacct_unknown")) == []


def test_sacct_failure_is_accounting_unavailable() -> None:
    with pytest.raises(AccountingUnavailable, match="Connection refused"):
        Sacct.parse(
            result(stderr="sacct: error: Problem talking to the database: Connection refused", exit_status=1)
        )


# ------------------------------------------------------------------------------------ seff / scancel


def test_seff_recorded_completed_matches_computed_from_sacct() -> None:
    seff = Seff.parse(load_recording("seff_completed"))
    assert seff.source == "seff"
    assert seff.state == "COMPLETED"
    assert seff.memory_efficiency == pytest.approx(0.4027)
    assert seff.memory_requested_bytes == 400 * MiB
    assert seff.core_walltime_seconds == 6.0
    computed = compute_efficiency([row.record for row in Sacct.parse(load_recording("sacct_completed"))])
    assert computed.source == "sacct"
    assert computed.memory_efficiency == pytest.approx(seff.memory_efficiency, abs=0.001)
    assert computed.memory_requested_bytes == seff.memory_requested_bytes
    assert computed.core_walltime_seconds == seff.core_walltime_seconds
    assert seff.memory_utilized_bytes is not None
    assert computed.memory_utilized_bytes is not None
    assert abs(computed.memory_utilized_bytes - seff.memory_utilized_bytes) < 0.01 * MiB
    # seff truncates CPU time to whole seconds; sacct keeps milliseconds.
    assert computed.cpu_efficiency == pytest.approx(0.124 / 6)


def test_seff_recorded_failed() -> None:
    seff = Seff.parse(load_recording("seff_failed"))
    assert seff.state == "FAILED"
    assert seff.memory_efficiency == pytest.approx(0.0178)


def test_seff_unknown_job() -> None:
    with pytest.raises(AccountingUnavailable, match="Job not found"):
        Seff.parse(load_recording("seff_unknown"))


def test_seff_garbage_is_a_parse_error() -> None:
    with pytest.raises(ParseError, match="hello"):
        Seff.parse(result("hello\n"))


def test_compute_efficiency_needs_an_allocation_row() -> None:
    steps = [row.record for row in Sacct.parse(load_recording("sacct_completed")) if row.record.step]
    with pytest.raises(ParseError):
        compute_efficiency(steps)


def test_scancel_of_a_finished_job_is_fine() -> None:
    Scancel.parse(load_recording("scancel_finished"))
    Scancel.parse(
        result(
            stderr="scancel: error: Kill job error on job id 5: Job/step already completing or completed",
            exit_status=1,
        )
    )
    Scancel.parse(
        result(stderr="scancel: error: Kill job error on job id 5: Invalid job id specified", exit_status=1)
    )
    with pytest.raises(SchedulerCommandError, match="Access/permission denied"):
        Scancel.parse(
            result(
                stderr="scancel: error: Kill job error on job id 5: Access/permission denied", exit_status=1
            )
        )


def test_new_ids_are_distinct_names() -> None:
    a, b = uuid4(), uuid4()
    assert job_name_for(a) != job_name_for(b)
    assert str(a) in job_name_for(a)
    assert str(a) in comment_for(a)


# ------------------------------------------------------------------------------------ backend decisions


class Replay:
    """Answers each SLURM command with a chosen recording; no shell, no SSH (decisions only)."""

    def __init__(self, answers: dict[str, str | CommandResult]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    async def run(
        self,
        argv: Sequence[str],
        *,
        stdin: str | None = None,
        timeout: float | None = None,
        idempotent: bool = False,
        prelude: str = "",
    ) -> CommandResult:
        name = argv[2] if argv[0] == "env" else argv[0]
        self.calls.append(name)
        answer = self.answers[name]
        return load_recording(answer) if isinstance(answer, str) else answer

    async def home(self) -> str:
        return "/home/hpcuser"

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        raise NotImplementedError

    async def read_file(self, path: str, *, offset: int = 0, length: int | None = None) -> bytes:
        raise NotImplementedError

    async def exists(self, path: str) -> bool:
        raise NotImplementedError

    async def size(self, path: str) -> int | None:
        raise NotImplementedError

    async def makedirs(self, path: str, *, mode: int = 0o700) -> None:
        raise NotImplementedError


def replay_backend(**answers: str | CommandResult) -> tuple[SlurmBackend, Replay]:
    conn = Replay(answers)
    return SlurmBackend("testbed", conn, workdir="~/.cloudhpc"), conn


async def test_poll_one_unknown_id_falls_through_to_sacct() -> None:
    backend, conn = replay_backend(squeue="squeue_unknown", sacct="sacct_unknown")
    assert await backend.poll(["999999"]) == {}
    assert conn.calls == ["squeue", "sacct"]
    assert backend.last_poll_commands == 2


async def test_poll_takes_terminal_states_from_sacct_only() -> None:
    squeue = load_recording("squeue_states")
    rows = {row.job_id: row.native_state for row in Squeue.parse(squeue)}
    ids = [job_id for job_id in rows if "[" not in job_id]
    backend, conn = replay_backend(squeue=squeue, sacct="sacct_unknown")
    answer = await backend.poll(ids)
    # sacct knew none of them: terminal squeue states are not trusted without an exit code
    assert {rows[job_id] for job_id in answer} == {"RUNNING", "PENDING"}
    assert conn.calls == ["squeue", "sacct"]


async def test_poll_without_changes_costs_one_squeue() -> None:
    squeue = load_recording("squeue_states")
    live = [row.job_id for row in Squeue.parse(squeue) if row.native_state in ("RUNNING", "PENDING")]
    backend, conn = replay_backend(squeue=squeue)
    answer = await backend.poll([j for j in live if "[" not in j])
    assert len(answer) == 2
    assert conn.calls == ["squeue"]
    assert backend.last_poll_commands == 1


async def test_poll_reads_exit_codes_from_sacct() -> None:
    failed = Sacct.parse(load_recording("sacct_failed"))[0].record.job_id
    backend, _ = replay_backend(squeue="squeue_unknown", sacct="sacct_failed")
    observation = (await backend.poll([failed]))[failed]
    assert (observation.state, observation.exit_code, observation.reason) == (JobState.FAILED, 3, "FAILED")


async def test_poll_says_whose_job_each_record_is() -> None:
    """squeue's and sacct's job names say which cloudhpc job a record is: after a controller lost a
    job and handed its id to another, the poller must be able to tell (test_poller)."""
    squeue = load_recording("squeue_states")
    rows = {row.job_id: row for row in Squeue.parse(squeue) if row.native_state in ("RUNNING", "PENDING")}
    backend, _ = replay_backend(squeue=squeue)
    answer = await backend.poll(["12", "13"])
    assert answer["12"].owner == UUID(rows["12"].name.removeprefix("chpc-"))
    assert answer["13"].owner is None, "a job named `wrap` is nobody's of ours"
    (accounted,) = Sacct.parse(load_recording("sacct_by_name"))
    backend, _ = replay_backend(squeue="squeue_unknown", sacct="sacct_by_name")
    answer = await backend.poll([accounted.record.job_id])
    assert answer[accounted.record.job_id].owner == UUID(accounted.record.name.removeprefix("chpc-"))


async def test_poll_never_takes_an_earlier_jobs_record_under_the_same_id() -> None:
    """A fresh controller hands ids out again and the database keeps every record: while this job's
    own record is not stored yet, sacct answers the earlier job's (FAILED, exit 3). The poller must
    ask again, not end this job with the other's outcome (a CI fault run did)."""
    (row,) = Squeue.parse(load_recording("squeue_reused_id"))
    (earlier,) = Sacct.parse(load_recording("sacct_reused_id"))
    assert earlier.record.job_id == row.job_id
    assert earlier.record.name != row.name
    backend, conn = replay_backend(squeue="squeue_reused_id", sacct="sacct_reused_id")
    assert await backend.poll([row.job_id]) == {}
    assert conn.calls == ["squeue", "sacct"]


async def test_poll_takes_slurmdbds_first_record_named_allocation_by_its_submit_time() -> None:
    """Right after a short job's end slurmdbd's record of it is named `allocation` for a moment
    (captured on the testbed): squeue's submit time says it is this job's, so its end is taken at
    once rather than a poll later (the Executor's round trip doubled when it was skipped)."""
    (row,) = Squeue.parse(load_recording("squeue_placeholder"))
    (placeholder,) = Sacct.parse(load_recording("sacct_placeholder"))
    assert placeholder.record.name == "allocation"
    assert placeholder.record.submit == row.submitted_at
    backend, _ = replay_backend(squeue="squeue_placeholder", sacct="sacct_placeholder")
    observation = (await backend.poll([row.job_id]))[row.job_id]
    assert (observation.state, observation.exit_code) == (JobState.COMPLETED, 0)
    assert observation.owner == UUID(row.name.removeprefix("chpc-"))


async def test_poll_takes_the_end_from_squeue_while_sacct_has_none_yet() -> None:
    """Right after slurmdbd comes back, a job that ended meanwhile is COMPLETED with End `Unknown`;
    its end is slurmctld's (squeue's), not the moment porter hears of it."""
    (row,) = Squeue.parse(load_recording("squeue_reused_id"))
    (accounted,) = Sacct.parse(load_recording("sacct_end_unknown"))
    assert accounted.record.end is None
    assert row.ended_at is not None
    backend, _ = replay_backend(squeue="squeue_reused_id", sacct="sacct_end_unknown")
    observation = (await backend.poll([row.job_id]))[row.job_id]
    assert (observation.state, observation.exit_code) == (JobState.COMPLETED, 0)
    assert observation.ended_at == row.ended_at
    assert observation.owner == UUID(row.name.removeprefix("chpc-"))


async def test_poll_survives_a_failing_sacct() -> None:
    down = result(stderr="sacct: error: Problem talking to the database", exit_status=1)
    backend, _ = replay_backend(squeue="squeue_unknown", sacct=down)
    assert await backend.poll(["999999"]) == {}


async def test_find_looks_in_squeue_then_sacct() -> None:
    by_name = load_recording("squeue_by_name")
    (row,) = Squeue.parse(by_name)
    job_id = UUID(row.name.removeprefix("chpc-"))
    backend, conn = replay_backend(squeue=by_name)
    assert await backend.find(job_id) == row.job_id
    assert conn.calls == ["squeue"]
    (accounted,) = Sacct.parse(load_recording("sacct_by_name"))
    backend, conn = replay_backend(squeue="squeue_by_name_none", sacct="sacct_by_name")
    assert await backend.find(UUID(accounted.record.name.removeprefix("chpc-"))) == accounted.record.job_id
    assert conn.calls == ["squeue", "sacct"]


async def test_find_ignores_a_job_whose_comment_is_not_ours() -> None:
    by_name = load_recording("squeue_by_name")
    (row,) = Squeue.parse(by_name)
    forged = CommandResult(
        argv=by_name.argv,
        exit_status=0,
        stdout=by_name.stdout.replace(f"cloudhpc:{row.name.removeprefix('chpc-')}", "cloudhpc:someone-else"),
        stderr="",
    )
    backend, _ = replay_backend(squeue=forged, sacct="sacct_unknown")
    assert await backend.find(UUID(row.name.removeprefix("chpc-"))) is None


async def test_efficiency_is_computed_from_sacct_without_seff() -> None:
    missing = result(stderr="bash: line 1: seff: command not found", exit_status=127)
    native_id = Sacct.parse(load_recording("sacct_completed"))[0].record.job_id
    backend, conn = replay_backend(seff=missing, sacct="sacct_completed")
    accounting = await backend.accounting(native_id)
    efficiency = await backend.efficiency(accounting)
    assert efficiency.source == "sacct"
    assert efficiency.memory_efficiency == pytest.approx(0.4027, abs=0.001)
    await backend.efficiency(accounting)
    # seff is not asked again, and the figures come from the records accounting already has
    assert conn.calls == ["sacct", "seff"]


async def test_accounting_unavailable_when_sacct_has_no_rows() -> None:
    backend, _ = replay_backend(sacct="sacct_unknown")
    with pytest.raises(AccountingUnavailable, match="no record"):
        await backend.accounting("999999")
    backend, _ = replay_backend(sacct=result(stderr="sacct: error: slurmdbd down", exit_status=1))
    with pytest.raises(AccountingUnavailable):
        await backend.accounting("5")


async def test_workdir_is_made_absolute() -> None:
    for workdir, expected in [
        ("~/.cloudhpc", "/home/hpcuser/.cloudhpc"),
        ("rel/dir", "/home/hpcuser/rel/dir"),
        ("/scratch/p/", "/scratch/p"),
        ("~", "/home/hpcuser"),
    ]:
        backend = SlurmBackend("t", Replay({}), workdir=workdir)
        assert await backend.workdir() == expected
