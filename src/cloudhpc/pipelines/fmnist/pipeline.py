"""The two example pipelines: `fmnist-cloud-hpc` (train on the supercomputer) and `fmnist-cloud`.

Both: preprocess (cloud) -> train -> evaluate on the held-out test split, gate, register (cloud).
They differ only in where training runs, which is what the original's experiments compared.

Secrets come from Kubernetes Secrets in the run's namespace, mounted as environment variables with
kfp-kubernetes: `cloudhpc-porter` (key `CLOUDHPC_TOKEN`; scripts/platform-up.sh creates it) for the
step that talks to porter, `cloudhpc-s3` (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`) for the steps
that read or write the object store; outside Kubernetes (the KFP local runner, the demo, tests) the same variables
come from the environment. The parameter defaults name the in-cluster services of
`deploy/kustomize` (porter in `monitoring`, MLflow and its S3 in `mlflow`).

The steps hand on KFP artifacts, so the Kubeflow UI shows the lineage preprocess -> Dataset ->
train -> Model -> evaluate -> Metrics: the Dataset (the splits' manifest) goes into training and
evaluation, the Model (the trained weights, with its MLflow run) into evaluation. Each step asks
Kubernetes for the CPU and memory of `STEP_RESOURCES`.

No `from __future__ import annotations`: KFP reads parameter types from the annotations.
"""

from dataclasses import dataclass
from typing import Any

from kfp import dsl, kubernetes

from cloudhpc.pipelines.components import (
    fmnist_evaluate_register,
    fmnist_preprocess,
    fmnist_train_cloud,
    fmnist_train_hpc,
)
from cloudhpc.pipelines.fmnist.hpc_job import HPC_JOB

__all__ = [
    "PIPELINES",
    "S3_SECRET",
    "STEP_RESOURCES",
    "TOKEN_SECRET",
    "StepResources",
    "cloud_hpc_pipeline",
    "cloud_pipeline",
]

TOKEN_SECRET = "cloudhpc-porter"  # noqa: S105 -- a Secret's name, not a secret
S3_SECRET = "cloudhpc-s3"  # noqa: S105
TOKEN_ENV = {"CLOUDHPC_TOKEN": "CLOUDHPC_TOKEN"}
S3_ENV = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}

PORTER_URL = "http://porter-service.monitoring.svc.cluster.local:5555"
MLFLOW_URL = "http://mlflow.mlflow.svc.cluster.local:5000"
S3_ENDPOINT = "http://mlflow-s3.mlflow.svc.cluster.local:9000"
STORE_URL = ""
"""Empty: each step uses its profile's own prefix, `s3://cloudhpc/users/<namespace>` (`steps.profile_store_url`)."""
THRESHOLDS = {"test_accuracy": 0.8, "test_macro_precision": 0.8, "test_macro_recall": 0.8}


@dataclass(frozen=True)
class StepResources:
    """What a step's pod asks Kubernetes for (Kubernetes quantities). Requests let the scheduler
    place the pod where it fits and the profile's ResourceQuota count it; the memory limit keeps a
    runaway step from taking its node's memory. There is no CPU limit: a limit throttles a step
    even on an idle node, and the request already guarantees its share."""

    cpu: str
    memory: str
    memory_limit: str

    def apply(self, task: dsl.PipelineTask) -> None:
        task.set_cpu_request(self.cpu).set_memory_request(self.memory).set_memory_limit(self.memory_limit)


STEP_RESOURCES = {
    # Fashion-MNIST is 70,000 28x28 images (55 MB as uint8): reading, splitting and compressing them
    "preprocess": StepResources(cpu="1", memory="1Gi", memory_limit="2Gi"),
    # follows the job through porter; imports torch and MLflow to copy the weights
    "train-hpc": StepResources(cpu="250m", memory="1Gi", memory_limit="2Gi"),
    # Ray Train in the pod: one worker per CPU of the request (`workers=0`), the CNN, the data
    "train-cloud": StepResources(cpu="2", memory="4Gi", memory_limit="8Gi"),
    # loads the model and the test split, scores it, exports it with torch.export for MLflow
    "evaluate": StepResources(cpu="1", memory="2Gi", memory_limit="4Gi"),
}
"""Each step's CPU and memory (docs/pipelines.md has the table): change them here and recompile
(`python -m cloudhpc.pipelines.compile`)."""


def _secret_env(task: dsl.PipelineTask, keys: dict[str, str]) -> None:
    secret = TOKEN_SECRET if keys is TOKEN_ENV else S3_SECRET
    kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env=keys)


def _preprocess(
    data_url: str, store_url: str, s3_endpoint_url: str, seed: int, train_limit: int, test_limit: int
) -> dsl.PipelineTask:
    """The first step of both pipelines."""
    pre = fmnist_preprocess(
        data_url=data_url,
        store_url=store_url,
        s3_endpoint_url=s3_endpoint_url,
        seed=seed,
        train_limit=train_limit,
        test_limit=test_limit,
    ).set_display_name("preprocess")
    _secret_env(pre, S3_ENV)
    STEP_RESOURCES["preprocess"].apply(pre)
    return pre


def _evaluate_register(
    pre: dsl.PipelineTask,
    train: dsl.PipelineTask,
    tracking_uri: str,
    thresholds: dict[str, float],
    registered_model_name: str,
    s3_endpoint_url: str,
) -> float:
    """The last step of both pipelines (the test split from `pre`'s Dataset, `train`'s Model);
    caching off for all three steps; the pipeline's output, the test accuracy."""
    evaluate = fmnist_evaluate_register(
        dataset=pre.outputs["dataset"],
        model=train.outputs["model"],
        tracking_uri=tracking_uri,
        thresholds=thresholds,
        registered_model_name=registered_model_name,
        s3_endpoint_url=s3_endpoint_url,
    ).set_display_name("evaluate, gate, register")
    _secret_env(evaluate, S3_ENV)
    STEP_RESOURCES["evaluate"].apply(evaluate)
    for task in (pre, train, evaluate):
        # A cached step would skip a job submission or a registration: never reuse results.
        task.set_caching_options(False)
    return evaluate.outputs["test_accuracy"]  # type: ignore[no-any-return]


@dsl.pipeline(  # type: ignore[untyped-decorator]
    name="fmnist-cloud-hpc",
    description="Preprocess in the cloud, train a CNN with Ray Train on a SLURM cluster through cloudhpc, "
    "evaluate on the held-out test split, register in MLflow.",
)
def cloud_hpc_pipeline(
    porter_url: str = PORTER_URL,
    cluster: str = "mahti",
    tracking_uri: str = MLFLOW_URL,
    mlflow_import: str = "",
    job_tracking_uri: str = "",
    experiment: str = "cloud-hpc-fmnist-pipeline",
    registered_model_name: str = "CLOUD-HPC-FMNIST-CNN",
    data_url: str = "",
    store_url: str = STORE_URL,
    s3_endpoint_url: str = S3_ENDPOINT,
    train_limit: int = 0,
    test_limit: int = 0,
    epochs: int = 5,
    batch_size: int = 32,
    learning_rate: float = 0.05,
    momentum: float = 0.9,
    seed: int = 42,
    workers: int = 0,
    cpus_per_worker: int = 1,
    hpc_job: dict[str, Any] = HPC_JOB,
    # `python`, not `python3`: KFP's local runner rewrites the text "python3" in everything it passes
    # to a step, parameter values included, into its own interpreter's path.
    python: str = "python",
    thresholds: dict[str, float] = THRESHOLDS,
    timeout_seconds: float = 0.0,
) -> float:
    pre = _preprocess(data_url, store_url, s3_endpoint_url, seed, train_limit, test_limit)
    train = fmnist_train_hpc(
        porter_url=porter_url,
        cluster=cluster,
        dataset=pre.outputs["dataset"],
        tracking_uri=tracking_uri,
        experiment=experiment,
        mlflow_import=mlflow_import,
        job_tracking_uri=job_tracking_uri,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        momentum=momentum,
        seed=seed,
        workers=workers,
        cpus_per_worker=cpus_per_worker,
        hpc_job=hpc_job,
        python=python,
        timeout_seconds=timeout_seconds,
    ).set_display_name("train on HPC (Ray Train ray-job)")
    _secret_env(train, TOKEN_ENV)
    STEP_RESOURCES["train-hpc"].apply(train)
    return _evaluate_register(pre, train, tracking_uri, thresholds, registered_model_name, s3_endpoint_url)


@dsl.pipeline(  # type: ignore[untyped-decorator]
    name="fmnist-cloud",
    description="The same pipeline with training inside the cloud step (the original's cloud-only baseline).",
)
def cloud_pipeline(
    tracking_uri: str = MLFLOW_URL,
    experiment: str = "cloud-fmnist-pipeline",
    registered_model_name: str = "CLOUD-FMNIST-CNN",
    data_url: str = "",
    store_url: str = STORE_URL,
    s3_endpoint_url: str = S3_ENDPOINT,
    train_limit: int = 0,
    test_limit: int = 0,
    epochs: int = 5,
    batch_size: int = 32,
    learning_rate: float = 0.05,
    momentum: float = 0.9,
    seed: int = 42,
    workers: int = 0,
    cpus_per_worker: int = 1,
    thresholds: dict[str, float] = THRESHOLDS,
) -> float:
    pre = _preprocess(data_url, store_url, s3_endpoint_url, seed, train_limit, test_limit)
    train = fmnist_train_cloud(
        dataset=pre.outputs["dataset"],
        tracking_uri=tracking_uri,
        experiment=experiment,
        s3_endpoint_url=s3_endpoint_url,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        momentum=momentum,
        seed=seed,
        workers=workers,
        cpus_per_worker=cpus_per_worker,
    ).set_display_name("train in the cloud (Ray Train in the step)")
    _secret_env(train, S3_ENV)
    STEP_RESOURCES["train-cloud"].apply(train)
    return _evaluate_register(pre, train, tracking_uri, thresholds, registered_model_name, s3_endpoint_url)


PIPELINES = {"fmnist-cloud-hpc": cloud_hpc_pipeline, "fmnist-cloud": cloud_pipeline}
"""Compiled into deploy/pipelines/<name>.yaml by `python -m cloudhpc.pipelines.compile`."""
