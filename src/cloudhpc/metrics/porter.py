"""porter's `/metrics`: job figures computed from the job store at scrape time, and API latency.

Nothing about jobs is counted in memory: every scrape reads the store (a few queries, whatever the
number of jobs), so the figures survive restarts, agree between porter replicas and never double
count. The scrape is bounded by design: per-job series exist for live jobs and for the latest
`porter.metrics.max_recent_jobs` jobs that ended within `porter.metrics.recent_window`; every job,
however old, is counted in `cloudhpc_jobs` (per cluster) and `cloudhpc_jobs_by_owner`, so totals
stay exact while the body follows recent activity, not history.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Histogram, disable_created_metrics, generate_latest

from cloudhpc.domain.states import JobState
from cloudhpc.metrics.catalog import JOB_LABELS, spec
from cloudhpc.metrics.exposition import Family, label_set, render
from cloudhpc.metrics.refusals import RefusalCounter
from cloudhpc.store import AccountingFacts, JobFacts, Store
from cloudhpc.store.metrics_view import BilledKey, TransitionKey, sum_billed

__all__ = ["API_BUCKETS", "BridgeSource", "PorterMetrics", "job_values"]

# `_created` series double the series count and no dashboard uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

API_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Long-polls (`?wait=`, the agent's work poll) last up to 60 s: the top buckets keep them apart."""

SETTLE_SECONDS = 60.0
"""Transitions older than this are counted for good; younger ones again at each scrape, so one
whose transaction commits late (after a higher id was seen) is not missed."""

BridgeSource = Callable[[], Iterable[tuple[str, str, bool]]]
"""Returns (job id, bridge name, ready) for every bridge of a live job."""


_PER_JOB = (
    "cloudhpc_job_queue_wait_seconds",
    "cloudhpc_job_run_seconds",
    "cloudhpc_job_cpu_efficiency_ratio",
    "cloudhpc_job_memory_efficiency_ratio",
    "cloudhpc_job_max_rss_bytes",
    "cloudhpc_job_allocated_cpus",
    "cloudhpc_job_billing_units",
    "cloudhpc_job_exit_code",
)


def _seconds(later: float, earlier: float) -> float:
    return max(0.0, later - earlier)


def job_values(job: JobFacts, now: float) -> dict[str, float]:
    """The per-job figures of one job at `now` (Unix seconds), by metric name; a figure nobody
    knows yet is left out.

    The times are SLURM's (Submit, Start, End, as the agent observed them); sacct's Elapsed wins
    for the run time of an ended job once the accounting is in.
    """
    values: dict[str, float] = {}
    ended = job.state.terminal
    submit = job.submitted_at
    start = job.started_at
    if submit is not None:
        if start is not None:
            values["cloudhpc_job_queue_wait_seconds"] = _seconds(start, submit)
        elif not ended:
            values["cloudhpc_job_queue_wait_seconds"] = _seconds(now, submit)
        elif job.ended_at is not None:  # cancelled (or failed) while still queued
            values["cloudhpc_job_queue_wait_seconds"] = _seconds(job.ended_at, submit)
    if ended and job.elapsed_seconds is not None:
        values["cloudhpc_job_run_seconds"] = job.elapsed_seconds
    elif start is not None:
        values["cloudhpc_job_run_seconds"] = _seconds(job.ended_at if ended and job.ended_at else now, start)
    if job.cpu_efficiency is not None:
        values["cloudhpc_job_cpu_efficiency_ratio"] = job.cpu_efficiency
    if job.memory_efficiency is not None:
        values["cloudhpc_job_memory_efficiency_ratio"] = job.memory_efficiency
    if job.max_rss_bytes is not None:
        values["cloudhpc_job_max_rss_bytes"] = job.max_rss_bytes
    if job.alloc_cpus is not None:
        values["cloudhpc_job_allocated_cpus"] = job.alloc_cpus
    if job.billing is not None:
        values["cloudhpc_job_billing_units"] = job.billing
    code = job.exit_code if job.exit_code is not None else job.sacct_exit_code
    if ended and code is not None:
        values["cloudhpc_job_exit_code"] = code
    return values


class PorterMetrics:
    """`PorterMetrics(store, clusters=settings.clusters)`; `render()` is the `/metrics` body.

    `render` blocks on the store: call it from a thread in async code.
    """

    def __init__(
        self,
        store: Store,
        *,
        clusters: Iterable[str] = (),
        recent_window: float = 3600.0,
        max_recent_jobs: int | None = None,
        bridges: BridgeSource | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.clusters = tuple(clusters)
        self.recent_window = recent_window
        self.max_recent_jobs = max_recent_jobs
        self.bridges = bridges
        self._clock = clock
        self._tally_lock = threading.Lock()
        self._settled: dict[TransitionKey, int] = {}
        self._settled_to = 0
        """The audit trail counted for good, up to this transition id (`_counts`)."""
        self._billed: dict[str, tuple[BilledKey, float] | None] = {}
        self._billed_read_at: float | None = None
        """Billed units of the stored accounting documents by job id, and when they were last read
        (`_billed_units`)."""
        self._accounting: dict[str, tuple[float, AccountingFacts]] = {}
        """Figures of stored accounting documents by job id, with the document's stamp: parsing
        10,000 documents is most of a scrape, and a stored document does not change."""
        self.registry = CollectorRegistry()
        self._latency = Histogram(
            "cloudhpc_api_request_duration_seconds",
            spec("cloudhpc_api_request_duration_seconds").help,
            ["route", "method", "status"],
            buckets=API_BUCKETS,
            registry=self.registry,
        )
        self._refusals = RefusalCounter(self.registry, "cloudhpc_mailbox_refused_objects_total")

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self._latency.labels(route, method, str(status)).observe(seconds)

    def mailbox_refusals(self, clusters: Iterable[str], reasons: Iterable[str]) -> Callable[[str, str], None]:
        """The `on_refused` of the S3 mailbox relay of `clusters` (call once per app). Counted in
        memory: the relay runs in one porter replica only."""
        return self._refusals.for_clusters(clusters, reasons)

    def families(self) -> list[Family]:
        """Everything computed from the store, as of now."""
        now = self._clock()
        by_owner, moves = self._counts(now)
        counts: dict[tuple[str, str], int] = {}
        for (cluster, _, state), n in by_owner.items():
            counts[cluster, state] = counts.get((cluster, state), 0) + n
        jobs = Family(spec("cloudhpc_jobs"))
        clusters = sorted(set(self.clusters) | {cluster for cluster, _ in counts})
        jobs.add_values({(c, s.value): counts.get((c, s.value), 0) for c in clusters for s in JobState})
        owners = Family(spec("cloudhpc_jobs_by_owner"))
        # every state of every (cluster, owner) seen, zeros included: a count that drops to 0
        # stays a 0, not a series gone stale
        pairs = {(cluster, owner) for cluster, owner, _ in by_owner}
        owners.add_values(
            {(c, o, s.value): by_owner.get((c, o, s.value), 0) for c, o in pairs for s in JobState}
        )

        transitions = Family(spec("cloudhpc_job_transitions_total"))
        transitions.add_values({k: float(n) for k, n in moves.items()})

        per_job = {name: Family(spec(name)) for name in _PER_JOB}
        lines = {name: family.lines for name, family in per_job.items()}
        recent, left_out = self._recent_jobs(now)
        for job in recent:
            labels = label_set(JOB_LABELS, (job.cluster, job.owner, job.id, job.name, job.kind))
            # The hot loop of a large scrape: values are finite numbers, so plain str() formats them.
            for name, value in job_values(job, now).items():
                lines[name].append(f"{name}{labels} {value}")
        omitted = Family(spec("cloudhpc_metrics_ended_jobs_left_out"))
        omitted.add("", left_out)

        seen = Family(spec("cloudhpc_agent_last_seen_timestamp_seconds"))
        seen.add_values({(cluster,): when.timestamp() for cluster, when in self.store.agents().items()})

        bridges = Family(spec("cloudhpc_bridge_ready"))
        if self.bridges is not None:
            bridges.add_values(
                {(job_id, name): 1.0 if ready else 0.0 for job_id, name, ready in self.bridges()}
            )
        tasks = Family(spec("cloudhpc_array_tasks"))
        task_counts = self.store.array_task_counts()
        tasks.add_values(
            {
                (c, s.value): task_counts.get((c, s.value), 0)
                for c in {c for c, _ in task_counts}
                for s in JobState
            }
        )
        restarts = Family(spec("cloudhpc_job_restarts_total"))
        restarts.add_values({(cluster,): count for cluster, count in self.store.restart_counts().items()})
        billed = Family(spec("cloudhpc_billed_units_total"))
        billed.add_values({tuple(key): units for key, units in self._billed_units().items()})
        return [jobs, tasks, restarts, billed, owners, transitions, *per_job.values(), omitted, seen, bridges]

    def _counts(self, now: float) -> tuple[dict[tuple[str, str, str], int], dict[tuple[str, str, str], int]]:
        """Jobs by (cluster, owner, state) and transitions by (cluster, from, to), both from the
        audit trail: a job is in the state its last transition entered, so a state's count is
        the transitions into it minus those out of it. The trail is counted whole at the first
        scrape, then only its new rows (`Store.transition_tally`): a scrape's cost does not grow
        with history. Exact as long as every state change writes its transition (the store's
        two writers do, and an integration test compares with a direct count)."""
        with self._tally_lock:
            tally = self.store.transition_tally(
                self._settled_to, datetime.fromtimestamp(now - SETTLE_SECONDS, UTC)
            )
            for key, n in tally.settled.items():
                self._settled[key] = self._settled.get(key, 0) + n
            self._settled_to = tally.settled_to
            rows = dict(self._settled)
        for key, n in tally.unsettled.items():
            rows[key] = rows.get(key, 0) + n
        by_owner: dict[tuple[str, str, str], int] = {}
        moves: dict[tuple[str, str, str], int] = {}
        for (cluster, owner, before, after), n in rows.items():
            by_owner[cluster, owner, after] = by_owner.get((cluster, owner, after), 0) + n
            if before is not None:
                by_owner[cluster, owner, before] = by_owner.get((cluster, owner, before), 0) - n
            move = (cluster, before or "none", after)
            moves[move] = moves.get(move, 0) + n
        return by_owner, moves

    def _billed_units(self) -> dict[BilledKey, float]:
        """Units billed per (cluster, owner, project, unit): every accounting document is read at
        the first scrape, then only those stored since the scrape before (less `SETTLE_SECONDS`,
        for a write whose transaction committed late or a replica whose clock is behind), so the
        cost does not grow with history; a replaced document replaces its job's entry. Times are
        the wall clock's, as the store's `updated_at` is, never the exporter's (test) clock."""
        with self._tally_lock:
            since = None
            if self._billed_read_at is not None:
                since = datetime.fromtimestamp(self._billed_read_at - SETTLE_SECONDS, UTC)
            read_at = time.time()
            self._billed.update(self.store.billed_documents(since))
            self._billed_read_at = read_at
            return sum_billed(self._billed.values())

    def _recent_jobs(self, now: float) -> tuple[list[JobFacts], int]:
        """The jobs with per-job series, their accounting figures filled in, and how many ended
        jobs of the window the cap left out."""
        since = datetime.fromtimestamp(now - self.recent_window, UTC)
        jobs, left_out = self.store.recent_jobs(since, self.max_recent_jobs)
        cache = self._accounting
        stale = [
            j.id
            for j in jobs
            if j.accounting_stamp is not None and cache.get(j.id, (None,))[0] != j.accounting_stamp
        ]
        if stale:
            fresh = self.store.accounting_facts(stale)
            stamps = {j.id: j.accounting_stamp for j in jobs}
            for job_id, facts in fresh.items():
                stamp = stamps[job_id]
                if stamp is not None:
                    cache[job_id] = (stamp, facts)
        if len(cache) > len(jobs):  # forget jobs that left the window
            current = {j.id for j in jobs}
            for job_id in [k for k in cache if k not in current]:
                del cache[job_id]
        return [j.with_accounting(cache[j.id][1]) if j.id in cache else j for j in jobs], left_out

    def render(self) -> bytes:
        return generate_latest(self.registry) + render(self.families()).encode()
