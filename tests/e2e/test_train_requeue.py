"""#13 item 5 end to end: the Fashion-MNIST training step itself (`steps.train_on_hpc`, its
`ray-job` with `checkpoint`) on the testbed's SLURM, porter and the submitter as processes. SLURM
warns the job before its time limit; the wrapper forwards the warning to `train.py`, whose workers
finish the epoch they are in, store its checkpoint and stop (exit 75); the wrapper requeues; the
next run resumes from that epoch (not from epoch 0) and the job ends `completed` with one restart,
with the figures and the weights of an uninterrupted run (trained here, locally, meanwhile).

Timings (SLURM 22.05, the testbed's slurm.conf): slurmctld checks time limits every 30 s and sends
`--signal` once `warn_before + 30 s` or less is left, so a 2-minute limit with `warn_before: 90s`
warns 0 to 30 s into a run, as a 1-minute limit with 30 s would, while an unwarned last run gets 2
minutes (Ray's start alone took up to 45 s on the loaded 2-core testbed). The work is 20 epochs
paced to at least 1 s each (`min_epoch_seconds`, which changes no number): more than a run gets
before a warning at 30 s, whatever Ray's start took. The requeued job waits out SLURM's hold
(`cred_expire + 1` = 31 s on the testbed).

This replaces tests/integration/test_train_resume.py (the same stop and resume, on a local Ray,
with a signal sent by the test, 87 s in CI).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cloudhpc.domain.states import JobState
from cloudhpc.pipelines.fmnist import data as fdata
from cloudhpc.pipelines.fmnist import train as train_module
from cloudhpc.pipelines.fmnist.hpc_job import HpcJob
from cloudhpc.pipelines.fmnist.steps import train_on_hpc
from tests.e2e.harness import Deployment
from tests.e2e.test_pipeline import HPC_PACKAGES
from tests.jobs import stored_log
from tests.testbed import Testbed

pytestmark = pytest.mark.timeout(900)

HP = train_module.HParams(epochs=20, min_epoch_seconds=1.0)
HPC_JOB = {
    "resources": {"nodes": 1, "cpus_per_task": 2, "time": "2"},
    "environment": {"packages": HPC_PACKAGES},
    "checkpoint": {"warn_before": "90s", "signal": "USR1", "max_restarts": 1},
}


@contextlib.contextmanager
def uninterrupted(data: Path, where: Path) -> Iterator[subprocess.Popen[str]]:
    """The same training, never stopped, on a local Ray cluster of its own (under a short temp
    directory: Ray's socket paths must fit), niced below the job's run; its Ray processes, which
    outlive their driver, are killed afterwards (found by that directory)."""
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    script = where / "train_fmnist.py"
    script.write_text(Path(train_module.__file__).read_text())
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "CLOUDHPC_CHECKPOINT_DIR": str(where / "ckpt")}
    env["RAY_TMPDIR"] = ray_tmp
    env.pop("RAY_ADDRESS", None)
    argv = ["nice", "-n", "10", sys.executable, str(script), f"--data={data}", f"--epochs={HP.epochs}"]
    argv += ["--workers=1", "--no-mlflow"]
    process = subprocess.Popen(
        argv, cwd=where, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        yield process
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.kill()
            process.wait(timeout=10)
        for entry in Path("/proc").iterdir():
            with contextlib.suppress(OSError, ValueError):
                if entry.name.isdigit() and ray_tmp.encode() in (entry / "cmdline").read_bytes():
                    os.kill(int(entry.name), signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def result_line(text: str) -> dict[str, float]:
    lines = [line for line in text.splitlines() if line.startswith(train_module.RESULT_MARKER)]
    assert len(lines) == 1, text[-4000:]
    summary: dict[str, float] = json.loads(lines[0].removeprefix(train_module.RESULT_MARKER))
    return summary


def final_state(checkpoints: Path) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    """Every epoch's figures (without timings) and the weights of the latest checkpoint."""
    latest = train_module.latest_checkpoint(checkpoints)
    assert latest is not None, checkpoints
    history = [
        {k: v for k, v in epoch.items() if k != "epoch_seconds"}
        for epoch in train_module.previous_history(latest)
    ]
    weights: dict[str, torch.Tensor] = torch.load(latest / train_module.CHECKPOINT_FILE, weights_only=True)
    return history, weights


def test_the_training_step_is_warned_requeued_and_resumes_to_the_uninterrupted_model(
    deployment: Deployment, testbed: Testbed, tmp_path: Path
) -> None:
    data = fdata.write_splits(fdata.load_dataset(None), tmp_path / "data")["train"]
    lines: list[str] = []
    with deployment.client() as client, uninterrupted(data, tmp_path) as reference:
        out = train_on_hpc(
            client,
            train_url=client.upload(data.read_bytes(), name="train.npz"),
            cluster="testbed",
            tracking_uri=testbed.mlflow_url,
            experiment="fmnist-requeue-e2e",
            hp=HP,
            workers=1,
            hpc_job=HpcJob.from_parameter(HPC_JOB),
            job_tracking_uri=testbed.mlflow_url,
            timeout=600,
            say=lines.append,
        )
        job = client.get(out.job_id)
        text = stored_log(client, job).decode()
        whole, _ = reference.communicate(timeout=300)
        assert reference.returncode == 0, whole[-3000:]

    assert job.state == JobState.COMPLETED, (job.reason, text[-4000:])
    assert job.restarts == 1, (job.reason, text[-4000:])
    assert job.reason == "Time limit warning; requeued (restart 1 of 1): COMPLETED"
    # run 0: warned, it finished the epoch it was in, kept its checkpoint and asked to be run again
    stopped = re.search(r"stopped on the checkpoint warning after epoch (\d+), its checkpoint saved", text)
    assert stopped is not None, text[-4000:]
    assert "run 0 ended (status 75) after SIGUSR1: requeued" in text, text[-4000:]
    # run 1: from that epoch's checkpoint, not from epoch 0, and no epoch trained twice
    resumed = re.search(r"resuming after epoch (\d+) from ", text)
    assert resumed is not None, text[-4000:]
    assert 1 <= int(resumed[1]) == int(stopped[1]) < HP.epochs
    epochs = [int(n) for n in re.findall(r"^\[train\] epoch (\d+): ", text, re.MULTILINE)]
    assert epochs == list(range(1, HP.epochs + 1)), epochs
    assert text.index(f"epoch {HP.epochs}: ") > resumed.start() > stopped.start()
    # the same model as a run that was never stopped
    ours, theirs = result_line(text), result_line(whole)
    assert ours["epochs"] == theirs["epochs"] == HP.epochs
    assert (ours["val_accuracy"], ours["val_loss"]) == (theirs["val_accuracy"], theirs["val_loss"])
    assert out.val_accuracy == theirs["val_accuracy"]  # what the step logged to MLflow
    on_cluster = Path("~hpcuser").expanduser() / ".cloudhpc/jobs" / str(job.id) / "checkpoints"
    (our_history, our_weights), (their_history, their_weights) = (
        final_state(on_cluster),
        final_state(tmp_path / "ckpt"),
    )
    assert our_history == their_history
    assert our_weights.keys() == their_weights.keys()
    assert all(torch.equal(our_weights[k], their_weights[k]) for k in our_weights)


def test_a_requeue_beyond_max_restarts_ends_the_job_failed(deployment: Deployment) -> None:
    """max_restarts binds SLURM's own requeues too (here an operator's; a preemption that requeues
    takes the same path): the agent cancels the run beyond it before it starts."""
    with deployment.client() as client:
        job = client.submit(
            {
                "name": "ckpt-bound",
                "cluster": "testbed",
                "script": "#!/bin/bash\necho run $CLOUDHPC_RESTART_COUNT\nsleep 300\n",
                "resources": {"time": "10"},
                "checkpoint": {"warn_before": 60, "max_restarts": 0},
            }
        )
        deadline = time.monotonic() + 120
        while b"run 0" not in stored_log(client, job):
            assert time.monotonic() < deadline, client.get(job)
            time.sleep(0.5)
        native = client.get(job).slurm_job_id
        assert native is not None
        subprocess.run(["scontrol", "requeue", native], check=True)
        ended = client.wait(job, timeout=120)
        assert ended.state == JobState.FAILED, ended
        assert ended.restarts == 1
        assert re.fullmatch(
            r"checkpoint\.max_restarts \(0\) reached: SLURM queued it again \(restart 1: (PENDING|REQUEUED)\); "
            r"cancelled",
            ended.reason or "",
        ), ended.reason
        assert stored_log(client, ended).decode().count("run ") == 1  # no second run
    accounting = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", native, "--format=State"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert accounting.stdout.splitlines()[-1].startswith("CANCELLED"), (
        accounting.stdout
    )  # "CANCELLED by <uid>"
