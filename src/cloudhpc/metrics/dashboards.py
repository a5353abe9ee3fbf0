"""The Grafana dashboards, as code (grafana-foundation-sdk), and the files Grafana provisions.

Over 600 lines on purpose: most of it is the two dashboards declared as data, panel after panel
(title, description, PromQL), over the small panel helpers above them. Split, a reader would lose
the one place where every panel, its query and the file it is written to can be read in order.

Two dashboards:

- **cloudhpc overview** (`cloudhpc-overview`): jobs by state and cluster, transitions, queue wait
  and run time distributions of recent jobs, their CPU and memory efficiency, SLURM command rate
  and latency, SSH reconnects, agent liveness, bridges, API latency;
- **cloudhpc job** (`cloudhpc-job`): one job (variable `job_id`), the figures `jobstats`/`seff`
  users know: queue wait, run time, CPU and memory efficiency, peak memory, CPUs, billing, exit code.

`python -m cloudhpc.metrics.dashboards` writes `dashboards/*.json` and
`provisioning/{datasources,dashboards}/*.yaml` under `OUT_DIR` (inside the `monitoring`
kustomization's root, so plain `kubectl kustomize`/`kubectl apply -k`, Argo CD and Flux can read
them without `--load-restrictor`); `--check` fails when the committed
files differ from what this module generates (a test runs it). Grafana itself is not needed to
build them; every PromQL expression here is run against a real Prometheus in the tests.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from grafana_foundation_sdk.builders import (
    bargauge,
    common,
    dashboard,
    gauge,
    histogram,
    prometheus,
    stat,
    timeseries,
)
from grafana_foundation_sdk.builders import table as table_panel
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_models
from grafana_foundation_sdk.models import dashboard as dashboard_models
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

__all__ = [
    "DASHBOARDS",
    "DATASOURCE_UID",
    "OUT_DIR",
    "generated_files",
    "job_dashboard",
    "main",
    "overview_dashboard",
    "write",
]

DATASOURCE_UID = "prometheus"
"""The uid of the provisioned Prometheus datasource (the default choice of the `datasource` variable)."""

DEFAULT_PROMETHEUS_URL = "http://prometheus-service.monitoring.svc.cluster.local:8080"
"""The original platform's Prometheus Service (namespace `monitoring`, port 8080)."""

OUT_DIR = Path("deploy/kustomize/monitoring/grafana")
"""Where the generated files live, relative to the repository: under the `monitoring` kustomization,
whose configMapGenerator may only read files below its own directory."""

GRAFANA_DASHBOARD_DIR = "/etc/grafana/dashboards/cloudhpc"
"""Where the Grafana deployment mounts `OUT_DIR/dashboards/`."""

_DS = dashboard_models.DataSourceRef(type_val="prometheus", uid="${datasource}")
_CLUSTER = 'cluster=~"$cluster"'
_JOB = 'job_id="$job_id"'
_LIVE = "pending|preparing|queued|running"


def _query(expr: str, legend: str = "", *, instant: bool = False, ref: str = "A") -> prometheus.Dataquery:
    query = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(_DS)
    if legend:
        query = query.legend_format(legend)
    if instant:
        query = query.instant().format(PromQueryFormat.TABLE)
    return query


def _thresholds(*steps: tuple[float | None, str]) -> dashboard.ThresholdsConfig:
    return (
        dashboard.ThresholdsConfig()
        .mode(dashboard_models.ThresholdsMode.ABSOLUTE)
        .steps([dashboard_models.Threshold(value=value, color=color) for value, color in steps])
    )


_Panel = TypeVar("_Panel", timeseries.Panel, stat.Panel, gauge.Panel, histogram.Panel, bargauge.Panel)


def _frame(panel: _Panel, title: str, description: str, *, unit: str, height: int, span: int) -> _Panel:
    """What every panel of ours sets: title, description, the `datasource` variable, unit and size."""
    return panel.title(title).description(description).datasource(_DS).unit(unit).height(height).span(span)


def _efficiency_thresholds() -> dashboard.ThresholdsConfig:
    """Red below 25 %, amber below 60 % (jobstats' "low efficiency" advice)."""
    return _thresholds((None, "red"), (0.25, "orange"), (0.6, "green"))


def _timeseries(
    title: str, description: str, *queries: prometheus.Dataquery, unit: str = "short", stack: bool = False
) -> timeseries.Panel:
    panel = (
        _frame(timeseries.Panel(), title, description, unit=unit, height=8, span=12)
        .fill_opacity(15 if stack else 5)
        .legend(
            common.VizLegendOptions()
            .display_mode(common_models.LegendDisplayMode.LIST)
            .placement(common_models.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
    )
    if stack:
        panel = panel.stacking(common.StackingConfig().mode(common_models.StackingMode.NORMAL))
    for query in queries:
        panel = panel.with_target(query)
    return panel


def _stat(
    title: str, description: str, query: prometheus.Dataquery, *, unit: str = "short", span: int = 6
) -> stat.Panel:
    return (
        _frame(stat.Panel(), title, description, unit=unit, height=4, span=span)
        .graph_mode(common_models.BigValueGraphMode.AREA)
        .color_mode(common_models.BigValueColorMode.VALUE)
        .with_target(query)
    )


def _ratio_gauge(title: str, description: str, query: prometheus.Dataquery, *, span: int = 6) -> gauge.Panel:
    """0..1 shown as percent, red below 25 %, amber below 60 % (jobstats' "low efficiency" advice)."""
    return (
        _frame(gauge.Panel(), title, description, unit="percentunit", height=6, span=span)
        .min(0)
        .max(1)
        .thresholds(_efficiency_thresholds())
        .with_target(query)
    )


def _histogram(title: str, description: str, query: prometheus.Dataquery, *, unit: str) -> histogram.Panel:
    """A distribution over the recent jobs' current values (one series per job)."""
    return (
        _frame(histogram.Panel(), title, description, unit=unit, height=8, span=12)
        .combine(True)
        .fill_opacity(60)
        .with_target(query)
    )


def _bars(title: str, description: str, query: prometheus.Dataquery) -> bargauge.Panel:
    return (
        _frame(bargauge.Panel(), title, description, unit="percentunit", height=8, span=12)
        .min(0)
        .max(1)
        .orientation(common_models.VizOrientation.HORIZONTAL)
        .display_mode(common_models.BarGaugeDisplayMode.GRADIENT)
        .thresholds(_efficiency_thresholds())
        .with_target(query)
    )


def _datasource_variable() -> dashboard.DatasourceVariable:
    return (
        dashboard.DatasourceVariable("datasource")
        .label("Prometheus")
        .type("prometheus")
        .current(dashboard_models.VariableOption(text="Prometheus", value=DATASOURCE_UID))
    )


def _label_variable(name: str, label: str, query: str, *, multi: bool) -> dashboard.QueryVariable:
    variable = (
        dashboard.QueryVariable(name)
        .label(label)
        .datasource(_DS)
        .query(query)
        .refresh(dashboard_models.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dashboard_models.VariableSort.ALPHABETICAL_ASC)
    )
    if multi:
        variable = variable.multi(True).include_all(True).all_value(".*")
    return variable


def _base(uid: str, title: str, description: str) -> dashboard.Dashboard:
    return (
        dashboard.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["cloudhpc", "slurm", "hpc"])
        .time("now-6h", "now")
        .refresh("30s")
        .timezone("browser")
        .tooltip(dashboard_models.DashboardCursorSync.CROSSHAIR)
        .editable()
    )


def overview_dashboard() -> dashboard.Dashboard:
    recent = f"{{{_CLUSTER}}}"
    return (
        _base(
            "cloudhpc-overview",
            "cloudhpc overview",
            "Jobs cloudhpc runs on SLURM clusters, their efficiency, and the health of porter and its agents.",
        )
        .with_variable(_datasource_variable())
        .with_variable(
            _label_variable("cluster", "Cluster", "label_values(cloudhpc_jobs, cluster)", multi=True)
        )
        .with_row(dashboard.Row("Jobs"))
        .with_panel(
            _stat(
                "Live jobs",
                "Jobs not yet ended: pending, preparing, queued or running.",
                _query(f'sum(cloudhpc_jobs{{{_CLUSTER}, state=~"{_LIVE}"}})'),
            )
        )
        .with_panel(
            _stat(
                "Running jobs",
                "Jobs SLURM reports as running.",
                _query(f'sum(cloudhpc_jobs{{{_CLUSTER}, state="running"}})'),
            )
        )
        .with_panel(
            _stat(
                "Failed or timed out (24 h)",
                "Jobs that entered `failed` or `timeout` in the last 24 hours.",
                _query(
                    f'sum(increase(cloudhpc_job_transitions_total{{{_CLUSTER}, to_state=~"failed|timeout"}}[24h]))'
                ),
            ).thresholds(_thresholds((None, "green"), (1, "red")))
        )
        .with_panel(
            _stat(
                "Bridges ready",
                "Bridges of live jobs whose readiness probe answers (0 when no job has bridges).",
                _query("sum(cloudhpc_bridge_ready) or vector(0)"),
            )
        )
        .with_panel(
            _timeseries(
                "Jobs by state",
                "Number of jobs in each state (from porter's job store).",
                _query(f"sum by (state) (cloudhpc_jobs{recent})", "{{state}}"),
                stack=True,
            )
        )
        .with_panel(
            _timeseries(
                "State changes per minute",
                "Transitions into each state, from the job store's audit trail.",
                _query(
                    f"sum by (to_state) (rate(cloudhpc_job_transitions_total{recent}[$__rate_interval])) * 60",
                    "{{to_state}}",
                ),
                unit="short",
            )
        )
        .with_row(dashboard.Row("Recent jobs: queue wait and run time"))
        .with_panel(
            _histogram(
                "Queue wait of recent jobs",
                "Distribution of queue wait over live jobs and jobs ended within the window.",
                _query(f"cloudhpc_job_queue_wait_seconds{recent}", "{{job_name}}"),
                unit="s",
            )
        )
        .with_panel(
            _histogram(
                "Run time of recent jobs",
                "Distribution of run time (sacct Elapsed for ended jobs).",
                _query(f"cloudhpc_job_run_seconds{recent}", "{{job_name}}"),
                unit="s",
            )
        )
        .with_panel(
            _timeseries(
                "Median and 90th percentile queue wait",
                "Across recent jobs.",
                _query(f"quantile(0.5, cloudhpc_job_queue_wait_seconds{recent})", "median"),
                _query(f"quantile(0.9, cloudhpc_job_queue_wait_seconds{recent})", "p90", ref="B"),
                unit="s",
            )
        )
        .with_panel(
            _timeseries(
                "CPU-hours of recent jobs by owner",
                "Run time x allocated CPUs, summed per owner.",
                _query(
                    f"sum by (owner) (cloudhpc_job_run_seconds{recent} * on (job_id) group_left "
                    f"cloudhpc_job_allocated_cpus{recent}) / 3600",
                    "{{owner}}",
                ),
                unit="short",
            )
        )
        .with_panel(
            _timeseries(
                "Units per user and per project",
                "Billing units of ended jobs in the site's unit (clusters.<name>.billing: sacct's billing TRES "
                "or the rates x elapsed time), all jobs however old, summed per owner and per project (the "
                "SLURM account); 0 while no cluster bills.",
                _query(
                    f"sum by (owner, unit) (cloudhpc_billed_units_total{recent}) or vector(0)",
                    "{{owner}} ({{unit}})",
                ),
                _query(
                    f"sum by (project, unit) (cloudhpc_billed_units_total{recent}) or vector(0)",
                    "project {{project}} ({{unit}})",
                    ref="B",
                ),
            )
        )
        .with_row(dashboard.Row("Recent jobs: efficiency"))
        .with_panel(
            _bars(
                "Lowest CPU efficiency",
                "The 15 recent jobs that used the smallest share of their allocated CPU time (seff).",
                _query(f"bottomk(15, cloudhpc_job_cpu_efficiency_ratio{recent})", "{{job_name}} ({{owner}})"),
            )
        )
        .with_panel(
            _bars(
                "Lowest memory efficiency",
                "The 15 recent jobs that used the smallest share of their requested memory (seff).",
                _query(
                    f"bottomk(15, cloudhpc_job_memory_efficiency_ratio{recent})", "{{job_name}} ({{owner}})"
                ),
            )
        )
        .with_panel(
            _timeseries(
                "Mean efficiency by owner",
                "Average CPU and memory efficiency of each owner's recent jobs.",
                _query(f"avg by (owner) (cloudhpc_job_cpu_efficiency_ratio{recent})", "CPU {{owner}}"),
                _query(
                    f"avg by (owner) (cloudhpc_job_memory_efficiency_ratio{recent})",
                    "memory {{owner}}",
                    ref="B",
                ),
                unit="percentunit",
            )
        )
        .with_panel(
            table_panel.Panel()
            .title("Recent jobs")
            .description("Each recent job with its accounting; click a job id for its dashboard.")
            .datasource(_DS)
            .height(8)
            .span(12)
            .with_target(_query(f"cloudhpc_job_cpu_efficiency_ratio{recent}", instant=True, ref="A"))
            .with_target(_query(f"cloudhpc_job_memory_efficiency_ratio{recent}", instant=True, ref="B"))
            .with_target(_query(f"cloudhpc_job_max_rss_bytes{recent}", instant=True, ref="C"))
            .with_target(_query(f"cloudhpc_job_run_seconds{recent}", instant=True, ref="D"))
            .with_target(_query(f"cloudhpc_job_exit_code{recent}", instant=True, ref="E"))
            .with_transformation(dashboard_models.DataTransformerConfig(id_val="merge", options={}))
            .with_transformation(
                dashboard_models.DataTransformerConfig(
                    id_val="organize",
                    options={
                        "excludeByName": {"Time": True, "__name__": True, "instance": True, "job": True},
                        "renameByName": {
                            "Value #A": "CPU eff.",
                            "Value #B": "memory eff.",
                            "Value #C": "max RSS",
                            "Value #D": "run time",
                            "Value #E": "exit code",
                        },
                    },
                )
            )
            .data_links(
                [
                    dashboard.DashboardLink("job dashboard").url(
                        "/d/cloudhpc-job/cloudhpc-job?var-job_id=${__data.fields.job_id}&${__url_time_range}"
                    )
                ]
            ),
        )
        .with_row(dashboard.Row("Platform: SLURM, SSH, agents, API"))
        .with_panel(
            _timeseries(
                "SLURM commands per second",
                "sbatch, squeue, sacct, scancel, seff run by the agents, by outcome.",
                _query(
                    f"sum by (command, outcome) (rate(cloudhpc_slurm_commands_total{recent}[$__rate_interval]))",
                    "{{command}} {{outcome}}",
                ),
                unit="reqps",
            )
        )
        .with_panel(
            _timeseries(
                "SLURM command latency (p95)",
                "95th percentile wall time of each SLURM command over SSH.",
                _query(
                    "histogram_quantile(0.95, sum by (le, command) "
                    f"(rate(cloudhpc_slurm_command_duration_seconds_bucket{recent}[$__rate_interval])))",
                    "{{command}}",
                ),
                unit="s",
            )
        )
        .with_panel(
            _timeseries(
                "API latency (p95) by route",
                "porter's API, long-polls (`?wait=`, the agent's work poll) included.",
                _query(
                    "histogram_quantile(0.95, sum by (le, route) "
                    "(rate(cloudhpc_api_request_duration_seconds_bucket[$__rate_interval])))",
                    "{{route}}",
                ),
                unit="s",
            )
        )
        .with_panel(
            _timeseries(
                "API requests per second by status",
                "All of porter's routes.",
                _query(
                    "sum by (status) (rate(cloudhpc_api_request_duration_seconds_count[$__rate_interval]))",
                    "{{status}}",
                ),
                unit="reqps",
            )
        )
        .with_panel(
            _stat(
                "Agent last seen",
                "Seconds since each cluster's agent last called porter (red after 90 s: offline).",
                _query(
                    f"time() - max by (cluster) (cloudhpc_agent_last_seen_timestamp_seconds{recent})",
                    "{{cluster}}",
                ),
                unit="s",
                span=8,
            ).thresholds(_thresholds((None, "green"), (90, "red")))
        )
        .with_panel(
            _stat(
                "SSH reconnects (1 h)",
                "Times an agent's SSH connection was lost and opened again in the last hour.",
                _query(
                    f"sum by (cluster) (increase(cloudhpc_ssh_reconnects_total{recent}[1h]))", "{{cluster}}"
                ),
                span=8,
            ).thresholds(_thresholds((None, "green"), (1, "orange"), (5, "red")))
        )
        .with_panel(
            _stat(
                "Mailbox refusals (1 h)",
                "S3 mailbox objects that porter or an agent refused in the last hour (unsigned, bad "
                "signature, stale): above 0, something without the mailbox key wrote the mailbox, or the "
                "two sides hold different keys (docs/submitter.md).",
                _query(
                    f"(sum(increase(cloudhpc_mailbox_refused_objects_total{recent}[1h])) or vector(0))"
                    f" + (sum(increase(cloudhpc_mailbox_refused_snapshots_total{recent}[1h])) or vector(0))"
                ),
                span=8,
            ).thresholds(_thresholds((None, "green"), (1, "red")))
        )
    )


def job_dashboard() -> dashboard.Dashboard:
    one = f"{{{_JOB}}}"
    return (
        _base(
            "cloudhpc-job",
            "cloudhpc job",
            "One job's accounting and efficiency, as seff and sacct report them (live and recent jobs).",
        )
        .with_variable(_datasource_variable())
        .with_variable(
            _label_variable(
                "job_id", "Job", "label_values(cloudhpc_job_queue_wait_seconds, job_id)", multi=False
            )
        )
        .with_row(dashboard.Row("Job"))
        .with_panel(
            table_panel.Panel()
            .title("Job")
            .description("Who, where and what kind.")
            .datasource(_DS)
            .height(4)
            .span(24)
            .with_target(_query(f"cloudhpc_job_queue_wait_seconds{one}", instant=True))
            .with_transformation(
                dashboard_models.DataTransformerConfig(
                    id_val="organize",
                    options={
                        "excludeByName": {
                            "Time": True,
                            "__name__": True,
                            "instance": True,
                            "job": True,
                            "Value": True,
                        }
                    },
                )
            )
        )
        .with_panel(
            _stat(
                "Queue wait",
                "Submission to start (so far, while queued).",
                _query(f"cloudhpc_job_queue_wait_seconds{one}"),
                unit="s",
                span=4,
            )
        )
        .with_panel(
            _stat(
                "Run time",
                "sacct Elapsed once ended.",
                _query(f"cloudhpc_job_run_seconds{one}"),
                unit="s",
                span=4,
            )
        )
        .with_panel(
            _stat("Allocated CPUs", "sacct AllocCPUS.", _query(f"cloudhpc_job_allocated_cpus{one}"), span=4)
        )
        .with_panel(
            _stat(
                "Billing units",
                "The billing TRES, where the site reports it.",
                _query(f"cloudhpc_job_billing_units{one}"),
                span=4,
            )
        )
        .with_panel(
            _stat(
                "Peak memory",
                "Largest MaxRSS of any step.",
                _query(f"cloudhpc_job_max_rss_bytes{one}"),
                unit="bytes",
                span=4,
            )
        )
        .with_panel(
            _stat(
                "Exit code", "Non-zero means the job failed.", _query(f"cloudhpc_job_exit_code{one}"), span=4
            ).thresholds(_thresholds((None, "green"), (1, "red")))
        )
        .with_row(dashboard.Row("Efficiency"))
        .with_panel(
            _ratio_gauge(
                "CPU efficiency",
                "CPU time used / (elapsed x allocated cores).",
                _query(f"cloudhpc_job_cpu_efficiency_ratio{one}"),
                span=8,
            )
        )
        .with_panel(
            _ratio_gauge(
                "Memory efficiency",
                "Peak memory / requested memory.",
                _query(f"cloudhpc_job_memory_efficiency_ratio{one}"),
                span=8,
            )
        )
        .with_panel(
            _stat(
                "CPU-hours",
                "Run time x allocated CPUs.",
                _query(
                    f"cloudhpc_job_run_seconds{one} * on (job_id) cloudhpc_job_allocated_cpus{one} / 3600"
                ),
                span=8,
            ).height(6)
        )
        .with_panel(
            _timeseries(
                "Queue wait and run time",
                "How the job's times grew while it was queued and running.",
                _query(f"cloudhpc_job_queue_wait_seconds{one}", "queue wait"),
                _query(f"cloudhpc_job_run_seconds{one}", "run time", ref="B"),
                unit="s",
            ).span(24)
        )
    )


DASHBOARDS: dict[str, Callable[[], dashboard.Dashboard]] = {
    "cloudhpc-overview.json": overview_dashboard,
    "cloudhpc-job.json": job_dashboard,
}


def _to_json(builder: Builder[dashboard_models.Dashboard]) -> str:
    board = builder.build()
    # Grafana needs a unique id per panel; the builders leave them unset.
    for number, panel in enumerate(board.panels or [], start=1):
        panel.id_val = number
    return json.dumps(board, cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def _provisioning_datasource() -> str:
    return f"""# Generated by `python -m cloudhpc.metrics.dashboards`: edit the code, not this file.
# The Prometheus that scrapes porter and the submitters (deploy/prometheus/cloudhpc-scrape.yaml).
apiVersion: 1
datasources:
  - name: Prometheus
    uid: {DATASOURCE_UID}
    type: prometheus
    access: proxy
    url: {DEFAULT_PROMETHEUS_URL}
    isDefault: true
    editable: false
    jsonData:
      timeInterval: 15s
"""


def _provisioning_dashboards() -> str:
    return f"""# Generated by `python -m cloudhpc.metrics.dashboards`: edit the code, not this file.
# Mount {OUT_DIR}/dashboards/ at {GRAFANA_DASHBOARD_DIR}.
apiVersion: 1
providers:
  - name: cloudhpc
    folder: cloudhpc
    type: file
    disableDeletion: true
    allowUiUpdates: false
    updateIntervalSeconds: 30
    options:
      path: {GRAFANA_DASHBOARD_DIR}
"""


def generated_files() -> dict[str, str]:
    """Relative path under `OUT_DIR` -> content."""
    files = {f"dashboards/{name}": _to_json(build()) for name, build in DASHBOARDS.items()}
    files["provisioning/datasources/cloudhpc-prometheus.yaml"] = _provisioning_datasource()
    files["provisioning/dashboards/cloudhpc.yaml"] = _provisioning_dashboards()
    return files


def write(root: Path) -> list[Path]:
    written = []
    for relative, content in generated_files().items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != content:
            path.write_text(content)
            written.append(path)
    return written


def stale(root: Path) -> list[str]:
    """Files under `root` that differ from (or are missing for) what the code generates."""
    return [
        rel
        for rel, content in generated_files().items()
        if not (root / rel).exists() or (root / rel).read_text() != content
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cloudhpc.metrics.dashboards", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"default: {OUT_DIR}")
    parser.add_argument("--check", action="store_true", help="exit 1 if the files are not up to date")
    args = parser.parse_args(argv)
    if args.check:
        out_of_date = stale(args.out)
        for rel in out_of_date:
            print(f"out of date: {args.out / rel}", file=sys.stderr)
        if out_of_date:
            print("regenerate with: python -m cloudhpc.metrics.dashboards", file=sys.stderr)
        return 1 if out_of_date else 0
    for path in write(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
