"""#13 item 5, without SLURM: the `checkpoint` spec's rules, the sbatch flags, and the wrapper's
trap run by a real bash with a stand-in `scontrol` (the testbed's SLURM runs are in
tests/e2e/test_requeue.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import uuid4

import pytest
from pydantic import ValidationError

from cloudhpc.config import ClusterConfig
from cloudhpc.domain.checkpoint import CheckpointSpec, requeue_reason
from cloudhpc.domain.jobs import JobSpec, Observation
from cloudhpc.domain.paths import JobPaths
from cloudhpc.domain.states import JobState
from cloudhpc.hpc.backend import CommandResult
from cloudhpc.hpc.jobscript import render_batch_script
from cloudhpc.hpc.slurm.restarts import SqueueRestarts
from cloudhpc.hpc.slurm.submit import Sbatch
from cloudhpc.ray.script import ENTRYPOINT_END_MARKER, HELPERS_FILE, render_ray_job
from cloudhpc.submitter.agent import Agent, _Tracked
from tests.jobs import job_from


def spec(**fields: object) -> JobSpec:
    base: dict[str, object] = {
        "name": "ckpt",
        "cluster": "testbed",
        "script": "echo hi\n",
        "resources": {"time": "2"},
        "checkpoint": {"warn_before": "30s", "signal": "USR1", "max_restarts": 2},
    }
    return JobSpec.model_validate(base | fields)


def test_checkpoint_values() -> None:
    got = spec().checkpoint
    assert got == CheckpointSpec(warn_before=30, signal="USR1", max_restarts=2)
    assert CheckpointSpec.model_validate({"warn_before": "1m30s", "signal": "SIGterm"}).slurm_signal() == (
        "B:TERM@90"
    )
    assert CheckpointSpec.model_validate({"warn_before": 45}).warn_before == 45


@pytest.mark.parametrize(
    ("checkpoint", "field", "words"),
    [
        ({"warn_before": "soon"}, "warn_before", "not a duration"),
        ({"warn_before": 0}, "warn_before", "greater than or equal to 1"),
        ({"warn_before": "70000"}, "warn_before", "less than or equal to 65535"),
        ({"signal": "KILL"}, "signal", "cannot be caught"),
        ({"signal": "USR3"}, "signal", "unknown signal"),
        ({"signal": "USR1; rm -rf ~"}, "signal", "unknown signal"),
        ({"max_restarts": -1}, "max_restarts", "greater than or equal to 0"),
        ({"max_restarts": 1000}, "max_restarts", "less than or equal to 100"),
        ({"restarts": 1}, "restarts", "Extra inputs"),
    ],
)
def test_bad_checkpoint_values_name_the_field(checkpoint: dict[str, object], field: str, words: str) -> None:
    with pytest.raises(ValidationError) as caught:
        spec(checkpoint=checkpoint)
    error = caught.value.errors()[0]
    assert error["loc"][:2] == ("checkpoint", field)
    assert words in error["msg"]


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"resources": {}}, "needs resources.time"),
        ({"resources": {"time": "1"}, "checkpoint": {"warn_before": 60}}, "shorter than the time limit"),
        ({"resources": {"time": "5", "signal": "B:USR2@60"}}, "leave resources.signal unset"),
        ({"array": "0-3"}, "not arrays"),
    ],
)
def test_checkpoint_needs_its_time_limit_alone(fields: dict[str, object], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        spec(**fields)


def ray_job(**checkpoint: object) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "train",
            "cluster": "testbed",
            "kind": "ray-job",
            "ray": {"entrypoint": "python train.py"},
            "resources": {"time": "5"},
            "checkpoint": {"warn_before": 60} | checkpoint,
        }
    )


def test_a_ray_job_may_checkpoint_with_a_signal_its_script_does_not_take_for_a_cancel() -> None:
    assert ray_job().checkpoint == CheckpointSpec(warn_before=60)
    for stop in ("TERM", "INT"):
        with pytest.raises(ValidationError, match=f"stops its Ray cluster on SIG{stop}"):
            ray_job(signal=stop)
    with pytest.raises(ValidationError, match="batch jobs and ray-jobs"):
        JobSpec.model_validate(
            {
                "name": "c",
                "cluster": "testbed",
                "kind": "ray-cluster",
                "ray": {},
                "resources": {"time": "5"},
                "checkpoint": {},
            }
        )


def test_sbatch_flags() -> None:
    paths = JobPaths(workdir="/w", job_id=uuid4())
    job = spec()
    argv = Sbatch(job_id=paths.job_id, paths=paths, resources=job.resources, checkpoint=job.checkpoint).argv()
    assert argv[-3:-1] == ["--signal=B:USR1@30", "--requeue"]
    plain = Sbatch(job_id=paths.job_id, paths=paths, resources=job.resources).argv()
    assert not any(a.startswith(("--signal", "--requeue")) for a in plain)
    # every job's output is appended to: a requeue of any job (an operator's) keeps its first run
    assert "--open-mode=append" in plain


def test_restart_counts_parsed() -> None:
    command = SqueueRestarts(jobs=["12", "13"])
    assert command.argv()[-2:] == ["--jobs=12,13", "--Format=JobID:|,RestartCnt:"]
    result = CommandResult(
        argv=command.argv(), exit_status=0, stdout="JOBID|RESTART_COUNT\n12|2\n13|0\n", stderr=""
    )
    assert command.parse(result) == {"12": 2, "13": 0}


def test_reasons() -> None:
    assert requeue_reason(0, 2, "RUNNING") is None
    assert requeue_reason(1, 2, "PENDING") == "Requeued (restart 1 of 2): PENDING"
    assert requeue_reason(1, None, "PENDING", "BeginTime") == "Requeued (restart 1): PENDING BeginTime"
    assert requeue_reason(2, 2, "TIMEOUT") == "checkpoint.max_restarts (2) reached: TIMEOUT"
    assert requeue_reason(0, 0, "TIMEOUT") == "checkpoint.max_restarts (0) reached: TIMEOUT"


# ---- the rendered wrapper, run by bash


USER_SCRIPT = """\
trap 'echo "user got USR1 at $i"; exit 3' USR1
echo "dir=$CLOUDHPC_CHECKPOINT_DIR restart=$CLOUDHPC_RESTART_COUNT"
for i in $(seq 1 25); do sleep 0.1; done
echo finished
"""


def run_wrapper(
    tmp_path: Path,
    restart_count: str | None,
    *,
    signal_after: float | None,
    kind: str = "batch",
    ready_after: float = 0.0,
) -> tuple[int, str, str]:
    """Render the wrapper for a checkpointed job (`kind` batch, or ray-job with `USER_SCRIPT` as its
    entrypoint and stand-ins for `ray` and the node helpers) in `tmp_path`, run it with a stand-in
    `scontrol` that logs its arguments, send it SIGUSR1 after `signal_after` seconds; (status,
    output, scontrol's log)."""
    job_id = uuid4()
    paths = JobPaths(workdir=str(tmp_path), job_id=job_id)
    Path(paths.control).mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if kind == "batch":
        Path(paths.user_script).write_text(USER_SCRIPT)
        script = render_batch_script(job_id=job_id, spec=spec(), paths=paths)
    else:
        script = render_ray_stand_ins(paths, bin_dir)
    Path(paths.batch_script).write_text(script)
    log = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {log}\nkill -TERM "$PPID"\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "HOME": str(tmp_path),
        "READY_AFTER": str(ready_after),
    }
    if restart_count is not None:
        env["SLURM_RESTART_COUNT"] = restart_count
    proc = subprocess.Popen(
        ["/bin/bash", paths.batch_script],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if signal_after is not None:
        time.sleep(signal_after)
        proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert Path(paths.jobdir, "checkpoints").is_dir()
    return proc.returncode, out, log.read_text() if log.exists() else ""


RAY_HELPERS = """\
import os, sys, time
if sys.argv[1] == "ports":
    print(" ".join(str(20000 + i) for i in range(int(sys.argv[2]))))
elif sys.argv[1] == "node-ip":
    print("127.0.0.1")
elif sys.argv[1] == "wait-ready":
    time.sleep(float(os.environ.get("READY_AFTER", "0")))
"""
"""Stands in for ray/node_script.py: free ports, the node's address, and `wait-ready` after
READY_AFTER seconds (Ray's start-up)."""


def render_ray_stand_ins(paths: JobPaths, bin_dir: Path) -> str:
    """A checkpointed ray-job's batch script (USER_SCRIPT as its entrypoint), its files, and a `ray`
    whose head (`ray start --block`) sleeps until stopped and says so."""
    job = JobSpec.model_validate(
        {
            "name": "ckpt-ray",
            "cluster": "testbed",
            "kind": "ray-job",
            "ray": {"entrypoint": USER_SCRIPT},
            "resources": {"time": "2"},
            "checkpoint": {"warn_before": "30s", "signal": "USR1", "max_restarts": 2},
        }
    )
    rendered = render_ray_job(
        job_id=paths.job_id, spec=job, paths=paths, resources=job.resources, bridges=[], tunnel=None
    )
    for rel, data in rendered.files.items():
        Path(paths.file(rel)).write_bytes(data)
    Path(paths.file(HELPERS_FILE)).write_text(RAY_HELPERS)
    (bin_dir / "ray").write_text(
        "#!/bin/bash\ntrap 'echo \"ray head stopped\"; exit 0' TERM\nsleep 100 & wait\n"
    )
    (bin_dir / "ray").chmod(0o755)
    return render_batch_script(job_id=paths.job_id, spec=job, paths=paths, body=rendered.body)


def test_warning_reaches_the_program_and_requeues(tmp_path: Path) -> None:
    status, out, scontrol = run_wrapper(tmp_path, None, signal_after=0.8)
    assert f"dir={tmp_path}/jobs/" in out
    assert "/checkpoints restart=0" in out
    assert "user got USR1" in out
    assert "finished" not in out
    assert "requeued" in out
    assert scontrol == "requeue 4242\n"
    assert status != 0  # ended by SLURM (here: the stand-in's SIGTERM) while waiting


def test_no_requeue_at_max_restarts(tmp_path: Path) -> None:
    status, out, scontrol = run_wrapper(tmp_path, "2", signal_after=0.8)
    assert "restart=2" in out
    assert "max_restarts (2) reached: not requeued" in out
    assert "user got USR1" not in out
    assert "finished" in out
    assert scontrol == ""
    assert status == 0


def test_program_that_finishes_is_not_requeued(tmp_path: Path) -> None:
    status, out, scontrol = run_wrapper(tmp_path, "1", signal_after=None)
    assert "restart=1" in out
    assert "finished" in out
    assert scontrol == ""
    assert status == 0


def test_ray_job_warning_reaches_the_driver_stops_ray_and_requeues(tmp_path: Path) -> None:
    """The ray-job's batch shell (on the head's node, where SLURM sends B: signals) forwards the
    warning to the entrypoint's process group, stops the Ray cluster, then requeues."""
    status, out, scontrol = run_wrapper(tmp_path, None, signal_after=1.5, kind="ray-job")
    assert "/checkpoints restart=0" in out
    assert "user got USR1" in out
    assert "finished" not in out
    assert out.index("user got USR1") < out.index("ray head stopped") < out.index("requeued")
    assert ENTRYPOINT_END_MARKER not in out  # the agent is not told the job ended
    assert scontrol == "requeue 4242\n"
    assert status != 0


def test_ray_job_warned_while_ray_starts_is_requeued_once_its_driver_runs(tmp_path: Path) -> None:
    """The warning may come before the entrypoint runs (SLURM checks time limits every 30 s): the
    trap, set before Ray starts, keeps it and forwards it as soon as the driver has started."""
    status, out, scontrol = run_wrapper(tmp_path, None, signal_after=0.5, kind="ray-job", ready_after=1.5)
    assert "running the entrypoint" in out
    assert "finished" not in out
    assert "requeued" in out
    assert scontrol == "requeue 4242\n"
    assert status != 0


def test_ray_job_that_finishes_ends_with_its_entrypoint(tmp_path: Path) -> None:
    status, out, scontrol = run_wrapper(tmp_path, "1", signal_after=None, kind="ray-job")
    assert "restart=1" in out
    assert "finished" in out
    assert f"{ENTRYPOINT_END_MARKER} 0" in out
    assert scontrol == ""
    assert status == 0


def test_ray_job_at_max_restarts_is_not_warned(tmp_path: Path) -> None:
    status, out, scontrol = run_wrapper(tmp_path, "2", signal_after=1.5, kind="ray-job")
    assert "max_restarts (2) reached: not requeued" in out
    assert "user got USR1" not in out
    assert "finished" in out
    assert scontrol == ""
    assert status == 0


def test_the_checkpoint_directory_is_quoted() -> None:
    script = render_batch_script(
        job_id=uuid4(), spec=spec(), paths=JobPaths(workdir="/w/a b;$(id)", job_id=uuid4())
    )
    assert "export CLOUDHPC_CHECKPOINT_DIR='/w/a b;$(id)/jobs/" in script


# ---- the agent's restart count


class CountingBackend:
    """Answers `restart_counts` as SLURM would (`counts`), counting the calls."""

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts
        self.calls = 0

    async def restart_counts(self, native_ids: Sequence[str]) -> Mapping[str, int]:
        self.calls += 1
        return {i: self.counts[i] for i in native_ids if i in self.counts}


def observe(state: JobState, native: str, started: int | None = None) -> Observation:
    at = (
        datetime(2026, 12, 5, 12, 0, tzinfo=UTC) + timedelta(seconds=started) if started is not None else None
    )
    return Observation(state=state, native_state=native, started_at=at)


@pytest.mark.parametrize("answers", [{"7": 1}, {}])
async def test_one_restart_counted_once_through_its_states(answers: dict[str, int]) -> None:
    """RUNNING, REQUEUED, PENDING, RUNNING again, COMPLETED: one restart, asked of SLURM when it is
    seen and at the end (a checkpoint job), and one more than known when SLURM has no answer."""
    backend = CountingBackend(answers)
    agent = Agent("c", ClusterConfig(backend="local"), backend=backend, channel=None, workdir="/w")  # type: ignore[arg-type]
    tracked = _Tracked(job=job_from(spec()), native_id="7")
    seen = [
        await agent._restarts(tracked, observe(JobState.RUNNING, "RUNNING", 0)),
        await agent._restarts(tracked, observe(JobState.QUEUED, "REQUEUED")),
        await agent._restarts(tracked, observe(JobState.QUEUED, "PENDING")),
        await agent._restarts(tracked, observe(JobState.RUNNING, "RUNNING", 200)),
        await agent._restarts(tracked, observe(JobState.COMPLETED, "COMPLETED", 200)),
    ]
    assert seen == [None, 1, 1, 1, 1]
    assert backend.calls == 2


async def test_a_missed_run_is_counted_from_slurm() -> None:
    """The poll saw neither the requeue nor the wait: a later start is a restart, SLURM says how many."""
    backend = CountingBackend({"7": 2})
    agent = Agent("c", ClusterConfig(backend="local"), backend=backend, channel=None, workdir="/w")  # type: ignore[arg-type]
    tracked = _Tracked(job=job_from(spec()), native_id="7")
    assert await agent._restarts(tracked, observe(JobState.RUNNING, "RUNNING", 0)) is None
    assert await agent._restarts(tracked, observe(JobState.RUNNING, "RUNNING", 300)) == 2
