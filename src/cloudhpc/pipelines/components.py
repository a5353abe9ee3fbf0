"""Kubeflow Pipelines (KFP v2) components: thin wrappers over `cloudhpc.pipelines` functions.

Each component runs in the `cloudhpc/pipelines` image (deploy/docker/pipelines.Dockerfile), which
has cloudhpc with its `pipelines` extra installed; its body only imports from cloudhpc and calls
one function, so everything a step does is tested without Kubeflow.

The porter token is never a pipeline parameter (parameters are stored in the clear with the run):
the components read `CLOUDHPC_TOKEN` from the environment, which the pipelines fill from a
Kubernetes Secret with kfp-kubernetes (`use_secret_as_env`). S3 credentials, where a step reads or
writes the object store, come the same way (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`).

No `from __future__ import annotations` here, unlike the rest of cloudhpc: KFP reads the
parameter types of a component from its annotations, and postponed (string) annotations break it.
"""

import os
from typing import Any, NamedTuple

from kfp import dsl

__all__ = [
    "PIPELINES_IMAGE",
    "cloudhpc_job",
    "cloudhpc_ray_session_close",
    "cloudhpc_ray_session_open",
    "fmnist_evaluate_register",
    "fmnist_preprocess",
    "fmnist_train_cloud",
    "fmnist_train_hpc",
]

PIPELINES_IMAGE = os.environ.get("CLOUDHPC_PIPELINES_IMAGE", "cloudhpc/pipelines:0.1.0")
"""The components' image: built from deploy/docker/pipelines.Dockerfile (cloudhpc[pipelines], CPU torch)."""


@dsl.component(base_image=PIPELINES_IMAGE, install_kfp_package=False)  # type: ignore[untyped-decorator]
def cloudhpc_job(
    spec: dict[str, Any],
    porter_url: str,
    timeout_seconds: float = 0.0,
    pipeline_job_id: str = dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    task_id: str = dsl.PIPELINE_TASK_ID_PLACEHOLDER,
) -> NamedTuple(  # type: ignore[valid-type]
    "Outputs",
    [
        ("job_id", str),
        ("state", str),
        ("accounting", dict[str, Any]),
        ("artifacts", dict[str, str]),
        ("timings", dict[str, float]),
        ("outputs", dict[str, str]),
    ],
):
    """Run any cloudhpc job (batch, ray-cluster, ray-job) to its end; fail the step if it fails.

    `spec` is the API's job spec as a dict, with every field of it (`array`, `after`, `checkpoint`,
    `outputs`, `resources.qos`/`gres`/`constraint`, ...; docs/api.md). The job's state changes and
    output lines stream into this step's log. A retried step finds its job again (the idempotency
    key is the run and task id) instead of submitting a second one. Terminating the run (SIGTERM to
    this step's pod) cancels the job. `outputs` lists the files the spec's `outputs` collected, by
    their path in the job directory, with their download URLs (`artifacts` has every artifact).
    """
    import collections
    import functools

    from cloudhpc.client import Client
    from cloudhpc.pipelines.runner import run_job, stop_job_on_sigterm

    say = functools.partial(print, flush=True)
    with stop_job_on_sigterm(), Client(porter_url) as client:
        outcome = run_job(
            client,
            spec,
            say=say,
            timeout=timeout_seconds or None,
            idempotency_key=f"kfp-{pipeline_job_id}-{task_id}",
        )
    outputs = collections.namedtuple(
        "outputs", ["job_id", "state", "accounting", "artifacts", "timings", "outputs"]
    )
    return outputs(
        outcome.job_id,
        outcome.job.state.value,
        outcome.accounting or {},
        outcome.artifact_urls(),
        outcome.timings,
        outcome.output_urls(),
    )


@dsl.component(base_image=PIPELINES_IMAGE, install_kfp_package=False)  # type: ignore[untyped-decorator]
def cloudhpc_ray_session_open(
    porter_url: str,
    cluster: str,
    name: str = "ray-session",
    nodes: int = 1,
    idle_timeout: int = 600,
    time_limit: str = "01:00:00",
    hpc_job: dict[str, Any] = {},  # noqa: B006 -- KFP needs a literal default; it is never mutated
    timeout_seconds: float = 1800.0,
) -> NamedTuple("Outputs", [("session_id", str), ("address", str)]):  # type: ignore[valid-type]
    """Open (or re-attach to, by `name`) a warm Ray session for the steps after this one: a
    `ray-cluster` that their ray-jobs name (`ray_session` of `fmnist_train_hpc`), once its
    dashboard answers. `hpc_job`: `{"resources": {...}, "environment": {...}, "head": {...}}`.

    The session is left running when this step ends; it ends itself after `idle_timeout` seconds
    without a Ray job, and `cloudhpc_ray_session_close` (in an `ExitHandler`, so it runs however
    the run ends) cancels it when the run ends: the component that opened it closes it."""
    import collections

    from cloudhpc.client import Client
    from cloudhpc.sessions import ray_session

    extra = dict(hpc_job)
    with Client(porter_url) as client:
        session = ray_session(
            cluster,
            name=name,
            nodes=nodes,
            idle_timeout=idle_timeout,
            time=time_limit,
            head=extra.get("head"),
            resources=extra.get("resources"),
            environment=extra.get("environment"),
            client=client,
            timeout=timeout_seconds,
        )
        print(
            f"[cloudhpc] Ray session {session.job_id} ({'re-attached' if session.reattached else 'started'})"
        )
    outputs = collections.namedtuple("outputs", ["session_id", "address"])
    return outputs(str(session.job_id), session.address)


@dsl.component(base_image=PIPELINES_IMAGE, install_kfp_package=False)  # type: ignore[untyped-decorator]
def cloudhpc_ray_session_close(porter_url: str, session_id: str) -> None:
    """Cancel the run's Ray session (`cloudhpc_ray_session_open`'s `session_id`); one that has
    ended already (its idle timeout) is left as it is."""
    from cloudhpc.client import Client

    with Client(porter_url) as client:
        job = client.get(session_id)
        if not job.state.terminal:
            client.cancel(job)
        print(f"[cloudhpc] Ray session {session_id}: {client.get(session_id).state.value}")


@dsl.component(base_image=PIPELINES_IMAGE, install_kfp_package=False)  # type: ignore[untyped-decorator]
def fmnist_preprocess(
    dataset: dsl.Output[dsl.Dataset],
    data_url: str,
    store_url: str,
    s3_endpoint_url: str = "",
    seed: int = 42,
    val_fraction: float = 0.1,
    test_fraction: float = 0.15,
    train_limit: int = 0,
    test_limit: int = 0,
    pipeline_job_id: str = dsl.PIPELINE_JOB_ID_PLACEHOLDER,
) -> None:
    """Fetch Fashion-MNIST (or, offline, scikit-learn's digits), split train/validation/test and
    store `train.npz` (what training sees) apart from `test.npz` (what only evaluation sees).

    `dataset` (a KFP Dataset artifact) holds the manifest of the splits: their object-store URLs,
    source, counts and digests (`DataRefs.manifest`); the later steps take it as their input."""
    import functools

    from cloudhpc.pipelines.fmnist.steps import fill_artifact, preprocess, profile_store_url

    refs = preprocess(
        data_url=data_url,
        store_url=store_url or profile_store_url(),
        prefix=f"pipelines/fmnist/{pipeline_job_id}",
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        train_limit=train_limit,
        test_limit=test_limit,
        s3_endpoint_url=s3_endpoint_url or None,
        say=functools.partial(print, flush=True),
    )
    fill_artifact(dataset, refs.manifest())


@dsl.component(base_image=PIPELINES_IMAGE, install_kfp_package=False)  # type: ignore[untyped-decorator]
def fmnist_train_hpc(
    dataset: dsl.Input[dsl.Dataset],
    model: dsl.Output[dsl.Model],
    train_metrics: dsl.Output[dsl.Metrics],
    porter_url: str,
    cluster: str,
    tracking_uri: str,
    experiment: str,
    mlflow_import: str = "",
    job_tracking_uri: str = "",
    epochs: int = 5,
    batch_size: int = 32,
    learning_rate: float = 0.05,
    momentum: float = 0.9,
    seed: int = 42,
    workers: int = 0,
    cpus_per_worker: int = 1,
    hpc_job: dict[str, Any] = {},  # noqa: B006 -- KFP needs a literal default; it is never mutated
    python: str = "python",
    timeout_seconds: float = 0.0,
    ray_session: str = "",
    pipeline_job_id: str = dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    task_id: str = dsl.PIPELINE_TASK_ID_PLACEHOLDER,
) -> NamedTuple(  # type: ignore[valid-type]
    "Outputs",
    [
        ("run_id", str),
        ("job_id", str),
        ("val_accuracy", float),
        ("timings", dict[str, float]),
        ("accounting", dict[str, Any]),
        ("artifacts", dict[str, str]),
    ],
):
    """Train on the HPC cluster as a Ray Train `ray-job` through porter on `dataset`'s training
    split; log accounting and the stage timing breakdown to the MLflow run. Fails the step when the
    job fails, or at once when `hpc_job` (`{"resources": {...}, "environment": {...}}`, as in a job
    spec; what it leaves out comes from `HPC_JOB`) is not valid. Terminating the run (SIGTERM to
    this step's pod) cancels the job.

    `model` gets the trained weights with the MLflow run and the job in its metadata;
    `train_metrics` the validation accuracy and the stage timings.

    `ray_session` (the `session_id` of `cloudhpc_ray_session_open`) trains on that warm Ray session
    instead of a cluster of its own: `hpc_job`'s resources and environment are then the session's,
    and MLflow is reached by `job_tracking_uri`."""
    import collections
    import functools

    from cloudhpc.client import Client
    from cloudhpc.pipelines.fmnist.hpc_job import HpcJob
    from cloudhpc.pipelines.fmnist.steps import DataRefs, fill_training_artifacts, train_on_hpc
    from cloudhpc.pipelines.fmnist.train import HParams
    from cloudhpc.pipelines.runner import stop_job_on_sigterm

    job = HpcJob.from_parameter(hpc_job)
    data = DataRefs.from_manifest(dataset.metadata)
    with stop_job_on_sigterm(), Client(porter_url) as client:
        out = train_on_hpc(
            client,
            train_url=data.train_url,
            cluster=cluster,
            tracking_uri=tracking_uri,
            experiment=experiment,
            hp=HParams(epochs, batch_size, learning_rate, momentum, seed),
            data_note=data.note,
            workers=workers,
            cpus_per_worker=cpus_per_worker,
            hpc_job=job,
            python=python,
            mlflow_import=mlflow_import,
            job_tracking_uri=job_tracking_uri,
            timeout=timeout_seconds or None,
            idempotency_key=f"kfp-{pipeline_job_id}-{task_id}",
            say=functools.partial(print, flush=True),
            session=ray_session,
        )
    fill_training_artifacts(model, train_metrics, out, tracking_uri)
    outputs = collections.namedtuple(
        "outputs", ["run_id", "job_id", "val_accuracy", "timings", "accounting", "artifacts"]
    )
    return outputs(out.run_id, out.job_id, out.val_accuracy, out.timings, out.accounting or {}, out.artifacts)


@dsl.component(base_image=PIPELINES_IMAGE, install_kfp_package=False)  # type: ignore[untyped-decorator]
def fmnist_train_cloud(
    dataset: dsl.Input[dsl.Dataset],
    model: dsl.Output[dsl.Model],
    train_metrics: dsl.Output[dsl.Metrics],
    tracking_uri: str,
    experiment: str,
    s3_endpoint_url: str = "",
    epochs: int = 5,
    batch_size: int = 32,
    learning_rate: float = 0.05,
    momentum: float = 0.9,
    seed: int = 42,
    workers: int = 0,
    cpus_per_worker: int = 1,
) -> NamedTuple("Outputs", [("run_id", str), ("val_accuracy", float), ("timings", dict[str, float])]):  # type: ignore[valid-type]
    """The `cloud` variant's training: the same Ray Train script inside this step, on `dataset`'s
    training split; `model` and `train_metrics` as in `fmnist_train_hpc`."""
    import collections
    import functools

    from cloudhpc.pipelines.fmnist.steps import DataRefs, fill_training_artifacts, train_in_cloud
    from cloudhpc.pipelines.fmnist.train import HParams

    data = DataRefs.from_manifest(dataset.metadata)
    out = train_in_cloud(
        train_url=data.train_url,
        tracking_uri=tracking_uri,
        experiment=experiment,
        hp=HParams(epochs, batch_size, learning_rate, momentum, seed),
        data_note=data.note,
        workers=workers,
        cpus_per_worker=cpus_per_worker,
        s3_endpoint_url=s3_endpoint_url or None,
        say=functools.partial(print, flush=True),
    )
    fill_training_artifacts(model, train_metrics, out, tracking_uri)
    outputs = collections.namedtuple("outputs", ["run_id", "val_accuracy", "timings"])
    return outputs(out.run_id, out.val_accuracy, out.timings)


@dsl.component(base_image=PIPELINES_IMAGE, install_kfp_package=False)  # type: ignore[untyped-decorator]
def fmnist_evaluate_register(
    dataset: dsl.Input[dsl.Dataset],
    model: dsl.Input[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
    tracking_uri: str,
    thresholds: dict[str, float],
    registered_model_name: str,
    s3_endpoint_url: str = "",
) -> NamedTuple(  # type: ignore[valid-type]
    "Outputs", [("test_accuracy", float), ("model_version", str), ("model_uri", str)]
):
    """Score `model` on `dataset`'s held-out test split, gate on the metrics logged in MLflow (the
    model's run) and register the model with its signature. A model below a threshold fails the
    step. `metrics` gets the test metrics the gate judged (`EVALUATION_METRICS`)."""
    import collections
    import functools
    import tempfile
    from pathlib import Path

    from cloudhpc.pipelines.fmnist.evaluate import EVALUATION_METRICS, evaluate_and_register
    from cloudhpc.pipelines.fmnist.steps import DataRefs, fetch_to, log_metrics

    data = DataRefs.from_manifest(dataset.metadata)
    with tempfile.TemporaryDirectory() as tmp:
        test_path = fetch_to(data.test_url, Path(tmp), s3_endpoint_url=s3_endpoint_url or None)
        result = evaluate_and_register(
            tracking_uri=tracking_uri,
            run_id=str(model.metadata["mlflow_run_id"]),
            test_path=test_path,
            thresholds={str(k): float(v) for k, v in thresholds.items()},
            registered_model_name=registered_model_name,
            tags={"data.source": data.source},
            state_dict_path=model.path,
            say=functools.partial(print, flush=True),
        )
    log_metrics(metrics, {k: result.metrics[k] for k in EVALUATION_METRICS if k in result.metrics})
    outputs = collections.namedtuple("outputs", ["test_accuracy", "model_version", "model_uri"])
    return outputs(result.metrics["test_accuracy"], result.model_version or "", result.model_uri or "")
