"""The example pipeline's pure parts: data loading and splitting, metrics, the gate, the job spec,
the timing breakdown, and the KFP components' interface (no servers).

The original's defects each have a test here: the gate that passed when metrics were missing, the
training job that could read the test split, the evaluation on the training set.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import struct
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from cloudhpc.domain.jobs import Job, JobSpec, Resources
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import JobFailed
from cloudhpc.pipelines.fmnist import data as fdata
from cloudhpc.pipelines.fmnist.evaluate import DEFAULT_THRESHOLDS, check_gate, classification_metrics
from cloudhpc.pipelines.fmnist.hpc_job import HPC_JOB, HpcJob
from cloudhpc.pipelines.fmnist.steps import object_url, stage_breakdown, training_job_spec
from cloudhpc.pipelines.fmnist.train import HParams, load_train_file
from cloudhpc.pipelines.runner import JobOutcome, job_timings
from tests.jobs import job_from

REPO = Path(__file__).resolve().parents[2]


def idx_bytes(array: np.ndarray, *, compress: bool = True) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    return gzip.compress(raw) if compress else raw


def write_fake_fmnist(directory: Path, n_train: int = 60, n_test: int = 20) -> None:
    """Fashion-MNIST's four published files, tiny: class k images are filled with the value 10*k."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = (labels[:, None, None] * 10 + rng.integers(0, 5, (n, 28, 28))).astype(np.uint8)
        (directory / f"{split}-images-idx3-ubyte.gz").write_bytes(idx_bytes(images))
        (directory / f"{split}-labels-idx1-ubyte.gz").write_bytes(idx_bytes(labels))


# ---- data --------------------------------------------------------------------------------------


def test_parse_idx_round_trip_gzipped_or_not() -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(fdata.parse_idx(idx_bytes(array)), array)
    assert np.array_equal(fdata.parse_idx(idx_bytes(array, compress=False)), array)
    with pytest.raises(ValueError, match="magic"):
        fdata.parse_idx(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="promises"):
        fdata.parse_idx(idx_bytes(array, compress=False)[:-1])


def test_fashion_mnist_from_a_file_url_keeps_its_test_split(tmp_path: Path) -> None:
    write_fake_fmnist(tmp_path)
    splits = fdata.load_dataset(f"file://{tmp_path}", val_fraction=0.2)
    assert splits.source.name == "fashion-mnist"
    assert not splits.source.offline
    assert splits.counts == {"train": 50, "validation": 10, "test": 20}  # the official 20 stay the test split
    assert splits.x_train.shape[1:] == (28, 28)
    assert splits.source.classes[0] == "T-shirt/top"


def test_offline_falls_back_to_digits_and_says_so(tmp_path: Path) -> None:
    splits = fdata.load_dataset(f"file://{tmp_path}/missing")
    assert splits.source.name == "digits"
    assert splits.source.offline
    assert splits.source.note.startswith("OFFLINE: Fashion-MNIST could not be read from file://")
    assert "digits" in splits.source.note
    assert "not a Fashion-MNIST accuracy" in splits.source.note
    assert sum(splits.counts.values()) == 1797
    assert splits.x_train.shape[1:] == (28, 28)
    assert splits.x_train.dtype == np.uint8
    assert "no data URL was configured" in fdata.load_dataset("").source.note


def test_splits_are_disjoint_stratified_and_seeded() -> None:
    a = fdata.load_dataset(None, seed=7)
    b = fdata.load_dataset(None, seed=7)
    assert all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("x_train", "x_val", "x_test"))
    rows = {name: {arr.tobytes() for arr in getattr(a, f"x_{name}")} for name in ("train", "val", "test")}
    # digits has a few duplicate images; disjointness is about examples, so compare the counts
    assert len(a.y_train) + len(a.y_val) + len(a.y_test) == 1797
    assert len(rows["test"] & rows["train"]) <= 5
    for labels in (a.y_train, a.y_val, a.y_test):
        counts = np.bincount(labels, minlength=10)
        assert counts.min() > 0
        assert counts.max() / counts.min() < 1.5


def test_train_file_never_holds_the_test_split(tmp_path: Path) -> None:
    splits = fdata.load_dataset(None, train_limit=200, test_limit=50)
    paths = fdata.write_splits(splits, tmp_path)
    with np.load(paths["train"]) as train:
        assert sorted(train.files) == ["x_train", "x_val", "y_train", "y_val"]
    with np.load(paths["test"]) as test:
        assert sorted(test.files) == ["x_test", "y_test"]
    meta = json.loads(paths["meta"].read_text())
    assert meta["source"]["name"] == "digits"
    assert meta["counts"]["test"] == 50
    # The training job refuses a file that holds a test split (the original trained on it once).
    with pytest.raises(ValueError, match="must never see it"):
        load_train_file(paths["test"])
    assert len(load_train_file(paths["train"])["y_train"]) == meta["counts"]["train"]


# ---- metrics and the gate ----------------------------------------------------------------------


def test_classification_metrics() -> None:
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0])
    m = classification_metrics(y_true, y_pred, classes=3)
    assert m["test_accuracy"] == pytest.approx(4 / 6)
    assert m["test_class_1_precision"] == pytest.approx(2 / 3)
    assert m["test_class_0_recall"] == pytest.approx(1 / 2)
    assert m["test_macro_recall"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert m["test_examples"] == 6
    collapsed = classification_metrics(y_true, np.zeros(6, dtype=np.int64), classes=3)
    assert collapsed["test_class_1_precision"] == 0.0  # never predicted: 0, not NaN
    assert collapsed["test_macro_precision"] < 0.2


def test_gate_passes_only_when_every_threshold_is_met_by_a_logged_metric() -> None:
    good = {"test_accuracy": 0.9, "test_macro_precision": 0.85, "test_macro_recall": 0.81}
    assert check_gate(good, DEFAULT_THRESHOLDS).passed
    low = check_gate({**good, "test_accuracy": 0.79}, DEFAULT_THRESHOLDS)
    assert not low.passed
    assert low.failures == ["test_accuracy = 0.7900 < 0.8"]
    # The original's gate skipped missing metrics, so a run that logged nothing passed.
    missing = check_gate({}, DEFAULT_THRESHOLDS)
    assert not missing.passed
    assert len(missing.failures) == 3
    assert all("was not logged" in f for f in missing.failures)
    assert not check_gate({**good, "test_accuracy": math.nan}, DEFAULT_THRESHOLDS).passed
    assert not check_gate(good, {}).passed  # a gate that checks nothing passes nothing
    assert "FAILED" in low.summary()


# ---- the training job ---------------------------------------------------------------------------


def test_training_job_spec_is_a_valid_ray_job() -> None:
    spec = training_job_spec(
        name="fmnist-train",
        cluster="testbed",
        train_url="s3://bucket/pipelines/fmnist/1/train.npz",
        run_id="abc123",
        hp=HParams(epochs=2),
        hpc_job=HpcJob.from_parameter({"resources": {"nodes": 2, "cpus_per_task": 4, "partition": "medium"}}),
        mlflow_import="10.0.0.5:5000",
    )
    job = JobSpec.model_validate(spec)
    assert job.kind.value == "ray-job"
    assert job.ray is not None
    assert job.ray.entrypoint is not None
    assert job.ray.entrypoint.startswith("python train_fmnist.py --data=data/train.npz")
    assert "--epochs=2" in job.ray.entrypoint
    assert job.ray.workers.nodes == 1
    assert job.ray.head.cpus_per_task == job.ray.workers.cpus_per_task == 4
    assert job.resources == Resources(nodes=2, cpus_per_task=4, time="00:30:00", partition="medium")
    assert job.environment.packages == ["ray[default,train]", "torch", "mlflow-skinny", "numpy"]
    assert [(i.name, i.host, i.port) for i in job.ray.import_] == [("mlflow", "10.0.0.5", 5000)]
    assert job.env["MLFLOW_RUN_ID"] == "abc123"
    assert "MLFLOW_TRACKING_URI" not in job.env
    assert job.files["data/train.npz"] == "s3://bucket/pipelines/fmnist/1/train.npz"
    # The script travels inline and imports nothing from cloudhpc (the cluster has no cloudhpc).
    source = job.files["train_fmnist.py"]
    assert "def main(" in source
    assert not re.search(r"^\s*(from|import) cloudhpc", source, re.MULTILINE)
    direct = training_job_spec(
        name="x",
        cluster="local",
        train_url="file:///o/t.npz",
        run_id="r",
        hp=HParams(),
        job_tracking_uri="http://m",
    )
    assert direct["env"]["MLFLOW_TRACKING_URI"] == "http://m"
    assert "import" not in direct["ray"]
    assert direct["resources"] == HPC_JOB["resources"]
    with pytest.raises(ValueError, match="needs MLflow"):
        training_job_spec(name="x", cluster="local", train_url="file:///t", run_id="r", hp=HParams())


def test_the_hpc_job_parameter_is_validated_with_one_set_of_defaults() -> None:
    assert HpcJob.from_parameter({}).as_parameter() == HPC_JOB
    assert HpcJob.from_parameter(None) == HpcJob()
    # what KFP hands a step: numbers of a struct parameter arrive as floats
    job = HpcJob.from_parameter(
        {"resources": {"nodes": 1.0, "time": "00:15:00"}, "environment": {"packages": []}}
    )
    assert (job.nodes, job.cpus_per_node, job.resources.time) == (1, 4, "00:15:00")
    assert job.environment.packages == []
    with pytest.raises(ValidationError, match=r"resources\.time"):
        HpcJob.from_parameter({"resources": {"time": "half an hour"}})
    with pytest.raises(ValidationError, match="resourcs"):
        HpcJob.from_parameter({"resourcs": {"nodes": 2}})
    with pytest.raises(ValidationError, match="partition"):
        HpcJob.from_parameter({"resources": {"partition": "a b"}})


def test_object_urls(tmp_path: Path) -> None:
    assert object_url("s3://bucket/prefix/", "a/b.npz") == "s3://bucket/prefix/a/b.npz"
    assert object_url(f"file://{tmp_path}", "k") == f"file://{tmp_path.resolve()}/k"


def _job(**times: datetime | None) -> Job:
    spec = JobSpec.model_validate({"name": "j", "cluster": "c", "script": "true"})
    return job_from(spec, state=JobState.COMPLETED, **times)


def test_stage_breakdown_adds_up() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    job = _job(
        created_at=t0,
        submitted_at=t0 + timedelta(seconds=2),
        started_at=t0 + timedelta(seconds=12),
        ended_at=t0 + timedelta(seconds=60),
    )
    assert job_timings(job) == {"staging": 2.0, "queue_wait": 10.0, "run": 48.0, "accept_to_end": 60.0}
    outcome = JobOutcome(
        job=job, accounting=None, artifacts=[], timings={**job_timings(job), "collection": 1.5}
    )
    start = (t0 + timedelta(seconds=17)).timestamp()
    metrics = {
        "timing.entrypoint_start_unix": start,
        "timing.entrypoint_end_unix": start + 40,
        "timing.training_seconds": 35.0,
        "timing.worker_startup_seconds": 8.0,
    }
    stages = stage_breakdown(outcome, metrics, step_seconds=66.0)
    assert stages["ray_start"] == pytest.approx(5.0)
    assert stages["training"] == 35.0
    assert stages["train_worker_startup"] == 8.0
    assert stages["entrypoint_other"] == pytest.approx(5.0)
    assert stages["teardown"] == pytest.approx(3.0)
    assert stages["overhead"] == pytest.approx(66.0 - 10.0 - 35.0)
    assert stages["collection"] == 1.5
    assert stages["environment"] == 2.0  # accept -> sbatch


def test_a_failed_job_raises_with_its_state() -> None:
    job = _job(created_at=None).model_copy(update={"state": JobState.FAILED, "reason": "OUT_OF_MEMORY"})
    with pytest.raises(JobFailed, match="OUT_OF_MEMORY") as caught:
        JobOutcome(job=job, accounting=None, artifacts=[]).raise_for_state()
    assert caught.value.state == "failed"
    assert caught.value.reason == "OUT_OF_MEMORY"


# ---- KFP components and the compiled pipelines --------------------------------------------------


def test_components_take_no_token_parameter() -> None:
    from cloudhpc.pipelines import components

    for name in components.__all__:
        if name == "PIPELINES_IMAGE":
            continue
        spec = getattr(components, name).component_spec
        assert not [p for p in spec.inputs or {} if "token" in p.lower() or "secret" in p.lower()], name
        assert spec.implementation.container.image == components.PIPELINES_IMAGE
    job = components.cloudhpc_job.component_spec
    assert set(job.inputs) >= {"spec", "porter_url"}
    assert set(job.outputs) == {"job_id", "state", "accounting", "artifacts", "timings"}
    train = components.fmnist_train_hpc.component_spec
    assert {"run_id", "job_id", "val_accuracy", "timings", "accounting", "artifacts"} == set(train.outputs)


def test_compiled_pipelines_are_in_sync_and_mount_the_secret() -> None:
    from cloudhpc.pipelines import compile as compile_module

    assert compile_module.main(["--check"]) == 0, "run `python -m cloudhpc.pipelines.compile`"
    docs = list(yaml.safe_load_all((REPO / "deploy" / "pipelines" / "fmnist-cloud-hpc.yaml").read_text()))
    pipeline, platform = docs[0], docs[1]
    assert pipeline["pipelineInfo"]["name"] == "fmnist-cloud-hpc"
    params = pipeline["root"]["inputDefinitions"]["parameters"]
    assert not [p for p in params if "token" in p.lower() or "password" in p.lower()]
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    train = next(v for k, v in executors.items() if "train-hpc" in k)
    mounted = {e["envVar"] for s in train["secretAsEnv"] for e in s["keyToEnv"]}
    assert mounted == {"CLOUDHPC_TOKEN"}
    assert {s["secretName"] for s in train["secretAsEnv"]} == {"cloudhpc-porter"}  # platform-up.sh's
    evaluate = next(v for k, v in executors.items() if "evaluate" in k)
    assert {s["secretName"] for s in evaluate["secretAsEnv"]} == {"cloudhpc-s3"}
