"""porter's `/metrics` computed from a real job store (SQLite and the testbed's PostgreSQL).

The accounting documents are built from real sacct/seff output (tests/recordings) the way the
agent builds them, so the JSON paths the store reads are the ones the agent writes.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from cloudhpc.config import MetricsConfig, PorterConfig, Settings
from cloudhpc.domain.jobs import Job, JobSpec
from cloudhpc.domain.reports import JobReport
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import ConfigError
from cloudhpc.hpc.slurm import Sacct, Seff
from cloudhpc.metrics.porter import PorterMetrics
from cloudhpc.porter.app import create_app
from cloudhpc.store import Store
from cloudhpc.submitter.agent import _jsonable
from tests.recordings import load_recording

NOW = datetime.now(UTC)


def accounting_record() -> dict[str, Any]:
    """What the agent stores for SLURM job 10 of the multistep recording."""
    rows = Sacct(jobs=["10"]).parse(load_recording("sacct_multistep"))
    records = [r.record for r in rows if r.record.job_id == rows[0].record.job_id]
    efficiency = Seff("10").parse(load_recording("seff_completed"))
    return {
        "slurm_job_id": records[0].job_id,
        "records": [_jsonable(dataclasses.asdict(r)) for r in records],
        "efficiency": _jsonable(dataclasses.asdict(efficiency)),
    }


def walk(store: Store, job: Job, *states: JobState, **fields: Any) -> None:
    for seq, state in enumerate(states, start=1):
        extra = fields if seq == len(states) else {}
        applied = store.apply_report(JobReport(job_id=job.id, seq=seq, state=state, **extra), actor="test")
        assert applied is not None
        assert applied.state == state


def submit(store: Store, name: str, owner: str = "alice", cluster: str = "mahti") -> Job:
    job, _ = store.create_job(owner, JobSpec(name=name, cluster=cluster, script="echo hi"))
    return job


def scrape(metrics: PorterMetrics) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """name -> {sorted label items -> value}"""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def per_job(series: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str) -> dict[str, float]:
    return {dict(labels)["job_id"]: value for labels, value in series.get(name, {}).items()}


def test_per_job_series_follow_the_window_and_the_accounting(store: Store) -> None:
    record = accounting_record()
    done = submit(store, "done")
    walk(
        store,
        done,
        JobState.PREPARING,
        JobState.QUEUED,
        JobState.RUNNING,
        JobState.COMPLETED,
        exit_code=0,
        submitted_at=NOW - timedelta(seconds=70),
        started_at=NOW - timedelta(seconds=60),
        ended_at=NOW - timedelta(seconds=10),
    )
    store.set_accounting(done.id, record)
    old = submit(store, "old", owner="bob")
    walk(store, old, JobState.PREPARING, JobState.FAILED, ended_at=NOW - timedelta(hours=3), exit_code=1)
    running = submit(store, "running")
    walk(
        store,
        running,
        JobState.PREPARING,
        JobState.QUEUED,
        JobState.RUNNING,
        submitted_at=NOW - timedelta(seconds=30),
        started_at=NOW - timedelta(seconds=20),
    )
    pending = submit(store, "pending", cluster="lumi")

    clock = [NOW.timestamp()]
    metrics = PorterMetrics(store, clusters=["mahti"], recent_window=3600, clock=lambda: clock[0])
    series = scrape(metrics)

    jobs = {dict(k)["cluster"] + "/" + dict(k)["state"]: v for k, v in series["cloudhpc_jobs"].items()}
    assert jobs["mahti/completed"] == 1
    assert jobs["mahti/failed"] == 1
    assert jobs["mahti/running"] == 1
    assert jobs["lumi/pending"] == 1
    assert jobs["mahti/timeout"] == 0  # every state of every cluster, so panels never miss a zero
    transitions = {
        (dict(k)["cluster"], dict(k)["from_state"], dict(k)["to_state"]): v
        for k, v in series["cloudhpc_job_transitions_total"].items()
    }
    assert transitions[("mahti", "none", "pending")] == 3
    assert transitions[("lumi", "none", "pending")] == 1
    assert transitions[("mahti", "running", "completed")] == 1
    assert transitions[("mahti", "preparing", "failed")] == 1

    # sacct's own figures for the ended job; the running job's grow with the clock
    allocation = record["records"][0]
    assert per_job(series, "cloudhpc_job_run_seconds") == {
        str(done.id): allocation["elapsed_seconds"],
        str(running.id): pytest.approx(20.0, abs=1e-3),
    }
    assert per_job(series, "cloudhpc_job_cpu_efficiency_ratio") == {
        str(done.id): record["efficiency"]["cpu_efficiency"]
    }
    assert per_job(series, "cloudhpc_job_memory_efficiency_ratio") == {
        str(done.id): record["efficiency"]["memory_efficiency"]
    }
    assert per_job(series, "cloudhpc_job_allocated_cpus") == {str(done.id): allocation["alloc_cpus"]}
    assert per_job(series, "cloudhpc_job_billing_units") == {str(done.id): allocation["billing"]}
    assert per_job(series, "cloudhpc_job_max_rss_bytes") == {
        str(done.id): max(r["max_rss_bytes"] or 0 for r in record["records"])
    }
    assert per_job(series, "cloudhpc_job_exit_code") == {str(done.id): 0}
    waits = per_job(series, "cloudhpc_job_queue_wait_seconds")
    assert waits.keys() == {str(done.id), str(running.id)}
    assert waits[str(done.id)] == pytest.approx(10.0, abs=1e-3)
    assert waits[str(running.id)] == pytest.approx(10.0, abs=1e-3)
    labels = dict(next(iter(series["cloudhpc_job_exit_code"])))
    assert labels == {
        "cluster": "mahti",
        "owner": "alice",
        "job_id": str(done.id),
        "job_name": "done",
        "kind": "batch",
    }
    assert str(old.id) not in str(series)  # ended 3 h ago: outside the 1 h window
    assert str(pending.id) not in str(series)  # nothing known yet

    # A restart (a new exporter on the same database) serves the same figures.
    again = scrape(PorterMetrics(store, clusters=["mahti"], recent_window=3600, clock=lambda: clock[0]))
    assert again == series

    # The ended job's series leave once it ended longer ago than the window; the live job stays.
    clock[0] += 3600
    later = scrape(metrics)
    assert per_job(later, "cloudhpc_job_cpu_efficiency_ratio") == {}
    assert set(per_job(later, "cloudhpc_job_run_seconds")) == {str(running.id)}
    assert later["cloudhpc_jobs"] == series["cloudhpc_jobs"]


def test_replaced_accounting_and_many_steps(store: Store) -> None:
    """A re-sent document is read again (the exporter caches by the document's stamp), and MaxRSS
    is found in any sacct row, also past the rows SQLite reads in the main query."""
    record = accounting_record()
    job = submit(store, "steps")
    walk(store, job, JobState.PREPARING, JobState.QUEUED, JobState.RUNNING, JobState.COMPLETED, ended_at=NOW)
    store.set_accounting(job.id, record)
    metrics = PorterMetrics(store, recent_window=3600, clock=lambda: NOW.timestamp())
    assert per_job(scrape(metrics), "cloudhpc_job_cpu_efficiency_ratio") == {
        str(job.id): record["efficiency"]["cpu_efficiency"]
    }
    steps = [dict(record["records"][-1], step=str(i), max_rss_bytes=1000 + i) for i in range(30)]
    steps[25]["max_rss_bytes"] = 7_777_777
    changed = {
        **record,
        "records": [record["records"][0], *steps],
        "efficiency": {**record["efficiency"], "cpu_efficiency": 0.125},
    }
    time.sleep(0.01)  # a new stamp
    store.set_accounting(job.id, changed)
    series = scrape(metrics)
    assert per_job(series, "cloudhpc_job_cpu_efficiency_ratio") == {str(job.id): 0.125}
    assert per_job(series, "cloudhpc_job_max_rss_bytes") == {str(job.id): 7_777_777}


SCRAPE_TOKEN = "scrape-" + "0123456789abcdef" * 2


def _settings(tmp_path: Path, **metrics: Any) -> Settings:
    token_file = tmp_path / "scrape-token"
    token_file.write_text(SCRAPE_TOKEN + "\n")
    return Settings(
        porter=PorterConfig(
            object_store=f"file://{tmp_path / 'objects'}",
            metrics=MetricsConfig(token_file=token_file, **metrics),
        )
    )


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_metrics_endpoint_counts_requests_and_agents(store: Store, tmp_path: Path) -> None:
    agent = store.create_token("agent-local", "agent", ["local"])
    with TestClient(create_app(_settings(tmp_path), store=store)) as client:
        client.get("/api/v1/agent/work?cluster=local", headers=_bearer(agent))
        client.get(f"/api/v1/jobs/{uuid.uuid4()}", headers=_bearer("nope"))
        body = client.get("/metrics", headers=_bearer(SCRAPE_TOKEN)).text
    families = {f.name: f for f in text_string_to_metric_families(body)}
    seen = {s.labels["cluster"] for s in families["cloudhpc_agent_last_seen_timestamp_seconds"].samples}
    assert seen == {"local"}
    routes = {
        (s.labels["route"], s.labels["status"])
        for s in families["cloudhpc_api_request_duration_seconds"].samples
        if s.name.endswith("_count")
    }
    assert ("/api/v1/agent/work", "200") in routes
    assert ("/api/v1/jobs/{job_id}", "401") in routes
    assert "_created" not in body
    assert {f.name for f in families.values()} >= {
        "cloudhpc_jobs",
        "cloudhpc_jobs_by_owner",
        "cloudhpc_job_transitions",
        "cloudhpc_bridge_ready",
    }


def test_metrics_needs_the_scrape_token_or_an_admin(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Owner and job names are user data: no scrape without the token (#12)."""
    user = store.create_token("alice", "user")
    agent = store.create_token("agent-local", "agent", ["local"])
    admin = store.create_token("root", "admin")
    caplog.set_level("DEBUG")
    with TestClient(create_app(_settings(tmp_path), store=store)) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=_bearer(SCRAPE_TOKEN + "x")).status_code == 401
        assert client.get("/metrics", headers={"Authorization": f"Basic {SCRAPE_TOKEN}"}).status_code == 401
        assert client.get("/metrics", headers=_bearer(user)).status_code == 403
        assert client.get("/metrics", headers=_bearer(agent)).status_code == 403
        assert client.get("/metrics", headers=_bearer(admin)).status_code == 200
        answer = client.get("/metrics", headers=_bearer(SCRAPE_TOKEN))
    assert answer.status_code == 200
    assert "cloudhpc_jobs" in answer.text
    assert SCRAPE_TOKEN not in caplog.text


def test_a_rotated_scrape_token_is_taken_without_a_restart(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Kubernetes updates a mounted Secret in place and Prometheus re-reads its credentials_file
    at each scrape: porter follows the file; a broken file keeps the last good token."""
    rotated = "rotated-" + "fedcba9876543210" * 2
    with TestClient(create_app(_settings(tmp_path), store=store)) as client:
        assert client.get("/metrics", headers=_bearer(SCRAPE_TOKEN)).status_code == 200
        (tmp_path / "scrape-token").write_text(rotated + "\n")
        assert client.get("/metrics", headers=_bearer(SCRAPE_TOKEN)).status_code == 401
        assert client.get("/metrics", headers=_bearer(rotated)).status_code == 200
        (tmp_path / "scrape-token").write_text("bad")
        assert client.get("/metrics", headers=_bearer(rotated)).status_code == 200
    assert "keeping the previous scrape token" in caplog.text
    assert rotated not in caplog.text


def test_without_a_token_file_only_admins_scrape(store: Store, tmp_path: Path) -> None:
    admin = store.create_token("root", "admin")
    settings = Settings(porter=PorterConfig(object_store=f"file://{tmp_path / 'objects'}"))
    with TestClient(create_app(settings, store=store)) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=_bearer(SCRAPE_TOKEN)).status_code == 401
        assert client.get("/metrics", headers=_bearer(admin)).status_code == 200


@pytest.mark.parametrize("content", ["", "short", "two words-and-more-than-16"])
def test_a_bad_token_file_stops_porter_naming_the_setting(tmp_path: Path, content: str) -> None:
    token_file = tmp_path / "scrape-token"
    token_file.write_text(content)
    for path in (token_file, tmp_path / "missing"):
        settings = Settings(porter=PorterConfig(metrics=MetricsConfig(token_file=path)))
        with pytest.raises(ConfigError, match=r"porter\.metrics\.token_file") as caught:
            create_app(settings)
        assert not content or content not in str(caught.value)


def _ended(store: Store, name: str, owner: str, cluster: str, ended: datetime, state: JobState) -> Job:
    job = submit(store, name, owner=owner, cluster=cluster)
    walk(
        store, job, JobState.PREPARING, JobState.QUEUED, JobState.RUNNING, state, ended_at=ended, exit_code=0
    )
    return job


def test_series_are_bounded_while_the_totals_stay_exact(store: Store) -> None:
    """Per-job series: live jobs, and of the jobs ended within the window the latest
    `max_recent_jobs`; per-cluster and per-owner counts cover every job (#12 item 9)."""
    live = submit(store, "live", owner="carol")
    recent = [
        _ended(
            store,
            f"recent-{i}",
            ("alice", "bob")[i % 2],
            "mahti",
            NOW - timedelta(minutes=i + 1),
            JobState.COMPLETED,
        )
        for i in range(5)
    ]
    clock = [NOW.timestamp()]
    metrics = PorterMetrics(
        store, clusters=["mahti"], recent_window=3600, max_recent_jobs=3, clock=lambda: clock[0]
    )

    def shape() -> tuple[set[str], int, dict[str, int]]:
        series = scrape(metrics)
        ids = {
            dict(k)["job_id"]
            for name in series
            if name.startswith("cloudhpc_job_")
            for k in series[name]
            if "job_id" in dict(k)
        }
        lines = sum(len(v) for v in series.values())
        return ids, lines, {"left_out": int(series["cloudhpc_metrics_ended_jobs_left_out"][()])}

    def old_jobs(count: int) -> None:
        for i in range(count):
            ended = NOW - timedelta(hours=2, minutes=i)
            _ended(store, f"old-{i}", f"user{i % 4}", ("mahti", "lumi")[i % 2], ended, JobState.FAILED)

    old_jobs(8)
    ids, lines, extra = shape()
    # the 3 latest ended (the pending live job has no figure yet, so no series)
    assert ids == {str(j.id) for j in recent[:3]}
    assert extra == {"left_out": 2}

    clock[0] += 120  # every transition so far is settled: counted for good, then only new rows
    assert shape() == (ids, lines, extra)
    old_jobs(40)  # 40 more jobs ended before the window, same owners: not one line more
    assert shape() == (ids, lines, extra)

    series = scrape(metrics)
    by_owner: dict[tuple[str, str], float] = {}
    for key, value in series["cloudhpc_jobs_by_owner"].items():
        labels = dict(key)
        by_owner[labels["cluster"], labels["state"]] = (
            by_owner.get((labels["cluster"], labels["state"]), 0) + value
        )
    totals = {(dict(k)["cluster"], dict(k)["state"]): v for k, v in series["cloudhpc_jobs"].items()}
    assert {k: v for k, v in by_owner.items() if v} == {k: v for k, v in totals.items() if v}
    assert sum(totals.values()) == 1 + 5 + 8 + 40
    assert totals[("lumi", "failed")] == 4 + 20
    # counted from the audit trail, incrementally: equal to a direct count of the store
    counted = {
        (dict(k)["cluster"], dict(k)["owner"], dict(k)["state"]): v
        for k, v in series["cloudhpc_jobs_by_owner"].items()
        if v
    }
    assert counted == store.count_by_owner_and_state()
    moves = {
        (dict(k)["cluster"], dict(k)["from_state"], dict(k)["to_state"]): v
        for k, v in series["cloudhpc_job_transitions_total"].items()
    }
    assert moves == store.transition_counts_by_cluster()
    fresh = scrape(PorterMetrics(store, clusters=["mahti"], recent_window=3600, clock=NOW.timestamp))
    assert fresh["cloudhpc_jobs_by_owner"] == series["cloudhpc_jobs_by_owner"]  # whole count = increments
    owners = {
        dict(k)["owner"]: v
        for k, v in series["cloudhpc_jobs_by_owner"].items()
        if dict(k)["state"] == "pending"
    }
    assert owners["carol"] == 1
    assert str(live.id) not in ids
