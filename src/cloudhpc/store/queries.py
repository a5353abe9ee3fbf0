"""Agent queries in the store: porter writes a question for a cluster's agent, the agent claims it
with its work channel and writes the answer, porter's waiting route reads it.

Short-lived rows: the asking route deletes its question once it has the answer or gives up
(`forget_query`). A question is worth answering until `expires_at` (the asking route gives up then
with a 504, and reads an answer only before), so a row whose question expired more than `KEEP` ago
(its asker's replica died while waiting) is finished, answered or not. Finished rows are deleted whenever a new question is written and by
porter's periodic retention sweep (`purge_queries`), so the table does not keep the last questions
of a porter that stops being asked. A question
claimed but not answered (the agent stopped meanwhile) is handed out again after `RECLAIM_AFTER`.
Wake-ups use the store's notifications (`notify_in`), so the asking replica and the agent's poll
may be on different porter replicas.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta
from typing import Any, Final
from uuid import UUID

from sqlalchemy import Delete, and_, delete, or_, select

from cloudhpc.domain.queries import AgentQuery, QueryAnswer
from cloudhpc.store.engine import Database, map_db_errors, utcnow
from cloudhpc.store.models import AgentQueryRow
from cloudhpc.store.notify import notify_in

__all__ = ["QueryRepository", "answer_key", "queries_key"]

KEEP: Final = timedelta(minutes=10)
"""How long a row stays after its question expired (room for replicas' clocks to differ)."""
RECLAIM_AFTER: Final = timedelta(seconds=5)


def queries_key(cluster: str) -> str:
    """What an agent's query poll waits for."""
    return f"queries:{cluster}"


def answer_key(query_id: UUID | str) -> str:
    """What the route that asked waits for."""
    return f"query:{query_id}"


def _finished(now: datetime) -> Delete:
    """The one rule of which rows go: those whose question expired more than `KEEP` before `now`.
    It runs with every new question, so it must find them by `ix_agent_queries_expires_at`, not by
    a scan of the table (`bench/agent_queries.py`)."""
    return delete(AgentQueryRow).where(AgentQueryRow.expires_at < now - KEEP)


class QueryRepository(Database):
    """Questions for agents and their answers."""

    @map_db_errors
    def purge_queries(self, now: datetime | None = None) -> int:
        """Delete the finished rows (answered or not, their question expired more than `KEEP` ago);
        returns how many. porter's retention sweep calls it periodically."""
        with self._write() as session:
            result = session.execute(_finished(now or utcnow()))
            return int(getattr(result, "rowcount", 0) or 0)

    @map_db_errors
    def ask_agent(
        self,
        cluster: str,
        kind: str,
        params: dict[str, Any],
        *,
        job_id: UUID | None = None,
        ttl: float = 30.0,
    ) -> UUID:
        """Record a question for `cluster`'s agent, valid for `ttl` seconds; returns its id."""
        now = utcnow()
        query_id = uuid.uuid4()
        with self._write() as session:
            session.execute(_finished(now))
            session.add(
                AgentQueryRow(
                    id=str(query_id),
                    cluster=cluster,
                    job_id=str(job_id) if job_id is not None else None,
                    kind=kind,
                    params=json.dumps(params),
                    created_at=now,
                    expires_at=now + timedelta(seconds=ttl),
                )
            )
            session.flush()
            notify_in(session, [queries_key(cluster)])
        return query_id

    @map_db_errors
    def claim_queries(self, cluster: str, agent: str, *, limit: int = 20) -> list[AgentQuery]:
        """Unanswered, unexpired questions for `cluster`, marked as claimed by `agent` (a claim
        older than `RECLAIM_AFTER` without an answer is handed out again)."""
        now = utcnow()
        open_question = and_(
            AgentQueryRow.cluster == cluster,
            AgentQueryRow.answered_at.is_(None),
            AgentQueryRow.expires_at > now,
            or_(AgentQueryRow.claimed_at.is_(None), AgentQueryRow.claimed_at < now - RECLAIM_AFTER),
        )
        # a read first: the agent's poll re-checks every second or so and almost always finds
        # nothing, which must not take SQLite's write lock each time
        with self._read() as session:
            if session.scalar(select(AgentQueryRow.id).where(open_question).limit(1)) is None:
                return []
        with self._write() as session:
            statement = (
                select(AgentQueryRow).where(open_question).order_by(AgentQueryRow.created_at).limit(limit)
            )
            if self.is_postgresql:
                statement = statement.with_for_update(skip_locked=True)
            rows = list(session.scalars(statement))
            for row in rows:
                row.claimed_by, row.claimed_at = agent, now
            return [
                AgentQuery(
                    id=UUID(row.id),
                    cluster=row.cluster,
                    kind=row.kind,
                    job_id=UUID(row.job_id) if row.job_id else None,
                    params=json.loads(row.params),
                )
                for row in rows
            ]

    @map_db_errors
    def query_cluster(self, query_id: UUID) -> str | None:
        """The cluster a question was asked of (the agent route checks the token against it)."""
        with self._read() as session:
            row = session.get(AgentQueryRow, str(query_id))
            return row.cluster if row is not None else None

    @map_db_errors
    def answer_query(self, query_id: UUID, answer: QueryAnswer) -> bool:
        """Store the agent's answer; False when the question is gone or was answered already."""
        with self._write() as session:
            row = session.get(AgentQueryRow, str(query_id))
            if row is None or row.answered_at is not None:
                return False
            row.answer = answer.model_dump_json()
            row.answered_at = utcnow()
            session.flush()
            notify_in(session, [answer_key(query_id)])
            return True

    @map_db_errors
    def forget_query(self, query_id: UUID) -> None:
        """Delete a question whose asker is done with it (answered, or given up on): the rows live
        only as long as a request waits, so the table stays small. A late answer then finds no
        question (404), which is what it is worth."""
        with self._write() as session:
            session.execute(delete(AgentQueryRow).where(AgentQueryRow.id == str(query_id)))

    @map_db_errors
    def query_answer(self, query_id: UUID) -> QueryAnswer | None:
        """The answer, or None while there is none."""
        with self._read() as session:
            row = session.get(AgentQueryRow, str(query_id))
            if row is None or row.answer is None:
                return None
            return QueryAnswer.model_validate_json(row.answer)
