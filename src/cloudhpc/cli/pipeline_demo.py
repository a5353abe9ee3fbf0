"""`cloudhpc demo`: the cloud-HPC pipeline end to end on this machine, with nothing configured.

1. an MLflow server on loopback (SQLite, proxied artifacts in `.cloudhpc/mlflow`);
2. `cloudhpc serve all` (porter + agent; the `local` cluster, or the SLURM testbed with
   `--cluster testbed`);
3. the `fmnist-cloud-hpc` Kubeflow pipeline, run by KFP's local runner: preprocess -> train as a
   Ray Train `ray-job` through porter -> evaluate on the held-out test split, gate, register;
4. the test accuracy, the MLflow run and where the train step's time went;
5. everything it started is stopped, by PID (the MLflow data stays in `.cloudhpc/mlflow`).

The full pipeline log (KFP prints every step's input and output) goes to `.cloudhpc/demo-pipeline.log`;
the console shows the stages and the lines that tell the story.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cloudhpc.cli.demo import free_port, stop_server, wait_ready
from cloudhpc.client import Client
from cloudhpc.private_files import make_private_dirs

__all__ = ["run_pipeline_demo"]

ROOT = Path(__file__).resolve().parents[3]
TESTBED_ENV = ROOT / ".testbed" / "env.sh"
TESTBED_CONFIG = ROOT / ".testbed" / "cloudhpc.yaml"
TESTBED_TORCH = "torch==2.13.0+cpu"
"""The testbed's PyTorch for hpcuser's environment: the CPU build, found by pip in the wheels on disk
(the testbed cluster's `pip.find_links`, set by scripts/testbed.sh; a real site pins its own)."""

_TASKS = {
    "fmnist-preprocess": "preprocess (cloud): fetch, split train/validation/test, store",
    "fmnist-train-hpc": "train on the cluster: a Ray Train ray-job through porter",
    "fmnist-evaluate-register": "evaluate on the held-out test split, gate, register in MLflow",
}
_SHOW = re.compile(
    r"^(\[cloudhpc\]|\[job\] \[train\]|\[job\] cloudhpc: (starting|Ray cluster ready|bridge)|data: |splits: |"
    r"stored |MLflow run |test accuracy |registered |stages: )"
)
_TASK_START = re.compile(r"Executing task .*?'(?P<task>[a-z-]+)'")
_TASK_END = re.compile(r"Task .*?'(?P<task>[a-z-]+)'.* finished with status .*?(?P<status>SUCCESS|FAILURE)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _Tee(io.TextIOBase):
    """Everything to the log file; the lines worth reading, and stage headings, to the console."""

    def __init__(self, log: TextIO, console: Console, started: float) -> None:
        self._log = log
        self._console = console
        self._started = started
        self._pending = ""
        self._stage = 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._log.write(text)
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self._line(_ANSI.sub("", line).strip())
        return len(text)

    def flush(self) -> None:
        self._log.flush()

    def _line(self, line: str) -> None:
        clock = f"[dim]{time.monotonic() - self._started:6.1f}s[/dim]"
        if match := _TASK_START.search(line):
            task = match["task"]
            self._stage += 1
            title = _TASKS.get(task, task)
            self._console.print(f"{clock} [bold]step {self._stage}/3[/bold] {title}")
        elif match := _TASK_END.search(line):
            colour = "green" if match["status"] == "SUCCESS" else "red"
            self._console.print(f"{clock}   [{colour}]{match['task']}: {match['status']}[/{colour}]")
        elif _SHOW.match(line):
            self._console.print(f"{clock}   {escape(line)}", highlight=False, soft_wrap=True)


def _read_env(path: Path) -> dict[str, str]:
    import shlex

    values: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        if raw.startswith("export "):
            name, _, value = raw[len("export ") :].partition("=")
            parts = shlex.split(value)
            values[name] = parts[0] if parts else ""
    return values


@contextlib.contextmanager
def _serve_all(
    state_dir: Path, env: dict[str, str], console: Console, config: Path | None
) -> Iterator[Client]:
    port = free_port()
    env = {
        **env,
        "CLOUDHPC_PORTER__LISTEN": f"127.0.0.1:{port}",
        "CLOUDHPC_SUBMITTER__LISTEN": f"127.0.0.1:{free_port()}",
    }
    argv = [sys.executable, "-m", "cloudhpc", "serve", "all"]
    if config is not None:
        argv += ["--config", str(config)]
    log_path = state_dir / "demo-server.log"
    with log_path.open("ab") as log:
        server = subprocess.Popen(argv, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    console.print(
        f"      porter + agent on 127.0.0.1:{port}, pid {server.pid}, log {log_path}", soft_wrap=True
    )
    try:
        client = wait_ready(server, f"http://127.0.0.1:{port}", state_dir / "admin-token", 90)
        if client is None:
            if server.poll() is not None:
                raise RuntimeError(f"`cloudhpc serve all` exited ({server.returncode}); see {log_path}")
            raise RuntimeError(f"`cloudhpc serve all` not ready after 90 s; see {log_path}")
        with client:
            yield client
    finally:
        stop_server(server, 20)
        console.print(f"      stopped porter + agent (pid {server.pid})")


def _timing_table(metrics: dict[str, float]) -> Table:
    rows = [
        ("environment", "accept -> sbatch: agent pickup, cached environment, files, sbatch"),
        ("queue_wait", "queue wait: sbatch -> start"),
        ("ray_start", "environment activation + Ray head and workers up"),
        ("training", "Ray Train fit (all workers)"),
        ("train_worker_startup", "  of which: training workers starting"),
        ("entrypoint_other", "rest of the entrypoint (imports, model upload)"),
        ("teardown", "Ray stopped, job ended"),
        ("collection", "accounting and artifacts collected"),
        ("step_wall", "train step, wall time"),
        ("overhead", "integration overhead (wall - queue wait - training)"),
    ]
    table = Table(title="train step: where the time went", show_header=True)
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("what")
    for key, what in rows:
        value = metrics.get(f"stage.{key}_seconds")
        if value is not None:
            table.add_row(key, f"{value:.1f}", what)
    return table


def run_pipeline_demo(
    *, cluster: str = "local", epochs: int = 5, data_url: str = "", state_dir: Path = Path(".cloudhpc")
) -> int:
    """Run the cloud-HPC pipeline against `serve all` on `cluster` (`local` or `testbed`)."""
    # Bound to the real stderr: while the pipeline runs, sys.stderr is the log tee.
    console = Console(file=sys.__stderr__)
    started = time.monotonic()
    make_private_dirs(state_dir)  # it will hold the tokens and the job store
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDHPC_")}
    # The local cluster runs the job with this interpreter's tools (ray, python) on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    config: Path | None = None
    params: dict[str, Any] = {
        "cluster": cluster,
        "epochs": epochs,
        "data_url": data_url,
        "timeout_seconds": 1800.0,
        "experiment": "cloudhpc-demo",
        "registered_model_name": "cloudhpc-demo-cnn",
    }
    if cluster == "local":
        params |= {
            "store_url": f"file://{(state_dir / 'objects').resolve()}",
            "s3_endpoint_url": "",
        }
        packages: list[str] = []  # the local cluster runs in this virtualenv
    elif cluster == "testbed":
        if not TESTBED_ENV.exists():
            console.print(
                f"[red]the testbed is not up ({TESTBED_ENV} is missing): run `make testbed-up`[/red]"
            )
            return 1
        tb = _read_env(TESTBED_ENV)
        config = TESTBED_CONFIG
        env |= {
            "AWS_ACCESS_KEY_ID": tb["TESTBED_S3_ACCESS_KEY"],
            "AWS_SECRET_ACCESS_KEY": tb["TESTBED_S3_SECRET_KEY"],
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        import ray

        params |= {
            "store_url": f"s3://{tb['TESTBED_S3_BUCKET']}",
            "s3_endpoint_url": tb["TESTBED_S3_ENDPOINT"],
            "mlflow_import": tb.get("TESTBED_MLFLOW_URL", "http://127.0.0.1:19700").removeprefix("http://"),
        }
        packages = [f"ray[default,train]=={ray.__version__}", TESTBED_TORCH, "mlflow-skinny", "numpy"]
    else:
        console.print(f"[red]unknown cluster {cluster!r}: use `local` or `testbed`[/red]")
        return 2
    # one Ray node of 2 CPUs: what a laptop and the testbed's one node have to spare
    params["hpc_job"] = {
        "resources": {"nodes": 1, "cpus_per_task": 2, "time": "00:15:00"},
        "environment": {"packages": packages},
    }

    from cloudhpc.pipelines.mlflow_server import LocalMlflowServer

    console.print(f"[bold]1/4[/bold] cloudhpc demo: the fmnist-cloud-hpc pipeline on cluster `{cluster}`")
    mlflow_server: LocalMlflowServer | None = None
    try:
        if cluster == "testbed":
            tracking_uri = _read_env(TESTBED_ENV).get("TESTBED_MLFLOW_URL", "http://127.0.0.1:19700")
            console.print(f"      MLflow: the testbed's server at {tracking_uri} (PostgreSQL + S3)")
        else:
            mlflow_server = LocalMlflowServer(state_dir / "mlflow")
            mlflow_server.start()
            tracking_uri = mlflow_server.url
            params["job_tracking_uri"] = tracking_uri
            console.print(
                f"      MLflow: started on {tracking_uri} (pid {mlflow_server.process.pid if mlflow_server.process else '?'}, "
                f"data in {mlflow_server.directory})",
                soft_wrap=True,
            )
        params["tracking_uri"] = tracking_uri
        console.print(
            f"[bold]2/4[/bold] starting `cloudhpc serve all`{' --config ' + str(config) if config else ''}"
        )
        with _serve_all(state_dir, env, console, config) as client:
            os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
            os.environ["CLOUDHPC_TOKEN"] = (state_dir / "admin-token").read_text().strip()
            params["porter_url"] = client.url
            # a job reads only its owner's objects: the data goes under the user's input prefix
            params["store_url"] = client.me().inputs[0].rstrip("/")
            console.print("[bold]3/4[/bold] running the pipeline with KFP's local runner")
            accuracy = _run_pipeline(params, state_dir, console, started)
        console.print("[bold]4/4[/bold] results")
        _report(tracking_uri, accuracy, console, cluster)
        return 0
    except Exception as exc:
        console.print(f"[red]demo failed: {type(exc).__name__}: {exc}[/red]")
        console.print(f"      full pipeline log: {state_dir / 'demo-pipeline.log'}")
        return 1
    finally:
        if mlflow_server is not None:
            pid = mlflow_server.process.pid if mlflow_server.process else None
            mlflow_server.stop()
            console.print(f"      stopped MLflow (pid {pid}); its runs stay in {mlflow_server.directory}")
        console.print(f"demo took {time.monotonic() - started:.0f} s")


def _run_pipeline(params: dict[str, Any], state_dir: Path, console: Console, started: float) -> float:
    from kfp import local

    from cloudhpc.pipelines.fmnist.pipeline import cloud_hpc_pipeline

    log_path = state_dir / "demo-pipeline.log"
    with log_path.open("w") as log:
        tee = _Tee(log, console, started)
        with contextlib.redirect_stdout(tee), contextlib.redirect_stderr(tee):
            local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(state_dir / "kfp"))
            task = cloud_hpc_pipeline(**params)
        tee.flush()
    return float(task.output)


def _report(tracking_uri: str, accuracy: float, console: Console, cluster: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("cloudhpc-demo")
    if experiment is None:
        raise RuntimeError(f"MLflow at {tracking_uri} has no experiment cloudhpc-demo")
    runs = client.search_runs(
        [experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1
    )
    run = runs[0]
    metrics = run.data.metrics
    note = run.data.tags.get("data.note", "")
    out = Console()
    out.print(f"test accuracy (held-out test split): [bold]{accuracy:.4f}[/bold]")
    if note.startswith("OFFLINE"):
        out.print(f"[yellow]{note}[/yellow]", soft_wrap=True)
    out.print(
        f"MLflow run {run.info.run_id}: {tracking_uri}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}"
    )
    out.print(
        f"  {len(client.get_metric_history(run.info.run_id, 'val_accuracy'))} epochs logged live, "
        f"job {run.data.tags.get('cloudhpc.job_id', '?')} on `{cluster}`, "
        f"CPU efficiency {100 * metrics.get('slurm.cpu_efficiency', float('nan')):.1f}%"
    )
    if cluster == "local":
        store = Path(".cloudhpc/mlflow").resolve()
        out.print(
            f"  (the demo's MLflow has stopped; browse its runs with `mlflow ui --backend-store-uri "
            f"sqlite:///{store}/mlflow.db --artifacts-destination {store}/artifacts`)",
            soft_wrap=True,
        )
    versions = client.search_model_versions(f"run_id = '{run.info.run_id}'")
    for version in versions:
        out.print(f"registered model {version.name} version {version.version} (with its signature)")
    out.print(_timing_table(metrics))
