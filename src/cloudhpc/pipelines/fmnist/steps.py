"""The steps of the example pipelines as plain functions: the KFP components, the demo and the
tests call these, so what a pipeline run does is testable without Kubeflow.

- `preprocess`: fetch, split, store `train.npz` / `test.npz` / `meta.json` in object storage.
- `train_on_hpc`: create the MLflow run, run the training as a `ray-job` through porter (the job
  imports the MLflow server through a bridge and logs to the run live), then log the job's
  accounting, efficiency and a stage timing breakdown to the same run.
- `train_in_cloud`: the same training in this process (the `cloud` pipeline's step).
- evaluation and registration live in `evaluate.py`.

The components hand their results on as KFP artifacts (a Dataset, a Model, Metrics) so that the
Kubeflow UI shows metrics and lineage; what goes into them is decided here (`DataRefs.manifest`,
`fill_artifact`, `export_checkpoint`), and the artifacts are duck-typed (`.path`, `.metadata`), so
this module still imports nothing from Kubeflow.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote

from cloudhpc.client import Client
from cloudhpc.domain.jobs import JobSpec
from cloudhpc.exceptions import JobFailed, PipelineError
from cloudhpc.pipelines.fmnist.data import load_dataset, read_url, write_splits
from cloudhpc.pipelines.fmnist.hpc_job import HpcJob
from cloudhpc.pipelines.fmnist.train import CHECKPOINT_FILE, HParams
from cloudhpc.pipelines.runner import JobOutcome, run_job
from cloudhpc.storage.inputs import InputScope

__all__ = [
    "CHECKPOINT_ARTIFACT",
    "TRAIN_ENTRYPOINT_FILE",
    "DataRefs",
    "TrainOutcome",
    "export_checkpoint",
    "fetch_to",
    "fill_artifact",
    "fill_training_artifacts",
    "log_metrics",
    "model_metadata",
    "object_url",
    "preprocess",
    "profile_store_url",
    "stage_breakdown",
    "train_in_cloud",
    "train_on_hpc",
    "training_job_spec",
]

Say = Callable[[str], None]

TRAIN_ENTRYPOINT_FILE = "train_fmnist.py"
"""The training script's name in the job directory (its source is shipped inline in `files`)."""

CHECKPOINT_ARTIFACT = f"checkpoint/{CHECKPOINT_FILE}"
"""Where the training script puts the weights in its MLflow run's artifacts."""

MANIFEST_KEYS = ("image_shape", "normalisation", "sha256")
"""What `meta.json` says about the splits that the Dataset artifact repeats (besides source and counts)."""


class KfpArtifact(Protocol):
    """What a KFP artifact (`dsl.Dataset`, `dsl.Model`, `dsl.Metrics`) offers a step: a local file
    that KFP uploads after the step, and metadata that the Kubeflow UI shows."""

    path: str
    metadata: dict[str, Any]


@dataclass
class DataRefs:
    train_url: str
    test_url: str
    meta_url: str
    source: str
    offline: bool
    note: str
    counts: dict[str, int]
    meta: dict[str, Any] = field(default_factory=dict)

    def manifest(self) -> dict[str, Any]:
        """The preprocessed data as the pipeline's Dataset artifact holds it: where the splits are,
        what they are and their digests. The arrays stay in the object store, where the training
        job reads them (a job reads only its owner's objects); copying them into KFP's artifact
        store too would only double the data."""
        return {
            "train_url": self.train_url,
            "test_url": self.test_url,
            "meta_url": self.meta_url,
            "source": self.source,
            "offline": self.offline,
            "note": self.note,
            "counts": dict(self.counts),
            **{k: self.meta[k] for k in MANIFEST_KEYS if k in self.meta},
        }

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> DataRefs:
        """The references back from a Dataset artifact's metadata (the steps after preprocess)."""
        return cls(
            train_url=str(manifest["train_url"]),
            test_url=str(manifest["test_url"]),
            meta_url=str(manifest.get("meta_url", "")),
            source=str(manifest.get("source", "")),
            offline=bool(manifest.get("offline", False)),
            note=str(manifest.get("note", "")),
            counts={str(k): int(v) for k, v in (manifest.get("counts") or {}).items()},
            meta={k: manifest[k] for k in MANIFEST_KEYS if k in manifest},
        )


@dataclass
class TrainOutcome:
    run_id: str
    val_accuracy: float
    timings: dict[str, float]
    job_id: str = ""
    state: str = "completed"
    accounting: dict[str, Any] | None = None
    artifacts: dict[str, str] = field(default_factory=dict)


def object_url(store_url: str, key: str) -> str:
    """The URL of `key` in the store `store_url` (`file://DIR` made absolute, or `s3://BUCKET/PREFIX`)."""
    if store_url.startswith("file://"):
        root = Path(unquote(store_url[len("file://") :])).expanduser().resolve()
        return f"file://{root}/{key}"
    return f"{store_url.rstrip('/')}/{key}"


def _open_store(store_url: str, s3_endpoint_url: str | None) -> Any:
    from cloudhpc.storage import open_object_store

    if store_url.startswith("file://"):
        root = Path(unquote(store_url[len("file://") :])).expanduser().resolve()
        store_url = f"file://{root}"
    return open_object_store(store_url, endpoint_url=s3_endpoint_url)


POD_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
"""Where Kubernetes tells a pod its namespace (a Kubeflow profile's namespace for a pipeline step)."""


def profile_store_url(bucket_url: str = "s3://cloudhpc", *, namespace_file: Path = POD_NAMESPACE_FILE) -> str:
    """The store URL a step uses when the run names none: its profile's own input prefix
    (`<bucket_url>/users/<namespace>`). A profile's S3 keys (`cloudhpc platform profile add`) may
    write only there, and porter accepts jobs' inputs only from there (the profile's porter user is
    its namespace), so the bucket's root would fail at the first write or the first HPC job."""
    try:
        namespace = namespace_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise PipelineError(
            f"store_url is empty and this step is not in a Kubernetes pod ({namespace_file}: {exc.strerror}): "
            "name your input prefix in the run's store_url (GET /api/v1/me shows it: Client().me().inputs)"
        ) from exc
    if not namespace:
        raise PipelineError(f"store_url is empty and {namespace_file} names no namespace: set store_url")
    return InputScope.from_store_url(bucket_url).owner_urls(namespace)[0].rstrip("/")


def preprocess(
    *,
    data_url: str,
    store_url: str,
    prefix: str,
    seed: int = 42,
    val_fraction: float = 0.1,
    test_fraction: float = 0.15,
    train_limit: int = 0,
    test_limit: int = 0,
    s3_endpoint_url: str | None = None,
    say: Say = print,
) -> DataRefs:
    """Fetch the data (digits when `data_url` cannot be read), split it, store it under `prefix`."""
    started = time.monotonic()
    splits = load_dataset(
        data_url or None,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        train_limit=train_limit or None,
        test_limit=test_limit or None,
        s3_endpoint_url=s3_endpoint_url,
    )
    say(f"data: {splits.source.note}")
    say(
        f"splits: {splits.counts['train']} train, {splits.counts['validation']} validation, {splits.counts['test']} test"
    )
    store = _open_store(store_url, s3_endpoint_url)
    urls: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_splits(splits, Path(tmp))
        meta = json.loads(paths["meta"].read_text())
        for name, path in paths.items():
            key = f"{prefix.strip('/')}/{path.name}"
            store.upload_file(key, path)
            urls[name] = object_url(store_url, key)
    say(
        f"stored {urls['train']} (train + validation) and {urls['test']} (held-out test) in {time.monotonic() - started:.1f} s"
    )
    return DataRefs(
        train_url=urls["train"],
        test_url=urls["test"],
        meta_url=urls["meta"],
        source=splits.source.name,
        offline=splits.source.offline,
        note=splits.source.note,
        counts=dict(splits.counts),
        meta=meta,
    )


def fill_artifact(artifact: KfpArtifact, content: Mapping[str, Any]) -> None:
    """Write `content` as the artifact's JSON file and into its metadata, so that both the file KFP
    uploads and the UI's view of the artifact say the same thing."""
    path = Path(artifact.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(content), indent=1, sort_keys=True) + "\n")
    artifact.metadata.update(content)


def log_metrics(artifact: Any, metrics: Mapping[str, float]) -> dict[str, float]:
    """Log each finite metric on a KFP `Metrics` artifact (`log_metric`, what the UI's metrics view
    reads) and write them as its JSON file; return what was logged. A NaN or an infinity is left
    out: the artifact's metadata is a protobuf Struct, which has no NaN."""
    finite = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
    for key, value in sorted(finite.items()):
        artifact.log_metric(key, value)
    fill_artifact(artifact, finite)
    return finite


def export_checkpoint(tracking_uri: str, run_id: str, destination: str | Path) -> Path:
    """Copy the run's trained weights (`CHECKPOINT_ARTIFACT`) to `destination`: the file of the
    pipeline's Model artifact, so that evaluation scores exactly the model the lineage shows."""
    client = _mlflow_client(tracking_uri)
    target = Path(destination)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(run_id, CHECKPOINT_ARTIFACT, tmp))
        target.write_bytes(local.read_bytes())
    return target


def model_metadata(out: TrainOutcome, tracking_uri: str) -> dict[str, Any]:
    """The Model artifact's metadata: where the model came from (the MLflow run and, on HPC, the
    cloudhpc job) and how to load its file."""
    meta: dict[str, Any] = {
        "framework": "pytorch",
        "format": "state_dict of cloudhpc.pipelines.fmnist.train.CNN (torch.load, weights_only)",
        "mlflow_run_id": out.run_id,
        "mlflow_tracking_uri": tracking_uri,
        "mlflow_artifact": f"runs:/{out.run_id}/{CHECKPOINT_ARTIFACT}",
    }
    if math.isfinite(out.val_accuracy):
        meta["val_accuracy"] = out.val_accuracy
    if out.job_id:
        meta["cloudhpc_job_id"] = out.job_id
    return meta


def fill_training_artifacts(model: KfpArtifact, metrics: Any, out: TrainOutcome, tracking_uri: str) -> None:
    """A train step's artifacts: `model` (a KFP Model) gets the run's weights as its file and
    `model_metadata` as its metadata; `metrics` (KFP Metrics) the validation accuracy and the stage
    timings as `stage_<name>_seconds`."""
    export_checkpoint(tracking_uri, out.run_id, model.path)
    model.metadata.update(model_metadata(out, tracking_uri))
    log_metrics(
        metrics,
        {"val_accuracy": out.val_accuracy, **{f"stage_{k}_seconds": v for k, v in out.timings.items()}},
    )


def fetch_to(url: str, directory: Path, *, s3_endpoint_url: str | None = None) -> Path:
    """Download an object (s3://, file://, https://) into `directory`, keeping its file name."""
    path = directory / url.rstrip("/").rsplit("/", 1)[-1]
    path.write_bytes(read_url(url, s3_endpoint_url=s3_endpoint_url))
    return path


def _train_args(hp: HParams, *, workers: int, cpus_per_worker: int) -> list[str]:
    return [
        f"--epochs={hp.epochs}",
        f"--batch-size={hp.batch_size}",
        f"--learning-rate={hp.learning_rate}",
        f"--momentum={hp.momentum}",
        f"--seed={hp.seed}",
        f"--workers={workers}",
        f"--cpus-per-worker={cpus_per_worker}",
        *([f"--min-epoch-seconds={hp.min_epoch_seconds}"] if hp.min_epoch_seconds else []),
    ]


def training_job_spec(
    *,
    name: str,
    cluster: str,
    train_url: str,
    run_id: str,
    hp: HParams,
    workers: int = 0,
    cpus_per_worker: int = 1,
    hpc_job: HpcJob | None = None,
    python: str = "python",
    mlflow_import: str = "",
    job_tracking_uri: str = "",
    session: str = "",
) -> dict[str, Any]:
    """The `ray-job` that trains: the data and the training script in `files`, the MLflow run in
    `env`, and MLflow reached through an import bridge (`mlflow_import` = host:port as the bridge
    host sees the server) or, where the job can reach it directly, `job_tracking_uri`. `hpc_job`
    gives its resources and environment (default: `HPC_JOB`); the spec is validated here.

    `session` (a warm Ray session's job id or name, docs/ray.md) runs the training on that running
    cluster instead: its size, environment and allocation are the session's, and MLflow must be
    reached by `job_tracking_uri` (a session's jobs have no import bridges of their own)."""
    import shlex

    job = hpc_job or HpcJob()
    nodes, cpus_per_node = job.nodes, job.cpus_per_node

    from cloudhpc.pipelines.fmnist import train as train_module

    source = Path(train_module.__file__).read_text(encoding="utf-8")
    argv = [
        python,
        TRAIN_ENTRYPOINT_FILE,
        "--data=data/train.npz",
        "--storage-path=ray_results",
        *_train_args(hp, workers=workers, cpus_per_worker=cpus_per_worker),
    ]
    # with `checkpoint` the warning goes to the entrypoint's process group: `exec` so that the bash
    # running the entrypoint is not there to die by the signal's default action (ending the run
    # before train.py stored its epoch) and the run ends with train.py's own status
    ray: dict[str, Any] = {
        "entrypoint": ("exec " if job.checkpoint is not None else "") + shlex.join(argv) + "\n",
        "head": {"cpus_per_task": cpus_per_node},
    }
    if nodes > 1:
        ray["workers"] = {"nodes": nodes - 1, "cpus_per_task": cpus_per_node}
    env = {"MLFLOW_RUN_ID": run_id, "PYTHONUNBUFFERED": "1"}
    if mlflow_import:
        host, _, port = mlflow_import.rpartition(":")
        ray["import"] = [{"name": "mlflow", "host": host, "port": int(port)}]
    elif job_tracking_uri:
        env["MLFLOW_TRACKING_URI"] = job_tracking_uri
    else:
        raise ValueError("the training job needs MLflow: give mlflow_import (host:port) or job_tracking_uri")
    spec = {
        "name": name,
        "cluster": cluster,
        "kind": "ray-job",
        "ray": ray,
        "resources": job.resources.model_dump(exclude_none=True),
        "environment": job.environment.model_dump(exclude_none=True),
        "files": {TRAIN_ENTRYPOINT_FILE: source, "data/train.npz": train_url},
        "env": env,
    }
    if job.checkpoint is not None:  # the entrypoint resumes from CLOUDHPC_CHECKPOINT_DIR (train.py)
        spec["checkpoint"] = job.checkpoint.model_dump()
    if session:
        if mlflow_import:
            raise ValueError(
                "on a session (ray.session) the job reaches MLflow by job_tracking_uri, not mlflow_import"
            )
        spec = {k: v for k, v in spec.items() if k not in ("resources", "environment")}
        spec["ray"] = {"session": session, "entrypoint": ray["entrypoint"]}
    JobSpec.model_validate(spec)  # a bad value fails this step, with the field named
    return spec


def stage_breakdown(
    outcome: JobOutcome, run_metrics: Mapping[str, float], step_seconds: float
) -> dict[str, float]:
    """Where the train step's wall time went, from the job record (SLURM's times), the training
    script's own clock (logged to MLflow) and the step's clock.

    - `environment`: accept -> sbatch (agent pickup, cached environment check or build, files staged,
      sbatch): the runner's `staging`
    - `queue_wait`: sbatch -> SLURM start
    - `ray_start`: SLURM start -> entrypoint start (environment activation, Ray head and workers up)
    - `training`: `TorchTrainer.fit` (worker startup included; `train_worker_startup` says how much)
    - `entrypoint_other`: the rest of the entrypoint (imports, connecting, uploading the model)
    - `teardown`: entrypoint end -> SLURM end (stopping Ray)
    - `collection`: SLURM end seen -> accounting and artifacts available
    - `overhead`: step wall time minus queue wait minus training: what integration costs
    """
    job = outcome.job
    names = {"staging": "environment", "queue_wait": "queue_wait", "collection": "collection"}
    out = {names[k]: v for k, v in outcome.timings.items() if k in names}
    start = run_metrics.get("timing.entrypoint_start_unix")
    end = run_metrics.get("timing.entrypoint_end_unix")
    training = run_metrics.get("timing.training_seconds")
    if job.started_at is not None and start is not None:
        out["ray_start"] = max(0.0, start - job.started_at.timestamp())
    if training is not None:
        out["training"] = training
    if "timing.worker_startup_seconds" in run_metrics:
        out["train_worker_startup"] = run_metrics["timing.worker_startup_seconds"]
    if start is not None and end is not None and training is not None:
        out["entrypoint_other"] = max(0.0, end - start - training)
    if job.ended_at is not None and end is not None:
        out["teardown"] = max(0.0, job.ended_at.timestamp() - end)
    out["step_wall"] = step_seconds
    out["overhead"] = step_seconds - out.get("queue_wait", 0.0) - out.get("training", 0.0)
    return out


def _accounting_metrics(accounting: Mapping[str, Any] | None) -> tuple[dict[str, float], dict[str, str]]:
    """MLflow metrics and params from porter's accounting record (sacct allocation row + efficiency)."""
    metrics: dict[str, float] = {}
    params: dict[str, str] = {}
    if not accounting:
        return metrics, params
    eff = accounting.get("efficiency") or {}
    for key in (
        "cpu_efficiency",
        "memory_efficiency",
        "cpu_utilized_seconds",
        "core_walltime_seconds",
        "memory_utilized_bytes",
        "memory_requested_bytes",
    ):
        if isinstance(eff.get(key), int | float):
            metrics[f"slurm.{key}"] = float(eff[key])
    records = accounting.get("records") or []
    main = next((r for r in records if not r.get("step")), records[0] if records else None)
    if main:
        for key in (
            "elapsed_seconds",
            "total_cpu_seconds",
            "alloc_cpus",
            "nodes",
            "max_rss_bytes",
            "billing",
        ):
            if isinstance(main.get(key), int | float):
                metrics[f"slurm.{key}"] = float(main[key])
        for key in ("job_id", "state", "partition", "account", "node_list"):
            if main.get(key):
                params[f"slurm.{key}"] = str(main[key])
    if eff.get("source"):
        params["slurm.efficiency_source"] = str(eff["source"])
    return metrics, params


def _mlflow_client(tracking_uri: str) -> Any:
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri)


def _start_run(tracking_uri: str, experiment: str, tags: Mapping[str, str], say: Say) -> tuple[Any, str]:
    """An MLflow client and a new run in `experiment` (created if missing), announced with `say`."""
    client = _mlflow_client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
    run_id = str(client.create_run(experiment_id, tags=dict(tags)).info.run_id)
    say(f"MLflow run {run_id} (experiment {experiment!r} at {tracking_uri})")
    return client, run_id


def train_on_hpc(
    porter: Client,
    *,
    train_url: str,
    cluster: str,
    tracking_uri: str,
    experiment: str,
    hp: HParams,
    data_note: str = "",
    workers: int = 0,
    cpus_per_worker: int = 1,
    hpc_job: HpcJob | None = None,
    python: str = "python",
    mlflow_import: str = "",
    job_tracking_uri: str = "",
    timeout: float | None = None,
    idempotency_key: str | None = None,
    say: Say = print,
    session: str = "",
) -> TrainOutcome:
    """Train on the cluster as a `ray-job` and log everything about the job to the MLflow run.

    Raises `JobFailed` when the job does not complete, after marking the run FAILED and logging the
    accounting it has, so the failure is visible in MLflow as well as in the step."""
    step_started = time.monotonic()
    mlflow_client, run_id = _start_run(
        tracking_uri,
        experiment,
        {"pipeline.variant": "cloud-hpc", "cloudhpc.cluster": cluster, "data.note": data_note[:5000]},
        say,
    )
    spec = training_job_spec(
        name="fmnist-train",
        cluster=cluster,
        train_url=train_url,
        run_id=run_id,
        hp=hp,
        workers=workers,
        cpus_per_worker=cpus_per_worker,
        hpc_job=hpc_job,
        python=python,
        mlflow_import=mlflow_import,
        job_tracking_uri=job_tracking_uri,
        session=session,
    )
    mlflow_client.log_param(
        run_id, "cloudhpc.spec", json.dumps({k: v for k, v in spec.items() if k != "files"})[:6000]
    )

    def submitted(job: Any) -> None:
        mlflow_client.set_tag(run_id, "cloudhpc.job_id", str(job.id))

    outcome = run_job(
        porter,
        spec,
        say=say,
        timeout=timeout,
        idempotency_key=idempotency_key,
        on_submitted=submitted,
        check=False,
    )
    run = mlflow_client.get_run(run_id)
    metrics, params = _accounting_metrics(outcome.accounting)
    breakdown = stage_breakdown(outcome, run.data.metrics, time.monotonic() - step_started)
    metrics |= {f"stage.{k}_seconds": v for k, v in breakdown.items()}
    params |= {"cloudhpc.job_id": outcome.job_id, "cloudhpc.state": outcome.job.state.value}
    if outcome.job.slurm_job_id:
        params["slurm.native_id"] = outcome.job.slurm_job_id
    _log_flat(mlflow_client, run_id, metrics, params)
    with tempfile.TemporaryDirectory() as tmp:
        record = {
            "job": outcome.job.model_dump(mode="json"),
            "accounting": outcome.accounting,
            "artifacts": outcome.artifacts,
            "stages": breakdown,
        }
        path = Path(tmp) / "job.json"
        path.write_text(json.dumps(record, indent=1, default=str) + "\n")
        mlflow_client.log_artifact(run_id, str(path), artifact_path="cloudhpc")
    say("stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in breakdown.items()))
    if outcome.job.state.value != "completed":
        mlflow_client.set_terminated(run_id, status="FAILED")
        outcome.raise_for_state()
    val = run.data.metrics.get("val_accuracy")
    if val is None:
        raise JobFailed(
            f"job {outcome.job_id} completed but run {run_id} has no val_accuracy: the training did not log",
            job_id=outcome.job_id,
            state=outcome.job.state.value,
        )
    return TrainOutcome(
        run_id=run_id,
        val_accuracy=float(val),
        timings=breakdown,
        job_id=outcome.job_id,
        state=outcome.job.state.value,
        accounting=outcome.accounting,
        artifacts=outcome.artifact_urls(),
    )


def _log_flat(client: Any, run_id: str, metrics: Mapping[str, float], params: Mapping[str, str]) -> None:
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    existing = client.get_run(run_id).data.params
    fresh = [Param(k, v[:6000]) for k, v in params.items() if k not in existing]
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()], params=fresh)


def train_in_cloud(
    *,
    train_url: str,
    tracking_uri: str,
    experiment: str,
    hp: HParams,
    data_note: str = "",
    workers: int = 0,
    cpus_per_worker: int = 1,
    s3_endpoint_url: str | None = None,
    say: Say = print,
) -> TrainOutcome:
    """The `cloud` pipeline's training: the same script, in this process, on a local Ray."""
    from cloudhpc.pipelines.fmnist import train as train_module

    step_started = time.monotonic()
    mlflow_client, run_id = _start_run(
        tracking_uri, experiment, {"pipeline.variant": "cloud", "data.note": data_note[:5000]}, say
    )
    with tempfile.TemporaryDirectory() as tmp:
        data = fetch_to(train_url, Path(tmp), s3_endpoint_url=s3_endpoint_url)
        argv = [
            f"--data={data}",
            f"--storage-path={Path(tmp) / 'ray_results'}",
            f"--tracking-uri={tracking_uri}",
            f"--run-id={run_id}",
            *_train_args(hp, workers=workers, cpus_per_worker=cpus_per_worker),
        ]
        try:
            code = train_module.main(argv)
        except BaseException:
            mlflow_client.set_terminated(run_id, status="FAILED")
            raise
        finally:
            _shutdown_ray()
    if code != 0:
        raise JobFailed(f"training exited {code}", state="failed")
    run = mlflow_client.get_run(run_id)
    m = run.data.metrics
    breakdown = {
        "training": m.get("timing.training_seconds", float("nan")),
        "train_worker_startup": m.get("timing.worker_startup_seconds", float("nan")),
        "step_wall": time.monotonic() - step_started,
    }
    breakdown["overhead"] = breakdown["step_wall"] - breakdown["training"]
    _log_flat(mlflow_client, run_id, {f"stage.{k}_seconds": v for k, v in breakdown.items()}, {})
    return TrainOutcome(
        run_id=run_id, val_accuracy=float(m.get("val_accuracy", float("nan"))), timings=breakdown
    )


def _shutdown_ray() -> None:
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
