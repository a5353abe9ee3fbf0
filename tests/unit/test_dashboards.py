"""The Grafana dashboards: committed JSON in sync with the code, and sound without a Grafana.

Grafana cannot run here; what it would reject or show empty is checked offline: unique panel ids,
a layout inside the 24-column grid with no overlaps, every query on the `datasource` variable,
every metric name one that cloudhpc exports. That every expression returns data from a real
Prometheus is checked in tests/e2e/test_monitoring.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloudhpc.metrics.catalog import METRICS
from cloudhpc.metrics.dashboards import DASHBOARDS, DATASOURCE_UID, OUT_DIR, generated_files, main, stale

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / OUT_DIR
METRIC_NAME = re.compile(r"\bcloudhpc_[a-z0-9_]+")


def dashboards() -> dict[str, dict[str, Any]]:
    return {name: json.loads((GRAFANA / "dashboards" / name).read_text()) for name in DASHBOARDS}


def expressions(board: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_committed_files_are_what_the_code_generates() -> None:
    assert stale(GRAFANA) == [], "run: python -m cloudhpc.metrics.dashboards"
    assert main(["--check", "--out", str(GRAFANA)]) == 0


def test_check_reports_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path)]) == 0
    (tmp_path / "dashboards" / "cloudhpc-job.json").write_text("{}")
    assert main(["--check", "--out", str(tmp_path)]) == 1
    assert "cloudhpc-job.json" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(DASHBOARDS))
def test_layout_ids_and_datasource(name: str) -> None:
    board = dashboards()[name]
    assert board["uid"] in ("cloudhpc-overview", "cloudhpc-job")
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    assert 0 not in ids
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0, panel["title"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        assert min(pos["h"], pos["w"]) >= 1
        mine = {
            (x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & mine, f"panel {panel['title']!r} overlaps another"
        cells |= mine
        for target in panel.get("targets", []):
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert target["expr"].strip()
        if panel["type"] != "row":
            assert panel["title"], panel
            assert panel.get("description"), panel
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == DATASOURCE_UID


@pytest.mark.parametrize("name", list(DASHBOARDS))
def test_every_metric_used_is_exported(name: str) -> None:
    for expr in expressions(dashboards()[name]):
        for used in METRIC_NAME.findall(expr):
            base = re.sub(r"_(bucket|count|sum)$", "", used)
            assert used in METRICS or (base in METRICS and METRICS[base].type == "histogram"), (used, expr)


def test_the_job_dashboard_is_driven_by_job_id() -> None:
    board = dashboards()["cloudhpc-job.json"]
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource", "job_id"]
    panel_exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert all('job_id="$job_id"' in e for e in panel_exprs)


def test_overview_covers_what_the_issue_asks_for() -> None:
    text = " ".join(expressions(dashboards()["cloudhpc-overview.json"]))
    for name in (
        "cloudhpc_jobs",
        "cloudhpc_job_queue_wait_seconds",
        "cloudhpc_job_run_seconds",
        "cloudhpc_job_cpu_efficiency_ratio",
        "cloudhpc_job_memory_efficiency_ratio",
        "cloudhpc_slurm_commands_total",
        "cloudhpc_slurm_command_duration_seconds_bucket",
        "cloudhpc_agent_last_seen_timestamp_seconds",
        "cloudhpc_api_request_duration_seconds_bucket",
    ):
        assert name in text


def test_provisioning_files_parse_and_agree() -> None:
    files = generated_files()
    datasources = yaml.safe_load(files["provisioning/datasources/cloudhpc-prometheus.yaml"])
    assert datasources["datasources"][0]["uid"] == DATASOURCE_UID
    assert datasources["datasources"][0]["type"] == "prometheus"
    providers = yaml.safe_load(files["provisioning/dashboards/cloudhpc.yaml"])
    assert providers["providers"][0]["options"]["path"] == "/etc/grafana/dashboards/cloudhpc"


def test_prometheus_scrape_snippet_has_both_roles() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "cloudhpc-scrape.yaml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"cloudhpc-porter", "cloudhpc-submitter"}
    assert jobs["cloudhpc-porter"]["static_configs"][0]["targets"][0].endswith(":5555")
    assert jobs["cloudhpc-submitter"]["static_configs"][0]["targets"][0].endswith(":5556")


def test_monitoring_doc_lists_every_metric() -> None:
    doc = (ROOT / "docs" / "monitoring.md").read_text()
    missing = [name for name in METRICS if f"`{name}`" not in doc]
    assert not missing, f"docs/monitoring.md does not describe {missing}"
