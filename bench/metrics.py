"""Render time and size of porter's `/metrics` as ended jobs pile up: the scrape is bounded by design.

Per-job series exist only for live jobs and the jobs that ended within `porter.metrics.recent_window`
(at most `porter.metrics.max_recent_jobs` of those); every other job is only counted, per cluster
(`cloudhpc_jobs`) and per owner (`cloudhpc_jobs_by_owner`). Each store holds LIVE running jobs and
RECENT jobs ended within the window, plus:

- `1k ended`: 1,000 jobs that ended before the window;
- `10k ended`: 10,000 such jobs (the target: at most 100 ms with 10,000 jobs in the store, and the
  same series count and about the same bytes as with 1,000: flat as history grows);
- `burst`: 10,000 jobs that all ended within the window (the cap at work: still bounded).

The jobs carry realistic accounting documents (the agent's format, built from a real sacct and
seff output of the testbed in tests/recordings), so the per-job figures are read out of real JSON.
Each figure is the median of RUNS runs with the spread (max - min) beside it. A run is a new
exporter (as after a porter restart) rendering twice: the first scrape counts the whole audit
trail and parses every recent accounting document (reported as `first`); a scrape after it reads
only what changed since (the target is judged on it). The CPU time of the render is printed too,
because the testbed machine is shared and its load inflates wall times.

Run: `python bench/metrics.py [--postgres]` (PostgreSQL: the testbed's server, a fresh schema).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
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

from cloudhpc.config import MetricsConfig
from cloudhpc.domain.jobs import JobSpec
from cloudhpc.hpc.slurm import Sacct, Seff
from cloudhpc.metrics.porter import PorterMetrics
from cloudhpc.store import Store
from cloudhpc.store.models import AccountingRow, JobRow, TransitionRow
from cloudhpc.submitter.agent import _jsonable

LIVE = 200
RECENT = 300
SCENARIOS = {"1k ended": (RECENT, 1_000), "10k ended": (RECENT, 10_000), "burst": (10_000, 0)}
"""name -> (jobs ended within the window, jobs ended before it)"""
RUNS = 3
DEFAULTS = MetricsConfig()
WINDOW = timedelta(seconds=DEFAULTS.recent_window)
TARGET_MS = 100.0
FLAT_BYTES = 0.01
"""`10k ended` may differ from `1k ended` by at most 1 % of the body (digits of the counts)."""
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


def populate(url: str, now: datetime, recent: int, old: int) -> None:
    """LIVE running jobs, `recent` jobs ended within the window and `old` before it, with their
    transitions and (ended jobs) accounting, inserted in bulk (the store's own write path would
    take minutes and measure nothing of interest here)."""
    spec = JobSpec(name="bench", cluster="mahti", script="srun ./train").model_dump_json(by_alias=True)
    jobs, transitions, documents = [], [], []
    for i in range(LIVE + recent + old):
        live, ended_recently = i < LIVE, i < LIVE + recent
        if live:
            ended = None
            started = now - timedelta(minutes=1 + i % 300)
        else:
            ago = (
                timedelta(seconds=i % int(WINDOW.total_seconds()))
                if ended_recently
                else WINDOW + timedelta(hours=1 + i % 500)
            )
            ended = now - ago
            started = ended - timedelta(minutes=20)
        job_id = str(uuid.uuid4())
        path = PATH[:4] if live else PATH
        jobs.append(
            {
                "id": job_id,
                "owner": f"user{i % 50}",
                "cluster": ("mahti", "puhti", "lumi")[i % 3],
                "name": f"train-{i}",
                "kind": "batch",
                "state": path[-1],
                "exit_code": None if live else 0,
                "created_at": started - timedelta(minutes=10),
                "submitted_at": started - timedelta(minutes=5),
                "started_at": started,
                "ended_at": ended,
                "updated_at": ended or started,
                "spec": spec,
                "artifacts": "[]",
            }
        )
        for step, (before, after) in enumerate(zip((None, *path), path, strict=False)):
            transitions.append(
                {
                    "job_id": job_id,
                    "at": started - timedelta(minutes=10 - step),
                    "from_state": before,
                    "to_state": after,
                    "actor": "bench",
                }
            )
        if ended is not None:
            documents.append(
                {
                    "job_id": job_id,
                    "record": accounting(0.1 + (i % 90) / 100, 1_000_000 + i),
                    "updated_at": ended,
                }
            )
    engine = create_engine(Store(url).url)
    with engine.begin() as conn:
        conn.execute(insert(JobRow), jobs)
        conn.execute(insert(TransitionRow), transitions)
        conn.execute(insert(AccountingRow), documents)
    engine.dispose()


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 1), "spread": round(max(values) - min(values), 1)}


def measure(url: str, now: datetime) -> dict[str, Any]:
    store = Store(url)
    first, steady, cpu = [], [], []
    body = b""
    for _ in range(RUNS):
        metrics = PorterMetrics(
            store,
            clusters=["mahti"],
            recent_window=DEFAULTS.recent_window,
            max_recent_jobs=DEFAULTS.max_recent_jobs,
            clock=lambda: now.timestamp(),
        )
        started = time.perf_counter()
        metrics.render()
        first.append((time.perf_counter() - started) * 1000)
        started, started_cpu = time.perf_counter(), time.process_time()
        body = metrics.render()
        steady.append((time.perf_counter() - started) * 1000)
        cpu.append((time.process_time() - started_cpu) * 1000)
    store.close()
    text = body.decode()
    return {
        "render_ms": _spread(steady),
        "render_cpu_ms": _spread(cpu),
        "first_render_ms": _spread(first),
        "series": sum(len(f.samples) for f in text_string_to_metric_families(text)),
        "jobs_with_series": len(set(re.findall(r'job_id="([^"]+)"', text))),
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


def run(postgres: bool, recent: int, old: int) -> dict[str, Any]:
    now = datetime.now(UTC)
    with database(postgres) as url:
        store = Store(url)
        store.migrate()
        store.close()
        populate(url, now, recent, old)
        return {"jobs": LIVE + recent + old, **measure(url, now)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--postgres", action="store_true", help="use the testbed's PostgreSQL instead of SQLite"
    )
    args = parser.parse_args()
    dialect = "postgresql" if args.postgres else "sqlite"
    load_before = os.getloadavg()[0]
    results = {name: run(args.postgres, recent, old) for name, (recent, old) in SCENARIOS.items()}
    for name, r in results.items():
        print(
            f"{dialect} {name:9} {r['jobs']:6} jobs: scrape {r['render_ms']['median']:6.1f} ms "
            f"(spread {r['render_ms']['spread']:.1f}, CPU {r['render_cpu_ms']['median']:.1f}), first "
            f"after a start {r['first_render_ms']['median']:6.1f} ms (spread "
            f"{r['first_render_ms']['spread']:.1f}); {r['series']} series, {r['jobs_with_series']} jobs "
            f"with per-job series, {r['bytes']} bytes"
        )
    small, large, burst = results["1k ended"], results["10k ended"], results["burst"]
    flat = (
        large["series"] == small["series"]
        and abs(large["bytes"] - small["bytes"]) <= FLAT_BYTES * small["bytes"]
    )
    fast = large["render_ms"]["median"] <= TARGET_MS
    bounded = burst["jobs_with_series"] <= LIVE + DEFAULTS.max_recent_jobs
    print(
        f"targets: scrape <= {TARGET_MS:.0f} ms (median of {RUNS}) with "
        f"{large['jobs']} jobs; series and bytes flat from 1k to 10k ended jobs; the burst capped at "
        f"max_recent_jobs={DEFAULTS.max_recent_jobs}. load average (1 min): {load_before:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after (a shared machine: indicative figures)"
    )
    met = flat and fast and bounded
    print(
        json.dumps(
            {
                "bench": "metrics",
                "store": dialect,
                "runs": RUNS,
                "recent_window_s": DEFAULTS.recent_window,
                "max_recent_jobs": DEFAULTS.max_recent_jobs,
                **{f"{name.replace(' ', '_')}": r for name, r in results.items()},
                "loadavg_before": round(load_before, 2),
                "loadavg_after": round(os.getloadavg()[0], 2),
                "target_render_ms": TARGET_MS,
                "target_flat_bytes_ratio": FLAT_BYTES,
                "flat": flat,
                "fast": fast,
                "bounded": bounded,
                "met": met,
            }
        )
    )
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
