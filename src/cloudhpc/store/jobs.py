"""Jobs as porter writes and reads them: desired state (create, cancel), pages of jobs, and each
job's audit trail of transitions.

What the agents write (observed state, leases, reconciliation) is in `store/agents.py`; both sides
convert rows with `to_job`, so a caller never sees an ORM object and cannot trigger a lazy load
outside a transaction.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final
from uuid import UUID, uuid4

from sqlalchemy import Row, and_, bindparam, or_, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, load_only

from cloudhpc.domain.arrays import TaskObservation
from cloudhpc.domain.bridges import BridgePlan
from cloudhpc.domain.jobs import Bridge, Job, JobKind, JobSpec, JobSummary
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import IdempotencyConflict, UnknownJob
from cloudhpc.store.bridges import allocate_bridges, to_bridge
from cloudhpc.store.dependencies import with_dependency
from cloudhpc.store.engine import Database, map_db_errors, utcnow
from cloudhpc.store.models import ACTIVE_SESSION, BridgeRow, JobRow, TransitionRow
from cloudhpc.store.notify import cluster_key, job_key, notify_in

__all__ = ["JobRepository", "Transition", "decode_cursor", "to_job"]

log = logging.getLogger(__name__)

_MAX_PAGE: Final = 1000


@dataclass(frozen=True)
class Transition:
    """One recorded state change. `from_state` is None for the creation of the job."""

    job_id: UUID
    at: datetime
    from_state: JobState | None
    to_state: JobState
    actor: str
    reason: str | None


def _encode_cursor(created_at: datetime, job_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), job_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


_BAD_CURSOR: Final = "invalid cursor: pass back the `next_cursor` of a previous page unchanged"


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at, job id) a cursor of `_encode_cursor` holds; `ValueError` for anything else.

    A cursor comes from the client, so every way it can be wrong (not base64, not JSON, JSON of
    another shape, a date Python cannot convert to UTC, JSON nested past the recursion limit) is
    the same `ValueError`, which porter answers with 422 naming `cursor`."""
    try:
        value = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
            raise ValueError("not a [created_at, id] pair")
        created_at = datetime.fromisoformat(value[0])
        if created_at.tzinfo is None or created_at.utcoffset() is None:
            raise ValueError("a naive timestamp")
        return created_at.astimezone(UTC), str(UUID(value[1]))
    except (ValueError, OverflowError, RecursionError) as exc:  # binascii.Error is a ValueError
        raise ValueError(_BAD_CURSOR) from exc


def _spec_json(spec: JobSpec) -> str:
    return spec.model_dump_json(by_alias=True)


def _same_spec(stored: str, spec: JobSpec) -> bool:
    """Compare specs by content, so defaults written out or left implicit do not matter."""
    return JobSpec.model_validate_json(stored).model_dump(mode="json", by_alias=True) == spec.model_dump(
        mode="json", by_alias=True
    )


_SUMMARY_FIELDS: Final = tuple(JobSummary.model_fields)


def to_summary(row: JobRow) -> JobSummary:
    """The listed half of a job; reads none of the row's spec, artifacts or bridges."""
    values = {name: getattr(row, name) for name in _SUMMARY_FIELDS}
    return JobSummary(
        **values | {"id": UUID(row.id), "kind": JobKind(row.kind), "state": JobState(row.state)}
    )


def to_job(row: JobRow) -> Job:
    return _job(row, (to_bridge(b) for b in row.bridges))


def _job(row: JobRow | Row[Any], bridges: Iterable[Bridge]) -> Job:
    """The job of an ORM row or of a Core row with the `jobs` columns; `bridges` is consumed only
    while the job is live."""
    return Job(
        id=UUID(row.id),
        name=row.name,
        owner=row.owner,
        cluster=row.cluster,
        kind=JobKind(row.kind),
        state=JobState(row.state),
        reason=row.reason,
        cancel_requested=row.cancel_requested,
        slurm_job_id=row.slurm_job_id,
        exit_code=row.exit_code,
        restarts=row.restarts or 0,
        created_at=row.created_at,
        submitted_at=row.submitted_at,
        started_at=row.started_at,
        ended_at=row.ended_at,
        spec=JobSpec.model_validate_json(row.spec),
        artifacts=json.loads(row.artifacts),
        cancel_tasks=json.loads(row.cancel_tasks) if row.cancel_tasks else [],
        # a bridge is forgotten the moment its job ends, even before porter releases its port
        bridges=[] if JobState(row.state).terminal else list(bridges),
    )


_JOBS: Final = JobRow.__table__
_BRIDGES: Final = BridgeRow.__table__
_BRIDGE_FIELDS: Final = tuple(Bridge.model_fields)
_GET_JOB: Final = (
    select(_JOBS, *(_BRIDGES.c[name].label(f"bridge_{name}") for name in _BRIDGE_FIELDS))
    .select_from(_JOBS.outerjoin(_BRIDGES, _BRIDGES.c.job_id == _JOBS.c.id))
    .where(_JOBS.c.id == bindparam("job_id"))
    .order_by(_BRIDGES.c.id)
)
"""One job and its bridges (one row per bridge, or one row with NULL bridge columns), built once:
`GET /jobs/{id}` is porter's hottest read (see `JobRepository.get_job`)."""


def _job_of_rows(rows: Sequence[Row[Any]]) -> Job:
    """The job of `_GET_JOB`'s rows."""
    bridges = (
        Bridge(**{name: getattr(row, f"bridge_{name}") for name in _BRIDGE_FIELDS})
        for row in rows
        if row.bridge_name is not None
    )
    return _job(rows[0], bridges)


def _to_transition(row: TransitionRow) -> Transition:
    return Transition(
        job_id=UUID(row.job_id),
        at=row.at,
        from_state=JobState(row.from_state) if row.from_state is not None else None,
        to_state=JobState(row.to_state),
        actor=row.actor,
        reason=row.reason,
    )


class JobRepository(Database):
    """Jobs as their owners see them: created, listed, read, cancelled, with their transitions."""

    @map_db_errors
    def create_job(
        self,
        owner: str,
        spec: JobSpec,
        *,
        idempotency_key: str | None = None,
        bridges: BridgePlan | None = None,
    ) -> tuple[Job, bool]:
        """Accept a job in state `pending`. Returns the job and whether it was created now.

        With an idempotency key this owner already used, the existing job is returned (and
        False), or `IdempotencyConflict` raised when the spec differs. Two concurrent creates
        with one key make one job: the loser hits the unique constraint and reads the winner's.

        `bridges` allocates the job's bridge ports in the same transaction: a job exists with all
        its ports or not at all (`BridgePortsExhausted` when the range has too few free ports).
        """
        if idempotency_key is not None:
            existing = self._find_by_key(owner, idempotency_key, spec)
            if existing is not None:
                return existing, False
        try:
            return self._insert(owner, spec, bridges, idempotency_key=idempotency_key), True
        except IntegrityError:
            if idempotency_key is None:
                raise
            log.debug("job create for %s lost the race for idempotency key %r", owner, idempotency_key)
            existing = self._find_by_key(owner, idempotency_key, spec)
            if existing is None:
                raise
            return existing, False

    @map_db_errors
    def open_session(
        self, owner: str, spec: JobSpec, *, bridges: BridgePlan | None = None
    ) -> tuple[Job, bool]:
        """The owner's active session `spec.name` on `spec.cluster` (and False: re-attached, its own
        spec kept), or a new ray-cluster from `spec` opened as a session (and True).

        Atomic across porter replicas: a unique index covers the active sessions (ACTIVE_SESSION),
        so of two opens at the same moment one inserts and the other's insert fails and reads the
        winner's row. A session being cancelled or ended no longer holds the name."""
        existing = self._find_session(owner, spec)
        if existing is not None:
            return existing, False
        try:
            return self._insert(owner, spec, bridges, is_session=True), True
        except IntegrityError:
            log.debug("session open for %s lost the race for %s/%s", owner, spec.cluster, spec.name)
            existing = self._find_session(owner, spec)
            if existing is None:
                raise
            return existing, False

    def _find_session(self, owner: str, spec: JobSpec) -> Job | None:
        with self._read() as session:
            row = session.scalars(
                select(JobRow).where(
                    JobRow.owner == owner,
                    JobRow.cluster == spec.cluster,
                    JobRow.name == spec.name,
                    text(ACTIVE_SESSION),
                )
            ).one_or_none()
            return to_job(row) if row is not None else None

    def _insert(
        self,
        owner: str,
        spec: JobSpec,
        bridges: BridgePlan | None,
        *,
        idempotency_key: str | None = None,
        is_session: bool = False,
    ) -> Job:
        """One new `pending` job with its bridge ports and first transition, in one transaction;
        `IntegrityError` when a unique constraint refuses it (an idempotency key, a session)."""
        now = utcnow()
        row = JobRow(
            id=str(uuid4()),
            owner=owner,
            cluster=spec.cluster,
            name=spec.name,
            kind=spec.kind.value,
            state=JobState.PENDING.value,
            cancel_requested=False,
            created_at=now,
            updated_at=now,
            spec=_spec_json(spec),
            idempotency_key=idempotency_key,
            is_session=is_session,
            observed_seq=0,
            artifacts="[]",
            bridges=[],
        )
        with self._write() as session:
            session.add(row)
            session.flush()
            if bridges is not None and bridges.exposed:
                row.bridges.extend(allocate_bridges(session, bridges, now))
                session.flush()
            session.add(
                TransitionRow(job_id=row.id, at=now, from_state=None, to_state=row.state, actor=owner)
            )
            notify_in(session, [cluster_key(row.cluster)])  # the cluster's agent has new work
        return to_job(row)

    def _find_by_key(self, owner: str, key: str, spec: JobSpec) -> Job | None:
        with self._read() as session:
            row = session.scalars(
                select(JobRow).where(JobRow.owner == owner, JobRow.idempotency_key == key)
            ).one_or_none()
            if row is None:
                return None
            if not _same_spec(row.spec, spec):
                raise IdempotencyConflict(
                    f"idempotency key {key!r} was already used for job {row.id} with a different "
                    "spec; use a new key for a new job"
                )
            return to_job(row)

    @map_db_errors
    def get_job(self, job_id: UUID) -> Job | None:
        """One statement, built once, for the job and its bridges, read as Core rows on a bare
        connection (a Session joins it only to plan a job's `after`).

        `GET /jobs/{id}` runs this in a worker thread under porter's one GIL. Through the ORM
        (`select(JobRow)` with `joinedload` in a Session: a statement built and cache-keyed per
        call, the identity map, instance state) it took ~0.84 ms of CPU, now ~0.2-0.3 ms; porter's
        whole GET took ~2.7 ms, so 250 GET/s kept porter ~65 % busy and its p99 rode on the
        queueing (docs/benchmarks.md, "The SQLite GET tail")."""
        with self._read_connection() as connection:
            rows = connection.execute(_GET_JOB, {"job_id": str(job_id)}).all()
            if not rows:
                return None
            with Session(bind=connection) as session:  # queries only for a job with `after`
                return with_dependency(session, _job_of_rows(rows))

    @map_db_errors
    def get_state(self, job_id: UUID) -> JobState | None:
        """Only the state: what a waiting request re-reads while it long-polls."""
        with self._read() as session:
            state = session.scalar(select(JobRow.state).where(JobRow.id == str(job_id)))
            return JobState(state) if state is not None else None

    @map_db_errors
    def list_jobs(
        self,
        *,
        owner: str | None,
        state: JobState | None = None,
        cluster: str | None = None,
        name: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[JobSummary], str | None]:
        """Newest first, as summaries (no spec). `owner=None` lists everybody's jobs (admins).

        Returns a page and the cursor of the next page (None on the last page). The cursor is
        opaque (keyset pagination on created_at, id), so pages stay consistent while jobs are
        being added. A malformed cursor raises `ValueError`.
        """
        if not 1 <= limit <= _MAX_PAGE:
            raise ValueError(f"limit must be between 1 and {_MAX_PAGE}, not {limit}")
        query = select(JobRow).options(load_only(*(getattr(JobRow, f) for f in _SUMMARY_FIELDS)))
        if owner is not None:
            query = query.where(JobRow.owner == owner)
        if state is not None:
            query = query.where(JobRow.state == state.value)
        if cluster is not None:
            query = query.where(JobRow.cluster == cluster)
        if name is not None:
            query = query.where(JobRow.name == name)
        if cursor is not None:
            after_at, after_id = decode_cursor(cursor)
            query = query.where(
                or_(JobRow.created_at < after_at, and_(JobRow.created_at == after_at, JobRow.id < after_id))
            )
        query = query.order_by(JobRow.created_at.desc(), JobRow.id.desc()).limit(limit + 1)
        with self._read() as session:
            rows = list(session.scalars(query))
            jobs = [to_summary(row) for row in rows[:limit]]
        next_cursor = (
            _encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id) if len(rows) > limit else None
        )
        return jobs, next_cursor

    @map_db_errors
    def request_cancel(self, job_id: UUID, actor: str) -> Job:
        """Ask for a job to be cancelled; honoured in every non-terminal state.

        A pending job that no agent has ever claimed cannot be on the cluster, so it is
        cancelled here at once. Any other live job keeps its state with `cancel_requested` set
        and its lease cleared, so the next `claim_work` hands it to the agent right away. A
        terminal job is returned unchanged.
        """
        with self._write() as session:
            row = session.get(JobRow, str(job_id), with_for_update=True)
            if row is None:
                raise UnknownJob(f"no job {job_id}")
            current = JobState(row.state)
            if current.terminal:
                return to_job(row)
            now = utcnow()
            row.cancel_requested = True
            row.updated_at = now
            notify_in(session, [job_key(row.id), cluster_key(row.cluster)])
            if current == JobState.PENDING and row.lease_owner is None:
                row.state = JobState.CANCELLED.value
                row.ended_at = now
                row.reason = "cancelled before an agent picked it up"
                session.add(
                    TransitionRow(
                        job_id=row.id,
                        at=now,
                        from_state=current.value,
                        to_state=row.state,
                        actor=actor,
                        reason=row.reason,
                    )
                )
            else:
                row.lease_until = None
            return to_job(row)

    @map_db_errors
    def request_task_cancel(self, job_id: UUID, index: int) -> Job:
        """Ask for one task of an array job to be cancelled: noted in `cancel_tasks`, the lease
        cleared so that the next `claim_work` hands the job to its agent, which scancels the task
        and reports it done. A terminal job is returned unchanged."""
        with self._write() as session:
            row = session.get(JobRow, str(job_id), with_for_update=True)
            if row is None:
                raise UnknownJob(f"no job {job_id}")
            if JobState(row.state).terminal:
                return to_job(row)
            asked = set(json.loads(row.cancel_tasks) if row.cancel_tasks else [])
            row.cancel_tasks = json.dumps(sorted(asked | {index}))
            row.lease_until = None
            row.updated_at = utcnow()
            notify_in(session, [job_key(row.id), cluster_key(row.cluster)])
            return to_job(row)

    @map_db_errors
    def job_bridges(self, job_id: UUID) -> list[Bridge]:
        """The bridges of a live job (none once it has ended)."""
        job = self.get_job(job_id)
        if job is None:
            raise UnknownJob(f"no job {job_id}")
        return list(job.bridges)

    @map_db_errors
    def job_tasks(self, job_id: UUID) -> list[TaskObservation] | None:
        """An array job's tasks as last reported, by index; None for a job that is not an array
        (or an array no agent has reported on yet)."""
        with self._read() as session:
            raw = session.scalar(select(JobRow.tasks).where(JobRow.id == str(job_id)))
        if raw is None:
            return None
        return [TaskObservation.model_validate(t) for t in json.loads(raw)]

    @map_db_errors
    def transitions(self, job_id: UUID) -> list[Transition]:
        """A job's state changes, oldest first."""
        with self._read() as session:
            rows = session.scalars(
                select(TransitionRow).where(TransitionRow.job_id == str(job_id)).order_by(TransitionRow.id)
            )
            return [_to_transition(row) for row in rows]
