"""The training script and the evaluation step against the testbed's real MLflow server
(runs in PostgreSQL, artifacts proxied to the S3 server) and a real local Ray cluster.

The training runs as its own process, as on the cluster: `python train_fmnist.py ...`, so its exit
status is what a SLURM job would report. `RAY_AUTH_MODE=disabled` keeps the local Ray cluster from
writing a token into the home directory (Ray does on a first `ray.init()`), which would switch
token authentication on for every later `ray start` of this user.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from cloudhpc.exceptions import QualityGateFailed
from cloudhpc.pipelines.fmnist import data as fdata
from cloudhpc.pipelines.fmnist import train as train_module
from cloudhpc.pipelines.fmnist.evaluate import evaluate_and_register
from tests.testbed import Testbed

EPOCHS = 3


@dataclass
class Trained:
    client: MlflowClient
    run_id: str
    paths: dict[str, Path]
    process: subprocess.CompletedProcess[str]


def run_training(
    tmp: Path, data: Path, run_id: str, tracking_uri: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    """The entrypoint as the job runs it: a copy of the file, alone in a directory, no cloudhpc import."""
    script = tmp / "train_fmnist.py"
    script.write_text(Path(train_module.__file__).read_text())
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_RUN_ID", None)  # the run by --run-id as the cloud step gives it (jobs get the variable)
    return subprocess.run(
        [
            sys.executable,
            str(script),
            f"--data={data}",
            f"--epochs={EPOCHS}",
            "--workers=2",
            f"--storage-path={tmp / 'ray_results'}",
            f"--run-id={run_id}",
            *extra,
        ],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.fixture(scope="module")
def trained(testbed: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    tmp = tmp_path_factory.mktemp("pipeline-mlflow")
    paths = fdata.write_splits(fdata.load_dataset(None), tmp / "data")
    client = MlflowClient(testbed.mlflow_url)
    experiment = client.get_experiment_by_name("it-pipeline") or client.get_experiment(
        client.create_experiment("it-pipeline")
    )
    assert experiment is not None
    run_id = client.create_run(experiment.experiment_id).info.run_id
    process = run_training(tmp, paths["train"], run_id, testbed.mlflow_url)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    return Trained(client, run_id, paths, process)


@pytest.mark.timeout(300)
def test_training_logs_parameters_and_every_epoch_as_it_goes(trained: Trained, testbed: Testbed) -> None:
    run = trained.client.get_run(trained.run_id)
    params = run.data.params
    assert params["hp.epochs"] == str(EPOCHS)
    assert params["hp.batch_size"] == "32"
    assert params["ray.num_workers"] == "2"  # data-parallel: both CPU slots, not one task
    assert params["data.train_examples"] == str(len(np.load(trained.paths["train"])["y_train"]))
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "epoch_seconds"):
        history = trained.client.get_metric_history(trained.run_id, key)
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, EPOCHS + 1)), key
    # Live: each epoch was logged when it ended, before the script finished.
    end_ms = run.data.metrics["timing.entrypoint_end_unix"] * 1000
    stamps = sorted(m.timestamp for m in trained.client.get_metric_history(trained.run_id, "val_accuracy"))
    assert stamps[0] < stamps[-1] < end_ms
    assert run.data.metrics["timing.training_seconds"] > 0
    assert run.data.metrics["val_accuracy"] > 0.5
    assert "Ray Train: 2 data-parallel worker(s)" in trained.process.stdout
    assert f"{train_module.RESULT_MARKER} " in trained.process.stdout
    # The checkpoint went through the server's artifact proxy into the S3 bucket.
    names = [f.path for f in trained.client.list_artifacts(trained.run_id, "checkpoint")]
    assert sorted(names) == ["checkpoint/architecture.json", "checkpoint/state_dict.pt"]
    s3 = testbed.s3_client()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow").get("Contents", [])]
    assert any(trained.run_id in key and key.endswith("state_dict.pt") for key in keys)


@pytest.mark.timeout(120)
def test_a_training_error_exits_non_zero_and_fails_the_run(
    trained: Trained, testbed: Testbed, tmp_path: Path
) -> None:
    run_id = trained.client.create_run(trained.client.get_run(trained.run_id).info.experiment_id).info.run_id
    # Handing the job the test split is an error (the original once trained on it).
    process = run_training(tmp_path, trained.paths["test"], run_id, testbed.mlflow_url)
    assert process.returncode != 0
    assert "must never see it" in process.stderr
    assert trained.client.get_run(run_id).info.status == "FAILED"


@pytest.mark.timeout(180)
def test_evaluation_registers_the_model_with_its_signature(trained: Trained, testbed: Testbed) -> None:
    name = f"it-cnn-{uuid.uuid4().hex[:8]}"
    result = evaluate_and_register(
        tracking_uri=testbed.mlflow_url,
        run_id=trained.run_id,
        test_path=trained.paths["test"],
        thresholds={"test_accuracy": 0.5},
        registered_model_name=name,
        tags={"data.source": "digits"},
    )
    assert result.gate.passed
    assert result.model_version == "1"
    metrics = trained.client.get_run(trained.run_id).data.metrics
    x_test, y_test = fdata.load_test_split(trained.paths["test"])
    assert metrics["test_examples"] == len(y_test)  # the held-out split, all of it, nothing else
    assert metrics["gate_passed"] == 1.0
    version = trained.client.get_model_version(name, "1")
    assert version.run_id == trained.run_id
    assert version.tags["data.source"] == "digits"

    mlflow.set_tracking_uri(testbed.mlflow_url)
    model = mlflow.pyfunc.load_model(f"models:/{name}/1")
    inputs = model.metadata.get_input_schema().inputs
    assert list(inputs[0].shape) == [-1, 1, 28, 28]
    x = (x_test[:64].astype(np.float32) / 255.0 - 0.5) / 0.5
    predicted = np.asarray(model.predict(x[:, None, :, :])).argmax(axis=1)
    assert predicted.shape == (64,)
    assert (predicted == y_test[:64]).mean() > 0.5


@pytest.mark.timeout(180)
def test_the_gate_rejects_a_model_below_the_threshold(trained: Trained, testbed: Testbed) -> None:
    name = f"it-rejected-{uuid.uuid4().hex[:8]}"
    with pytest.raises(QualityGateFailed, match=r"test_accuracy = 0\.\d+ < 1\.01"):
        evaluate_and_register(
            tracking_uri=testbed.mlflow_url,
            run_id=trained.run_id,
            test_path=trained.paths["test"],
            thresholds={"test_accuracy": 1.01},
            registered_model_name=name,
        )
    run = trained.client.get_run(trained.run_id)
    assert run.data.metrics["gate_passed"] == 0.0
    assert run.data.tags["gate"].startswith("FAILED")
    assert trained.client.search_model_versions(f"name = '{name}'") == []
