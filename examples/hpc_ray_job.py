"""Submit a Ray job to the HPC cluster from Python, watch it, and read its metrics from MLflow.

The script version of `hpc_ray_job.ipynb` (the notebook a user opens first); the tests run this
file against the testbed. It trains the example CNN with Ray Train on the cluster, as the
`fmnist-cloud-hpc` pipeline's train step does, but spelled out with the SDK:

1. the data: split into train/validation/test, stored in the object store (the job gets only the
   training and validation splits);
2. an MLflow run for the job to log into;
3. the job: a `ray-job` whose entrypoint is the training script, with MLflow imported through the
   bridge; `submit`, then `wait` with a callback for each state, then its output and accounting;
4. the metrics the job logged, epoch by epoch, read back from MLflow.

Configuration: `CLOUDHPC_URL` and `CLOUDHPC_TOKEN` (porter), `MLFLOW_TRACKING_URI`, and S3
credentials in `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` when the store is `s3://`. Example (the
testbed, with `serve all --config .testbed/cloudhpc.yaml` running):

    python examples/hpc_ray_job.py --cluster testbed --mlflow-import 127.0.0.1:19700 \
        --s3-endpoint-url http://127.0.0.1:19833 \
        --package 'ray[default,train]' --package 'torch==2.13.0+cpu' \
        --package mlflow-skinny --package numpy
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid

from mlflow.tracking import MlflowClient

from cloudhpc.client import ApiError, Client
from cloudhpc.domain.jobs import Job
from cloudhpc.pipelines.fmnist.hpc_job import HpcJob
from cloudhpc.pipelines.fmnist.steps import preprocess, training_job_spec
from cloudhpc.pipelines.fmnist.train import HParams


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the example CNN with Ray on the HPC cluster.")
    parser.add_argument("--cluster", required=True, help="a cluster of porter's configuration")
    parser.add_argument("--mlflow-import", default="", help="MLflow as the bridge VM reaches it (host:port)")
    parser.add_argument(
        "--store-url",
        default="",
        help="where the data goes: one of your own prefixes in porter's object store, since a job reads "
        "only its owner's objects (default: the first that porter's GET /api/v1/me names)",
    )
    parser.add_argument("--s3-endpoint-url", default=None)
    parser.add_argument(
        "--package", action="append", default=[], help="pip requirement of the job's environment"
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--experiment", default="hpc-ray-job-example")
    args = parser.parse_args(argv)
    tracking_uri = os.environ["MLFLOW_TRACKING_URI"]

    # 1. The data, in the object store, under your own prefix (a job may read only your objects).
    if not args.store_url:
        with Client() as hpc:  # CLOUDHPC_URL, CLOUDHPC_TOKEN
            args.store_url = hpc.me().inputs[0].rstrip("/")
    refs = preprocess(
        data_url="",
        store_url=args.store_url,
        prefix=f"examples/{uuid.uuid4().hex[:8]}",
        s3_endpoint_url=args.s3_endpoint_url,
    )

    # 2. The MLflow run the job logs into.
    mlflow = MlflowClient(tracking_uri)
    experiment = mlflow.get_experiment_by_name(args.experiment)
    experiment_id = experiment.experiment_id if experiment else mlflow.create_experiment(args.experiment)
    run_id = mlflow.create_run(experiment_id).info.run_id
    print(f"MLflow run {run_id}")

    # 3. The Ray job: submit, watch, read its output and accounting.
    spec = training_job_spec(
        name="example-train",
        cluster=args.cluster,
        train_url=refs.train_url,
        run_id=run_id,
        hp=HParams(epochs=args.epochs),
        # the job's resources and environment, as in a job spec (what is left out: HPC_JOB's)
        hpc_job=HpcJob.from_parameter(
            {
                "resources": {"nodes": 1, "cpus_per_task": 2, "time": "00:20:00"},
                "environment": {"packages": args.package},
            }
        ),
        mlflow_import=args.mlflow_import,
        job_tracking_uri="" if args.mlflow_import else tracking_uri,
    )
    with Client() as hpc:  # CLOUDHPC_URL, CLOUDHPC_TOKEN
        job = hpc.submit(spec)
        print(f"submitted job {job.id}")

        def show(current: Job) -> None:
            print(
                f"  state: {current.state.value}"
                + (f" (SLURM {current.slurm_job_id})" if current.slurm_job_id else "")
            )

        final = hpc.wait(job, on_change=show, timeout=1800)
        output = hpc.logs(final).data.decode(errors="replace")
        print("last lines of the job's output:")
        for line in output.splitlines()[-8:]:
            print(f"  | {line}")
        if final.state.value != "completed":
            print(f"the job ended {final.state.value}: {final.reason}")
            return 1
        # Accounting is collected just after the end (sacct lags slurmctld): 404 means "not yet".
        for _ in range(60):
            try:
                accounting = hpc.accounting(final)
                break
            except ApiError as exc:
                if exc.status != 404:
                    raise
                time.sleep(0.5)
        else:
            accounting = None
        efficiency = accounting.efficiency if accounting is not None else None
        if efficiency is None:
            print("no efficiency figures were stored for the job")
        else:
            print(f"CPU efficiency {100 * (efficiency.cpu_efficiency or 0):.1f}%, state {efficiency.state}")

    # 4. The metrics it logged, epoch by epoch.
    history = sorted(mlflow.get_metric_history(run_id, "val_accuracy"), key=lambda m: m.step)
    for point in history:
        print(f"epoch {point.step}: validation accuracy {point.value:.4f}")
    params = mlflow.get_run(run_id).data.params
    print(f"trained by {params['ray.num_workers']} Ray Train worker(s) on {params['ray.nodes']} node(s)")
    return 0 if len(history) == args.epochs else 1


if __name__ == "__main__":
    sys.exit(main())
