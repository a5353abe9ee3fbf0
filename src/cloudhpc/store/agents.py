"""The agent protocol's side of the store: which agent serves a cluster, the work it is handed,
what it reconciles against after a start, and the observations it reports.

Single writer per fact (ARCHITECTURE §2): porter writes desired state (`store/jobs.py`), the agent
writes observed state here, each report carrying a sequence number so that a stale or repeated one
is ignored.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from datetime import datetime, timedelta
from typing import Final

from sqlalchemy import func, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from cloudhpc.domain.jobs import Job
from cloudhpc.domain.reports import JobReport, Reconciliation
from cloudhpc.domain.states import ACTIVE_STATES, TERMINAL_STATES, JobState, can_transition
from cloudhpc.store.dependencies import plan_dependencies, with_dependency
from cloudhpc.store.engine import DEFAULT_URL, Database, map_db_errors, utcnow
from cloudhpc.store.jobs import to_job
from cloudhpc.store.models import AccountingRow, AgentRow, JobRow, TransitionRow
from cloudhpc.store.notify import cluster_key, job_key, notify_in

__all__ = ["UNACCOUNTED_WINDOW", "AgentRepository"]

log = logging.getLogger(__name__)

WAITING_ALLOWANCE: Final = 400
"""Waiting rows a claim looks past, so jobs waiting for a dependency do not hide the others."""

# How long after its end a job without accounting is still handed to a restarted agent to collect:
# long enough to outlast an agent outage over a weekend, short of sites' sacct purge periods.
UNACCOUNTED_WINDOW: Final = timedelta(days=7)


class AgentRepository(Database):
    """Agent slots, work leases, reconciliation views and reports, with this process's report counts."""

    def __init__(self, url: str = DEFAULT_URL) -> None:
        super().__init__(url)
        self._counts_lock = threading.Lock()
        self._report_counts: Counter[str] = Counter()

    # -- who serves a cluster ----------------------------------------------------------------

    @map_db_errors
    def touch_agent(self, cluster: str, agent: str) -> None:
        """Record that `agent` serving `cluster` was just heard from."""
        statement = self._upsert(AgentRow, {"cluster": cluster, "agent": agent, "last_seen": utcnow()})
        with self._write() as session:
            session.execute(statement)

    @map_db_errors
    def take_agent_slot(self, cluster: str, agent: str, *, hold_seconds: float) -> tuple[str, float] | None:
        """Record `agent` as the one serving `cluster`, unless another agent was heard from within
        `hold_seconds`: then nothing changes and the other's name and silence (s) come back.

        One agent per cluster is what keeps reconciliation from submitting a job twice: an agent
        that finds a job `preparing` without a SLURM id cannot tell a dead agent's job from a live
        one's. A restarted agent (a new name) takes over once its predecessor is silent.

        The decision is one conditional upsert (`INSERT ... ON CONFLICT DO UPDATE ... WHERE`), so it
        holds across porter replicas by the database alone: of two agents asking at once, on any
        replicas, exactly one gets the row, including when the cluster has no row yet (a
        read-then-write under `FOR UPDATE` locks nothing then, and both would win). On PostgreSQL
        the time is the database's, so replicas with skewed clocks agree on who is silent.
        """
        now = func.statement_timestamp() if self.is_postgresql else utcnow()
        insert = pg_insert if self.is_postgresql else sqlite_insert
        values = insert(AgentRow).values(cluster=cluster, agent=agent, last_seen=now)
        claim = values.on_conflict_do_update(
            index_elements=[AgentRow.cluster],
            set_={"agent": values.excluded.agent, "last_seen": values.excluded.last_seen},
            where=or_(AgentRow.agent == agent, AgentRow.last_seen < now - timedelta(seconds=hold_seconds)),
        ).returning(AgentRow.agent)
        with self._write() as session:
            if session.execute(claim).first() is not None:
                return None
            holder, last_seen = session.execute(
                select(AgentRow.agent, AgentRow.last_seen).where(AgentRow.cluster == cluster)
            ).one()
            at = session.scalar(select(func.statement_timestamp())) if self.is_postgresql else now
        assert isinstance(at, datetime)
        return holder, max((at - last_seen).total_seconds(), 0.0)

    @map_db_errors
    def agents(self) -> dict[str, datetime]:
        """When each cluster's agent was last seen."""
        with self._read() as session:
            return {row.cluster: row.last_seen for row in session.scalars(select(AgentRow))}

    # -- work and reconciliation -------------------------------------------------------------

    @map_db_errors
    def claim_work(
        self, cluster: str, agent: str, *, lease_seconds: float = 30, limit: int = 100
    ) -> list[Job]:
        """Jobs of `cluster` that need the agent, leased to `agent` for `lease_seconds`.

        That is: pending jobs to submit, and live jobs whose cancellation was requested (a
        pending one among them must be looked up on the cluster and cancelled, not submitted).
        A leased job is not offered again until the lease runs out, which happens only if the
        agent died before reporting: another agent (or the same one restarted) then gets it and
        must look for it in SLURM before submitting (ARCHITECTURE §2).
        """
        now = utcnow()
        query = (
            select(JobRow)
            .where(
                JobRow.cluster == cluster,
                JobRow.state.in_([s.value for s in ACTIVE_STATES]),
                or_(
                    JobRow.state == JobState.PENDING.value,
                    JobRow.cancel_requested,
                    JobRow.cancel_tasks.is_not(None),
                ),
                or_(JobRow.lease_until.is_(None), JobRow.lease_until <= now),
            )
            .order_by(JobRow.created_at, JobRow.id)
        )
        if self.is_postgresql:
            # Replicas serving two agents at once each skip the rows the other is handing out.
            query = query.with_for_update(skip_locked=True)
        # On SQLite the write transaction (BEGIN IMMEDIATE) already excludes every other writer.
        with self._write() as session:
            offered: list[Job] = []
            seen: set[str] = set()
            # the lease runs from when it is written, not from before the write lock was waited for
            until = utcnow() + timedelta(seconds=lease_seconds)
            # in batches: a job still waiting for a dependency's SLURM id is passed over (not
            # leased), and the next batch looks past it; only what is offered is asked for, so
            # concurrent claims (SKIP LOCKED) still share the rest
            while len(offered) < limit and len(seen) <= limit + WAITING_ALLOWANCE:
                batch = query.where(JobRow.id.not_in(seen)) if seen else query
                rows = list(session.scalars(batch.limit(limit - len(offered))))
                if not rows:
                    break
                for row in rows:
                    seen.add(row.id)
                    job = to_job(row)
                    if job.spec.after and not row.cancel_requested and row.state == JobState.PENDING.value:
                        plan = plan_dependencies(session, job)
                        if plan.never is not None:
                            self._fail_unsatisfiable(session, row, plan.never, now)
                            continue
                        if plan.waiting:
                            continue
                        job = job.model_copy(update={"dependency": plan.option})
                    row.lease_owner = agent
                    row.lease_until = until
                    offered.append(job)
            return offered

    def _fail_unsatisfiable(self, session: Session, row: JobRow, reason: str, now: datetime) -> None:
        """End a pending job whose `after` can never be met (a job it waits for ended otherwise
        before SLURM could judge): it would wait forever."""
        session.add(
            TransitionRow(
                job_id=row.id,
                at=now,
                from_state=row.state,
                to_state=JobState.FAILED.value,
                actor="porter",
                reason=reason,
            )
        )
        row.state = JobState.FAILED.value
        row.reason = reason
        row.ended_at = now
        row.updated_at = now
        notify_in(session, [job_key(row.id)])

    @map_db_errors
    def active_jobs(self, cluster: str) -> list[Job]:
        """Every non-terminal job of a cluster: what an agent reconciles after a restart (with the
        `dependency` of one it may have to submit again)."""
        with self._read() as session:
            rows = session.scalars(
                select(JobRow)
                .where(JobRow.cluster == cluster, JobRow.state.in_([s.value for s in ACTIVE_STATES]))
                .order_by(JobRow.created_at, JobRow.id)
            )
            return [with_dependency(session, to_job(row)) for row in rows]

    def reconciliation(
        self, cluster: str, *, unaccounted_within: timedelta = UNACCOUNTED_WINDOW
    ) -> Reconciliation:
        """What an agent of `cluster` reconciles against after a start (see `Reconciliation`)."""
        return Reconciliation(
            jobs=self.active_jobs(cluster),
            unaccounted=self.unaccounted_jobs(cluster, within=unaccounted_within),
            seq_floor=self.seq_floor(cluster),
        )

    @map_db_errors
    def unaccounted_jobs(self, cluster: str, *, within: timedelta = UNACCOUNTED_WINDOW) -> list[Job]:
        """Jobs that ran in SLURM (they have a SLURM id), ended within `within` and whose
        accounting document never arrived, or arrived only provisional (`final` false), oldest
        end first."""
        since = utcnow() - within
        with self._read() as session:
            rows = session.scalars(
                select(JobRow)
                .outerjoin(AccountingRow, AccountingRow.job_id == JobRow.id)
                .where(
                    JobRow.cluster == cluster,
                    JobRow.state.in_([s.value for s in TERMINAL_STATES]),
                    JobRow.slurm_job_id.is_not(None),
                    JobRow.ended_at >= since,
                    or_(AccountingRow.job_id.is_(None), AccountingRow.final.is_(False)),
                )
                .order_by(JobRow.ended_at, JobRow.id)
            )
            return [to_job(row) for row in rows]

    @map_db_errors
    def seq_floor(self, cluster: str) -> int:
        """The highest report seq applied for any job of `cluster` (0 when none)."""
        with self._read() as session:
            floor = session.scalar(select(func.max(JobRow.observed_seq)).where(JobRow.cluster == cluster))
        return int(floor or 0)

    @map_db_errors
    def apply_report(self, report: JobReport, *, actor: str) -> Job | None:
        """Apply an agent's observation of a job, atomically, if it is newer than the last one.

        Returns None when the report is ignored because it is stale or a duplicate (`seq` not
        above the last applied one) or names an unknown job; otherwise the job as it is now.

        Rules, in order:
        - the job row is locked, so two concurrent reports are applied one after the other and
          only the newer can win;
        - the state moves only along `can_transition`; an illegal move (backwards, or out of a
          terminal state) is logged and skipped, and every applied change records a transition
          with `actor` and the report's `reason`;
        - the other fields (slurm_job_id, reason, exit_code, timestamps) are copied when set,
          unless the job was already terminal and the report names another state: such a report
          contradicts a final fact and is ignored whole. A report repeating the terminal state
          may still fill in facts learnt late (an exit code from accounting). Fields are never
          cleared by a report;
        - entering a terminal state without `ended_at` stamps the current time.
        """
        with self._write() as session:
            row = session.get(JobRow, str(report.job_id), with_for_update=True)
            if row is None:
                self._count_report("unknown_job")
                log.warning(
                    "report seq %d from %s for unknown job %s ignored", report.seq, actor, report.job_id
                )
                return None
            if report.seq <= row.observed_seq:
                self._count_report("stale")
                log.info(
                    "stale report for job %s ignored: seq %d <= %d", row.id, report.seq, row.observed_seq
                )
                return None
            now = utcnow()
            current = JobState(row.state)
            row.observed_seq = report.seq
            keys = [job_key(row.id)]
            if (report.slurm_job_id and not row.slurm_job_id) or report.state.terminal:
                keys.append(cluster_key(row.cluster))  # a job waiting for this one may go now
            notify_in(session, keys)  # sent at commit, to every replica's waiters
            row.updated_at = now
            outcome = "applied"
            if report.state != current and not can_transition(current, report.state):
                outcome = "illegal_transition"
                self._count_report(outcome)
                log.warning(
                    "job %s: ignoring illegal move %s -> %s reported by %s (seq %d)",
                    row.id,
                    current.value,
                    report.state.value,
                    actor,
                    report.seq,
                )
                if current.terminal:
                    return to_job(row)
            elif report.state != current:
                row.state = report.state.value
                session.add(
                    TransitionRow(
                        job_id=row.id,
                        at=now,
                        from_state=current.value,
                        to_state=report.state.value,
                        actor=actor,
                        reason=report.reason,
                    )
                )
            if outcome == "applied":
                self._count_report(outcome)
            for field in ("slurm_job_id", "reason", "exit_code", "submitted_at", "started_at", "ended_at"):
                value = getattr(report, field)
                if value is not None:
                    setattr(row, field, value)
            if report.restarts is not None and report.restarts > (row.restarts or 0):
                row.restarts = report.restarts  # a count SLURM only increases
            if report.tasks is not None:
                row.tasks = json.dumps([t.model_dump(mode="json") for t in report.tasks])
            if report.cancelled_tasks and row.cancel_tasks:
                left = sorted(set(json.loads(row.cancel_tasks)) - set(report.cancelled_tasks))
                row.cancel_tasks = json.dumps(left) if left else None
            if JobState(row.state).terminal and row.ended_at is None:
                row.ended_at = now
            return to_job(row)

    def _count_report(self, outcome: str) -> None:
        with self._counts_lock:
            self._report_counts[outcome] += 1

    def report_counts(self) -> dict[str, int]:
        """Reports handled by this process, by outcome: applied, stale, illegal_transition, unknown_job."""
        with self._counts_lock:
            return dict(self._report_counts)
