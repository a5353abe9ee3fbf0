"""The job store: the single source of desired state, and the only code that runs SQL.

`Store` is synchronous on purpose: porter calls it from FastAPI's threadpool, and the agent
protocol's guarantees come from database transactions, not from Python locks. Every public method
returns domain models (`Job`) or small frozen dataclasses, never ORM objects, so no caller can
trigger a lazy load outside a transaction.

Concurrency rules, per dialect:

- PostgreSQL: READ COMMITTED with explicit row locks (`SELECT ... FOR UPDATE`) where a decision
  depends on the current row, and `FOR UPDATE SKIP LOCKED` for handing out work, so several
  porter replicas can share one database (ARCHITECTURE §9).
- SQLite: one writer at a time. Write transactions start with `BEGIN IMMEDIATE`, taking the write
  lock up front; a deferred transaction that reads and then writes can fail with "database is
  locked" when another writer got in between, which `busy_timeout` cannot fix. Reads use plain
  `BEGIN` and, thanks to WAL, never wait for writers.

Driver errors are translated to `StoreError` in one place (`_map_db_errors`).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import logging
import secrets
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Concatenate, Final, NamedTuple, ParamSpec, TypeVar
from uuid import UUID, uuid4

import alembic.command
import alembic.util
from alembic.config import Config as AlembicConfig
from sqlalchemy import (
    Engine,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, joinedload, sessionmaker
from sqlalchemy.pool import StaticPool
from sqlalchemy.sql.expression import Executable

from cloudhpc.domain.jobs import Bridge, Job, JobKind, JobSpec
from cloudhpc.domain.reports import JobReport, Reconciliation
from cloudhpc.domain.states import ACTIVE_STATES, TERMINAL_STATES, JobState, can_transition
from cloudhpc.exceptions import BridgePortsExhausted, IdempotencyConflict, StoreError, UnknownJob
from cloudhpc.store.models import (
    AccountingRow,
    AgentRow,
    Base,
    BridgeRow,
    JobRow,
    OutputChunkRow,
    TokenRow,
    TransitionRow,
    UTCDateTime,
)

__all__ = [
    "DEFAULT_URL",
    "ROLES",
    "TOKEN_PREFIX",
    "AccountingFacts",
    "BridgePlan",
    "BridgeRecord",
    "ExpiredArtifacts",
    "ExposedPort",
    "JobFacts",
    "Principal",
    "Store",
    "TokenInfo",
    "Transition",
    "normalize_url",
]

log = logging.getLogger(__name__)

DEFAULT_URL: Final = "sqlite:///.cloudhpc/state.db"
TOKEN_PREFIX: Final = "chpc_"  # noqa: S105 (a prefix, not a secret)
ROLES: Final = ("user", "agent", "admin")
MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"
# How long after its end a job without accounting is still handed to a restarted agent to collect:
# long enough to outlast an agent outage over a weekend, short of sites' sacct purge periods.
UNACCOUNTED_WINDOW: Final = timedelta(days=7)

_SQLITE_BUSY_TIMEOUT_MS = 10_000
# A pooled PostgreSQL connection idle longer than this is pinged before use (see `_pg_engine`).
_PG_PING_AFTER_IDLE_S = 10.0
_PG_USED_AT = "cloudhpc_used_at"
_WRITE_OPTION = "cloudhpc_write"
# Any constant works; it only has to be the same for every porter replica sharing the database.
_MIGRATION_LOCK_KEY = 0x636C6F7564687063  # "cloudhpc"
_BRIDGE_LOCK_KEY = 0x6272696467657321  # "bridges!"
_MAX_PAGE = 1000

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class Principal:
    """Who a bearer token speaks for. Agents act only on `clusters`; users only on their jobs."""

    user: str
    role: str
    clusters: tuple[str, ...]
    token_id: int


@dataclass(frozen=True)
class TokenInfo:
    """A token as an administrator may list it: everything but the secret."""

    id: int
    user: str
    role: str
    clusters: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class Transition:
    """One recorded state change. `from_state` is None for the creation of the job."""

    job_id: UUID
    at: datetime
    from_state: JobState | None
    to_state: JobState
    actor: str
    reason: str | None


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


@dataclass(frozen=True)
class ExpiredArtifacts:
    """A job whose artifacts outlived the retention period."""

    job_id: UUID
    owner: str
    keys: list[str]


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

# Built from the constants above only; values are bound parameters.
_RECENT_SQL: Final = {
    dialect: f"""
SELECT j.id, j.owner, j.cluster, j.name, j.kind, j.state, j.exit_code,
       {epoch("j.submitted_at")} AS submitted, {epoch("j.started_at")} AS started,
       {epoch("j.ended_at")} AS ended, {epoch("a.updated_at")} AS stamp
FROM jobs AS j LEFT OUTER JOIN job_accounting AS a ON a.job_id = j.id
WHERE j.state IN :active OR j.ended_at >= :since
"""  # noqa: S608
    for dialect, epoch in (("sqlite", _sqlite_epoch), ("postgresql", _pg_epoch))
}
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


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _accounting_facts(values: Sequence[Any]) -> AccountingFacts:
    """(cpu, mem, step, cpus, billing, elapsed, exit code, max RSS) -> the figures; the row's own
    figures only when records[0] is the allocation (no step), which it always is for sacct."""
    cpu, mem, step, cpus, billing, elapsed, code, rss = values
    if step is None:
        return AccountingFacts(cpu, mem, _int(cpus), billing, elapsed, _int(code), _int(rss))
    return AccountingFacts(cpu, mem, None, None, None, None, _int(rss))


def _max_rss(document: str) -> float | None:
    sizes = [r.get("max_rss_bytes") for r in json.loads(document).get("records", [])]
    known = [float(v) for v in sizes if isinstance(v, int | float)]
    return max(known) if known else None


@dataclass(frozen=True)
class ExposedPort:
    """One bridge to allocate: the job's port `remote_port` under `name`; `scheme` makes its URL."""

    name: str
    remote_port: int
    scheme: str | None = None


@dataclass(frozen=True)
class BridgePlan:
    """The bridge ports a new job needs on one bridge VM, from porter's `porter.bridge` settings."""

    host: str
    port_range: tuple[int, int]
    exposed: tuple[ExposedPort, ...]


@dataclass(frozen=True)
class BridgeRecord:
    """A held bridge port, with what the reconciler needs to know of its job."""

    job_id: UUID
    owner: str
    state: JobState
    bridge: Bridge


def normalize_url(url: str) -> URL:
    """The SQLAlchemy URL for a configured database URL.

    `postgresql://` and `postgres://` mean the psycopg 3 driver (the only PostgreSQL driver we
    install); an explicit `postgresql+driver://` is kept. Any URL query (`?options=-csearch_path%3Dx`,
    `?sslmode=require`) is passed to the driver.
    """
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise StoreError(
            f"unsupported database URL scheme {parsed.drivername!r}: use sqlite:///PATH or postgresql://..."
        )
    return parsed


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _describe(exc: SQLAlchemyError) -> str:
    """A one-line message without the SQL statement and its parameters (they can be large)."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        origin: BaseException = exc.orig
    else:
        origin = exc
    first = str(origin).strip().splitlines()
    return f"{type(origin).__name__}: {first[0] if first else '(no message)'}"


def _map_db_errors(
    method: Callable[Concatenate[Store, P], R],
) -> Callable[Concatenate[Store, P], R]:
    """The one boundary where SQLAlchemy and driver errors become `StoreError`.

    Our own `StoreError`s (unknown job, idempotency conflict) pass through unchanged.
    """

    @functools.wraps(method)
    def wrapper(self: Store, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        except SQLAlchemyError as exc:
            raise StoreError(
                f"job store ({self.dialect}) failed in {method.__name__}: {_describe(exc)}"
            ) from exc

    return wrapper


def _encode_cursor(created_at: datetime, job_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), job_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        stamp, job_id = json.loads(raw)
        created_at = datetime.fromisoformat(stamp)
        UUID(job_id)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise ValueError("invalid cursor: pass back the `next` value of a previous page unchanged") from exc
    if created_at.tzinfo is None:
        raise ValueError("invalid cursor: pass back the `next` value of a previous page unchanged")
    return created_at, str(job_id)


def _spec_json(spec: JobSpec) -> str:
    return spec.model_dump_json(by_alias=True)


def _same_spec(stored: str, spec: JobSpec) -> bool:
    """Compare specs by content, so defaults written out or left implicit do not matter."""
    return JobSpec.model_validate_json(stored).model_dump(mode="json", by_alias=True) == spec.model_dump(
        mode="json", by_alias=True
    )


def _to_job(row: JobRow) -> Job:
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
        created_at=row.created_at,
        submitted_at=row.submitted_at,
        started_at=row.started_at,
        ended_at=row.ended_at,
        spec=JobSpec.model_validate_json(row.spec),
        artifacts=json.loads(row.artifacts),
        # a bridge is forgotten the moment its job ends, even before porter releases its port
        bridges=[] if JobState(row.state).terminal else [_to_bridge(b) for b in row.bridges],
    )


def _to_bridge(row: BridgeRow) -> Bridge:
    return Bridge(
        name=row.name,
        remote_port=row.remote_port,
        bridge_host=row.bridge_host,
        bridge_port=row.bridge_port,
        url=row.url,
        service_dns=row.service_dns,
        ready=row.ready,
    )


def _host_in_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _to_transition(row: TransitionRow) -> Transition:
    return Transition(
        job_id=UUID(row.job_id),
        at=row.at,
        from_state=JobState(row.from_state) if row.from_state is not None else None,
        to_state=JobState(row.to_state),
        actor=row.actor,
        reason=row.reason,
    )


def _to_token_info(row: TokenRow) -> TokenInfo:
    return TokenInfo(
        id=row.id,
        user=row.user_name,
        role=row.role,
        clusters=tuple(json.loads(row.clusters)),
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


class Store:
    """Jobs, their transitions and output, tokens and agent heartbeats, in SQLite or PostgreSQL.

    `Store("sqlite:///.cloudhpc/state.db")` (the default, parent directory created) or
    `Store("postgresql://user:pass@host/db")`. Call `migrate()` once at start-up; it is a no-op
    when the schema is current and safe to run from several replicas at once.
    """

    def __init__(self, url: str = DEFAULT_URL) -> None:
        self.url = normalize_url(url)
        self.dialect = self.url.get_backend_name()
        self._engine = self._create_engine(self.url)
        self._write_engine = self._engine.execution_options(**{_WRITE_OPTION: True})
        # PostgreSQL reads run without BEGIN/COMMIT: under READ COMMITTED each statement takes its
        # own snapshot inside a transaction too, so a transaction buys reads nothing but two round
        # trips (half of a `GET /jobs/{id}`). SQLite reads keep theirs: there it is the snapshot.
        read_engine = (
            self._engine.execution_options(isolation_level="AUTOCOMMIT")
            if self.is_postgresql
            else self._engine
        )
        self._reads = sessionmaker(read_engine, expire_on_commit=False)
        self._writes = sessionmaker(self._write_engine, expire_on_commit=False)
        self._counts_lock = threading.Lock()
        self._report_counts: Counter[str] = Counter()

    # -- engine, lifecycle -------------------------------------------------------------------

    @staticmethod
    def _create_engine(url: URL) -> Engine:
        if url.get_backend_name() == "postgresql":
            return Store._pg_engine(url)
        database = url.database or ""
        memory = database in ("", ":memory:") or "mode=memory" in database
        if memory:
            # One shared connection, or every pooled connection would see its own empty database.
            # Fine for a quick script or a unit test; not for concurrent writers (use a file).
            engine = create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
        else:
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", Store._sqlite_on_connect)
        event.listen(engine, "begin", Store._sqlite_on_begin)
        return engine

    @staticmethod
    def _pg_engine(url: URL) -> Engine:
        """A pool that pings a connection only when it has been idle for a while.

        `pool_pre_ping` pings at every checkout: one more round trip per request, about 40% of
        `GET /jobs/{id}` on PostgreSQL (bench/api.py). A connection in steady use is known to be
        alive; one idle for `_PG_PING_AFTER_IDLE_S` (when a server restart or a firewall may have
        dropped it) is pinged, and a failed ping makes the pool connect anew. A connection that
        dies while in steady use fails its request (503, the client retries) and SQLAlchemy
        invalidates the pool, so the next requests reconnect.
        """
        engine = create_engine(url, pool_size=10, max_overflow=20)

        def used(_dbapi_connection: Any, record: Any, *_: Any) -> None:
            record.info[_PG_USED_AT] = time.monotonic()

        def ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
            if time.monotonic() - record.info.get(_PG_USED_AT, 0.0) < _PG_PING_AFTER_IDLE_S:
                return
            try:
                engine.dialect.do_ping(dbapi_connection)
            except Exception as exc:
                raise DisconnectionError(f"idle connection failed its ping: {exc}") from exc
            record.info[_PG_USED_AT] = time.monotonic()

        event.listen(engine, "connect", used)
        event.listen(engine, "checkout", ping_if_idle)
        event.listen(engine, "checkin", used)
        return engine

    @staticmethod
    def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from pysqlite so `_sqlite_on_begin` decides how to BEGIN.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
            Store._sqlite_enable_wal(cursor)
        finally:
            cursor.close()

    @staticmethod
    def _sqlite_enable_wal(cursor: Any) -> None:
        """Switch the database to WAL (a persistent setting, so only a new database switches).

        The switch needs an exclusive lock and SQLite reports "database is locked" at once,
        without the busy handler, when another connection holds any lock: retry a while.
        """
        deadline = time.monotonic() + _SQLITE_BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                mode = cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
                continue
            if mode != "wal" and mode != "memory":
                log.warning("SQLite refused WAL mode (journal_mode=%s); concurrent reads will wait", mode)
            return

    @staticmethod
    def _sqlite_on_begin(connection: Any) -> None:
        write = connection.get_execution_options().get(_WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine, for tests and the schema check only: nothing else runs SQL."""
        return self._engine

    @property
    def is_postgresql(self) -> bool:
        return self.dialect == "postgresql"

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with self._writes.begin() as session:
            yield session

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._reads.begin() as session:
            yield session

    def alembic_config(self) -> AlembicConfig:
        """The Alembic configuration of the packaged migrations (no alembic.ini involved)."""
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.set_main_option("path_separator", "os")
        return cfg

    def migrate(self) -> None:
        """Bring the schema to the newest revision; a no-op when it is already there."""
        cfg = self.alembic_config()
        try:
            with self._write_engine.begin() as conn:
                if self.is_postgresql:
                    # Replicas starting together would otherwise race to create the same tables.
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
                cfg.attributes["connection"] = conn
                alembic.command.upgrade(cfg, "head")
        except SQLAlchemyError as exc:
            raise StoreError(f"migrating the job store ({self.dialect}) failed: {_describe(exc)}") from exc
        except alembic.util.CommandError as exc:
            raise StoreError(f"migrating the job store ({self.dialect}) failed: {exc}") from exc

    def close(self) -> None:
        self._engine.dispose()

    def ping(self) -> bool:
        """True when the database answers (for `/readyz`); never raises."""
        try:
            with self._engine.connect() as conn:
                conn.execute(select(1))
        except SQLAlchemyError as exc:
            log.warning("job store ping failed: %s", _describe(exc))
            return False
        return True

    # -- jobs: desired state (written by porter) ---------------------------------------------

    @_map_db_errors
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
        now = _utcnow()
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
            observed_seq=0,
            artifacts="[]",
            bridges=[],
        )
        try:
            with self._write() as session:
                session.add(row)
                session.flush()
                if bridges is not None and bridges.exposed:
                    row.bridges.extend(self._allocate_bridges(session, bridges, now))
                    session.flush()
                session.add(
                    TransitionRow(job_id=row.id, at=now, from_state=None, to_state=row.state, actor=owner)
                )
        except IntegrityError:
            if idempotency_key is None:
                raise
            log.debug("job create for %s lost the race for idempotency key %r", owner, idempotency_key)
            existing = self._find_by_key(owner, idempotency_key, spec)
            if existing is None:
                raise
            return existing, False
        return _to_job(row), True

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
            return _to_job(row)

    @_map_db_errors
    def get_job(self, job_id: UUID) -> Job | None:
        with self._read() as session:
            # one statement for the job and its bridges (the relationship's default is a second one)
            query = select(JobRow).where(JobRow.id == str(job_id)).options(joinedload(JobRow.bridges))
            row = session.scalars(query).unique().one_or_none()
            return _to_job(row) if row is not None else None

    @_map_db_errors
    def get_state(self, job_id: UUID) -> JobState | None:
        """Only the state: what a waiting request re-reads while it long-polls."""
        with self._read() as session:
            state = session.scalar(select(JobRow.state).where(JobRow.id == str(job_id)))
            return JobState(state) if state is not None else None

    @_map_db_errors
    def list_jobs(
        self,
        *,
        owner: str | None,
        state: JobState | None = None,
        cluster: str | None = None,
        name: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[Job], str | None]:
        """Newest first. `owner=None` lists everybody's jobs (admins).

        Returns a page and the cursor of the next page (None on the last page). The cursor is
        opaque (keyset pagination on created_at, id), so pages stay consistent while jobs are
        being added. A malformed cursor raises `ValueError`.
        """
        if not 1 <= limit <= _MAX_PAGE:
            raise ValueError(f"limit must be between 1 and {_MAX_PAGE}, not {limit}")
        query = select(JobRow)
        if owner is not None:
            query = query.where(JobRow.owner == owner)
        if state is not None:
            query = query.where(JobRow.state == state.value)
        if cluster is not None:
            query = query.where(JobRow.cluster == cluster)
        if name is not None:
            query = query.where(JobRow.name == name)
        if cursor is not None:
            after_at, after_id = _decode_cursor(cursor)
            query = query.where(
                or_(JobRow.created_at < after_at, and_(JobRow.created_at == after_at, JobRow.id < after_id))
            )
        query = query.order_by(JobRow.created_at.desc(), JobRow.id.desc()).limit(limit + 1)
        with self._read() as session:
            rows = list(session.scalars(query))
            jobs = [_to_job(row) for row in rows[:limit]]
        next_cursor = (
            _encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id) if len(rows) > limit else None
        )
        return jobs, next_cursor

    @_map_db_errors
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
                return _to_job(row)
            now = _utcnow()
            row.cancel_requested = True
            row.updated_at = now
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
            return _to_job(row)

    @_map_db_errors
    def set_artifacts(self, job_id: UUID, keys: Sequence[str]) -> None:
        """Record the object-store keys of a job's saved files (script, logs, accounting)."""
        with self._write() as session:
            result = session.execute(
                update(JobRow)
                .where(JobRow.id == str(job_id))
                .values(artifacts=json.dumps(list(keys)), updated_at=_utcnow())
                .execution_options(synchronize_session=False)
            )
            if getattr(result, "rowcount", 0) == 0:
                raise UnknownJob(f"no job {job_id}")

    @_map_db_errors
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
                row.updated_at = _utcnow()
            return merged

    @_map_db_errors
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

    @_map_db_errors
    def set_accounting(self, job_id: UUID, record: Mapping[str, Any]) -> None:
        """Store (or replace) a job's accounting document; it must be JSON-serialisable."""
        document = json.dumps(record)
        now = _utcnow()
        with self._write() as session:
            if session.get(JobRow, str(job_id)) is None:
                raise UnknownJob(f"no job {job_id}")
            session.execute(
                self._upsert(AccountingRow, {"job_id": str(job_id), "record": document, "updated_at": now})
            )

    @_map_db_errors
    def get_accounting(self, job_id: UUID) -> dict[str, Any] | None:
        """The accounting document of a job, or None until the agent has sent it."""
        with self._read() as session:
            document = session.scalar(select(AccountingRow.record).where(AccountingRow.job_id == str(job_id)))
        if document is None:
            return None
        value: dict[str, Any] = json.loads(document)
        return value

    # -- bridges ---------------------------------------------------------------------------

    def _allocate_bridges(self, session: Session, plan: BridgePlan, now: datetime) -> list[BridgeRow]:
        """Free ports of `plan.host` in the range, picked at random among the free ones, so a port
        released a moment ago (whose old tunnel may still be closing) is rarely handed out at once."""
        if self.is_postgresql:
            # replicas allocating at once would both see a port free; one lock orders them
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _BRIDGE_LOCK_KEY})
        low, high = plan.port_range
        used = set(
            session.scalars(
                select(BridgeRow.bridge_port).where(
                    BridgeRow.bridge_host == plan.host, BridgeRow.bridge_port.between(low, high)
                )
            )
        )
        free = [port for port in range(low, high + 1) if port not in used]
        if len(free) < len(plan.exposed):
            raise BridgePortsExhausted(
                f"the bridge VM {plan.host} has {len(free)} free port(s) in {low}-{high}, this job needs "
                f"{len(plan.exposed)}: wait for jobs to end, or widen porter.bridge.port_range"
            )
        ports = secrets.SystemRandom().sample(free, len(plan.exposed))
        host = _host_in_url(plan.host)
        return [
            BridgeRow(
                name=exposed.name,
                remote_port=exposed.remote_port,
                bridge_host=plan.host,
                bridge_port=port,
                url=f"{exposed.scheme}://{host}:{port}" if exposed.scheme else f"{host}:{port}",
                ready=False,
                created_at=now,
            )
            for exposed, port in zip(plan.exposed, ports, strict=True)
        ]

    @_map_db_errors
    def job_bridges(self, job_id: UUID) -> list[Bridge]:
        """The bridges of a live job (none once it has ended)."""
        job = self.get_job(job_id)
        if job is None:
            raise UnknownJob(f"no job {job_id}")
        return list(job.bridges)

    @_map_db_errors
    def bridge_records(self) -> list[BridgeRecord]:
        """Every held bridge port with its job's owner and state: what porter's reconciler works on."""
        with self._read() as session:
            rows = session.execute(
                select(BridgeRow, JobRow.owner, JobRow.state)
                .join(JobRow, JobRow.id == BridgeRow.job_id)
                .order_by(BridgeRow.id)
            )
            return [
                BridgeRecord(job_id=UUID(b.job_id), owner=owner, state=JobState(state), bridge=_to_bridge(b))
                for b, owner, state in rows
            ]

    @_map_db_errors
    def set_bridge_ready(self, job_id: UUID, name: str, ready: bool) -> bool:
        """Record a probe's verdict; True when it changed the bridge's `ready`."""
        with self._write() as session:
            result = session.execute(
                update(BridgeRow)
                .where(BridgeRow.job_id == str(job_id), BridgeRow.name == name, BridgeRow.ready != ready)
                .values(ready=ready, ready_at=_utcnow() if ready else None)
                .execution_options(synchronize_session=False)
            )
            return bool(getattr(result, "rowcount", 0))

    @_map_db_errors
    def set_bridge_service(self, job_id: UUID, name: str, service_dns: str | None) -> None:
        """Record where the bridge is published in Kubernetes (None: not published)."""
        with self._write() as session:
            session.execute(
                update(BridgeRow)
                .where(BridgeRow.job_id == str(job_id), BridgeRow.name == name)
                .values(service_dns=service_dns)
                .execution_options(synchronize_session=False)
            )

    @_map_db_errors
    def release_bridges(self, job_id: UUID) -> int:
        """Free a job's bridge ports (its job has ended and its Services are gone); returns how many."""
        with self._write() as session:
            result = session.execute(
                delete(BridgeRow)
                .where(BridgeRow.job_id == str(job_id))
                .execution_options(synchronize_session=False)
            )
            return int(getattr(result, "rowcount", 0) or 0)

    @_map_db_errors
    def bridge_readiness(self) -> list[tuple[str, str, bool]]:
        """(job id, bridge name, ready) of every bridge of a live job, for `cloudhpc_bridge_ready`."""
        return [
            (str(r.job_id), r.bridge.name, r.bridge.ready)
            for r in self.bridge_records()
            if not r.state.terminal
        ]

    # -- the agent protocol -----------------------------------------------------------------

    @_map_db_errors
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
        now = _utcnow()
        query = (
            select(JobRow)
            .where(
                JobRow.cluster == cluster,
                JobRow.state.in_([s.value for s in ACTIVE_STATES]),
                or_(JobRow.state == JobState.PENDING.value, JobRow.cancel_requested),
                or_(JobRow.lease_until.is_(None), JobRow.lease_until <= now),
            )
            .order_by(JobRow.created_at, JobRow.id)
            .limit(limit)
        )
        if self.is_postgresql:
            # Replicas serving two agents at once each skip the rows the other is handing out.
            query = query.with_for_update(skip_locked=True)
        # On SQLite the write transaction (BEGIN IMMEDIATE) already excludes every other writer.
        with self._write() as session:
            rows = list(session.scalars(query))
            until = now + timedelta(seconds=lease_seconds)
            for row in rows:
                row.lease_owner = agent
                row.lease_until = until
            return [_to_job(row) for row in rows]

    @_map_db_errors
    def active_jobs(self, cluster: str) -> list[Job]:
        """Every non-terminal job of a cluster: what an agent reconciles after a restart."""
        with self._read() as session:
            rows = session.scalars(
                select(JobRow)
                .where(JobRow.cluster == cluster, JobRow.state.in_([s.value for s in ACTIVE_STATES]))
                .order_by(JobRow.created_at, JobRow.id)
            )
            return [_to_job(row) for row in rows]

    def reconciliation(
        self, cluster: str, *, unaccounted_within: timedelta = UNACCOUNTED_WINDOW
    ) -> Reconciliation:
        """What an agent of `cluster` reconciles against after a start (see `Reconciliation`)."""
        return Reconciliation(
            jobs=self.active_jobs(cluster),
            unaccounted=self.unaccounted_jobs(cluster, within=unaccounted_within),
            seq_floor=self.seq_floor(cluster),
        )

    @_map_db_errors
    def unaccounted_jobs(self, cluster: str, *, within: timedelta = UNACCOUNTED_WINDOW) -> list[Job]:
        """Jobs that ran in SLURM (they have a SLURM id), ended within `within` and whose
        accounting document never arrived, oldest end first."""
        since = _utcnow() - within
        with self._read() as session:
            rows = session.scalars(
                select(JobRow)
                .outerjoin(AccountingRow, AccountingRow.job_id == JobRow.id)
                .where(
                    JobRow.cluster == cluster,
                    JobRow.state.in_([s.value for s in TERMINAL_STATES]),
                    JobRow.slurm_job_id.is_not(None),
                    JobRow.ended_at >= since,
                    AccountingRow.job_id.is_(None),
                )
                .order_by(JobRow.ended_at, JobRow.id)
            )
            return [_to_job(row) for row in rows]

    @_map_db_errors
    def seq_floor(self, cluster: str) -> int:
        """The highest report seq applied for any job of `cluster` (0 when none)."""
        with self._read() as session:
            floor = session.scalar(select(func.max(JobRow.observed_seq)).where(JobRow.cluster == cluster))
        return int(floor or 0)

    @_map_db_errors
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
            now = _utcnow()
            current = JobState(row.state)
            row.observed_seq = report.seq
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
                    return _to_job(row)
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
            if JobState(row.state).terminal and row.ended_at is None:
                row.ended_at = now
            return _to_job(row)

    def _upsert(self, model: type[Base], values: dict[str, Any]) -> Executable:
        """INSERT, or UPDATE the row with the same primary key: one statement, no race window."""
        insert = pg_insert if self.is_postgresql else sqlite_insert
        keys = [column.name for column in inspect(model).primary_key]
        statement = insert(model).values(values)
        return statement.on_conflict_do_update(
            index_elements=keys, set_={k: v for k, v in values.items() if k not in keys}
        )

    def _count_report(self, outcome: str) -> None:
        with self._counts_lock:
            self._report_counts[outcome] += 1

    def report_counts(self) -> dict[str, int]:
        """Reports handled by this process, by outcome: applied, stale, illegal_transition, unknown_job."""
        with self._counts_lock:
            return dict(self._report_counts)

    @_map_db_errors
    def transitions(self, job_id: UUID) -> list[Transition]:
        """A job's state changes, oldest first."""
        with self._read() as session:
            rows = session.scalars(
                select(TransitionRow).where(TransitionRow.job_id == str(job_id)).order_by(TransitionRow.id)
            )
            return [_to_transition(row) for row in rows]

    # -- metrics -----------------------------------------------------------------------------

    @_map_db_errors
    def count_by_state(self) -> dict[tuple[str, str], int]:
        """Number of jobs per (cluster, state)."""
        with self._read() as session:
            rows = session.execute(
                select(JobRow.cluster, JobRow.state, func.count()).group_by(JobRow.cluster, JobRow.state)
            )
            return {(cluster, state): count for cluster, state, count in rows}

    @_map_db_errors
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

    @_map_db_errors
    def recent_jobs(self, ended_since: datetime) -> list[JobFacts]:
        """Every live job and every job that ended at or after `ended_since`, without the
        accounting figures (`accounting_facts` reads those): one query, no JSON."""
        statement = text(_RECENT_SQL["postgresql" if self.is_postgresql else "sqlite"]).bindparams(
            bindparam("active", value=sorted(s.value for s in ACTIVE_STATES), expanding=True),
            bindparam("since", value=ended_since, type_=UTCDateTime()),
        )
        with self._read() as session:
            return [
                JobFacts(
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
                for r in session.execute(statement)
            ]

    @_map_db_errors
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
        jobs = self.recent_jobs(ended_since)
        facts = self.accounting_facts([j.id for j in jobs if j.accounting_stamp is not None])
        return [j.with_accounting(facts[j.id]) if j.id in facts else j for j in jobs]

    @_map_db_errors
    def transition_counts(self) -> dict[tuple[str, str], int]:
        """Number of recorded transitions per (from_state, to_state); creation is from "none"."""
        with self._read() as session:
            rows = session.execute(
                select(TransitionRow.from_state, TransitionRow.to_state, func.count()).group_by(
                    TransitionRow.from_state, TransitionRow.to_state
                )
            )
            return {(from_state or "none", to_state): count for from_state, to_state, count in rows}

    # -- tokens ------------------------------------------------------------------------------

    @_map_db_errors
    def create_token(self, user: str, role: str, clusters: Sequence[str] | None = None) -> str:
        """Create a bearer token and return its plaintext, the only time it is ever visible.

        Only the SHA-256 is stored: tokens are 256 random bits, so a plain hash is enough (no
        salt or slow hash needed) and lookup by hash needs no constant-time comparison.
        """
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        if not user:
            raise ValueError("a token needs a user name")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._write() as session:
            session.add(
                TokenRow(
                    user_name=user,
                    role=role,
                    clusters=json.dumps(sorted(set(clusters or ()))),
                    token_hash=_hash_token(token),
                    created_at=_utcnow(),
                )
            )
        return token

    @_map_db_errors
    def verify_token(self, token: str) -> Principal | None:
        """The principal of a valid, unrevoked token; None for anything else."""
        if not token.startswith(TOKEN_PREFIX):
            return None
        with self._read() as session:
            row = session.scalars(
                select(TokenRow).where(
                    TokenRow.token_hash == _hash_token(token), TokenRow.revoked_at.is_(None)
                )
            ).one_or_none()
            if row is None:
                return None
            return Principal(
                user=row.user_name, role=row.role, clusters=tuple(json.loads(row.clusters)), token_id=row.id
            )

    @_map_db_errors
    def revoke_token(self, token: str) -> bool:
        """Revoke a token given its plaintext. False when it is unknown or already revoked."""
        return self._revoke(TokenRow.token_hash == _hash_token(token))

    @_map_db_errors
    def revoke_token_id(self, token_id: int) -> bool:
        """Revoke a token by the id `list_tokens` shows. False when unknown or already revoked."""
        return self._revoke(TokenRow.id == token_id)

    def _revoke(self, condition: Any) -> bool:
        with self._write() as session:
            result = session.execute(
                update(TokenRow)
                .where(condition, TokenRow.revoked_at.is_(None))
                .values(revoked_at=_utcnow())
                .execution_options(synchronize_session=False)
            )
            return bool(getattr(result, "rowcount", 0))

    @_map_db_errors
    def list_tokens(self, user: str | None = None) -> list[TokenInfo]:
        with self._read() as session:
            query = select(TokenRow).order_by(TokenRow.id)
            if user is not None:
                query = query.where(TokenRow.user_name == user)
            return [_to_token_info(row) for row in session.scalars(query)]

    # -- agents ------------------------------------------------------------------------------

    @_map_db_errors
    def touch_agent(self, cluster: str, agent: str) -> None:
        """Record that `agent` serving `cluster` was just heard from."""
        statement = self._upsert(AgentRow, {"cluster": cluster, "agent": agent, "last_seen": _utcnow()})
        with self._write() as session:
            session.execute(statement)

    @_map_db_errors
    def take_agent_slot(self, cluster: str, agent: str, *, hold_seconds: float) -> tuple[str, float] | None:
        """Record `agent` as the one serving `cluster`, unless another agent was heard from within
        `hold_seconds`: then nothing changes and the other's name and silence (s) come back.

        One agent per cluster is what keeps reconciliation from submitting a job twice: an agent
        that finds a job `preparing` without a SLURM id cannot tell a dead agent's job from a live
        one's. A restarted agent (a new name) takes over once its predecessor is silent."""
        now = _utcnow()
        with self._write() as session:
            query = select(AgentRow).where(AgentRow.cluster == cluster)
            if self.is_postgresql:
                query = query.with_for_update()
            row = session.scalars(query).one_or_none()
            if row is not None and row.agent != agent:
                silent = (now - row.last_seen).total_seconds()
                if silent < hold_seconds:
                    return row.agent, silent
            session.execute(self._upsert(AgentRow, {"cluster": cluster, "agent": agent, "last_seen": now}))
        return None

    @_map_db_errors
    def agents(self) -> dict[str, datetime]:
        """When each cluster's agent was last seen."""
        with self._read() as session:
            return {row.cluster: row.last_seen for row in session.scalars(select(AgentRow))}

    # -- job output --------------------------------------------------------------------------

    @_map_db_errors
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

    @_map_db_errors
    def output_size(self, job_id: UUID) -> int:
        with self._read() as session:
            return self._output_size(session, str(job_id))

    @_map_db_errors
    def read_output(self, job_id: UUID, offset: int, limit: int) -> bytes:
        """Up to `limit` bytes of a job's stored stdout from byte `offset` (empty past the end)."""
        if offset < 0 or limit < 0:
            raise ValueError("offset and limit must be >= 0")
        if limit == 0:
            return b""
        key = str(job_id)
        end = offset + limit
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
