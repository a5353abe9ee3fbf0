"""The example pipelines end to end, run by KFP's local runner (`SubprocessRunner(use_venv=False)`):
every step is a separate process, as a Kubeflow pod would be.

`cloud-hpc`: porter and the submitter as processes, SLURM on the testbed, the training as a Ray
Train `ray-job` in a cached environment built for hpcuser, MLflow imported into the job through the
bridge (the testbed's sshd), the testbed's MLflow server (PostgreSQL + S3) holding the run, its
per-epoch metrics, the job's accounting and stage timings, and the registered model.
`cloud`: the same with training in the step. Both check the KFP artifacts the steps wrote (the
Dataset's manifest, the Model's weights and metadata, the training and evaluation Metrics). Plus: a
failing training fails its step, the generic job component, and `cloudhpc demo` (the pipeline on the
embedded default) from a fresh directory.

The first cloud-hpc run builds the training environment on the testbed (Ray with Train, PyTorch
from the CPU wheel on disk, the MLflow client) when it is not cached yet, hence its long timeout.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import mlflow
import numpy as np
import pytest
import ray
import torch
from kfp import dsl, local
from mlflow.tracking import MlflowClient

from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import JobFailed
from cloudhpc.pipelines.components import cloudhpc_job, fmnist_train_hpc
from cloudhpc.pipelines.fmnist.pipeline import cloud_hpc_pipeline, cloud_pipeline
from cloudhpc.pipelines.fmnist.steps import preprocess
from cloudhpc.pipelines.fmnist.train import CNN
from tests.e2e.harness import Deployment, bridged_deployment
from tests.testbed import Testbed

TORCH_CPU = "torch==2.13.0+cpu"
HPC_PACKAGES = [f"ray[default,train]=={ray.__version__}", TORCH_CPU, "mlflow-skinny", "numpy"]
"""The testbed's training environment: PyTorch's CPU build, which pip finds in the wheels on disk (the
testbed cluster's `pip.find_links`), never PyPI's CUDA build."""
EPOCHS = 3
ENV_BUILD = 900
"""Seconds the first run may spend building the environment on the testbed."""


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, testbed: Testbed) -> Iterator[Deployment]:
    dep = bridged_deployment(tmp_path_factory.mktemp("pipeline"), testbed, "pipeline-e2e")
    dep.start("porter")
    dep.start("submitter")
    dep.scrape_with_prometheus(f"pipeline-{uuid.uuid4().hex[:8]}")
    try:
        yield dep
    finally:
        dep.stop()


@pytest.fixture
def kfp_env(
    deployment: Deployment, testbed: Testbed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """What the Kubernetes Secret gives the steps on a cluster: the token and the S3 credentials."""
    monkeypatch.setenv("CLOUDHPC_TOKEN", deployment.user_token)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", testbed.s3_access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", testbed.s3_secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # A local `ray.init()` (the cloud step) would otherwise write ~/.ray/auth_token, which turns
    # token authentication on for every later `ray start` of this user on this machine.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    return tmp_path


def inputs_url(deployment: Deployment) -> str:
    """alice's own prefix in porter's store: a job reads only its owner's objects (docs/security.md)."""
    with deployment.client() as porter:
        url: str = porter.me().inputs[0]
    return url.rstrip("/")


def hpc_params(deployment: Deployment, testbed: Testbed, **overrides: Any) -> dict[str, Any]:
    return {
        "porter_url": deployment.url,
        "cluster": "testbed",
        "tracking_uri": testbed.mlflow_url,
        "mlflow_import": testbed.mlflow_url.removeprefix("http://"),
        "store_url": inputs_url(deployment),
        "s3_endpoint_url": testbed.s3_endpoint,
        "epochs": EPOCHS,
        "hpc_job": {
            "resources": {"nodes": 1, "cpus_per_task": 2, "time": "00:20:00"},
            "environment": {"packages": HPC_PACKAGES},
        },
        "timeout_seconds": float(ENV_BUILD + 300),
        **overrides,
    }


def step_outputs(pipeline_root: Path, task: str) -> dict[str, Path]:
    """The artifact files that step `task` of the latest run wrote, by output name (KFP's local
    runner lays them out as `<pipeline root>/<run>/<task>/<output>`, as the backend does in its
    object store)."""
    runs = sorted((p for p in pipeline_root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    assert runs, f"no run under {pipeline_root}"
    return {p.name: p for p in (runs[-1] / task).iterdir()}


def check_artifacts(pipeline_root: Path, train_task: str, run_id: str, accuracy: float) -> None:
    """The Dataset, Model and Metrics artifacts of a finished run hold what their steps put there."""
    dataset = json.loads(step_outputs(pipeline_root, "fmnist-preprocess")["dataset"].read_text())
    assert dataset["train_url"].endswith("/train.npz")
    assert dataset["test_url"].endswith("/test.npz")
    assert dataset["source"] == "digits"
    assert dataset["offline"] is True
    assert dataset["counts"]["test"] > 0
    assert set(dataset["sha256"]) == {"train.npz", "test.npz"}
    trained = step_outputs(pipeline_root, train_task)
    cnn = CNN()
    cnn.load_state_dict(torch.load(trained["model"], map_location="cpu", weights_only=True))
    train_metrics = json.loads(trained["train_metrics"].read_text())
    assert 0 < train_metrics["val_accuracy"] <= 1
    assert train_metrics["stage_training_seconds"] > 0
    evaluated = json.loads(step_outputs(pipeline_root, "fmnist-evaluate-register")["metrics"].read_text())
    assert evaluated["test_accuracy"] == pytest.approx(accuracy)
    assert evaluated["gate_passed"] == 1.0
    assert {"test_macro_precision", "test_macro_recall", "test_macro_f1", "test_examples"} <= set(evaluated)
    client = MlflowClient()
    assert client.get_run(run_id).data.metrics["test_accuracy"] == pytest.approx(accuracy)


def prometheus_value(testbed: Testbed, expr: str, timeout: float = 30) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        body = httpx.get(f"{testbed.prometheus_url}/api/v1/query", params={"query": expr}, timeout=10).json()
        result: list[dict[str, Any]] = body["data"]["result"]
        if result or time.monotonic() > deadline:
            return result
        time.sleep(1)


@pytest.mark.timeout(ENV_BUILD + 600)
def test_cloud_hpc_pipeline_on_the_testbed(
    deployment: Deployment, testbed: Testbed, kfp_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_name = f"e2e-hpc-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    task = cloud_hpc_pipeline(
        **hpc_params(deployment, testbed, experiment="e2e-cloud-hpc", registered_model_name=model_name)
    )
    took = time.monotonic() - started
    accuracy = float(task.output)
    assert accuracy > 0.8
    log = capsys.readouterr().out

    # The step's log carries the job: its states and its output, line by line.
    assert "[cloudhpc] job" in log
    assert ": running" in log
    assert re.search(r"\[job\] \[train\] epoch 3: train loss", log)
    assert "[job] cloudhpc: Ray cluster ready: 1 node(s)" in log

    client = MlflowClient(testbed.mlflow_url)
    version = client.search_model_versions(f"name = '{model_name}'")[0]
    run = client.get_run(version.run_id)
    m, p = run.data.metrics, run.data.params
    # per-epoch metrics, logged from the cluster through the bridge
    assert [x.step for x in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1, 2, 3]
    assert p["ray.num_workers"] == "2"
    # the job's accounting and efficiency (sacct + seff on the testbed)
    assert p["cloudhpc.state"] == "completed"
    assert p["slurm.state"] == "COMPLETED"
    assert m["slurm.elapsed_seconds"] > 0
    assert 0 < m["slurm.cpu_efficiency"] <= 1
    assert m["slurm.alloc_cpus"] == 2
    # the stage breakdown
    for stage in (
        "environment",
        "queue_wait",
        "ray_start",
        "training",
        "collection",
        "step_wall",
        "overhead",
    ):
        assert f"stage.{stage}_seconds" in m, stage
    assert m["stage.training_seconds"] > 0
    assert m["stage.step_wall_seconds"] < took
    # the held-out test split, and a model that loads and predicts
    assert m["test_accuracy"] == pytest.approx(accuracy)
    assert m["gate_passed"] == 1.0
    mlflow.set_tracking_uri(testbed.mlflow_url)
    check_artifacts(kfp_env / "kfp", "fmnist-train-hpc", run.info.run_id, accuracy)
    model = mlflow.pyfunc.load_model(f"models:/{model_name}/{version.version}")
    x = np.zeros((2, 1, 28, 28), dtype=np.float32)
    assert np.asarray(model.predict(x)).shape == (2, 10)
    # Prometheus scraped porter's series for the job
    job_id = run.data.tags["cloudhpc.job_id"]
    series = prometheus_value(testbed, f'cloudhpc_job_run_seconds{{job_id="{job_id}"}}')
    assert series
    assert float(series[0]["value"][1]) > 0
    with deployment.client() as porter:
        assert porter.get(job_id).state == JobState.COMPLETED
        assert {"output.log", "sacct.json"} <= {a.name for a in porter.artifacts(job_id)}
    print(
        f"\ncloud-hpc pipeline {took:.1f} s; train step {m['stage.step_wall_seconds']:.1f} s, "
        f"training {m['stage.training_seconds']:.1f} s, overhead {m['stage.overhead_seconds']:.1f} s"
    )


@pytest.mark.timeout(ENV_BUILD + 300)
def test_a_training_failure_fails_the_step(deployment: Deployment, testbed: Testbed, kfp_env: Path) -> None:
    refs = preprocess(
        data_url="",
        store_url=inputs_url(deployment),
        prefix=f"pipelines/fmnist/e2e-failure-{uuid.uuid4().hex[:8]}",
        s3_endpoint_url=testbed.s3_endpoint,
    )
    params = hpc_params(deployment, testbed)
    for key in ("store_url", "s3_endpoint_url"):
        params.pop(key)
    # The test split handed to training: the script refuses it and exits 1, SLURM says FAILED. The
    # step's body, as KFP's executor calls it with the artifacts (a raise fails the step).
    dataset = dsl.Dataset(
        uri=str(kfp_env / "dataset"), metadata={**refs.manifest(), "train_url": refs.test_url}
    )
    model = dsl.Model(uri=str(kfp_env / "model"))
    with pytest.raises(JobFailed) as failed:
        fmnist_train_hpc.python_func(
            dataset=dataset,
            model=model,
            train_metrics=dsl.Metrics(uri=str(kfp_env / "train_metrics")),
            experiment="e2e-failures",
            pipeline_job_id=f"e2e-failure-{uuid.uuid4().hex[:8]}",
            task_id="train",
            **params,
        )
    assert failed.value.state == "failed"
    assert not Path(model.path).exists()  # no model from a failed training
    client = MlflowClient(testbed.mlflow_url)
    experiment = client.get_experiment_by_name("e2e-failures")
    assert experiment is not None
    run = client.search_runs(
        [experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1
    )[0]
    assert run.info.status == "FAILED"
    with deployment.client() as porter:
        job = porter.get(run.data.tags["cloudhpc.job_id"])
    assert job.state == JobState.FAILED
    assert job.exit_code == 1


@pytest.mark.timeout(300)
def test_the_job_component_runs_any_job_and_fails_with_it(deployment: Deployment, kfp_env: Path) -> None:
    spec = {"name": "kfp-batch", "cluster": "testbed", "script": "echo hello from the step\n"}
    task = cloudhpc_job(spec=spec, porter_url=deployment.url)
    assert task.outputs["state"] == "completed"
    with deployment.client() as porter:
        assert b"hello from the step" in porter.logs(task.outputs["job_id"]).data
    assert task.outputs["accounting"]["efficiency"]["state"] == "COMPLETED"
    assert "output.log" in task.outputs["artifacts"]
    assert task.outputs["timings"]["queue_wait"] >= 0
    with pytest.raises(RuntimeError, match="FAILURE"):
        cloudhpc_job(
            spec={**spec, "name": "kfp-fails", "script": "echo bye; exit 3\n"}, porter_url=deployment.url
        )


@pytest.mark.timeout(400)
def test_cloud_pipeline(testbed: Testbed, kfp_env: Path) -> None:
    model_name = f"e2e-cloud-{uuid.uuid4().hex[:8]}"
    task = cloud_pipeline(
        tracking_uri=testbed.mlflow_url,
        store_url=f"s3://{testbed.s3_bucket}",
        s3_endpoint_url=testbed.s3_endpoint,
        epochs=EPOCHS,
        experiment="e2e-cloud",
        registered_model_name=model_name,
    )
    assert float(task.output) > 0.8
    client = MlflowClient(testbed.mlflow_url)
    version = client.search_model_versions(f"name = '{model_name}'")[0]
    run = client.get_run(version.run_id)
    mlflow.set_tracking_uri(testbed.mlflow_url)
    check_artifacts(kfp_env / "kfp", "fmnist-train-cloud", run.info.run_id, float(task.output))
    assert run.data.tags["pipeline.variant"] == "cloud"
    assert run.data.tags["data.note"].startswith("OFFLINE")
    assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == EPOCHS


@pytest.mark.timeout(400)
def test_demo_runs_the_pipeline_on_the_embedded_default(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDHPC_", "AWS_", "RAY_"))}
    # A user who once ran `ray.init()` has ~/.ray/auth_token, and then every `ray start` of theirs
    # requires it: the job's readiness probe and the training driver must send it.
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    env["HOME"] = str(home)
    script = Path(sys.executable).with_name("cloudhpc")
    done = subprocess.run(
        [str(script), "demo", "--epochs", "3"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=360,
        check=False,
    )
    context = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-5000:]}"
    assert done.returncode == 0, context
    assert re.search(r"test accuracy \(held-out test split\): 0\.[89]\d+", done.stdout), context
    assert "OFFLINE" in done.stdout
    assert "registered model cloudhpc-demo-cnn version 1" in done.stdout
    assert re.search(r"MLflow run [0-9a-f]{32}", done.stdout)
    for stage in ("environment", "queue_wait", "ray_start", "training", "collection", "overhead"):
        assert re.search(rf"│ {stage} +│ +\d+\.\d │", done.stdout), stage
    for step in ("step 1/3 preprocess", "step 2/3 train on the cluster", "step 3/3 evaluate"):
        assert step in done.stderr
    assert "3 epochs logged live" in done.stdout
    # Everything it started is gone.
    server = re.search(r"stopped porter \+ agent \(pid (\d+)\)", done.stderr)
    tracker = re.search(r"stopped MLflow \(pid (\d+)\)", done.stderr)
    assert server, context
    assert tracker, context
    for pid in (int(server.group(1)), int(tracker.group(1))):
        assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    assert (tmp_path / ".cloudhpc" / "mlflow" / "mlflow.db").exists()
    pipeline_log = (tmp_path / ".cloudhpc" / "demo-pipeline.log").read_text()
    assert "Token authentication is enabled" in pipeline_log  # the job's Ray did use the token


@pytest.mark.timeout(ENV_BUILD + 300)
def test_the_example_script_runs(deployment: Deployment, testbed: Testbed) -> None:
    """examples/hpc_ray_job.py, the script version of the notebook, as a user runs it."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CLOUDHPC_")},
        "CLOUDHPC_URL": deployment.url,
        "CLOUDHPC_TOKEN": deployment.user_token,
        "MLFLOW_TRACKING_URI": testbed.mlflow_url,
        "AWS_ACCESS_KEY_ID": testbed.s3_access_key,
        "AWS_SECRET_ACCESS_KEY": testbed.s3_secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    argv = [
        sys.executable,
        str(Path(__file__).resolve().parents[2] / "examples" / "hpc_ray_job.py"),
        "--cluster=testbed",
        f"--mlflow-import={testbed.mlflow_url.removeprefix('http://')}",
        f"--s3-endpoint-url={testbed.s3_endpoint}",
        f"--epochs={EPOCHS}",
        *(f"--package={p}" for p in HPC_PACKAGES),
    ]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=ENV_BUILD + 240, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "  state: running" in done.stdout
    assert "  state: completed" in done.stdout
    assert re.search(r"epoch 3: validation accuracy 0\.\d+", done.stdout)
    assert "trained by 2 Ray Train worker(s) on 1 node(s)" in done.stdout
