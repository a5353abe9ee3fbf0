"""#15 item 3 end to end on the SLURM testbed (porter and the submitter as processes, SLURM over SSH):
"when will it start, and what will it cost?" checked against what SLURM then does.

A second partition is made for the test (`scontrol create`, as root, deleted after it) on the same
node with `MaxCPUsPerNode=1`, so one 1-CPU job fills it while the testbed's `debug` partition (and
the other tests' jobs there) stays free. Then: both partitions idle predict a start now; with a
job running on the full one, its prediction moves to that job's end while `debug`'s stays now and
is the `earliest`; a job with `partition: auto` goes to `debug` (SLURM's own record says so, the
queued transition's reason says why) and starts when predicted; after its end its accounting and
`cloudhpc_billed_units_total` carry the units of the configured rates, and the dashboard's PromQL
for them runs on the real Prometheus.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from cloudhpc.cli.main import app
from cloudhpc.client import Client
from cloudhpc.domain.billing import Estimate
from cloudhpc.domain.jobs import Job
from cloudhpc.domain.states import JobState
from cloudhpc.metrics.dashboards import OUT_DIR
from cloudhpc.store import Store
from tests.e2e.harness import Deployment, final_accounting, running
from tests.testbed import Testbed

ROOT = Path(__file__).resolve().parents[2]
DEBUG_RATE = 1.0
FULL_RATE = 3.0


def _scontrol(*args: str) -> None:
    subprocess.run(["scontrol", *args], check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture
def full_partition() -> Iterator[str]:
    """A partition on the testbed's node that one 1-CPU job fills; deleted after the test."""
    name = f"h1est{uuid.uuid4().hex[:6]}"
    _scontrol(
        "create", f"PartitionName={name}", "Nodes=ALL", "MaxCPUsPerNode=1", "MaxTime=INFINITE", "State=UP"
    )
    try:
        yield name
    finally:
        subprocess.run(["scancel", f"--partition={name}"], check=False, timeout=30)
        _scontrol("delete", f"PartitionName={name}")


@pytest.fixture
def deployment(tmp_path: Path, testbed: Testbed, full_partition: str) -> Iterator[Deployment]:
    dep = Deployment(tmp_path / "deploy", testbed, f"sqlite:///{tmp_path / 'state.db'}")
    data = yaml.safe_load(dep.config.read_text())
    data["clusters"]["testbed"]["limits"] = {"partitions": {"debug": {}, full_partition: {}}}
    data["clusters"]["testbed"]["billing"] = {
        "unit": "BU",
        "partitions": {"debug": {"cpu_hour": DEBUG_RATE}, full_partition: {"cpu_hour": FULL_RATE}},
    }
    dep.config.write_text(yaml.safe_dump(data))
    with running(dep):
        yield dep


def by_partition(estimate: Estimate) -> dict[str | None, Any]:
    return {e.partition: e for e in estimate.partitions}


def spec(name: str, script: str, **resources: Any) -> dict[str, Any]:
    return {
        "name": name,
        "cluster": "testbed",
        "script": script,
        "resources": {"cpus_per_task": 1} | resources,
    }


def script_file(deployment: Deployment) -> Path:
    path = deployment.root / "probe.sh"
    path.write_text("true\n")
    return path


def estimate_until(client: Client, probe: dict[str, Any], now: set[str], timeout: float = 180) -> Estimate:
    """The estimate once SLURM predicts a start within a minute on each partition of `now`."""
    deadline = time.monotonic() + timeout
    while True:
        asked = datetime.now(UTC)
        found = client.estimate(probe)
        parts = by_partition(found)
        late = [
            p
            for p in now
            if p not in parts or parts[p].start is None or parts[p].start - asked > timedelta(seconds=60)
        ]
        if not late:
            return found
        assert time.monotonic() < deadline, f"no start within a minute on {late} for {timeout} s: {found}"
        time.sleep(5)


def wait_for(client: Client, job: Job, state: JobState, timeout: float = 90) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(job, wait=5, since_state=job.state)
        if job.state == state or job.state.terminal:
            return job
    raise AssertionError(f"job {job.id} still {job.state.value} after {timeout} s")


def test_estimates_follow_what_slurm_does(
    deployment: Deployment, testbed: Testbed, full_partition: str
) -> None:
    full = full_partition
    with deployment.client() as client:
        probe = spec("probe", "true", time="00:05:00")

        # ---- both partitions idle: SLURM would start the job now on either, at each one's rate (the
        # testbed's node is shared with other tests' jobs: asked again until it has room for one more)
        idle = estimate_until(client, probe, {"debug", full})
        parts = by_partition(idle)
        assert set(parts) == {"debug", full}, idle
        assert (parts["debug"].cost, parts[full].cost) == (
            pytest.approx(DEBUG_RATE * 5 / 60, abs=1e-6),
            pytest.approx(FULL_RATE * 5 / 60, abs=1e-6),
        )
        assert idle.unit == "BU"

        # ---- the CLI: the table, and the same answer as JSON
        env = {"CLOUDHPC_URL": deployment.url, "CLOUDHPC_TOKEN": deployment.user_token, "COLUMNS": "200"}
        command = ["jobs", "submit", "--name", "probe", "--cluster", "testbed", "-r", "time=00:05:00"]
        shown = CliRunner().invoke(
            app, [*command, "--script", str(script_file(deployment)), "--estimate"], env=env
        )
        assert shown.exit_code == 0, shown.output
        assert "earliest" in shown.stdout
        assert full in shown.stdout
        as_json = CliRunner().invoke(
            app, [*command, "--script", str(script_file(deployment)), "--estimate", "-o", "json"], env=env
        )
        assert as_json.exit_code == 0, as_json.output
        assert {p["partition"] for p in json.loads(as_json.stdout)["partitions"]} == {"debug", full}
        assert [j for j in client.list() if j.name == "probe"] == []  # --estimate submitted nothing

        # ---- a job fills the second partition: its prediction moves to that job's end
        blocker = client.submit(spec("blocker", "sleep 600", partition=full, time="00:10:00"))
        blocker = wait_for(client, blocker, JobState.RUNNING)
        assert blocker.state == JobState.RUNNING, blocker
        assert blocker.started_at is not None
        busy = estimate_until(client, probe, {"debug"})
        parts = by_partition(busy)
        assert parts["debug"].start is not None
        assert parts[full].start is not None
        assert parts[full].start >= blocker.started_at + timedelta(minutes=9), (
            parts[full],
            blocker.started_at,
        )
        assert parts[full].start - parts["debug"].start > timedelta(minutes=5)
        assert busy.earliest == "debug"

        # ---- partition auto goes where SLURM predicted the earliest start, and says so
        predicted = parts["debug"].start
        auto = client.submit(spec("auto", "sleep 2", partition="auto", time="00:05:00"))
        auto = client.wait(auto, timeout=120)
        assert auto.state == JobState.COMPLETED, auto
        assert auto.spec.resources.partition == "auto"  # the stored spec is what was submitted
        assert auto.started_at is not None
        assert auto.started_at - predicted < timedelta(seconds=120), (auto.started_at, predicted)
        store = Store(deployment.database)
        try:
            queued = [t for t in store.transitions(auto.id) if t.to_state == JobState.QUEUED]
        finally:
            store.close()
        assert queued[0].reason is not None
        assert queued[0].reason.startswith("partition auto: debug, the earliest predicted start of "), queued
        assert full in queued[0].reason

        # ---- after the end: the units of the rates, in the accounting and the metric
        accounting = final_accounting(client, auto)
        allocation = accounting.records[0]
        assert allocation.partition == "debug"  # SLURM's own record (sacct, through the agent)
        assert accounting.billed is not None, accounting
        assert allocation.alloc_cpus is not None
        assert allocation.elapsed_seconds is not None
        expected = allocation.alloc_cpus * allocation.elapsed_seconds / 3600 * DEBUG_RATE
        assert (accounting.billed.unit, accounting.billed.source) == ("BU", "rates")
        assert accounting.billed.units == pytest.approx(expected, abs=1e-6)
        assert accounting.billed.units > 0
        client.cancel(blocker)

    token = Path(yaml.safe_load(deployment.config.read_text())["porter"]["metrics"]["token_file"]).read_text()
    metrics = httpx.get(
        f"{deployment.url}/metrics", headers={"Authorization": f"Bearer {token.strip()}"}, timeout=10
    ).text
    line = next(m for m in metrics.splitlines() if m.startswith("cloudhpc_billed_units_total{"))
    assert 'owner="alice"' in line
    assert 'unit="BU"' in line
    assert float(line.rsplit(" ", 1)[1]) == pytest.approx(accounting.billed.units, abs=1e-6)

    # ---- the dashboard panel's PromQL is valid for the real Prometheus
    board = json.loads((ROOT / OUT_DIR / "dashboards" / "cloudhpc-overview.json").read_text())
    [panel] = [p for p in board["panels"] if p["title"] == "Units per user and per project"]
    for target in panel["targets"]:
        expr = target["expr"].replace("$cluster", ".*")
        answer = httpx.get(
            f"{testbed.prometheus_url}/api/v1/query", params={"query": expr}, timeout=10
        ).json()
        assert answer["status"] == "success", (expr, answer)
