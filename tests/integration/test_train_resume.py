"""#13 item 5, the training step: with CLOUDHPC_CHECKPOINT_DIR set, `train.py` checkpoints every
epoch with Ray Train and a run started again resumes from the latest checkpoint, ending with the
same model as a run that was never stopped. As on the cluster: the entrypoint alone in a directory,
run by its own process, stopped by the requeue warning (SIGUSR1 to its process group, as the job
wrapper forwards it) after its first epoch's checkpoint is stored; a real local Ray cluster."""

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
from pathlib import Path

import pytest
import torch

from cloudhpc.pipelines.fmnist import data as fdata
from cloudhpc.pipelines.fmnist import train as train_module

EPOCHS = 8
pytestmark = pytest.mark.timeout(600)


def start(tmp: Path, data: Path, checkpoints: Path, ray_tmp: str) -> subprocess.Popen[str]:
    """The entrypoint, its local Ray cluster under `ray_tmp` (short: Ray's socket paths must fit)."""
    script = tmp / "train_fmnist.py"
    script.write_text(Path(train_module.__file__).read_text())
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "CLOUDHPC_CHECKPOINT_DIR": str(checkpoints),
        "RAY_TMPDIR": ray_tmp,
    }
    env.pop("RAY_ADDRESS", None)
    argv = [sys.executable, str(script), f"--data={data}", f"--epochs={EPOCHS}", "--workers=1", "--no-mlflow"]
    return subprocess.Popen(
        argv,
        cwd=tmp,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def stop_everything_of(ray_tmp: str) -> None:
    """What SLURM does to a job's processes at its requeue: every process of this run's Ray cluster
    (they outlive their driver, in sessions of their own) is killed, found by its temp directory."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if ray_tmp.encode() in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


def result_of(process: subprocess.Popen[str]) -> tuple[dict[str, float], str]:
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out[-3000:]
    line = next(line for line in out.splitlines() if line.startswith(train_module.RESULT_MARKER))
    return json.loads(line.removeprefix(train_module.RESULT_MARKER)), out


def weights(checkpoints: Path) -> dict[str, torch.Tensor]:
    latest = train_module.latest_checkpoint(checkpoints)
    assert latest is not None
    state: dict[str, torch.Tensor] = torch.load(latest / train_module.CHECKPOINT_FILE, weights_only=True)
    return state


def figures(checkpoints: Path) -> list[dict[str, float]]:
    """Every epoch's figures as the latest checkpoint recorded them, without the timings."""
    history = train_module.previous_history(train_module.latest_checkpoint(checkpoints))
    return [{k: v for k, v in epoch.items() if k != "epoch_seconds"} for epoch in history]


def test_a_stopped_training_resumes_to_the_same_model(tmp_path: Path) -> None:
    data = fdata.write_splits(fdata.load_dataset(None), tmp_path / "data")["train"]
    (tmp_path / "whole").mkdir()
    (tmp_path / "stopped").mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    whole, _ = result_of(start(tmp_path / "whole", data, tmp_path / "whole" / "ckpt", ray_tmp))

    stopped_dir = tmp_path / "stopped" / "ckpt"
    first = start(tmp_path / "stopped", data, stopped_dir, ray_tmp)
    deadline = time.monotonic() + 240
    while train_module.latest_checkpoint(stopped_dir) is None:
        assert first.poll() is None, first.communicate()[0][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGUSR1)  # the job wrapper's forwarded warning
    stop_everything_of(ray_tmp)
    first.communicate(timeout=60)
    assert first.returncode != 0
    done = train_module.previous_history(train_module.latest_checkpoint(stopped_dir))
    assert 1 <= len(done) < EPOCHS

    resumed, out = result_of(start(tmp_path / "stopped", data, stopped_dir, ray_tmp))
    shutil.rmtree(ray_tmp, ignore_errors=True)
    # (the stopped run's workers may have stored one more epoch while they went down)
    after = re.search(r"resuming after epoch (\d+) from ", out)
    assert after is not None, out[-3000:]
    assert len(done) <= int(after[1]) < EPOCHS
    assert resumed["epochs"] == whole["epochs"] == EPOCHS
    assert resumed["val_accuracy"] == whole["val_accuracy"]
    assert resumed["val_loss"] == whole["val_loss"]
    assert figures(stopped_dir) == figures(tmp_path / "whole" / "ckpt")
    mine, theirs = weights(stopped_dir), weights(tmp_path / "whole" / "ckpt")
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
