"""What asking an agent a question costs when the question table is large (issue 12: 67.5 ms per
question with 240,000 rows on SQLite), without and with the index on `expires_at` (migration 0007).

Every `Store.ask_agent` first deletes the finished questions (`store/queries.py`, `_finished`), then
writes its own. The table is filled with live questions (unexpired: the sweep deletes none of them,
as when many requests wait at once or askers died within `KEEP`), plus a few finished ones per
question, so each sweep has something to delete. The same store is measured twice: with the index
dropped (the schema before 0007), then with it made again; each phase times `ASKS` questions and
prints the sweep's query plan. The median and p95 per question are printed, then one JSON line.

Run anywhere: `python bench/agent_queries.py [rows]` (SQLite in a temporary directory; no testbed).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert

from cloudhpc.store import Store
from cloudhpc.store.engine import utcnow
from cloudhpc.store.models import AgentQueryRow
from cloudhpc.store.queries import KEEP, _finished

ROWS = 240_000
ASKS = 200
FINISHED_PER_ASK = 2
INDEX = "ix_agent_queries_expires_at"
TARGET_MS = 5.0
"""The indexed sweep's median per question must be at most this (the scan took 67.5 ms)."""


def question(key: str, cluster: str, created: datetime, expires: datetime) -> dict[str, Any]:
    return {
        "id": key,
        "cluster": cluster,
        "job_id": None,
        "kind": "job_files",
        "params": "{}",
        "created_at": created,
        "expires_at": expires,
    }


def fill(store: Store, live: int) -> None:
    """`live` questions of 8 clusters, unexpired for an hour or more."""
    now = utcnow()
    rows = [
        question(f"{n:036d}", f"c{n % 8}", now, now + timedelta(hours=1, seconds=n % 600))
        for n in range(live)
    ]
    with store.engine.begin() as conn:
        for start in range(0, len(rows), 10_000):
            conn.execute(insert(AgentQueryRow), rows[start : start + 10_000])


def plan(store: Store) -> str:
    sweep = _finished(utcnow()).compile(dialect=store.engine.dialect, compile_kwargs={"literal_binds": True})
    with store.engine.connect() as conn:
        return "; ".join(str(row[-1]) for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sweep}"))


def phase(store: Store) -> dict[str, Any]:
    """Time `ASKS` questions; before each, `FINISHED_PER_ASK` finished rows for its sweep to delete."""
    timings: list[float] = []
    asked = []
    for n in range(ASKS):
        fill_finished(store, n)
        started = time.perf_counter()
        asked.append(store.ask_agent("c0", "job_files", {}, ttl=3600))
        timings.append((time.perf_counter() - started) * 1000)
    for query_id in asked:
        store.forget_query(query_id)
    timings.sort()
    return {
        "median_ms": round(statistics.median(timings), 2),
        "p95_ms": round(timings[int(len(timings) * 0.95) - 1], 2),
        "min_ms": round(timings[0], 2),
        "max_ms": round(timings[-1], 2),
        "plan": plan(store),
    }


def fill_finished(store: Store, ask: int) -> None:
    """Questions that expired longer than `KEEP` ago: the next sweep deletes them."""
    old = utcnow() - KEEP - timedelta(minutes=1)
    rows = [question(f"f{ask:029d}-{n:05d}", "c1", old, old) for n in range(FINISHED_PER_ASK)]
    with store.engine.begin() as conn:
        conn.execute(insert(AgentQueryRow), rows)


def main() -> int:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else ROWS
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(f"sqlite:///{tmp}/state.db")
        try:
            store.migrate()
            fill(store, rows)
            with store.engine.begin() as conn:
                conn.exec_driver_sql(f"DROP INDEX {INDEX}")
            before = phase(store)
            with store.engine.begin() as conn:
                conn.exec_driver_sql(f"CREATE INDEX {INDEX} ON agent_queries (expires_at)")
            after = phase(store)
        finally:
            store.close()
    for name, result in (("without the index", before), ("with the index", after)):
        print(
            f"{name}: {result['median_ms']} ms median per question, p95 {result['p95_ms']} ms "
            f"(min {result['min_ms']}, max {result['max_ms']}; {ASKS} questions, {rows:,} live rows); "
            f"sweep plan: {result['plan']}"
        )
    met = after["median_ms"] <= TARGET_MS and INDEX in after["plan"]
    print(
        json.dumps(
            {
                "bench": "agent_queries",
                "store": "sqlite",
                "live_rows": rows,
                "questions": ASKS,
                "without_index": before,
                "with_index": after,
                "target_median_ms": TARGET_MS,
                "met": met,
            }
        )
    )
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
