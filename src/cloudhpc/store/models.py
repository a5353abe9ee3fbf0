"""The job store's tables, as SQLAlchemy 2 typed declarative models.

Nothing outside `cloudhpc.store` sees these classes: the repository converts rows to domain
models before returning. The Alembic migrations in `migrations/versions/` must describe exactly
this metadata (a test compares them on SQLite and PostgreSQL), so a change here needs a new
migration.

Column names avoid SQL keywords (`user`, `offset`) so that an operator can query the database by
hand without quoting.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from cloudhpc.domain.states import ACTIVE_STATES

__all__ = [
    "AccountingRow",
    "AgentQueryRow",
    "AgentRow",
    "Base",
    "BridgeRow",
    "JobRow",
    "OutputChunkRow",
    "TokenRow",
    "TransitionRow",
    "UTCDateTime",
]

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
"""Deterministic constraint names, so migrations can address them on every dialect."""

# SQLite only auto-increments an `INTEGER PRIMARY KEY`; PostgreSQL gets a 64-bit identity.
_BIGINT_PK = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python.

    PostgreSQL stores `timestamptz`; SQLite has no time zones and returns naive values, so values
    are stored as naive UTC there and get their zone back on read. Naive input is refused: it is
    always a bug, and guessing its zone would silently shift times.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"refusing to store a naive datetime ({value.isoformat()}); use UTC")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


ACTIVE_SESSION = (
    "is_session AND NOT cancel_requested AND state IN ("
    + ", ".join(f"'{state.value}'" for state in sorted(ACTIVE_STATES))
    + ")"
)
"""The rows of the unique index on sessions: opened as one, not being cancelled, not ended. The
same SQL selects the session an open re-attaches to (`JobRepository.open_session`)."""


class JobRow(Base):
    """One job: desired state written by porter, observed state written by the agent's reports."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    cluster: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, server_default=false())
    slurm_job_id: Mapped[str | None] = mapped_column(String(64))
    exit_code: Mapped[int | None] = mapped_column(Integer)
    # times SLURM ran the job again (requeue, preemption): only ever grows
    restarts: Mapped[int] = mapped_column(Integer, server_default=text("0"), default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    submitted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    spec: Mapped[str] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    # The `seq` of the last agent report applied; older reports are ignored.
    observed_seq: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    # An agent's claim on a pending job, so two agents never submit it both.
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    artifacts: Mapped[str] = mapped_column(Text, server_default=text("'[]'"))
    # An array job's tasks, JSON of [TaskObservation, ...] as last reported; NULL for other jobs.
    tasks: Mapped[str | None] = mapped_column(Text)
    # Array tasks whose cancellation was asked for (JSON list of indices), until the agent did it.
    cancel_tasks: Mapped[str | None] = mapped_column(Text)
    # A ray-cluster opened as a warm Ray session (`POST /ray-sessions`): at most one active per
    # owner, cluster and name (ux_jobs_active_session).
    is_session: Mapped[bool] = mapped_column(Boolean, server_default=false(), default=False)
    bridges: Mapped[list[BridgeRow]] = relationship(
        lazy="selectin", order_by="BridgeRow.id", passive_deletes=True, cascade="all, delete-orphan"
    )

    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key"),
        Index("ix_jobs_cluster_state", "cluster", "state"),
        Index("ix_jobs_owner_created_at", "owner", "created_at"),
        Index("ix_jobs_created_at", "created_at"),
        # the metrics' restart counts read only the few restarted jobs, not every row's spec
        Index("ix_jobs_restarts_cluster", "restarts", "cluster"),
        # two opens of one session at the same moment: the second insert fails, and reads the first
        Index(
            "ux_jobs_active_session",
            "owner",
            "cluster",
            "name",
            unique=True,
            sqlite_where=text(ACTIVE_SESSION),
            postgresql_where=text(ACTIVE_SESSION),
        ),
    )


class TransitionRow(Base):
    """The audit trail: every state change of every job, with who caused it."""

    __tablename__ = "job_transitions"

    id: Mapped[int] = mapped_column(_BIGINT_PK, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str | None] = mapped_column(Text)


class TokenRow(Base):
    """A bearer token. Only its SHA-256 is kept; the plaintext is shown once, at creation."""

    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    clusters: Mapped[str] = mapped_column(Text, server_default=text("'[]'"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class AgentRow(Base):
    """When each cluster's agent was last heard from (for `GET /clusters` and readiness)."""

    __tablename__ = "agents"

    cluster: Mapped[str] = mapped_column(String(64), primary_key=True)
    agent: Mapped[str] = mapped_column(String(128))
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime)


class OutputChunkRow(Base):
    """A piece of a job's stdout, appended by the agent so porter serves logs without SSH."""

    __tablename__ = "job_output"

    job_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    byte_offset: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class AccountingRow(Base):
    """A job's accounting (sacct records and efficiency) as the agent sent it when the job ended.

    Kept out of `jobs` so listing jobs never reads these documents.
    """

    __tablename__ = "job_accounting"

    job_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    record: Mapped[str] = mapped_column(Text)
    # indexed: a metrics scrape reads the documents stored since the one before, not every document
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    # False: stored before the scheduler recorded all of the job (the document's `final`); the
    # job is listed as unaccounted until the final document replaces it
    final: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())


class BridgeRow(Base):
    """A bridge port on the bridge VM, held by a live job; the row is deleted when the port is free.

    The unique (bridge_host, bridge_port) pair is what guarantees a port in use is never handed out
    twice, by any porter replica: rows exist only while their job holds the port.
    """

    __tablename__ = "bridges"

    id: Mapped[int] = mapped_column(_BIGINT_PK, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    remote_port: Mapped[int] = mapped_column(Integer)
    bridge_host: Mapped[str] = mapped_column(String(255))
    bridge_port: Mapped[int] = mapped_column(Integer)
    url: Mapped[str | None] = mapped_column(Text)
    service_dns: Mapped[str | None] = mapped_column(String(255))
    ready: Mapped[bool] = mapped_column(Boolean, server_default=false())
    ready_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (
        UniqueConstraint("bridge_host", "bridge_port"),
        UniqueConstraint("job_id", "name"),
    )


class AgentQueryRow(Base):
    """A question for a cluster's agent and, once it came, the answer (both JSON text).

    Porter writes the question and waits; the agent claims it through its work channel and writes
    the answer. Rows are short-lived: each is useless after `expires_at` and deleted soon after.
    """

    __tablename__ = "agent_queries"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    cluster: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str | None] = mapped_column(
        String(36), ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[str] = mapped_column(String(32))
    params: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    answered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    answer: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("ix_agent_queries_cluster_expires_at", "cluster", "expires_at"),
        # the sweep of finished rows names only expires_at (migration 0007)
        Index("ix_agent_queries_expires_at", "expires_at"),
    )
