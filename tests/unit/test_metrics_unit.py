"""Metric rules that need no server: per-job figures, the text format, artifact key layout."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import StorageError
from cloudhpc.metrics.agent import AgentMetrics
from cloudhpc.metrics.catalog import AGENT_METRICS, JOB_LABELS, METRICS
from cloudhpc.metrics.exposition import Family, format_value, label_set, render
from cloudhpc.metrics.porter import job_values
from cloudhpc.storage.artifacts import artifact_key, foreign_keys, job_prefix
from cloudhpc.store import JobFacts

NOW = datetime(2026, 1, 2, 12, 0, tzinfo=UTC).timestamp()
JOB_ID = uuid.UUID("8642c8fe-657f-45f7-a673-019c8db631a9")


def facts(state: JobState, **fields: object) -> JobFacts:
    base: dict[str, object] = {
        "id": str(JOB_ID),
        "owner": "alice",
        "cluster": "mahti",
        "name": "train",
        "kind": "batch",
        "state": state,
        "exit_code": None,
        "submitted_at": None,
        "started_at": None,
        "ended_at": None,
    }
    base.update(fields)
    return JobFacts(**base)  # type: ignore[arg-type]


def test_pending_job_has_no_figures() -> None:
    assert job_values(facts(JobState.PENDING), NOW) == {}


def test_queued_job_waits_until_now() -> None:
    job = facts(JobState.QUEUED, submitted_at=NOW - (90))
    assert job_values(job, NOW) == {"cloudhpc_job_queue_wait_seconds": 90.0}


def test_running_job_runs_until_now() -> None:
    job = facts(JobState.RUNNING, submitted_at=NOW - (100), started_at=NOW - (40))
    assert job_values(job, NOW) == {"cloudhpc_job_queue_wait_seconds": 60.0, "cloudhpc_job_run_seconds": 40.0}


def test_ended_job_prefers_sacct() -> None:
    job = facts(
        JobState.FAILED,
        exit_code=3,
        submitted_at=NOW - (100),
        started_at=NOW - (50),
        ended_at=NOW - (10),
        accounting_stamp=NOW - 5,
        cpu_efficiency=0.25,
        memory_efficiency=0.5,
        alloc_cpus=4,
        billing=8.0,
        elapsed_seconds=41.0,
        max_rss_bytes=123456,
    )
    assert job_values(job, NOW) == {
        "cloudhpc_job_queue_wait_seconds": 50.0,
        "cloudhpc_job_run_seconds": 41.0,
        "cloudhpc_job_cpu_efficiency_ratio": 0.25,
        "cloudhpc_job_memory_efficiency_ratio": 0.5,
        "cloudhpc_job_max_rss_bytes": 123456,
        "cloudhpc_job_allocated_cpus": 4,
        "cloudhpc_job_billing_units": 8.0,
        "cloudhpc_job_exit_code": 3,
    }


def test_cancelled_in_queue_waited_until_the_end() -> None:
    job = facts(JobState.CANCELLED, submitted_at=NOW - (30), ended_at=NOW - (10))
    assert job_values(job, NOW) == {"cloudhpc_job_queue_wait_seconds": 20.0}


def test_exposition_parses_and_escapes() -> None:
    family = Family(METRICS["cloudhpc_job_exit_code"])
    hostile = 'a"b\\c\nd'
    family.add(label_set(JOB_LABELS, ("mahti", hostile, str(JOB_ID), "train", "batch")), 2)
    jobs = Family(METRICS["cloudhpc_jobs"])
    jobs.add_values({("mahti", "running"): 3.0, ("mahti", "completed"): 0.0})
    text = render([family, jobs])
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    (sample,) = parsed["cloudhpc_job_exit_code"].samples
    assert sample.labels["owner"] == hostile
    assert sample.value == 2
    assert {s.labels["state"]: s.value for s in parsed["cloudhpc_jobs"].samples} == {
        "running": 3,
        "completed": 0,
    }
    assert parsed["cloudhpc_jobs"].type == "gauge"


@pytest.mark.parametrize(
    ("value", "text"),
    [(3.0, "3"), (0.25, "0.25"), (float("nan"), "NaN"), (float("inf"), "+Inf"), (1e20, "1e+20")],
)
def test_format_value(value: float, text: str) -> None:
    assert format_value(value) == text


def test_agent_metrics_count_slurm_commands_only() -> None:
    metrics = AgentMetrics()

    class Conn:
        reconnects = 2

    metrics.watch_connection("mahti", Conn())
    metrics.observe_command("mahti", "sbatch", "ok", 0.2)
    metrics.observe_command("mahti", "squeue", "timeout", 30.0)
    metrics.observe_command("mahti", "bash", "ok", 0.1)  # an environment build: not SLURM
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    assert set(families) == {spec.name.removesuffix("_total") for spec in AGENT_METRICS}
    commands = {
        (s.labels["command"], s.labels["outcome"]): s.value
        for s in families["cloudhpc_slurm_commands"].samples
    }
    assert commands == {("sbatch", "ok"): 1.0, ("squeue", "timeout"): 1.0}
    (reconnects,) = families["cloudhpc_ssh_reconnects"].samples
    assert (reconnects.name, reconnects.labels, reconnects.value) == (
        "cloudhpc_ssh_reconnects_total",
        {"cluster": "mahti"},
        2,
    )
    assert "_created" not in metrics.render().decode()


@pytest.mark.parametrize(
    ("owner", "segment"),
    [
        ("alice", "alice"),
        ("a/b", "a%2Fb"),
        ("..", "%2E%2E"),
        (".", "%2E"),
        ("x y", "x%20y"),
        ("me@site", "me@site"),
    ],
)
def test_artifact_prefix_keeps_the_owner_in_one_segment(owner: str, segment: str) -> None:
    assert job_prefix(owner, JOB_ID) == f"jobs/{segment}/{JOB_ID}/"
    assert artifact_key(owner, JOB_ID, "files/conf/a.yaml") == f"jobs/{segment}/{JOB_ID}/files/conf/a.yaml"


def test_artifact_names_cannot_climb_out() -> None:
    with pytest.raises(StorageError):
        artifact_key("alice", JOB_ID, "../../bob/x")


def test_foreign_keys() -> None:
    mine = job_prefix("alice", JOB_ID)
    keys = [mine + "job.sh", mine, f"jobs/bob/{JOB_ID}/job.sh", "mailbox/x"]
    assert foreign_keys("alice", JOB_ID, keys) == keys[1:]
