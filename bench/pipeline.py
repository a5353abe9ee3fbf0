"""Both example pipelines on the testbed, stage by stage, and the integration overhead of cloud-hpc.

`fmnist-cloud-hpc` runs through porter and the submitter (real processes), SLURM on the testbed, the
training as a Ray Train `ray-job` with MLflow imported through the bridge; `fmnist-cloud` trains in
its step. Both run with KFP's local runner (every step its own process) on the offline digits data
(no data set can be downloaded here), 5 epochs, 2 data-parallel workers.

The overhead of cloud-hpc is the train step's wall time minus the queue wait minus the training
time (`TorchTrainer.fit`, worker start included): what the integration itself costs. Target: at
most 15 s. The original paid about 606 s of its 885 s train step (pip installs ~195 s, waiting for
the bridge ~65 s, the queue plus Ray start ~245 s, waiting for accounting ~270 s), about 360 s of it
beyond the queue wait. The first run of the training environment on a fresh testbed includes
building it (pip); the figures below are for a warm environment: a first, unmeasured run warms it.

Run on the testbed machine: `python bench/pipeline.py [--runs N]`.

`--topology`: fmnist-cloud-hpc across the multi-host topology (bench/topology_mode.py), run with KFP's
local runner on `cloud` as docs/pipelines.md says, porter on `cloud` as deploy/kustomize renders it,
the compose submitter on `laptop` behind the relay, a 2-node training job on `c1` and `c2` logging to
MLflow through the job's import. Only the cloud-hpc variant (the cloud variant does not cross hosts).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.*

from bench.topology_mode import shipped, spread
from kfp import local
from mlflow.tracking import MlflowClient
from tests.e2e.harness import bridged_deployment
from tests.shipped import TRAINING_ENV, hpc_pipeline_params, prebuild_environment, run_pipeline_on_cloud
from tests.testbed import load_testbed

from cloudhpc.pipelines.fmnist.pipeline import cloud_hpc_pipeline, cloud_pipeline

TARGET_OVERHEAD = 15.0
STAGES = (
    "environment",
    "queue_wait",
    "ray_start",
    "training",
    "train_worker_startup",
    "entrypoint_other",
    "teardown",
    "collection",
    "step_wall",
    "overhead",
)


def run_quietly(pipeline: Any, **params: Any) -> tuple[float, float, str]:
    """(seconds, test accuracy, KFP log): KFP's local runner prints every step's inputs and outputs."""
    out = io.StringIO()
    started = time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        task = pipeline(**params)
    return time.monotonic() - started, float(task.output), out.getvalue()


def latest_run(client: MlflowClient, experiment: str) -> Any:
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    return client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[
        0
    ]


def stages_of(client: MlflowClient, experiment: str) -> dict[str, float]:
    """The train step's stage timings, as the job logged them to MLflow (`stage.<name>_seconds`)."""
    run = latest_run(client, experiment)
    return {
        k.removeprefix("stage.").removesuffix("_seconds"): v
        for k, v in run.data.metrics.items()
        if k.startswith("stage.")
    }


def report(name: str, i: int, took: float, accuracy: float, stages: Mapping[str, float]) -> None:
    print(
        f"run {i} {name:9s}: pipeline {took:6.1f} s, train step "
        f"{stages.get('step_wall', float('nan')):6.1f} s, training {stages.get('training', float('nan')):5.1f} s, "
        f"overhead {stages.get('overhead', float('nan')):5.1f} s, test accuracy {accuracy:.4f}",
        flush=True,
    )


def topology_runs(runs: int, epochs: int) -> list[dict[str, float]]:
    """Warm-up plus `runs` runs of fmnist-cloud-hpc on the topology (its nodes reach no PyPI: the
    training environment is prebuilt through the single-host testbed, as the e2e test does)."""
    prebuild_environment(load_testbed(), TRAINING_ENV)
    results: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp, shipped(Path(tmp)) as dep:
        mlflow = MlflowClient(dep.topology.mlflow_url)
        with dep.client() as client:
            (store,) = [u for u in client.me().inputs if "/users/" in u]
        for i in range(runs + 1):
            name = f"bench-topology-{uuid.uuid4().hex[:6]}"
            params = hpc_pipeline_params(dep.topology, dep.platform, store.rstrip("/"), epochs, name)
            workdir = Path(tmp) / f"run{i}"
            workdir.mkdir()
            code, text, took = run_pipeline_on_cloud(dep.topology, dep.platform, params, workdir)
            found = re.search(r"^PIPELINE accuracy (\S+) seconds", text, re.M)
            if code != 0 or found is None:
                raise RuntimeError(f"the pipeline failed (exit {code}):\n{text[-4000:]}")
            stages = stages_of(mlflow, name)
            report("cloud-hpc", i, took, float(found.group(1)), stages)
            if i > 0:  # run 0 is the warm-up
                results.append({"pipeline": took, "test_accuracy": float(found.group(1)), **stages})
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", type=int, default=3, help="measured runs of each pipeline (after a warm-up)"
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--topology", action="store_true", help="across the multi-host topology")
    args = parser.parse_args()
    if args.topology:
        return summary(
            {"cloud-hpc": topology_runs(args.runs, args.epochs)}, args.runs, args.epochs, "topology"
        )

    tb = load_testbed()
    os.environ.update(
        AWS_ACCESS_KEY_ID=tb.s3_access_key,
        AWS_SECRET_ACCESS_KEY=tb.s3_secret_key,
        AWS_DEFAULT_REGION="us-east-1",
        RAY_AUTH_MODE="disabled",  # keeps the cloud step's local Ray from writing ~/.ray/auth_token
    )
    mlflow = MlflowClient(tb.mlflow_url)
    tag = uuid.uuid4().hex[:6]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dep = bridged_deployment(root, tb, "bench-pipeline")
        dep.start("porter")
        dep.start("submitter")
        os.environ["CLOUDHPC_TOKEN"] = dep.user_token
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root / "kfp"))
        common = {
            "tracking_uri": tb.mlflow_url,
            "store_url": f"s3://{tb.s3_bucket}",
            "s3_endpoint_url": tb.s3_endpoint,
            "epochs": args.epochs,
        }
        hpc = {
            **common,
            "porter_url": dep.url,
            "cluster": "testbed",
            "mlflow_import": tb.mlflow_url.removeprefix("http://"),
            "hpc_job": {
                "resources": {"nodes": 1, "cpus_per_task": 2, "time": "00:20:00"},
                "environment": TRAINING_ENV,
            },
            "timeout_seconds": 1800.0,
            "experiment": f"bench-cloud-hpc-{tag}",
            "registered_model_name": f"bench-cloud-hpc-{tag}",
        }
        cloud = {**common, "experiment": f"bench-cloud-{tag}", "registered_model_name": f"bench-cloud-{tag}"}
        results: dict[str, list[dict[str, float]]] = {"cloud-hpc": [], "cloud": []}
        try:
            print(
                "warm-up: one cloud-hpc run (builds the training environment if it is not cached)", flush=True
            )
            run_quietly(cloud_hpc_pipeline, **hpc)
            for i in range(args.runs):
                for name, pipeline, params in (
                    ("cloud-hpc", cloud_hpc_pipeline, hpc),
                    ("cloud", cloud_pipeline, cloud),
                ):
                    took, accuracy, _log = run_quietly(pipeline, **params)
                    stages = stages_of(mlflow, params["experiment"])
                    results[name].append({"pipeline": took, "test_accuracy": accuracy, **stages})
                    report(name, i + 1, took, accuracy, stages)
        finally:
            dep.stop()

    return summary(results, args.runs, args.epochs, "testbed")


def summary(results: Mapping[str, list[dict[str, float]]], runs: int, epochs: int, site: str) -> int:
    """The medians per stage (with the overhead's spread) and the JSON line."""

    def median(name: str, key: str) -> float:
        values = [r[key] for r in results.get(name, []) if key in r]
        return statistics.median(values) if values else float("nan")

    names = [n for n in ("cloud-hpc", "cloud") if results.get(n)]
    print(f"\nmedians over {runs} run(s) (seconds):")
    print(f"{'stage':22s} " + " ".join(f"{n:>10s}" for n in names))
    for key in ("pipeline", *STAGES, "test_accuracy"):
        print(f"{key:22s} " + " ".join(f"{median(n, key):10.2f}" for n in names))
    overhead = median("cloud-hpc", "overhead")
    figures: dict[str, Any] = {
        "bench": "pipeline",
        "site": site,
        "runs": runs,
        "epochs": epochs,
        "cloud_hpc_pipeline_s": round(median("cloud-hpc", "pipeline"), 2),
        "cloud_hpc_train_step_s": round(median("cloud-hpc", "step_wall"), 2),
        "cloud_hpc_training_s": round(median("cloud-hpc", "training"), 2),
        "cloud_hpc_queue_wait_s": round(median("cloud-hpc", "queue_wait"), 2),
        "cloud_hpc_ray_start_s": round(median("cloud-hpc", "ray_start"), 2),
        "cloud_hpc_collection_s": round(median("cloud-hpc", "collection"), 2),
        "cloud_hpc_overhead_s": round(overhead, 2),
        "cloud_hpc_overhead_spread_s": spread(
            [r["overhead"] for r in results["cloud-hpc"] if "overhead" in r]
        ),
        "test_accuracy": round(median("cloud-hpc", "test_accuracy"), 4),
    }
    if "cloud" in names:
        figures.update(
            cloud_pipeline_s=round(median("cloud", "pipeline"), 2),
            cloud_train_step_s=round(median("cloud", "step_wall"), 2),
            cloud_training_s=round(median("cloud", "training"), 2),
        )
    figures.update(target_overhead_s=TARGET_OVERHEAD, met=overhead <= TARGET_OVERHEAD)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
