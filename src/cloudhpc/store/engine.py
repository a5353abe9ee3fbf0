"""The store's database: engine creation and tuning per dialect, sessions, migrations, and the one
place where driver errors become `StoreError`.

Every repository of the store (`jobs`, `bridges`, `tokens`, `agents`, `output`, `metrics_view`)
is a `Database` and reaches SQL only through `_read()`, `_read_connection()` and `_write()`, so the
concurrency rules below hold for all of them.

Concurrency rules, per dialect:

- PostgreSQL: READ COMMITTED with explicit row locks (`SELECT ... FOR UPDATE`) where a decision
  depends on the current row, and `FOR UPDATE SKIP LOCKED` for handing out work, so several
  porter replicas can share one database (ARCHITECTURE §9).
- SQLite: one writer at a time. Write transactions start with `BEGIN IMMEDIATE`, taking the write
  lock up front; a deferred transaction that reads and then writes can fail with "database is
  locked" when another writer got in between, which `busy_timeout` cannot fix. Reads use plain
  `BEGIN` and, thanks to WAL, never wait for writers. A file database's writers in this process
  first queue on `_WriteGate`, in arrival order; `busy_timeout` is left for other processes (CLI
  commands opening the same file).
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Concatenate, Final, ParamSpec, TypeVar

import alembic.command
import alembic.util
from alembic.config import Config as AlembicConfig
from sqlalchemy import Connection, Engine, create_engine, event, inspect, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool
from sqlalchemy.sql.expression import Executable

from cloudhpc.exceptions import StoreError
from cloudhpc.private_files import make_private_dirs, open_private_file
from cloudhpc.store.models import Base
from cloudhpc.store.notify import ChangeSender, take_notifications

__all__ = ["DEFAULT_URL", "Database", "map_db_errors", "normalize_url", "utcnow"]

log = logging.getLogger(__name__)

DEFAULT_URL: Final = "sqlite:///.cloudhpc/state.db"
MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"

_SQLITE_BUSY_TIMEOUT_MS = 10_000
# A pooled PostgreSQL connection idle longer than this is pinged before use (see `_pg_engine`).
_PG_PING_AFTER_IDLE_S = 10.0
_PG_USED_AT = "cloudhpc_used_at"
# Kept connections cover the worker threads that usually query at once (see `_pg_engine`), on
# both dialects; the overflow is for bursts up to the thread pool's 40 workers.
_POOL_SIZE = 25
_POOL_OVERFLOW = 15
_WRITE_OPTION = "cloudhpc_write"
# Any constant works; it only has to be the same for every porter replica sharing the database.
_MIGRATION_LOCK_KEY = 0x636C6F7564687063  # "cloudhpc"

P = ParamSpec("P")
R = TypeVar("R")
D = TypeVar("D", bound="Database")


class _WriteGate:
    """A first-come first-served lock for the write transactions of one SQLite file in this process.

    Without it, porter's writers wait for SQLite's write lock in its busy handler, which polls
    with sleeps growing to 100 ms and lets whoever polls first win: under bench/api.py's 50-client
    POST loop, `BEGIN IMMEDIATE` waited 1.6-1.7 s at the 99th percentile (5.9 s at most) while the
    median write held the lock ~10 ms. Here each waiter blocks on a lock of its own and `release`
    hands the gate to the longest waiter, so none is overtaken and none sleeps past its turn.

    The holder's thread is recorded so that a write nested in another on the same thread (the
    store has none) skips the gate instead of waiting for itself forever: it then waits in SQLite's
    busy handler and fails after `busy_timeout`, as it did before the gate.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._waiters: deque[threading.Lock] = deque()
        self._owner: int | None = None

    @property
    def waiting(self) -> int:
        """How many writers are queued (for tests)."""
        return len(self._waiters)

    def held_by(self, thread_id: int | None) -> bool:
        """Whether the thread `thread_id` (a `threading.get_ident()`) holds the gate."""
        return thread_id is not None and self._owner == thread_id

    def acquire(self, timeout: float) -> bool:
        """Take the gate, after every writer that queued earlier; False after `timeout` s."""
        with self._mutex:
            if self._owner is None and not self._waiters:
                self._owner = threading.get_ident()
                return True
            turn = threading.Lock()
            turn.acquire()
            self._waiters.append(turn)
        if not turn.acquire(timeout=timeout):
            with self._mutex:
                if turn in self._waiters:
                    self._waiters.remove(turn)
                    return False
            # `release` handed the gate over just as the wait timed out: it is ours
        self._owner = threading.get_ident()
        return True

    def release(self) -> None:
        """Hand the gate to the longest waiter, or open it when none waits."""
        with self._mutex:
            self._owner = None
            if self._waiters:
                # the gate stays taken: only the waiter whose turn this is can go on
                self._owner = -1
                self._waiters.popleft().release()


_GATES: dict[Path, _WriteGate] = {}
_GATES_LOCK = threading.Lock()


def _write_gate(path: Path) -> _WriteGate:
    """The one gate of a SQLite file in this process, shared by every `Database` on it."""
    with _GATES_LOCK:
        return _GATES.setdefault(path.resolve(), _WriteGate())


def _in_memory(database: str) -> bool:
    """Whether a SQLite URL's database names an in-memory database rather than a file."""
    return database in ("", ":memory:") or "mode=memory" in database


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


def utcnow() -> datetime:
    return datetime.now(UTC)


def _describe(exc: SQLAlchemyError) -> str:
    """A one-line message without the SQL statement and its parameters (they can be large)."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        origin: BaseException = exc.orig
    else:
        origin = exc
    first = str(origin).strip().splitlines()
    return f"{type(origin).__name__}: {first[0] if first else '(no message)'}"


def map_db_errors(method: Callable[Concatenate[D, P], R]) -> Callable[Concatenate[D, P], R]:
    """The one boundary where SQLAlchemy and driver errors become `StoreError`.

    Our own `StoreError`s (unknown job, idempotency conflict) pass through unchanged.
    """

    @functools.wraps(method)
    def wrapper(self: D, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        except SQLAlchemyError as exc:
            raise StoreError(
                f"job store ({self.dialect}) failed in {method.__name__}: {_describe(exc)}"
            ) from exc

    return wrapper


class Database:
    """One SQLite or PostgreSQL database, its connection pool, and the store's transactions.

    `Database("sqlite:///.cloudhpc/state.db")` (the default, parent directory created) or
    `Database("postgresql://user:pass@host/db")`. Call `migrate()` once at start-up; it is a no-op
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
        self._read_engine = read_engine
        self._reads = sessionmaker(read_engine, expire_on_commit=False)
        self._writes = sessionmaker(self._write_engine, expire_on_commit=False)
        # The NOTIFYs of committed writes (PostgreSQL; see store/notify.py); its thread and
        # connection start with the first write that notifies.
        self._notifications = ChangeSender(self.url) if self.is_postgresql else None
        self._gate = self._sqlite_file_gate(self.url)

    # -- engine ------------------------------------------------------------------------------

    @staticmethod
    def _create_engine(url: URL) -> Engine:
        if url.get_backend_name() == "postgresql":
            return Database._pg_engine(url)
        database = url.database or ""
        if _in_memory(database):
            # One shared connection, or every pooled connection would see its own empty database.
            # Fine for a quick script or a unit test; not for concurrent writers (use a file).
            engine = create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
        else:
            Database._create_private_file(Path(database).expanduser())
            # SQLAlchemy's default for a file keeps 5 connections: with more worker threads than
            # that, every burst opened (and closed again) connections, each with its PRAGMAs: 1,437
            # in one bench/api.py run. Kept as many as on PostgreSQL (see `_pg_engine`).
            engine = create_engine(
                url,
                connect_args={"check_same_thread": False},
                pool_size=_POOL_SIZE,
                max_overflow=_POOL_OVERFLOW,
            )
        event.listen(engine, "connect", Database._sqlite_on_connect)
        event.listen(engine, "begin", Database._sqlite_on_begin)
        return engine

    @staticmethod
    def _sqlite_file_gate(url: URL) -> _WriteGate | None:
        """The `_WriteGate` of a SQLite file; None for PostgreSQL (row locks, several writers at
        once) and for an in-memory database (one shared connection, no lock to wait for)."""
        database = url.database or ""
        if url.get_backend_name() != "sqlite" or _in_memory(database):
            return None
        return _write_gate(Path(database).expanduser())

    @staticmethod
    def _create_private_file(path: Path) -> None:
        """Create the SQLite file 0600 (in a 0700 directory, if it makes one) before SQLite does:
        it holds every job's spec and environment values, and SQLite would create it, and its WAL
        and shared-memory files, which take the database file's mode, 0644 under the usual umask."""
        make_private_dirs(path.parent)
        if not path.exists():
            os.close(open_private_file(path, os.O_WRONLY))

    @staticmethod
    def _pg_engine(url: URL) -> Engine:
        """A pool that pings a connection only when it has been idle for a while.

        `pool_pre_ping` pings at every checkout: one more round trip per request, about 40% of
        `GET /jobs/{id}` on PostgreSQL (bench/api.py). A connection in steady use is known to be
        alive; one idle for `_PG_PING_AFTER_IDLE_S` (when a server restart or a firewall may have
        dropped it) is pinged, and a failed ping makes the pool connect anew. A connection that
        dies while in steady use fails its request (503, the client retries) and SQLAlchemy
        invalidates the pool, so the next requests reconnect.

        The pool keeps `_POOL_SIZE` connections: a connection beyond the pool's size is closed
        when it is returned, and with 10 kept, every burst above 10 concurrent requests (after a
        pause of the process) opened and closed connections: 1,646 new connections, each a server
        process and an authentication, in one bench/api.py run on PostgreSQL.
        """
        engine = create_engine(url, pool_size=_POOL_SIZE, max_overflow=_POOL_OVERFLOW)

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
            Database._sqlite_enable_wal(cursor)
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
    def notifications(self) -> ChangeSender | None:
        """What sends the NOTIFYs of committed writes (PostgreSQL), for its counters; None on SQLite."""
        return self._notifications

    @property
    def is_postgresql(self) -> bool:
        return self.dialect == "postgresql"

    # -- transactions ------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """A write transaction; the keys it named with `notify_in` are notified once it committed.

        On a SQLite file it first waits for its turn at the file's `_WriteGate` (no longer than
        SQLite's `busy_timeout`), held until the transaction committed or rolled back."""
        gate = self._gate
        if gate is None or gate.held_by(threading.get_ident()):
            with self._writes.begin() as session:
                yield session
        else:
            if not gate.acquire(_SQLITE_BUSY_TIMEOUT_MS / 1000):
                raise StoreError(
                    f"job store ({self.dialect}): no turn to write within {_SQLITE_BUSY_TIMEOUT_MS / 1000:g} s, "
                    "other writers held the database"
                )
            try:
                with self._writes.begin() as session:
                    yield session
            finally:
                gate.release()
        keys = take_notifications(session)
        if keys and self._notifications is not None:
            self._notifications.send(keys)

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._reads.begin() as session:
            yield session

    @contextmanager
    def _read_connection(self) -> Iterator[Connection]:
        """A read transaction like `_read`'s, on a bare connection: for a hot read of Core rows,
        which does not need a Session's machinery (about 0.12 ms of CPU per call on SQLite)."""
        with self._read_engine.begin() as connection:
            yield connection

    def _upsert(self, model: type[Base], values: dict[str, Any]) -> Executable:
        """INSERT, or UPDATE the row with the same primary key: one statement, no race window."""
        insert = pg_insert if self.is_postgresql else sqlite_insert
        keys = [column.name for column in inspect(model).primary_key]
        statement = insert(model).values(values)
        return statement.on_conflict_do_update(
            index_elements=keys, set_={k: v for k, v in values.items() if k not in keys}
        )

    # -- lifecycle ---------------------------------------------------------------------------

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
        if self._notifications is not None:
            self._notifications.close()  # what was committed is still notified
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
