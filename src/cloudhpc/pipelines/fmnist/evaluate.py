"""Evaluate on the held-out test split, gate on the logged metrics, register the model in MLflow.

The original's gate read the run's metrics back from MLflow and skipped every threshold whose
metric was missing; its training step had dropped them all (a key filter kept only keys containing
"name"), so the gate compared nothing and always passed. Here the gate reads the metrics back from
MLflow too (what was really logged, not what this process believes it logged), and a missing
metric is a failure, like a low one.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cloudhpc.exceptions import QualityGateFailed

__all__ = [
    "DEFAULT_THRESHOLDS",
    "EVALUATION_METRICS",
    "GateResult",
    "Registration",
    "check_gate",
    "classification_metrics",
    "evaluate_and_register",
    "load_checkpoint_model",
    "predict",
]

log = logging.getLogger(__name__)

DEFAULT_THRESHOLDS = {"test_accuracy": 0.80, "test_macro_precision": 0.80, "test_macro_recall": 0.80}
"""The original's thresholds (accuracy, precision, recall at least 0.80), on the test split."""

EVALUATION_METRICS = (
    "test_accuracy",
    "test_macro_precision",
    "test_macro_recall",
    "test_macro_f1",
    "test_examples",
    "gate_passed",
)
"""The evaluation's summary metrics, as the pipeline's Metrics artifact shows them in the Kubeflow UI
(the per-class ones stay in the MLflow run)."""


@dataclass(frozen=True)
class GateResult:
    passed: bool
    failures: list[str]

    def summary(self) -> str:
        return "passed" if self.passed else "FAILED: " + "; ".join(self.failures)


@dataclass
class Registration:
    run_id: str
    metrics: dict[str, float]
    gate: GateResult
    model_name: str | None = None
    model_version: str | None = None
    model_uri: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def classification_metrics(
    y_true: npt.NDArray[np.int64], y_pred: npt.NDArray[np.int64], classes: int = 10
) -> dict[str, float]:
    """Overall accuracy, macro precision/recall/F1 and per-class precision/recall, from a confusion
    matrix. A class never predicted has precision 0 (not NaN), so a collapsed model scores low."""
    if len(y_true) != len(y_pred) or len(y_true) == 0:
        raise ValueError("need equally long, non-empty label arrays")
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    tp = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    actual = confusion.sum(axis=1).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    f1 = np.divide(
        2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0
    )
    present = actual > 0
    metrics = {
        "test_accuracy": float(tp.sum() / len(y_true)),
        "test_macro_precision": float(precision[present].mean()),
        "test_macro_recall": float(recall[present].mean()),
        "test_macro_f1": float(f1[present].mean()),
        "test_examples": float(len(y_true)),
    }
    for cls in range(classes):
        metrics[f"test_class_{cls}_precision"] = float(precision[cls])
        metrics[f"test_class_{cls}_recall"] = float(recall[cls])
    return metrics


def check_gate(metrics: Mapping[str, float], thresholds: Mapping[str, float]) -> GateResult:
    """Every threshold must be met by a metric that exists; a missing metric fails the gate."""
    if not thresholds:
        return GateResult(False, ["no thresholds were given; a gate that checks nothing passes nothing"])
    failures = []
    for name, minimum in sorted(thresholds.items()):
        value = metrics.get(name)
        if value is None:
            failures.append(f"{name} was not logged")
        elif not value >= minimum:  # NaN fails too
            failures.append(f"{name} = {value:.4f} < {minimum}")
    return GateResult(not failures, failures)


def load_checkpoint_model(state_dict_path: str | Path) -> Any:
    """The CNN with the weights the training job saved."""
    import torch

    from cloudhpc.pipelines.fmnist.train import CNN

    model = CNN()
    model.load_state_dict(torch.load(state_dict_path, map_location="cpu", weights_only=True))
    return model.eval()


def predict(model: Any, images: npt.NDArray[np.uint8], batch_size: int = 1024) -> npt.NDArray[np.int64]:
    import torch

    from cloudhpc.pipelines.fmnist.train import normalise

    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            out.append(model(normalise(images[start : start + batch_size])).argmax(1).numpy())
    return np.concatenate(out).astype(np.int64)


def evaluate_and_register(
    *,
    tracking_uri: str,
    run_id: str,
    test_path: str | Path,
    thresholds: Mapping[str, float] = DEFAULT_THRESHOLDS,
    registered_model_name: str = "fmnist-cnn",
    tags: Mapping[str, str] | None = None,
    state_dict_path: str | Path | None = None,
    say: Callable[[str], None] = print,
) -> Registration:
    """Score the run's checkpoint on the held-out test split, log the metrics to the run, read them
    back, gate, and register the model (with its signature) only when the gate passes.

    `state_dict_path` is the weights to score when the caller has them (the pipeline's Model
    artifact, so the model the lineage shows is the one scored and registered); without it they
    are downloaded from the run.

    Raises `QualityGateFailed` after logging why, so the pipeline step fails visibly.
    """
    import mlflow
    import torch
    from mlflow.entities import Metric
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    from cloudhpc.pipelines.fmnist.data import load_test_split

    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    if state_dict_path is not None:
        model = load_checkpoint_model(state_dict_path)
    else:
        from cloudhpc.pipelines.fmnist.steps import CHECKPOINT_ARTIFACT

        with tempfile.TemporaryDirectory() as tmp:
            model = load_checkpoint_model(client.download_artifacts(run_id, CHECKPOINT_ARTIFACT, tmp))
    x_test, y_test = load_test_split(test_path)
    say(f"evaluating run {run_id} on the held-out test split ({len(y_test)} examples)")
    metrics = classification_metrics(y_test, predict(model, x_test))
    now = int(time.time() * 1000)
    client.log_batch(
        run_id, metrics=[Metric(key=k, value=v, timestamp=now, step=0) for k, v in metrics.items()]
    )
    logged = client.get_run(run_id).data.metrics  # the gate judges what MLflow holds
    gate = check_gate(logged, thresholds)
    logged["gate_passed"] = 1.0 if gate.passed else 0.0
    client.log_metric(run_id, "gate_passed", logged["gate_passed"])
    client.set_tag(run_id, "gate", gate.summary()[:5000])
    say(
        f"test accuracy {logged.get('test_accuracy', float('nan')):.4f}, macro precision "
        f"{logged.get('test_macro_precision', float('nan')):.4f}, macro recall "
        f"{logged.get('test_macro_recall', float('nan')):.4f}; gate {gate.summary()}"
    )
    result = Registration(run_id=run_id, metrics=dict(logged), gate=gate)
    if not gate.passed:
        raise QualityGateFailed(
            f"model of run {run_id} not registered: the evaluation gate {gate.summary()} "
            f"(thresholds {dict(thresholds)})"
        )
    example = (x_test[:4].astype(np.float32) / 255.0 - 0.5) / 0.5
    example = example[:, None, :, :]
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, output)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            signature=signature,
            input_example=example,
            registered_model_name=registered_model_name,
            # Listing them skips MLflow's requirement inference, a subprocess that takes ~10 s.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
        )
    version = str(info.registered_model_version)
    for key, value in {"run_id": run_id, **dict(tags or {})}.items():
        client.set_model_version_tag(registered_model_name, version, key, value)
    client.set_model_version_tag(
        registered_model_name, version, "test_accuracy", f"{metrics['test_accuracy']:.4f}"
    )
    say(f"registered {registered_model_name} version {version} ({info.model_uri})")
    result.model_name = registered_model_name
    result.model_version = version
    result.model_uri = f"models:/{registered_model_name}/{version}"
    return result
