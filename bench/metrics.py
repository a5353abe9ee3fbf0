"""Render time of porter's `/metrics` with 10,000 jobs in the store (target: at most 250 ms), and the
number of series (bounded by `porter.metrics_job_window`, not by history).

The jobs carry realistic accounting documents (the agent's format, built from a real sacct and
seff output of the testbed in tests/recordings), so the per-job figures are read out of real JSON.
Two histories of 10,000 jobs each:

- `all recent`: every job ended within the window, the worst case: every job has its series;
- `history`: 1,000 jobs ended within the window and 9,000 before it: the series follow the 1,000.

Run: `python bench/metrics.py [--postgres]` (PostgreSQL: the testbed's server, a fresh schema).
Each figure is the median of several renders after one cold render (reported too); the CPU time
of the rendering thread is reported beside the wall time, because the testbed machine is shared.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.*

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, insert
from tests.recordings import load_recording

from cloudhpc.domain.jobs import JobSpec
from cloudhpc.hpc.slurm import Sacct, Seff
from cloudhpc.metrics.porter import PorterMetrics
from cloudhpc.store import Store
from cloudhpc.store.models import AccountingRow, JobRow, TransitionRow
from cloudhpc.submitter.agent import _jsonable

JOBS = 10_000
RECENT_IN_HISTORY = 1_000
WINDOW = timedelta(hours=24)
RENDERS = 7
TARGET_MS = 250.0
PATH = ("pending", "preparing", "queued", "running", "completed")


def accounting(cpu_efficiency: float, rss: int) -> str:
    rows = Sacct(jobs=["10"]).parse(load_recording("sacct_multistep"))
    records = [dataclasses.replace(r.record) for r in rows if r.record.job_id == rows[0].record.job_id]
    records = [dataclasses.replace(records[0])] + [
        dataclasses.replace(r, max_rss_bytes=rss) for r in records[1:]
    ]
    efficiency = dataclasses.replace(
        Seff("10").parse(load_recording("seff_completed")), cpu_efficiency=cpu_efficiency
    )
    return json.dumps(
        {
            "slurm_job_id": records[0].job_id,
            "records": [_jsonable(dataclasses.asdict(r)) for r in records],
            "efficiency": _jsonable(dataclasses.asdict(efficiency)),
        }
    )


def populate(url: str, recent: int, now: datetime) -> None:
    """10,000 completed jobs with transitions and accounting, inserted in bulk (the store's own
    write path would take minutes and measure nothing of interest here)."""
    spec = JobSpec(name="bench", cluster="mahti", script="srun ./train").model_dump_json(by_alias=True)
    jobs, transitions, documents = [], [], []
    for i in range(JOBS):
        ended = now - (timedelta(minutes=i % 600) if i < recent else WINDOW + timedelta(hours=1 + i % 500))
        job_id = str(uuid.uuid4())
        jobs.append(
            {
                "id": job_id,
                "owner": f"user{i % 50}",
                "cluster": ("mahti", "puhti", "lumi")[i % 3],
                "name": f"train-{i}",
                "kind": "batch",
                "state": "completed",
                "exit_code": 0,
                "created_at": ended - timedelta(minutes=30),
                "submitted_at": ended - timedelta(minutes=25),
                "started_at": ended - timedelta(minutes=20),
                "ended_at": ended,
                "updated_at": ended,
                "spec": spec,
                "artifacts": "[]",
            }
        )
        for step, (before, after) in enumerate(zip((None, *PATH), PATH, strict=False)):
            transitions.append(
                {
                    "job_id": job_id,
                    "at": ended - timedelta(minutes=30 - step),
                    "from_state": before,
                    "to_state": after,
                    "actor": "bench",
                }
            )
        documents.append(
            {"job_id": job_id, "record": accounting(0.1 + (i % 90) / 100, 1_000_000 + i), "updated_at": ended}
        )
    engine = create_engine(Store(url).url)
    with engine.begin() as conn:
        conn.execute(insert(JobRow), jobs)
        conn.execute(insert(TransitionRow), transitions)
        conn.execute(insert(AccountingRow), documents)
    engine.dispose()


def measure(url: str, now: datetime) -> dict[str, Any]:
    store = Store(url)
    metrics = PorterMetrics(
        store, clusters=["mahti"], job_window=WINDOW.total_seconds(), clock=lambda: now.timestamp()
    )
    started = time.perf_counter()
    body = metrics.render()
    cold = (time.perf_counter() - started) * 1000
    times, cpu = [], []
    for _ in range(RENDERS):
        started, started_cpu = time.perf_counter(), time.process_time()
        body = metrics.render()
        times.append((time.perf_counter() - started) * 1000)
        cpu.append((time.process_time() - started_cpu) * 1000)
    series = sum(len(f.samples) for f in text_string_to_metric_families(body.decode()))
    per_job = body.decode().count('job_id="')
    store.close()
    return {
        "cold_ms": round(cold, 1),
        "p50_ms": round(statistics.median(times), 1),
        "cpu_p50_ms": round(statistics.median(cpu), 1),
        "max_ms": round(max(times), 1),
        "series": series,
        "per_job_series": per_job,
        "bytes": len(body),
    }


@contextlib.contextmanager
def database(postgres: bool) -> Iterator[str]:
    if not postgres:
        with tempfile.TemporaryDirectory() as tmp:
            yield f"sqlite:///{tmp}/state.db"
        return
    from tests.integration.stores import postgres_url

    with postgres_url(Path(tempfile.gettempdir())) as url:
        yield url


def run(postgres: bool, recent: int) -> dict[str, Any]:
    now = datetime.now(UTC)
    with database(postgres) as url:
        store = Store(url)
        store.migrate()
        store.close()
        populate(url, recent, now)
        return measure(url, now)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--postgres", action="store_true", help="use the testbed's PostgreSQL instead of SQLite"
    )
    args = parser.parse_args()
    dialect = "postgresql" if args.postgres else "sqlite"
    worst = run(args.postgres, JOBS)
    print(f"{dialect}: {JOBS} jobs, all ended within the window: {worst}")
    history = run(args.postgres, RECENT_IN_HISTORY)
    print(f"{dialect}: {JOBS} jobs, {RECENT_IN_HISTORY} ended within the window: {history}")
    met = worst["p50_ms"] <= TARGET_MS and history["per_job_series"] < worst["per_job_series"] / 5
    print(
        json.dumps(
            {
                "bench": "metrics",
                "store": dialect,
                "jobs": JOBS,
                "render_ms_p50": worst["p50_ms"],
                "render_cpu_ms_p50": worst["cpu_p50_ms"],
                "render_ms_cold": worst["cold_ms"],
                "render_ms_max": worst["max_ms"],
                "series_all_recent": worst["series"],
                "body_bytes_all_recent": worst["bytes"],
                "render_ms_p50_history": history["p50_ms"],
                "series_history": history["series"],
                "per_job_series_all_recent": worst["per_job_series"],
                "per_job_series_history": history["per_job_series"],
                "target_render_ms": TARGET_MS,
                "met": met,
            }
        )
    )
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
