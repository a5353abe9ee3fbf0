"""Every metric cloudhpc exports, once: name, type, labels and help text.

The exporters take their help text from here, `docs/monitoring.md` lists the same names (a test
checks it), and the dashboards may only use names from this table (another test), so a renamed
metric cannot leave a dashboard or a page silently pointing at nothing.

Naming follows Prometheus conventions: base units (`_seconds`, `_bytes`, `_ratio` for 0..1),
`_total` for counters, and one metric per quantity instead of the original's three gauges whose
`metric` label carried sacct abbreviations (CPUEffPe, ElaSec, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["AGENT_METRICS", "JOB_LABELS", "METRICS", "PORTER_METRICS", "MetricSpec"]

JOB_LABELS = ("cluster", "owner", "job_id", "job_name", "kind")
"""Labels of every per-job series. Bounded: only live jobs and the latest
`porter.metrics.max_recent_jobs` jobs that ended within `porter.metrics.recent_window` have
series. Owner and job name are user data: `/metrics` needs the scrape token (docs/security.md)."""


@dataclass(frozen=True)
class MetricSpec:
    name: str
    """As it appears in PromQL (counters with `_total`)."""
    type: Literal["gauge", "counter", "histogram"]
    labels: tuple[str, ...]
    help: str
    role: Literal["porter", "submitter"]


PORTER_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "cloudhpc_jobs", "gauge", ("cluster", "state"), "Jobs in the store by cluster and state", "porter"
    ),
    MetricSpec(
        "cloudhpc_array_tasks",
        "gauge",
        ("cluster", "state"),
        "Tasks of the live array jobs by cluster and task state (an array counts once in cloudhpc_jobs)",
        "porter",
    ),
    MetricSpec(
        "cloudhpc_job_restarts_total",
        "counter",
        ("cluster",),
        "Times SLURM ran a job again (requeue before the time limit, an operator's scontrol requeue, "
        "preemption), summed over every job of the cluster",
        "porter",
    ),
    MetricSpec(
        "cloudhpc_billed_units_total",
        "counter",
        ("cluster", "owner", "project", "unit"),
        "Units billed to ended jobs in the site's unit (clusters.<name>.billing), however old, by owner and "
        "project (the job's SLURM account, '' when none): sacct's billing TRES or the configured rates x "
        "elapsed time",
        "porter",
    ),
    MetricSpec(
        "cloudhpc_jobs_by_owner",
        "gauge",
        ("cluster", "owner", "state"),
        "Jobs in the store by cluster, owner and state: every job however old (per-job series cover "
        "recent jobs only)",
        "porter",
    ),
    MetricSpec(
        "cloudhpc_metrics_ended_jobs_left_out",
        "gauge",
        (),
        "Jobs that ended within porter.metrics.recent_window but have no per-job series because "
        "porter.metrics.max_recent_jobs later-ended jobs have them",
        "porter",
    ),
    MetricSpec(
        "cloudhpc_job_transitions_total",
        "counter",
        ("cluster", "from_state", "to_state"),
        "State changes of jobs, counted from the job store's audit trail (from_state `none`: creation)",
        "porter",
    ),
    MetricSpec(
        "cloudhpc_job_queue_wait_seconds",
        "gauge",
        JOB_LABELS,
        "Time from submission to SLURM until start (so far, for a job still queued)",
        "porter",
    ),
    MetricSpec(
        "cloudhpc_job_run_seconds",
        "gauge",
        JOB_LABELS,
        "Run time: sacct's Elapsed once the job ended, time since start while it runs",
        "porter",
    ),
    MetricSpec(
        "cloudhpc_job_cpu_efficiency_ratio",
        "gauge",
        JOB_LABELS,
        "CPU time used / (elapsed x allocated cores), as seff reports it (0..1)",
        "porter",
    ),
    MetricSpec(
        "cloudhpc_job_memory_efficiency_ratio",
        "gauge",
        JOB_LABELS,
        "Peak memory / requested memory, as seff reports it (may exceed 1 where limits are not enforced)",
        "porter",
    ),
    MetricSpec(
        "cloudhpc_job_max_rss_bytes", "gauge", JOB_LABELS, "Largest MaxRSS of any step (sacct)", "porter"
    ),
    MetricSpec(
        "cloudhpc_job_allocated_cpus",
        "gauge",
        JOB_LABELS,
        "CPUs allocated to the job (sacct AllocCPUS)",
        "porter",
    ),
    MetricSpec(
        "cloudhpc_job_billing_units",
        "gauge",
        JOB_LABELS,
        "Billing units SLURM charged (the billing TRES), where the site reports them",
        "porter",
    ),
    MetricSpec("cloudhpc_job_exit_code", "gauge", JOB_LABELS, "Exit code of an ended job", "porter"),
    MetricSpec(
        "cloudhpc_agent_last_seen_timestamp_seconds",
        "gauge",
        ("cluster",),
        "When each cluster's agent last called porter (Unix time)",
        "porter",
    ),
    MetricSpec(
        "cloudhpc_bridge_ready",
        "gauge",
        ("job_id", "name"),
        "1 when a job's bridge answers its readiness probe, else 0",
        "porter",
    ),
    MetricSpec(
        "cloudhpc_api_request_duration_seconds",
        "histogram",
        ("route", "method", "status"),
        "porter API latency by route template, method and status",
        "porter",
    ),
    MetricSpec(
        "cloudhpc_mailbox_refused_objects_total",
        "counter",
        ("cluster", "reason"),
        "Objects of a cluster's S3 mailbox that porter refused to act on (the agent's messages, its own "
        "cursor): reason `unsigned` or `bad_signature` (altered, moved from another key, another key)",
        "porter",
    ),
)

AGENT_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "cloudhpc_slurm_commands_total",
        "counter",
        ("cluster", "command", "outcome"),
        "SLURM commands run over SSH by command and outcome (ok, error, timeout, disconnect)",
        "submitter",
    ),
    MetricSpec(
        "cloudhpc_slurm_command_duration_seconds",
        "histogram",
        ("cluster", "command"),
        "Wall time of SLURM commands over SSH, connection set-up included",
        "submitter",
    ),
    MetricSpec(
        "cloudhpc_ssh_reconnects_total",
        "counter",
        ("cluster",),
        "Times the agent's SSH connection to a cluster was lost and opened again",
        "submitter",
    ),
    MetricSpec(
        "cloudhpc_mailbox_refused_snapshots_total",
        "counter",
        ("cluster", "reason"),
        "porter's snapshots in the S3 mailbox that the agent refused to act on: reason `unsigned`, "
        "`bad_signature` (altered, moved from another key, another key) or `stale` (too old: a replay, "
        "porter not publishing, or clocks apart)",
        "submitter",
    ),
)

METRICS: dict[str, MetricSpec] = {m.name: m for m in (*PORTER_METRICS, *AGENT_METRICS)}


def spec(name: str) -> MetricSpec:
    return METRICS[name]
