"""What a job leaves behind: its stdout (stored by offset as the agent uploads it), the object-store
keys of its saved files, and its accounting document.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cloudhpc.exceptions import UnknownJob
from cloudhpc.store.engine import Database, map_db_errors, utcnow
from cloudhpc.store.models import AccountingRow, JobRow, OutputChunkRow
from cloudhpc.store.notify import job_key, notify_in

__all__ = ["ExpiredArtifacts", "OutputRepository"]

log = logging.getLogger(__name__)

_MAX_OFFSET = 2**63 - 1


@dataclass(frozen=True)
class ExpiredArtifacts:
    """A job whose artifacts outlived the retention period."""

    job_id: UUID
    owner: str
    keys: list[str]


class OutputRepository(Database):
    """Job output chunks, artifact keys and accounting documents."""

    # -- stdout ------------------------------------------------------------------------------

    @map_db_errors
    def append_output(self, job_id: UUID, offset: int, data: bytes) -> int:
        """Store a chunk of a job's stdout at byte `offset`; returns the stored length after it.

        Idempotent, so the agent can resend after a timeout: bytes already stored are skipped
        (a chunk that overlaps the end is trimmed to its new part). A chunk starting beyond the
        stored length would leave a hole and is not stored; the returned length tells the agent
        where to resume.
        """
        if offset < 0:
            raise ValueError(f"offset must be >= 0, not {offset}")
        key = str(job_id)
        try:
            with self._write() as session:
                if session.get(JobRow, key) is None:
                    raise UnknownJob(f"no job {job_id}")
                size = self._output_size(session, key)
                if offset > size:
                    log.warning("job %s: output chunk at %d after %d stored bytes refused", key, offset, size)
                    return size
                fresh = data[size - offset :]
                if not fresh:
                    return size
                session.add(OutputChunkRow(job_id=key, byte_offset=size, data=fresh))
                session.flush()
                notify_in(session, [job_key(key)])
                return size + len(fresh)
        except IntegrityError:
            # A concurrent append stored a chunk at the same offset first: ours is a duplicate.
            return self.output_size(job_id)

    @staticmethod
    def _output_size(session: Session, job_id: str) -> int:
        size = session.scalar(
            select(func.max(OutputChunkRow.byte_offset + func.length(OutputChunkRow.data))).where(
                OutputChunkRow.job_id == job_id
            )
        )
        return int(size or 0)

    @map_db_errors
    def output_size(self, job_id: UUID) -> int:
        with self._read() as session:
            return self._output_size(session, str(job_id))

    @map_db_errors
    def read_output(self, job_id: UUID, offset: int, limit: int) -> bytes:
        """Up to `limit` bytes of a job's stored stdout from byte `offset` (empty past the end).

        Offsets are SQL BIGINTs: the end of the range is clamped to the largest one, so an offset
        near 2**63 is an empty read rather than an integer overflow in the database."""
        if offset < 0 or limit < 0:
            raise ValueError("offset and limit must be >= 0")
        if limit == 0 or offset >= _MAX_OFFSET:
            return b""
        key = str(job_id)
        end = min(offset + limit, _MAX_OFFSET)
        with self._read() as session:
            first = session.scalar(
                select(func.max(OutputChunkRow.byte_offset)).where(
                    OutputChunkRow.job_id == key, OutputChunkRow.byte_offset <= offset
                )
            )
            rows = session.execute(
                select(OutputChunkRow.byte_offset, OutputChunkRow.data)
                .where(
                    OutputChunkRow.job_id == key,
                    OutputChunkRow.byte_offset >= (first or 0),
                    OutputChunkRow.byte_offset < end,
                )
                .order_by(OutputChunkRow.byte_offset)
            )
            parts: list[bytes] = []
            for start, data in rows:
                lo = max(offset - start, 0)
                hi = min(end - start, len(data))
                if hi > lo:
                    parts.append(bytes(data[lo:hi]))
        return b"".join(parts)

    # -- artifacts ---------------------------------------------------------------------------

    @map_db_errors
    def set_artifacts(self, job_id: UUID, keys: Sequence[str]) -> None:
        """Record the object-store keys of a job's saved files (script, logs, accounting)."""
        with self._write() as session:
            result = session.execute(
                update(JobRow)
                .where(JobRow.id == str(job_id))
                .values(artifacts=json.dumps(list(keys)), updated_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            if getattr(result, "rowcount", 0) == 0:
                raise UnknownJob(f"no job {job_id}")

    @map_db_errors
    def add_artifacts(self, job_id: UUID, keys: Sequence[str]) -> list[str]:
        """Add keys to a job's artifacts (the agent reports them at submission and at the end, in
        any order, possibly twice); returns the list as it is now, in the order first reported."""
        with self._write() as session:
            row = session.get(JobRow, str(job_id), with_for_update=True)
            if row is None:
                raise UnknownJob(f"no job {job_id}")
            current: list[str] = json.loads(row.artifacts)
            merged = list(dict.fromkeys([*current, *keys]))
            if merged != current:
                row.artifacts = json.dumps(merged)
                row.updated_at = utcnow()
            return merged

    @map_db_errors
    def expired_artifacts(self, ended_before: datetime, *, limit: int = 500) -> list[ExpiredArtifacts]:
        """Jobs that ended before `ended_before` and still have artifacts: the retention sweep's work."""
        with self._read() as session:
            rows = session.execute(
                select(JobRow.id, JobRow.owner, JobRow.artifacts)
                .where(JobRow.ended_at < ended_before, JobRow.artifacts != "[]")
                .order_by(JobRow.ended_at, JobRow.id)
                .limit(limit)
            )
            return [ExpiredArtifacts(UUID(i), owner, json.loads(keys)) for i, owner, keys in rows]

    # -- accounting --------------------------------------------------------------------------

    @map_db_errors
    def set_accounting(self, job_id: UUID, record: Mapping[str, Any]) -> bool:
        """Store (or replace) a job's accounting document; it must be JSON-serialisable. A document
        that is not final (`"final": false`) never replaces a final one (an agent that restarted
        may send a job's provisional figures after its final ones): False when it was dropped."""
        document = json.dumps(record)
        final = record.get("final", True) is not False
        now = utcnow()
        with self._write() as session:
            if session.get(JobRow, str(job_id)) is None:
                raise UnknownJob(f"no job {job_id}")
            if not final and session.scalar(
                select(AccountingRow.final).where(AccountingRow.job_id == str(job_id)).with_for_update()
            ):
                return False
            session.execute(
                self._upsert(
                    AccountingRow,
                    {"job_id": str(job_id), "record": document, "updated_at": now, "final": final},
                )
            )
        return True

    @map_db_errors
    def get_accounting(self, job_id: UUID) -> dict[str, Any] | None:
        """The accounting document of a job, or None until the agent has sent it."""
        with self._read() as session:
            document = session.scalar(select(AccountingRow.record).where(AccountingRow.job_id == str(job_id)))
        if document is None:
            return None
        value: dict[str, Any] = json.loads(document)
        return value
