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
from typing import Any

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from cloudhpc.domain.jobs import Job, JobSpec, Resources
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import JobFailed, PipelineError
from cloudhpc.pipelines.fmnist import data as fdata
from cloudhpc.pipelines.fmnist.evaluate import DEFAULT_THRESHOLDS, check_gate, classification_metrics
from cloudhpc.pipelines.fmnist.hpc_job import HPC_JOB, HpcJob
from cloudhpc.pipelines.fmnist.steps import object_url, profile_store_url, stage_breakdown, training_job_spec
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


def test_the_training_job_checkpoints_when_the_parameter_asks() -> None:
    """`hpc_job.checkpoint` (a pipeline parameter) becomes the ray-job's `checkpoint`; without it
    there is none. A checkpoint that does not fit the time limit fails the step before submitting."""
    asked = HpcJob.from_parameter(
        {"resources": {"time": "00:10:00"}, "checkpoint": {"warn_before": "2m", "max_restarts": 2.0}}
    )
    spec = training_job_spec(
        name="x", cluster="testbed", train_url="file:///t", run_id="r", hp=HParams(),
        hpc_job=asked, job_tracking_uri="http://m",
    )  # fmt: skip
    job = JobSpec.model_validate(spec)
    assert job.checkpoint is not None
    assert (job.checkpoint.warn_before, job.checkpoint.max_restarts) == (120, 2)
    assert HpcJob.from_parameter({}).checkpoint is None
    assert "checkpoint" not in HPC_JOB
    too_late = HpcJob.from_parameter({"resources": {"time": "1"}, "checkpoint": {"warn_before": "2m"}})
    with pytest.raises(ValidationError, match="shorter than the time limit"):
        training_job_spec(
            name="x", cluster="testbed", train_url="file:///t", run_id="r", hp=HParams(),
            hpc_job=too_late, job_tracking_uri="http://m",
        )  # fmt: skip


def test_the_outcome_lists_the_collected_outputs() -> None:
    """What the cloudhpc_job component returns as `outputs`: the collected files by their path in the
    job directory (the artifact name's `%XX` decoded), with their download URL."""
    artifacts = [
        {"name": "output.log", "url": "http://p/a/output.log"},
        {"name": "outputs/results/a.csv", "url": "http://p/a/outputs/results/a.csv"},
        {"name": "outputs/100%25 done.txt", "url": "http://p/a/outputs/100%2525%20done.txt"},
        {"name": "outputs.json", "url": "http://p/a/outputs.json"},
    ]
    outcome = JobOutcome(job=_job(created_at=None), accounting=None, artifacts=artifacts)
    assert outcome.output_urls() == {
        "results/a.csv": "http://p/a/outputs/results/a.csv",
        "100% done.txt": "http://p/a/outputs/100%2525%20done.txt",
    }


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
    assert set(job.outputs) == {"job_id", "state", "accounting", "artifacts", "timings", "outputs"}
    train = components.fmnist_train_hpc.component_spec
    assert {"run_id", "job_id", "val_accuracy", "timings", "accounting", "artifacts"} | {
        "model",
        "train_metrics",
    } == set(train.outputs)


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


# ---- KFP artifacts, resources, and the SDK against the deployed backend -------------------------


def _compiled(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The committed pipeline `name` (checked in sync with the code above): its IR and its
    Kubernetes platform spec."""
    docs = list(yaml.safe_load_all((REPO / "deploy" / "pipelines" / f"{name}.yaml").read_text()))
    return docs[0], docs[1]


def _artifact_types(definitions: dict[str, Any]) -> dict[str, str]:
    return {k: v["artifactType"]["schemaTitle"] for k, v in (definitions.get("artifacts") or {}).items()}


@pytest.mark.parametrize("name", ["fmnist-cloud-hpc", "fmnist-cloud"])
def test_compiled_steps_hand_on_dataset_model_and_metrics_artifacts(name: str) -> None:
    """What the Kubeflow UI shows as metrics and lineage: preprocess -> Dataset -> train ->
    Model (+ training Metrics) -> evaluate -> Metrics, the Dataset going to evaluation too."""
    pipeline, _ = _compiled(name)
    train = "fmnist-train-hpc" if name == "fmnist-cloud-hpc" else "fmnist-train-cloud"
    comps = pipeline["components"]

    def io(comp: str) -> tuple[dict[str, str], dict[str, str]]:
        spec = comps[f"comp-{comp}"]
        return _artifact_types(spec.get("inputDefinitions", {})), _artifact_types(
            spec.get("outputDefinitions", {})
        )

    assert io("fmnist-preprocess") == ({}, {"dataset": "system.Dataset"})
    assert io(train) == (
        {"dataset": "system.Dataset"},
        {"model": "system.Model", "train_metrics": "system.Metrics"},
    )
    assert io("fmnist-evaluate-register") == (
        {"dataset": "system.Dataset", "model": "system.Model"},
        {"metrics": "system.Metrics"},
    )
    tasks = pipeline["root"]["dag"]["tasks"]

    def producers(task: str) -> dict[str, tuple[str, str]]:
        artifacts = tasks[task]["inputs"].get("artifacts") or {}
        return {
            k: (v["taskOutputArtifact"]["producerTask"], v["taskOutputArtifact"]["outputArtifactKey"])
            for k, v in artifacts.items()
        }

    assert producers(train) == {"dataset": ("fmnist-preprocess", "dataset")}
    assert producers("fmnist-evaluate-register") == {
        "dataset": ("fmnist-preprocess", "dataset"),
        "model": (train, "model"),
    }
    # the splits travel only inside the Dataset: no URL parameter beside it
    for task in (train, "fmnist-evaluate-register"):
        assert not {"train_url", "test_url", "run_id"} & set(tasks[task]["inputs"].get("parameters") or {})


@pytest.mark.parametrize("name", ["fmnist-cloud-hpc", "fmnist-cloud"])
def test_every_compiled_step_requests_cpu_and_memory(name: str) -> None:
    """Each executor carries the requests and the memory limit of `STEP_RESOURCES` for its step, in
    the fields the backend turns into the pod's `resources`."""
    from cloudhpc.pipelines.fmnist.pipeline import STEP_RESOURCES

    pipeline, _ = _compiled(name)
    step_of = {
        "exec-fmnist-preprocess": "preprocess",
        "exec-fmnist-train-hpc": "train-hpc",
        "exec-fmnist-train-cloud": "train-cloud",
        "exec-fmnist-evaluate-register": "evaluate",
    }
    executors = pipeline["deploymentSpec"]["executors"]
    assert len(executors) == 3
    for executor, spec in executors.items():
        want = STEP_RESOURCES[step_of[executor]]
        resources = spec["container"].get("resources")
        assert resources is not None, f"{executor} requests nothing"
        assert resources["resourceCpuRequest"] == want.cpu, executor
        assert resources["resourceMemoryRequest"] == want.memory, executor
        assert resources["resourceMemoryLimit"] == want.memory_limit, executor
        assert "resourceCpuLimit" not in resources, f"{executor}: no CPU limit (it throttles)"
    # and each memory limit is above its request, so a step is not OOM-killed at its request
    for res in STEP_RESOURCES.values():
        assert _quantity(res.memory_limit) > _quantity(res.memory)


def _quantity(text: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "m": 1e-3, "": 1}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", text).groups()  # type: ignore[union-attr]
    return float(number) * units[unit]


def _pins() -> dict[str, str]:
    """The KFP packages as pyproject.toml pins them (`name==version`)."""
    text = (REPO / "pyproject.toml").read_text()
    return dict(re.findall(r'"(kfp(?:-[a-z-]+)?)==([0-9.]+)"', text))


def test_the_kfp_sdk_matches_the_deployed_backend() -> None:
    """The SDK that compiled deploy/pipelines/ is the release line of the KFP backend that
    deploy/kustomize installs, with the IR (kfp-pipeline-spec) and API client (kfp-server-api) of
    the same release: a newer SDK may write IR fields an older backend does not know, and its
    driver drops unknown fields silently (docs/pipelines.md). Bump the manifests' ref and the pins
    together, then recompile."""
    from importlib.metadata import version

    pins = _pins()
    assert set(pins) == {"kfp", "kfp-kubernetes", "kfp-pipeline-spec", "kfp-server-api"}
    assert len(set(pins.values())) == 1, f"one release for all KFP packages: {pins}"
    for package, pinned in pins.items():
        assert version(package) == pinned, f"{package} {version(package)} installed, {pinned} pinned"
    refs = set(
        re.findall(
            r"github\.com/kubeflow/pipelines//\S+\?ref=([0-9.]+)",
            (
                REPO / "deploy" / "kustomize" / "upstream" / "standalone-kfp" / "kustomization.yaml"
            ).read_text(),
        )
    )
    assert len(refs) == 1, refs
    backend = refs.pop()
    assert pins["kfp"].split(".")[:2] == backend.split(".")[:2], f"SDK {pins['kfp']}, backend {backend}"
    for name in ("fmnist-cloud-hpc", "fmnist-cloud"):
        pipeline, _ = _compiled(name)
        assert pipeline["sdkVersion"] == f"kfp-{pins['kfp']}", name
        assert pipeline["schemaVersion"] == "2.1.0", name


def test_the_steps_fill_their_artifacts(tmp_path: Path) -> None:
    """What the components write into their KFP artifacts (the real `dsl` classes, no runner): the
    Dataset's manifest survives the trip to the next step, metrics skip NaN (a protobuf Struct
    has none), the Model says where it came from."""
    from kfp import dsl

    from cloudhpc.pipelines.fmnist.steps import (
        DataRefs,
        TrainOutcome,
        fill_artifact,
        log_metrics,
        model_metadata,
    )

    refs = DataRefs(
        train_url="s3://b/p/train.npz",
        test_url="s3://b/p/test.npz",
        meta_url="s3://b/p/meta.json",
        source="digits",
        offline=True,
        note="OFFLINE",
        counts={"train": 10, "validation": 2, "test": 3},
        meta={"sha256": {"train.npz": "ab"}, "image_shape": [1, 28, 28], "unrelated": 1},
    )
    dataset = dsl.Dataset(uri=str(tmp_path / "pre" / "dataset"))
    fill_artifact(dataset, refs.manifest())
    written = json.loads(Path(dataset.path).read_text())
    assert written == dataset.metadata
    assert written["sha256"] == {"train.npz": "ab"}
    assert "unrelated" not in written
    back = DataRefs.from_manifest(json.loads(json.dumps(dataset.metadata)))
    assert back == DataRefs(
        **{**refs.__dict__, "meta": {"sha256": {"train.npz": "ab"}, "image_shape": [1, 28, 28]}}
    )

    metrics = dsl.Metrics(uri=str(tmp_path / "train" / "metrics"))
    logged = log_metrics(metrics, {"val_accuracy": 0.9, "stage_training_seconds": float("nan")})
    assert logged == {"val_accuracy": 0.9} == metrics.metadata
    assert json.loads(Path(metrics.path).read_text()) == {"val_accuracy": 0.9}

    meta = model_metadata(
        TrainOutcome(run_id="r1", val_accuracy=0.91, timings={}, job_id="j1"), "http://mlflow"
    )
    assert meta["mlflow_run_id"] == "r1"
    assert meta["mlflow_artifact"] == "runs:/r1/checkpoint/state_dict.pt"
    assert meta["framework"] == "pytorch"
    assert meta["cloudhpc_job_id"] == "j1"
    assert "val_accuracy" not in model_metadata(TrainOutcome("r2", float("nan"), {}), "http://mlflow")


def test_a_run_without_store_url_writes_under_its_profiles_own_prefix(tmp_path: Path) -> None:
    """The profile's S3 keys may write only `users/<namespace>/`: the bucket's root (the old default)
    was refused at the first write."""
    namespace_file = tmp_path / "namespace"
    namespace_file.write_text("alice\n")
    assert profile_store_url(namespace_file=namespace_file) == "s3://cloudhpc/users/alice"
    assert profile_store_url("s3://other/pre", namespace_file=namespace_file) == "s3://other/pre/users/alice"
    with pytest.raises(PipelineError, match="store_url"):
        profile_store_url(namespace_file=tmp_path / "missing")
    namespace_file.write_text("\n")
    with pytest.raises(PipelineError, match="no namespace"):
        profile_store_url(namespace_file=namespace_file)
