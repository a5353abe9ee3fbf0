"""The metrics exporter's read model: counts by state, transition counts from the audit trail, and
the facts of recent jobs with their accounting figures, read by raw SQL per dialect.

A scrape reads every live and recently ended job (10,000 and more), so this module trades the ORM for
hand-written SQL and NamedTuples: the figures of an accounting document are extracted by the
database in one parse per document.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple

from sqlalchemy import BindParameter, bindparam, func, select, text

from cloudhpc.domain.states import ACTIVE_STATES, JobState
from cloudhpc.store.engine import Database, map_db_errors
from cloudhpc.store.models import AccountingRow, JobRow, TransitionRow, UTCDateTime

__all__ = [
    "AccountingFacts",
    "BilledKey",
    "JobFacts",
    "MetricsView",
    "RecentJobs",
    "TransitionKey",
    "TransitionTally",
    "sum_billed",
]


class JobFacts(NamedTuple):
    """What the metrics exporter needs of one recent job.

    Times are Unix seconds, not datetimes, and this is a NamedTuple, not a dataclass: a scrape
    builds one per recent job (10,000 and more), and datetimes and frozen dataclasses cost more
    than the query. `accounting_stamp` is when the accounting document was stored (None: not
    yet); the figures after it come from that document (see `AccountingFacts`).
    """

    id: str
    owner: str
    cluster: str
    name: str
    kind: str
    state: JobState
    exit_code: int | None
    submitted_at: float | None
    started_at: float | None
    ended_at: float | None
    accounting_stamp: float | None = None
    cpu_efficiency: float | None = None
    memory_efficiency: float | None = None
    alloc_cpus: int | None = None
    billing: float | None = None
    elapsed_seconds: float | None = None
    sacct_exit_code: int | None = None
    max_rss_bytes: int | None = None

    def with_accounting(self, facts: AccountingFacts) -> JobFacts:
        return self._replace(
            cpu_efficiency=facts.cpu_efficiency,
            memory_efficiency=facts.memory_efficiency,
            alloc_cpus=facts.alloc_cpus,
            billing=facts.billing,
            elapsed_seconds=facts.elapsed_seconds,
            sacct_exit_code=facts.exit_code,
            max_rss_bytes=facts.max_rss_bytes,
        )


class AccountingFacts(NamedTuple):
    """The figures of one accounting document (as the agent stores it): seff's efficiency, the
    allocation's sacct row (`records[0]`, the row without a step) and the largest MaxRSS of any row.
    A document stored once never changes, so the exporter keeps these per job and asks again only
    when the stamp moves."""

    cpu_efficiency: float | None
    memory_efficiency: float | None
    alloc_cpus: int | None
    billing: float | None
    elapsed_seconds: float | None
    exit_code: int | None
    max_rss_bytes: int | None


# JSON paths into the accounting document, in this order.
_FACT_PATHS: Final = (
    ("efficiency", "cpu_efficiency"),
    ("efficiency", "memory_efficiency"),
    ("records", "0", "step"),
    ("records", "0", "alloc_cpus"),
    ("records", "0", "billing"),
    ("records", "0", "elapsed_seconds"),
    ("records", "0", "exit_code"),
)
_RSS_STEPS: Final = 16
"""SQLite reads the MaxRSS of the first 16 sacct rows in the same parse as the figures above
(`json_each` over the document would parse it a second time and double the query); a job with
more rows (many srun steps) has its document read whole in Python."""
_N: Final = len(_FACT_PATHS)
_IDS_PER_QUERY: Final = 2000


def _sqlite_path(parts: tuple[str, ...]) -> str:
    return "$" + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in parts)


def _sqlite_epoch(value: str) -> str:
    return f"(julianday({value}) - 2440587.5) * 86400.0"


def _pg_epoch(value: str) -> str:
    return f"CAST(EXTRACT(EPOCH FROM {value}) AS double precision)"


_SQLITE_PATHS: Final = ", ".join(
    [f"'{_sqlite_path(p)}'" for p in _FACT_PATHS]
    + [f"'$.records[{i}].max_rss_bytes'" for i in range(_RSS_STEPS)]
    + [f"'$.records[{_RSS_STEPS}].job_id'"]
)

# Built from the constants above only; values are bound parameters. Live jobs all; ended jobs
# only within the window and, of those, the latest `:limit` to end (ARCHITECTURE: a scrape is
# bounded by design, not by the store's history).
_FACTS_SQL: Final = {
    dialect: f"""
SELECT j.id, j.owner, j.cluster, j.name, j.kind, j.state, j.exit_code,
       {epoch("j.submitted_at")} AS submitted, {epoch("j.started_at")} AS started,
       {epoch("j.ended_at")} AS ended, {epoch("a.updated_at")} AS stamp
FROM jobs AS j LEFT OUTER JOIN job_accounting AS a ON a.job_id = j.id
"""  # noqa: S608
    for dialect, epoch in (("sqlite", _sqlite_epoch), ("postgresql", _pg_epoch))
}
_LIVE_WHERE: Final = "WHERE j.state IN :active"
_ENDED_WHERE: Final = (
    "WHERE j.state NOT IN :active AND j.ended_at >= :since ORDER BY j.ended_at DESC, j.id LIMIT :limit"
)
_ENDED_COUNT_SQL: Final = (
    "SELECT count(*) FROM jobs AS j WHERE j.state NOT IN :active AND j.ended_at >= :since"
)
# Each document is parsed once: by one multi-path json_extract on SQLite (a JSON array Python
# reads), in a LATERAL join on PostgreSQL (plain columns).
_ACCOUNTING_SQL: Final = {
    "sqlite": f"""
SELECT a.job_id, json_extract(a.record, {_SQLITE_PATHS}) AS facts FROM job_accounting AS a
WHERE a.job_id IN :ids
""",  # noqa: S608
    "postgresql": """
SELECT a.job_id,
       CAST(d.doc #>> '{efficiency,cpu_efficiency}' AS double precision) AS cpu,
       CAST(d.doc #>> '{efficiency,memory_efficiency}' AS double precision) AS mem,
       d.doc #>> '{records,0,step}' AS step,
       CAST(d.doc #>> '{records,0,alloc_cpus}' AS double precision) AS cpus,
       CAST(d.doc #>> '{records,0,billing}' AS double precision) AS billing,
       CAST(d.doc #>> '{records,0,elapsed_seconds}' AS double precision) AS elapsed,
       CAST(d.doc #>> '{records,0,exit_code}' AS double precision) AS code,
       (SELECT max(CAST(e.value ->> 'max_rss_bytes' AS double precision))
          FROM jsonb_array_elements(d.doc -> 'records') AS e) AS max_rss
FROM job_accounting AS a CROSS JOIN LATERAL (SELECT CAST(a.record AS jsonb) AS doc) AS d
WHERE a.job_id IN :ids
""",
}


# The billed units (the agent's `billed`: docs/monitoring.md) of each accounting document stored
# since :since, with the job's cluster, owner and SLURM account (the project); NULL units where the
# document has none. The date is compared before any document is parsed, so a scrape after the
# first parses only the documents stored since the one before.
_BILLED_SQL: Final = {
    "sqlite": """
SELECT a.job_id, j.cluster, j.owner, coalesce(json_extract(a.record, '$.records[0].account'), '') AS project,
       json_extract(a.record, '$.billed.unit') AS unit, json_extract(a.record, '$.billed.units') AS units
FROM job_accounting AS a JOIN jobs AS j ON j.id = a.job_id
WHERE a.updated_at >= :since
""",
    "postgresql": """
SELECT a.job_id, j.cluster, j.owner, coalesce(d.doc #>> '{records,0,account}', '') AS project,
       d.doc #>> '{billed,unit}' AS unit, CAST(d.doc #>> '{billed,units}' AS double precision) AS units
FROM job_accounting AS a JOIN jobs AS j ON j.id = a.job_id
     CROSS JOIN LATERAL (SELECT CAST(a.record AS jsonb) AS doc) AS d
WHERE a.updated_at >= :since
""",
}

BilledKey = tuple[str, str, str, str]
"""(cluster, owner, project, unit) of `cloudhpc_billed_units_total`."""


TransitionKey = tuple[str, str, str | None, str]
"""(cluster, owner, from_state or None for creation, to_state)"""


class TransitionTally(NamedTuple):
    """The audit trail after some id, counted by `TransitionKey`: `settled` up to id `settled_to`
    (rows old enough that no transaction still writing can add one below it), `unsettled` after it."""

    settled: dict[TransitionKey, int]
    settled_to: int
    unsettled: dict[TransitionKey, int]


class RecentJobs(NamedTuple):
    """What `recent_jobs` found: the jobs that get per-job series, and how many ended jobs of the
    window were left out because of the limit (counted, so an operator sees the cap at work)."""

    jobs: list[JobFacts]
    ended_left_out: int


def _job_facts(r: Any) -> JobFacts:
    return JobFacts(
        r.id,
        r.owner,
        r.cluster,
        r.name,
        r.kind,
        JobState(r.state),
        r.exit_code,
        r.submitted,
        r.started,
        r.ended,
        r.stamp,
    )


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _accounting_facts(values: Sequence[Any]) -> AccountingFacts:
    """(cpu, mem, step, cpus, billing, elapsed, exit code, max RSS) -> the figures; the row's own
    figures only when records[0] is the allocation (no step), which it always is for sacct."""
    cpu, mem, step, cpus, billing, elapsed, code, rss = values
    if step is None:
        return AccountingFacts(cpu, mem, _int(cpus), billing, elapsed, _int(code), _int(rss))
    return AccountingFacts(cpu, mem, None, None, None, None, _int(rss))


def sum_billed(documents: Iterable[tuple[BilledKey, float] | None]) -> dict[BilledKey, float]:
    """The documents' units summed per key (documents without units count nothing)."""
    totals: dict[BilledKey, float] = {}
    for document in documents:
        if document is not None:
            key, units = document
            totals[key] = totals.get(key, 0.0) + units
    return totals


def _max_rss(document: str) -> float | None:
    sizes = [r.get("max_rss_bytes") for r in json.loads(document).get("records", [])]
    known = [float(v) for v in sizes if isinstance(v, int | float)]
    return max(known) if known else None


class MetricsView(Database):
    """What porter's metrics exporter reads on each scrape."""

    @map_db_errors
    def count_by_state(self) -> dict[tuple[str, str], int]:
        """Number of jobs per (cluster, state)."""
        with self._read() as session:
            rows = session.execute(
                select(JobRow.cluster, JobRow.state, func.count()).group_by(JobRow.cluster, JobRow.state)
            )
            return {(cluster, state): count for cluster, state, count in rows}

    @map_db_errors
    def array_task_counts(self) -> dict[tuple[str, str], int]:
        """Tasks of the live array jobs per (cluster, task state), from their last reports (an
        ended array's tasks are not counted: bounded by what runs now, not by history)."""
        with self._read() as session:
            rows = session.execute(
                select(JobRow.cluster, JobRow.tasks).where(
                    JobRow.tasks.is_not(None), JobRow.state.in_([s.value for s in ACTIVE_STATES])
                )
            )
            counts: Counter[tuple[str, str]] = Counter()
            for cluster, tasks in rows:
                counts.update((cluster, task["state"]) for task in json.loads(tasks or "[]"))
            return dict(counts)

    @map_db_errors
    def restart_counts(self) -> dict[str, int]:
        """Restarts (SLURM requeues) of all jobs per cluster, however old: a count that only grows."""
        # summed here, not with GROUP BY: grouping by cluster made SQLite walk ix_jobs_cluster_state
        # over every job instead of ix_jobs_restarts_cluster over the few restarted ones
        with self._read() as session:
            rows = session.execute(select(JobRow.cluster, JobRow.restarts).where(JobRow.restarts > 0))
            counts: Counter[str] = Counter()
            for cluster, restarts in rows:
                counts[cluster] += int(restarts)
            return dict(counts)

    @map_db_errors
    def billed_documents(
        self, stored_since: datetime | None = None
    ) -> dict[str, tuple[BilledKey, float] | None]:
        """By job id, the billed units of each accounting document stored since `stored_since` (all
        when None) with their (cluster, owner, project, unit); None for a document without them
        (a replaced document may have lost them). The exporter keeps these by job and reads only
        what changed after its first scrape, as it does for the audit trail."""
        sql = _BILLED_SQL["postgresql" if self.is_postgresql else "sqlite"]
        since = bindparam(
            "since", value=stored_since or datetime.min.replace(tzinfo=UTC), type_=UTCDateTime()
        )
        with self._read() as session:
            rows = session.execute(text(sql).bindparams(since))
            return {
                str(job_id): None if units is None else ((c, o, p, str(u)), float(units))
                for job_id, c, o, p, u, units in rows
            }

    def billed_units(self) -> dict[BilledKey, float]:
        """Units billed to ended jobs, however old, per (cluster, owner, project, unit), the project
        being the job's SLURM account ('' when sacct named none)."""
        return sum_billed(self.billed_documents().values())

    @map_db_errors
    def transition_counts_by_cluster(self) -> dict[tuple[str, str, str], int]:
        """Recorded transitions per (cluster, from_state, to_state); creation is from "none".

        Counted from the audit trail, so the numbers are the same after a restart and on every
        porter replica: a counter that never double counts.
        """
        with self._read() as session:
            rows = session.execute(
                select(JobRow.cluster, TransitionRow.from_state, TransitionRow.to_state, func.count())
                .join(JobRow, JobRow.id == TransitionRow.job_id)
                .group_by(JobRow.cluster, TransitionRow.from_state, TransitionRow.to_state)
            )
            return {(c, f or "none", t): n for c, f, t, n in rows}

    @map_db_errors
    def count_by_owner_and_state(self) -> dict[tuple[str, str, str], int]:
        """Number of jobs per (cluster, owner, state): every job of the store, however old, so the
        per-owner and per-cluster totals on /metrics stay exact while per-job series are bounded."""
        with self._read() as session:
            rows = session.execute(
                select(JobRow.cluster, JobRow.owner, JobRow.state, func.count()).group_by(
                    JobRow.cluster, JobRow.owner, JobRow.state
                )
            )
            return {(cluster, owner, state): count for cluster, owner, state, count in rows}

    @map_db_errors
    def transition_tally(self, after_id: int, settled_before: datetime) -> TransitionTally:
        """The transitions with an id above `after_id`, counted by (cluster, owner, from, to).

        The audit trail only grows, so the exporter counts it once and then only what was added
        (a primary-key range), instead of joining every transition of history at every scrape.
        Ids are handed out when a row is inserted, not when its transaction commits: on PostgreSQL
        a row may appear after a higher id did. Rows written before `settled_before` (the caller
        gives a margin far longer than any transaction) are settled: counted for good, up to the
        first row still younger; the rest are counted afresh on each call.
        """
        cutoff = bindparam("cutoff", value=settled_before, type_=UTCDateTime())
        t = TransitionRow.__table__
        with self._read() as session:
            young = session.execute(
                select(func.min(t.c.id)).where(t.c.id > after_id, t.c.at >= cutoff)
            ).scalar_one()
            old = select(func.max(t.c.id)).where(t.c.id > after_id, t.c.at < cutoff)
            if young is not None:
                old = old.where(t.c.id < young)
            settled_to = session.execute(old).scalar_one() or after_id

            def tally(*where: Any) -> dict[TransitionKey, int]:
                rows = session.execute(
                    select(JobRow.cluster, JobRow.owner, t.c.from_state, t.c.to_state, func.count())
                    .join(JobRow, JobRow.id == t.c.job_id)
                    .where(*where)
                    .group_by(JobRow.cluster, JobRow.owner, t.c.from_state, t.c.to_state)
                )
                return {(c, o, f, to): n for c, o, f, to, n in rows}

            settled = tally(t.c.id > after_id, t.c.id <= settled_to) if settled_to > after_id else {}
            return TransitionTally(settled, settled_to, tally(t.c.id > settled_to))

    @map_db_errors
    def recent_jobs(self, ended_since: datetime, max_ended: int | None = None) -> RecentJobs:
        """Every live job and the jobs that ended at or after `ended_since` (the latest `max_ended`
        of those when given), without the accounting figures (`accounting_facts` reads those): no
        JSON, and a count of the ended jobs left out by `max_ended`."""
        dialect = "postgresql" if self.is_postgresql else "sqlite"
        active: BindParameter[list[str]] = bindparam(
            "active", value=sorted(s.value for s in ACTIVE_STATES), expanding=True
        )
        since: BindParameter[datetime] = bindparam("since", value=ended_since, type_=UTCDateTime())
        # No limit: NULL on PostgreSQL, a negative number on SQLite.
        limit = max_ended if max_ended is not None else (None if self.is_postgresql else -1)
        with self._read() as session:
            live = session.execute(text(_FACTS_SQL[dialect] + _LIVE_WHERE).bindparams(active))
            jobs = [_job_facts(r) for r in live]
            ended_sql = text(_FACTS_SQL[dialect] + _ENDED_WHERE).bindparams(active, since, limit=limit)
            ended = [_job_facts(r) for r in session.execute(ended_sql)]
            left_out = 0
            if max_ended is not None and len(ended) >= max_ended:
                total = session.execute(text(_ENDED_COUNT_SQL).bindparams(active, since)).scalar_one()
                left_out = int(total) - len(ended)
        return RecentJobs(jobs + ended, left_out)

    @map_db_errors
    def accounting_facts(self, job_ids: Sequence[str]) -> dict[str, AccountingFacts]:
        """The figures of these jobs' accounting documents, read by the database (one parse per
        document), in a few queries whatever the number of jobs."""
        out: dict[str, AccountingFacts] = {}
        sql = _ACCOUNTING_SQL["postgresql" if self.is_postgresql else "sqlite"]
        with self._read() as session:
            for start in range(0, len(job_ids), _IDS_PER_QUERY):
                chunk = list(job_ids[start : start + _IDS_PER_QUERY])
                rows = session.execute(text(sql).bindparams(bindparam("ids", value=chunk, expanding=True)))
                if self.is_postgresql:
                    for r in rows:
                        out[r.job_id] = _accounting_facts(
                            (r.cpu, r.mem, r.step, r.cpus, r.billing, r.elapsed, r.code, r.max_rss)
                        )
                    continue
                longer = []
                for job_id, document in rows:
                    facts = json.loads(document) if document else [None] * (_N + _RSS_STEPS + 1)
                    sizes = [v for v in facts[_N : _N + _RSS_STEPS] if v is not None]
                    out[job_id] = _accounting_facts((*facts[:_N], max(sizes) if sizes else None))
                    if facts[-1] is not None:
                        longer.append(job_id)
                if longer:  # more sacct rows than the query read (many srun steps): read those whole
                    query = select(AccountingRow.job_id, AccountingRow.record).where(
                        AccountingRow.job_id.in_(longer)
                    )
                    for job_id, document in session.execute(query):
                        out[job_id] = out[job_id]._replace(max_rss_bytes=_int(_max_rss(document)))
        return out

    def recent_job_facts(self, ended_since: datetime) -> list[JobFacts]:
        """`recent_jobs` with their accounting figures filled in."""
        jobs = self.recent_jobs(ended_since).jobs
        facts = self.accounting_facts([j.id for j in jobs if j.accounting_stamp is not None])
        return [j.with_accounting(facts[j.id]) if j.id in facts else j for j in jobs]

    @map_db_errors
    def transition_counts(self) -> dict[tuple[str, str], int]:
        """Number of recorded transitions per (from_state, to_state); creation is from "none"."""
        with self._read() as session:
            rows = session.execute(
                select(TransitionRow.from_state, TransitionRow.to_state, func.count()).group_by(
                    TransitionRow.from_state, TransitionRow.to_state
                )
            )
            return {(from_state or "none", to_state): count for from_state, to_state, count in rows}
