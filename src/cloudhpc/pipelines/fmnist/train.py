"""Train the example CNN data-parallel with Ray Train, logging to MLflow as it goes.

This file is the job's entrypoint on the cluster. It is shipped to the job as a single file (the
pipeline puts its source into the job's `files`), so it imports nothing from cloudhpc: only numpy,
torch, ray and mlflow, which the job's environment provides. In the cloud variant the same `main`
runs inside the pipeline step.

What the original did, and what this does instead:

- It wrapped the whole training loop in one `@ray.remote` task, so one CPU of one node worked and
  the second node idled. Here `TorchTrainer` runs one worker per allocated CPU slot (by default:
  all CPUs of the Ray cluster, across its nodes) and DistributedDataParallel averages gradients.
- It logged metrics after the fact, from pickles, and a key filter dropped them. Here the driver
  logs parameters at once and each epoch's metrics as soon as the epoch ends (workers cannot reach
  MLflow: the bridge listens on the head node's loopback, so rank 0 sends its numbers to the
  driver through a Ray queue).
- It caught every exception and exited 0, so Ray reported SUCCEEDED. Here nothing is caught: an
  error ends the process non-zero, the SLURM job fails, the pipeline step fails.
- It trained on the test set in one version and evaluated on the training set in another. Here
  the job receives only `train.npz` (train + validation) and refuses a file holding a test split;
  the held-out test split is evaluated by a separate step.

Checkpoint and requeue: with `CLOUDHPC_CHECKPOINT_DIR` set (a job with `checkpoint`, #13 item 5)
Ray Train keeps its run there and rank 0 reports a checkpoint after every epoch (the model, the
optimizer, the epoch and the history so far); a run started again (the job requeued before its
time limit) resumes from the latest one (found by the driver, or `ray.train.get_checkpoint()` when
Ray Train restored the run itself). Every epoch shuffles with
its own seed (`seed + epoch`), so a resumed run ends with the same weights as an uninterrupted one.
The warning (`CLOUDHPC_CHECKPOINT_SIGNAL`, forwarded by the job's wrapper) is caught from the first
line on: the workers finish the epoch they are in (at least one, so a run warned while it started
still leaves a checkpoint), report its checkpoint and stop together, and the entrypoint exits
`STOPPED_STATUS` for the wrapper to requeue the job.

MLflow: with `MLFLOW_RUN_ID` set (the pipeline creates the run in the cloud) the run is resumed;
the tracking URI is `--tracking-uri`, else `http://$CLOUDHPC_IMPORT_MLFLOW` (the import bridge to the
MLflow server; its artifacts are proxied by the server, so the job needs no S3 credentials), else
`MLFLOW_TRACKING_URI`. `--no-mlflow` trains without it (tests).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

WARNED = threading.Event()
"""Set by the job's checkpoint warning: stop after the current epoch, keeping its checkpoint."""


def catch_warning() -> None:
    """Catch the checkpoint warning (a job with `checkpoint` names it in CLOUDHPC_CHECKPOINT_SIGNAL)
    instead of dying by its default action mid-epoch."""
    name = os.environ.get("CLOUDHPC_CHECKPOINT_SIGNAL")
    number = (
        getattr(signal, f"SIG{name}", None) if name and os.environ.get("CLOUDHPC_CHECKPOINT_DIR") else None
    )
    if isinstance(number, signal.Signals):
        signal.signal(number, lambda _signum, _frame: WARNED.set())


if __name__ == "__main__":
    catch_warning()  # before the imports below, which take seconds: a warning may come meanwhile

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

__all__ = [
    "CNN",
    "RESULT_MARKER",
    "HParams",
    "TrainResult",
    "main",
    "normalise",
    "run_training",
]

STOPPED_STATUS = 75
"""The entrypoint's exit status when it stopped on the warning with its checkpoint saved (EX_TEMPFAIL:
run it again)."""
STOP_FILE = "stop-requested"
"""In the checkpoint directory while a warned run winds down: how the driver tells the workers."""
RESULT_MARKER = "CLOUDHPC-TRAIN-RESULT"
"""Prefix of the last line the entrypoint prints: a JSON summary a log reader can find."""

CHECKPOINT_FILE = "state_dict.pt"
TRAIN_STATE_FILE = "train_state.pt"
"""Beside the weights in an epoch's checkpoint: the optimizer's state, the epoch, the history."""
HISTORY_FILE = "history.json"
ARCHITECTURE = {"name": "lenet5", "input": [1, 28, 28], "classes": 10}


class CNN(nn.Module):
    """The original's LeNet-style network: conv(1->6, 5), pool, conv(6->16, 5), pool, 256-120-84-10."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.classifier(self.features(x))
        return out


def normalise(images: np.ndarray[Any, Any]) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) in [-1, 1]: the original's Normalize((0.5,), (0.5,))."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)).float().div_(255.0)
    return x.sub_(0.5).div_(0.5).unsqueeze(1)


@dataclass(frozen=True)
class HParams:
    """The original used batch 4, lr 0.001, momentum 0.9, seed 42, 5 epochs; batch 32 (per worker)
    and lr 0.05 take far fewer optimizer steps to a similar accuracy, which a 2-core testbed needs."""

    epochs: int = 5
    batch_size: int = 32
    learning_rate: float = 0.05
    momentum: float = 0.9
    seed: int = 42
    min_epoch_seconds: float = 0.0
    """An epoch lasts at least this long (the rest is waited out): demos and tests of checkpoint and
    requeue need work of a known length; it changes no number of the training."""


@dataclass
class TrainResult:
    state_dict_path: Path
    history: list[dict[str, float]]
    num_workers: int
    cpus_per_worker: int
    nodes: int
    timings: dict[str, float] = field(default_factory=dict)
    stopped_after: int | None = None
    """Set when the run stopped on the checkpoint warning: the last epoch stored (`history` is up to
    it, `state_dict_path` its weights), from which the next run resumes."""


def load_train_file(path: str | Path) -> dict[str, np.ndarray[Any, Any]]:
    """The training and validation splits; a file holding a test split is refused outright."""
    with np.load(path) as data:
        if "x_test" in data.files or "y_test" in data.files:
            raise ValueError(f"{path} holds a test split; the training job must never see it")
        missing = {"x_train", "y_train", "x_val", "y_val"} - set(data.files)
        if missing:
            raise ValueError(f"{path} lacks {sorted(missing)}")
        return {k: data[k] for k in ("x_train", "y_train", "x_val", "y_val")}


def _sum_across_workers(values: list[float]) -> list[float]:
    """Sums over all workers (DDP process group), or the values themselves with one worker."""
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return [float(v) for v in tensor.tolist()]


def _train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker: its shard of each epoch, DDP gradient averaging."""
    import ray.train
    import ray.train.torch
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_num_threads(int(config["threads"]))
    hp = HParams(**config["hparams"])
    torch.manual_seed(hp.seed)
    every_epoch = bool(config.get("checkpoint_every_epoch"))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()

    data = load_train_file(config["data"])
    x_train, y_train = normalise(data["x_train"]), torch.from_numpy(data["y_train"].astype(np.int64))
    # Validation: each worker takes every world-th example (no padding, so no example counts twice).
    x_val = normalise(data["x_val"][rank::world])
    y_val = torch.from_numpy(data["y_val"][rank::world].astype(np.int64))

    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=hp.batch_size, shuffle=True)
    loader = ray.train.torch.prepare_data_loader(loader)  # a DistributedSampler shard per worker
    network = CNN()
    # the latest epoch's checkpoint the driver found (its history is the driver's too), else the
    # one Ray Train restored its run from (its own record may lag: a stopped run's workers can store
    # one more epoch on their way down)
    resumed = (
        ray.train.Checkpoint.from_directory(config["resume"])
        if config.get("resume")
        else ray.train.get_checkpoint()
    )
    state: dict[str, Any] = {"epoch": 0, "history": []}
    if resumed is not None:
        with resumed.as_directory() as where:
            network.load_state_dict(torch.load(Path(where) / CHECKPOINT_FILE, weights_only=True))
            state = torch.load(Path(where) / TRAIN_STATE_FILE, weights_only=False)
    model = ray.train.torch.prepare_model(network)  # DDP
    optimizer = torch.optim.SGD(model.parameters(), lr=hp.learning_rate, momentum=hp.momentum)
    if resumed is not None:
        optimizer.load_state_dict(state["optimizer"])
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    queue = config.get("queue")
    history: list[dict[str, float]] = list(state["history"])

    metrics: dict[str, float] = history[-1] if history else {}
    for epoch in range(int(state["epoch"]) + 1, hp.epochs + 1):
        started = time.perf_counter()
        torch.manual_seed(hp.seed + epoch)  # the epoch's shuffle, the same after a resume
        set_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)  # a different shuffle per epoch across the shards
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        for xb, yb in loader:
            optimizer.zero_grad()
            logits = model(xb)
            loss = loss_fn(logits, yb)
            (loss / len(yb)).backward()
            optimizer.step()
            loss_sum += float(loss.detach())
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(yb)
        model.eval()
        with torch.no_grad():
            logits = model(x_val) if len(y_val) else torch.empty(0, 10)
            val_loss = float(loss_fn(logits, y_val)) if len(y_val) else 0.0
            val_correct = int((logits.argmax(1) == y_val).sum()) if len(y_val) else 0
        time.sleep(max(0.0, hp.min_epoch_seconds - (time.perf_counter() - started)))
        # (every worker stops after the same epoch: the stop request is summed with the figures)
        stop_file: str | None = config.get("stop_file")
        asked = float(stop_file is not None and os.path.exists(stop_file))
        t_loss, t_correct, t_seen, v_loss, v_correct, v_seen, stop = _sum_across_workers(
            [loss_sum, correct, seen, val_loss, val_correct, len(y_val), asked]
        )
        metrics = {
            "epoch": float(epoch),
            "train_loss": t_loss / max(t_seen, 1),
            "train_accuracy": t_correct / max(t_seen, 1),
            "val_loss": v_loss / max(v_seen, 1),
            "val_accuracy": v_correct / max(v_seen, 1),
            "epoch_seconds": time.perf_counter() - started,
        }
        history.append(metrics)
        if rank == 0 and queue is not None:
            queue.put(metrics)
        if every_epoch:
            _report(model, optimizer, epoch, history, rank)
        if stop and epoch < hp.epochs:
            return  # warned: this epoch's checkpoint is the next run's start
    # Otherwise one report at the end: the epochs' numbers already went to the driver through the
    # queue, and each report waits for the controller's next poll, which adds seconds to an epoch.
    if not every_epoch or not history or int(state["epoch"]) >= hp.epochs:
        _report(model, optimizer, hp.epochs, history, rank)


def _report(
    model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, history: list[dict[str, float]], rank: int
) -> None:
    """Report the epoch's metrics; rank 0 with a checkpoint of everything a resume needs."""
    import ray.train

    metrics = history[-1] if history else {"epoch": float(epoch)}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        module: Any = getattr(model, "module", model)  # unwrap DDP
        torch.save(module.state_dict(), Path(tmp) / CHECKPOINT_FILE)
        state = {"epoch": epoch, "history": history, "optimizer": optimizer.state_dict()}
        torch.save(state, Path(tmp) / TRAIN_STATE_FILE)
        (Path(tmp) / HISTORY_FILE).write_text(json.dumps({"epoch": epoch, "history": history}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def latest_checkpoint(storage: str | Path) -> Path | None:
    """The checkpoint directory of the latest epoch Ray Train stored under `storage` (None: none)."""
    best: tuple[int, Path] | None = None
    for found in Path(storage).glob(f"**/{HISTORY_FILE}"):
        if not (found.parent / TRAIN_STATE_FILE).is_file() or not (found.parent / CHECKPOINT_FILE).is_file():
            continue  # a checkpoint still being written when the run was stopped
        try:
            epoch = int(json.loads(found.read_text())["epoch"])
        except (ValueError, KeyError, TypeError):
            continue
        if best is None or epoch > best[0]:
            best = (epoch, found.parent)
    return best[1] if best is not None else None


def previous_history(checkpoint: Path | None) -> list[dict[str, float]]:
    """The epochs a resumed run already did, as its latest checkpoint recorded them."""
    if checkpoint is None:
        return []
    history: list[dict[str, float]] = json.loads((checkpoint / HISTORY_FILE).read_text())["history"]
    return history


def _match_cluster_auth_mode() -> None:
    """Ray (2.5x and later) starts every cluster of a user with token authentication once
    `~/.ray/auth_token` exists (any local `ray.init()` writes it), but a driver connecting to an
    existing cluster sends the token only when RAY_AUTH_MODE says `token`. Say so when the file is
    there, or the job's own cluster refuses its driver."""
    if os.environ.get("RAY_ADDRESS") and not os.environ.get("RAY_AUTH_MODE"):
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        if os.environ.get("RAY_AUTH_TOKEN") or (path.is_file() and path.stat().st_size > 0):
            os.environ["RAY_AUTH_MODE"] = "token"


def _cluster_shape(cpus_per_worker: int, workers: int) -> tuple[int, int]:
    """(workers, nodes): `workers` 0 means one worker per `cpus_per_worker` CPUs of the cluster."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]  # type: ignore[no-untyped-call]
    total_cpus = int(ray.cluster_resources().get("CPU", 0))  # type: ignore[no-untyped-call]
    if workers <= 0:
        workers = max(1, total_cpus // cpus_per_worker)
    if workers * cpus_per_worker > total_cpus:
        raise ValueError(
            f"{workers} workers x {cpus_per_worker} CPUs need {workers * cpus_per_worker} CPUs; "
            f"the Ray cluster has {total_cpus} on {len(nodes)} node(s)"
        )
    return workers, len(nodes)


def run_training(
    data_path: str | Path,
    hp: HParams,
    *,
    workers: int = 0,
    cpus_per_worker: int = 1,
    storage_path: str | Path,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    log: Callable[[str], None] = print,
    checkpoint_dir: str | Path | None = None,
) -> TrainResult:
    """Fit the CNN with `TorchTrainer` on the Ray cluster `ray.init()` finds (`RAY_ADDRESS`, the
    job's own cluster) or starts. `on_epoch` is called in this process as each epoch ends. With
    `checkpoint_dir` Ray Train stores its run there, checkpoints every epoch and resumes from the
    latest checkpoint found there (the earlier epochs' metrics come from it, not `on_epoch`)."""
    _match_cluster_auth_mode()  # before Ray's native code is loaded: it reads the mode once
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Empty, Queue

    timings: dict[str, float] = {}
    started = time.time()
    if not ray.is_initialized():
        # The job-level runtime environment reaches the Train controller even on a cluster this
        # process did not start: it polls its workers every 2 s by default, which a short run feels.
        ray.init(runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}})
    timings["ray_connect_seconds"] = time.time() - started
    num_workers, nodes = _cluster_shape(cpus_per_worker, workers)
    log(
        f"Ray Train: {num_workers} data-parallel worker(s) x {cpus_per_worker} CPU on {nodes} node(s), "
        f"{hp.epochs} epoch(s)"
    )
    # The queue actor takes no CPU, so it never competes with the workers for a slot.
    queue: Queue = Queue(actor_options={"num_cpus": 0})
    resume = latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    history: list[dict[str, float]] = previous_history(resume)
    if resume is not None:
        log(f"resuming after epoch {len(history)} from {resume}")
    done = threading.Event()

    def drain(block: bool) -> None:
        while True:
            try:
                metrics = queue.get(block=block, timeout=0.5)
            except Empty:
                return
            if not timings.get("worker_startup_seconds"):
                # The first epoch's numbers arrive one epoch after the workers were up.
                timings["worker_startup_seconds"] = max(
                    0.0, time.time() - fit_started - metrics["epoch_seconds"]
                )
            history.append(metrics)
            log(
                "epoch {epoch:.0f}: train loss {train_loss:.4f} acc {train_accuracy:.4f}, "
                "val loss {val_loss:.4f} acc {val_accuracy:.4f} ({epoch_seconds:.1f} s)".format(**metrics)
            )
            if on_epoch is not None:
                on_epoch(metrics)

    def drain_until_done() -> None:
        while not done.is_set():
            drain(block=True)

    stop_file = Path(checkpoint_dir) / STOP_FILE if checkpoint_dir is not None else None
    if stop_file is not None:
        stop_file.parent.mkdir(parents=True, exist_ok=True)
        stop_file.unlink(missing_ok=True)  # the request of the run before this one

    def pass_the_warning_on() -> None:
        while not done.is_set():
            if WARNED.wait(0.2) and stop_file is not None:
                log("warned: the workers stop after the epoch they are in, keeping its checkpoint")
                stop_file.touch()
                return

    fit_started = time.time()
    drainer = threading.Thread(target=drain_until_done, name="metrics-drain", daemon=True)
    drainer.start()
    threading.Thread(target=pass_the_warning_on, name="warning", daemon=True).start()
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={
            "data": str(Path(data_path).resolve()),
            "hparams": asdict(hp),
            "threads": cpus_per_worker,
            "queue": queue,
            "checkpoint_every_epoch": checkpoint_dir is not None,
            # (TorchTrainer's resume_from_checkpoint is refused by Ray Train v2: the workers load it)
            "resume": str(resume) if resume is not None else None,
            "stop_file": str(stop_file.resolve()) if stop_file is not None else None,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=False, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name="fmnist", storage_path=str(Path(checkpoint_dir or storage_path).resolve())
        ),
    )
    try:
        result = trainer.fit()
    finally:
        done.set()
        drainer.join(timeout=10)
    timings["training_seconds"] = time.time() - fit_started
    drain(block=False)  # whatever arrived after the drainer's last look
    latest = latest_checkpoint(checkpoint_dir) if WARNED.is_set() and checkpoint_dir is not None else None
    stored = previous_history(latest)
    if latest is not None and len(stored) < hp.epochs:
        return TrainResult(
            state_dict_path=latest / CHECKPOINT_FILE,
            history=stored,
            num_workers=num_workers,
            cpus_per_worker=cpus_per_worker,
            nodes=nodes,
            timings=timings,
            stopped_after=len(stored),
        )
    if result.checkpoint is None:
        raise RuntimeError("training ended without a checkpoint from rank 0")
    out_dir = Path(tempfile.mkdtemp(prefix="fmnist-model-"))
    result.checkpoint.to_directory(str(out_dir))
    state_dict_path = out_dir / CHECKPOINT_FILE
    if not state_dict_path.exists():
        raise RuntimeError(f"the checkpoint has no {CHECKPOINT_FILE}")
    if len(history) != hp.epochs:
        raise RuntimeError(f"received metrics for {len(history)} of {hp.epochs} epochs")
    return TrainResult(
        state_dict_path=state_dict_path,
        history=history,
        num_workers=num_workers,
        cpus_per_worker=cpus_per_worker,
        nodes=nodes,
        timings=timings,
    )


# ---- entrypoint ------------------------------------------------------------------------------


def _tracking_uri(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    imported = os.environ.get("CLOUDHPC_IMPORT_MLFLOW")
    if imported:
        return imported if "://" in imported else f"http://{imported}"
    return os.environ.get("MLFLOW_TRACKING_URI") or None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train the example CNN with Ray Train, logging to MLflow.")
    p.add_argument("--data", required=True, help="train.npz with x_train, y_train, x_val, y_val")
    p.add_argument("--epochs", type=int, default=HParams.epochs)
    p.add_argument("--batch-size", type=int, default=HParams.batch_size)
    p.add_argument("--learning-rate", type=float, default=HParams.learning_rate)
    p.add_argument("--momentum", type=float, default=HParams.momentum)
    p.add_argument("--seed", type=int, default=HParams.seed)
    p.add_argument("--min-epoch-seconds", type=float, default=HParams.min_epoch_seconds)
    p.add_argument("--workers", type=int, default=0, help="0: one per --cpus-per-worker CPUs of the cluster")
    p.add_argument("--cpus-per-worker", type=int, default=1)
    p.add_argument("--storage-path", default="ray_results", help="Ray Train's storage (shared on HPC)")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--run-id", default=None, help="MLflow run to resume (default: MLFLOW_RUN_ID)")
    p.add_argument("--experiment", default=None, help="MLflow experiment when no MLFLOW_RUN_ID is given")
    p.add_argument("--no-mlflow", action="store_true", help="train without MLflow (tests)")
    return p


class _Tracking:
    """MLflow, by run id through the client API. The fluent API (`mlflow.log_metrics`) keeps the
    active run per thread: called from the thread that receives the epochs it would start a new run
    (or, with MLFLOW_RUN_ID set, resume and end this one behind our back)."""

    def __init__(self, uri: str, run_id: str | None, experiment: str | None) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(uri)
        if run_id is None:
            name = experiment or "Default"
            found = self.client.get_experiment_by_name(name)
            experiment_id = found.experiment_id if found is not None else self.client.create_experiment(name)
            run_id = self.client.create_run(experiment_id).info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id: str = run_id

    def params(self, values: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in values.items()])

    def metrics(self, values: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()]
        )

    def artifact(self, path: Path, artifact_path: str) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def document(self, value: dict[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, value, artifact_file)

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


def main(argv: list[str] | None = None) -> int:
    """Train and log. Every error propagates: the process exits non-zero and the job fails."""
    entry_started = time.time()
    args = _parser().parse_args(argv)
    hp = HParams(
        args.epochs, args.batch_size, args.learning_rate, args.momentum, args.seed, args.min_epoch_seconds
    )

    def say(line: str) -> None:
        print(f"[train] {line}", flush=True)

    tracking: _Tracking | None = None
    if not args.no_mlflow:
        uri = _tracking_uri(args.tracking_uri)
        if uri is None:
            raise RuntimeError(
                "no MLflow tracking URI: pass --tracking-uri, import the `mlflow` service "
                "(CLOUDHPC_IMPORT_MLFLOW) or set MLFLOW_TRACKING_URI; --no-mlflow trains without it"
            )
        tracking = _Tracking(uri, args.run_id or os.environ.get("MLFLOW_RUN_ID") or None, args.experiment)
        say(f"MLflow run {tracking.run_id} at {uri}")
    try:
        data = load_train_file(args.data)
        say(f"data: {len(data['y_train'])} training and {len(data['y_val'])} validation examples")
        if tracking is not None:
            tracking.params(
                {
                    "hp.epochs": hp.epochs,
                    "hp.batch_size": hp.batch_size,
                    "hp.learning_rate": hp.learning_rate,
                    "hp.momentum": hp.momentum,
                    "hp.seed": hp.seed,
                    "data.train_examples": len(data["y_train"]),
                    "data.validation_examples": len(data["y_val"]),
                }
            )
            tracking.metrics({"timing.entrypoint_start_unix": entry_started})

        def on_epoch(metrics: dict[str, float]) -> None:
            if tracking is not None:
                tracking.metrics(
                    {k: v for k, v in metrics.items() if k != "epoch"}, step=int(metrics["epoch"])
                )

        result = run_training(
            args.data,
            hp,
            workers=args.workers,
            cpus_per_worker=args.cpus_per_worker,
            storage_path=args.storage_path,
            on_epoch=on_epoch,
            log=say,
            checkpoint_dir=os.environ.get("CLOUDHPC_CHECKPOINT_DIR") or None,
        )
        if result.stopped_after is not None:
            # the MLflow run stays RUNNING: the requeued job's next run resumes it
            say(
                f"stopped on the checkpoint warning after epoch {result.stopped_after}, its checkpoint "
                f"saved; exiting {STOPPED_STATUS} to be run again"
            )
            return STOPPED_STATUS
        upload_started = time.time()
        if tracking is not None:
            tracking.params(
                {
                    "ray.num_workers": result.num_workers,
                    "ray.cpus_per_worker": result.cpus_per_worker,
                    "ray.nodes": result.nodes,
                }
            )
            tracking.artifact(result.state_dict_path, "checkpoint")
            tracking.document(ARCHITECTURE, "checkpoint/architecture.json")
        result.timings["model_upload_seconds"] = time.time() - upload_started
        if tracking is not None:
            tracking.metrics({f"timing.{k}": v for k, v in result.timings.items()})
            tracking.metrics({"timing.entrypoint_end_unix": time.time()})
        shutil.rmtree(result.state_dict_path.parent, ignore_errors=True)
        last = result.history[-1]
        summary = {
            "run_id": tracking.run_id if tracking else None,
            "epochs": len(result.history),
            "val_accuracy": last["val_accuracy"],
            "val_loss": last["val_loss"],
            "num_workers": result.num_workers,
            "nodes": result.nodes,
            "timings": result.timings,
        }
        print(f"{RESULT_MARKER} {json.dumps(summary, sort_keys=True)}", flush=True)
    except BaseException:
        if tracking is not None:
            tracking.end("FAILED")
        raise
    if tracking is not None:
        # Later steps still add to the run (accounting, timings, test metrics): MLflow allows that.
        tracking.end("FINISHED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
