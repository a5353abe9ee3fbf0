"""Wake-ups that cross porter replicas: PostgreSQL `NOTIFY` sent right after the writing
transaction commits, and one `LISTEN` connection per porter that hands each notification to its
local waiters.

Why this shape (issue 12 items 8 and 7):

- A write names the keys its change wakes (`notify_in`); the store sends them once the transaction
  has committed (`Database._write` hands them to its `ChangeSender`), so nobody is woken for a
  change that was rolled back, and a woken waiter always finds the change committed.
- Not *inside* the writing transaction: PostgreSQL serialises the commits of all transactions
  that sent a `NOTIFY` (one lock for the whole cluster, held across the commit's WAL flush). With a
  NOTIFY in every write, 25 threads committing small inserts on the testbed did 0.42x the commits
  of the same writes without it, and moving it out made `POST /jobs` on PostgreSQL 1.26x faster
  (docs/benchmarks.md; the access check's reads were the other part of its fall). The sender instead
  folds the keys of every write committed meanwhile into one `NOTIFY` statement on a connection of
  its own, with `synchronous_commit = off` (a notification is not data: nothing to make durable),
  so the writes group-commit freely and a burst of writes costs a few notifying commits.
- The price: a replica killed between a commit and the sender's next round trip (about a
  millisecond) does not notify the others; their waiters find the change at their next re-check
  (`SAFETY_RECHECK`, 5 s). Notifications only ever wake: every waiter re-reads the store.
- Payloads are the waiters' keys (`job:<id>`, `cluster:<name>`); a listener only wakes, it never
  trusts a payload as data.
- The channel is named after the connection's schema (`cloudhpc:<schema>`), because `NOTIFY`
  channels are database-wide while several deployments (or tests) may share one database with a
  schema each.
- `ChangeListener` keeps one connection, reconnects with backoff when PostgreSQL restarts or the
  connection dies, and calls `on_gap` whenever it may have missed notifications (the connection was
  lost, and again once it is back), so that the waiters re-read instead of sleeping on a
  notification that will never come.
- SQLite has one process by design: `notify_in` does nothing there and porter's in-process
  notifier is the whole mechanism.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any, Final
from uuid import UUID

import psycopg
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

__all__ = ["ChangeListener", "ChangeSender", "cluster_key", "job_key", "notify_in", "take_notifications"]

log = logging.getLogger(__name__)

# The channel, `cloudhpc:<schema>`; PostgreSQL truncates identifiers (channel names) to 63 bytes,
# so both the sender and the listener truncate alike.
_CHANNEL_QUERY: Final = "SELECT left('cloudhpc:' || current_schema(), 63)"
_NOTIFY: Final = (
    "SELECT pg_notify(left('cloudhpc:' || current_schema(), 63), k) FROM unnest(CAST(%s AS text[])) AS k"
)
_PENDING: Final = "cloudhpc_notify"
"""Where a write session collects the keys it will notify once committed (`Session.info`)."""
_MAX_PENDING: Final = 100_000
"""Keys kept for a sender that cannot reach PostgreSQL; beyond that they are dropped (every
listener wakes all its waiters when it reconnects after an outage anyway)."""


def job_key(job_id: UUID | str) -> str:
    """What waiters on one job (its state, output, bridges) wait for."""
    return f"job:{job_id}"


def cluster_key(cluster: str) -> str:
    """What a cluster's agent work poll (and the mailbox relay) wait for."""
    return f"cluster:{cluster}"


def notify_in(session: Session, keys: Iterable[str]) -> None:
    """Have `keys` notified once `session`'s transaction has committed (PostgreSQL; nothing on SQLite).

    Only collected here (no round trip, no NOTIFY in the transaction: see the module's docstring);
    the store's `_write` hands them to its `ChangeSender` after the commit, and drops them when the
    transaction rolls back. Repeated keys are sent once.
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    pending: dict[str, None] = session.info.setdefault(_PENDING, {})
    pending.update(dict.fromkeys(keys))


def take_notifications(session: Session) -> list[str]:
    """The keys `notify_in` collected in `session` (and forgets them): what to send after its commit."""
    return list(session.info.pop(_PENDING, {}))


def _connect_kwargs(url: URL) -> dict[str, Any]:
    """libpq parameters for `url`, exactly as SQLAlchemy's psycopg dialect derives them for the pool
    (host, port, user, password, dbname and any URL query such as `options` or `sslmode`)."""
    _args, kwargs = url.get_dialect()().create_connect_args(url)
    # A dead server or a silent network cut is noticed by TCP within ~25 s; the URL may override.
    defaults = {
        "connect_timeout": 10,
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
    }
    return defaults | dict(kwargs)


class ChangeListener:
    """One porter's `LISTEN` connection: every notification's payload goes to `on_key`.

    `on_gap()` is called when notifications may have been missed: when the connection is lost and
    again each time it is (re-)established, since anything sent while nobody listened is gone.
    `connected` tells porter whether cross-replica wake-ups are live (its waiters re-check the store
    more often while they are not). Reconnects back off from `min_backoff` to `max_backoff` seconds.
    Every `health_interval` seconds without traffic the connection is probed with a query, so a
    connection that died silently (no FIN: a host gone, a firewall) is noticed, on top of TCP
    keepalives.
    """

    def __init__(
        self,
        url: URL,
        on_key: Callable[[str], None],
        on_gap: Callable[[], None],
        *,
        min_backoff: float = 0.2,
        max_backoff: float = 5.0,
        health_interval: float = 15.0,
    ) -> None:
        self._params = _connect_kwargs(url)
        self._on_key = on_key
        self._on_gap = on_gap
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.health_interval = health_interval
        self.connected = False
        self.connects = 0
        """How many times a LISTEN connection was established (1 after a start, +1 per reconnect)."""
        self.channel: str | None = None
        self._ready = asyncio.Event()

    async def wait_connected(self, timeout: float) -> bool:
        """True once the first LISTEN is in place (porter waits a moment for it at start-up)."""
        try:
            async with asyncio.timeout(timeout):
                await self._ready.wait()
            return True
        except TimeoutError:
            return False

    async def run(self) -> None:
        """Listen until cancelled, reconnecting after every failure."""
        backoff = self.min_backoff
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(autocommit=True, **self._params) as conn:
                    await self._listen(conn)
                    backoff = self.min_backoff
                    await self._pump(conn)
            except (psycopg.Error, OSError) as exc:
                if self.connected:
                    log.warning("change notifications: connection lost (%s); reconnecting", exc)
                else:
                    log.warning("change notifications: cannot listen (%s); retrying in %.1f s", exc, backoff)
            except Exception:
                # a bug must not end cross-replica wake-ups for the process's lifetime
                log.exception("change notifications: unexpected failure; reconnecting")
            finally:
                if self.connected:
                    self.connected = False
                    self._on_gap()  # waiters re-read, and re-check often until we are back
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)

    async def _listen(self, conn: psycopg.AsyncConnection[Any]) -> None:
        cursor = await conn.execute(_CHANNEL_QUERY)
        row = await cursor.fetchone()
        assert row is not None
        self.channel = str(row[0])
        await conn.execute(f'LISTEN "{self.channel.replace(chr(34), chr(34) * 2)}"')
        self.connected = True
        self.connects += 1
        self._ready.set()
        log.info("change notifications: listening on %r (connection %d)", self.channel, self.connects)
        self._on_gap()  # whatever was notified before this LISTEN is lost: everybody re-reads once

    async def _pump(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while True:
            received = 0
            async for notify in conn.notifies(timeout=self.health_interval):
                received += 1
                self._on_key(notify.payload)
            if not received:
                await conn.execute("SELECT 1")  # raises when the connection died silently


class ChangeSender:
    """Sends the keys of committed writes as `NOTIFY`s, from a thread and a connection of its own.

    `send(keys)` only queues and returns at once. The thread sends everything queued in one
    statement, so while one round trip is under way the keys of every write committed meanwhile
    gather for the next: under load a notifying commit carries many writes' keys, and the writes'
    own commits never wait for the cluster-wide lock that a NOTIFY's commit takes. The connection
    runs with `synchronous_commit = off`: its commits have no data to flush, so that lock is held
    for no disk write. On a failure the batch is retried once on a new connection (a server
    restart or an idle connection dropped on the way), then kept and retried with a backoff.
    `close()` sends what is queued, then stops the thread.
    """

    def __init__(self, url: URL, *, min_backoff: float = 0.2, max_backoff: float = 5.0) -> None:
        # named for operators reading pg_stat_activity (a name in the URL wins)
        self._params = {"application_name": "cloudhpc change sender"} | _connect_kwargs(url)
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self._pending: dict[str, None] = {}
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._conn: psycopg.Connection[Any] | None = None
        self.batches = 0
        """How many NOTIFY statements were sent (each one notifying commit, however many keys)."""
        self.keys_sent = 0

    @property
    def backend_pid(self) -> int | None:
        """The PostgreSQL backend of the sender's connection, while it has one."""
        conn = self._conn
        return conn.info.backend_pid if conn is not None else None

    def send(self, keys: Iterable[str]) -> None:
        """Queue `keys` for the next NOTIFY (starting the sending thread on first use)."""
        with self._wake:
            if self._closed:
                log.debug("change notifications: sender closed, %s not sent", list(keys))
                return
            room = _MAX_PENDING - len(self._pending)
            for key in keys:
                if room <= 0:
                    log.warning("change notifications: %d keys waiting to be sent; dropping", _MAX_PENDING)
                    break
                if key not in self._pending:
                    self._pending[key] = None
                    room -= 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="change-sender", daemon=True)
                self._thread.start()
            self._wake.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (for up to `timeout` seconds), then stop."""
        with self._wake:
            self._closed = True
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        backoff = self.min_backoff
        while True:
            with self._wake:
                while not self._pending and not self._closed:
                    self._wake.wait()
                if not self._pending:
                    break  # closed, and everything sent
                keys = list(self._pending)
                self._pending.clear()
            if self._deliver(keys) or self._deliver(keys):  # once more on a fresh connection
                backoff = self.min_backoff
                continue
            with self._wake:
                if self._closed:
                    log.warning("change notifications: stopping with %d keys not sent", len(keys))
                    break
                self._pending = dict.fromkeys(keys) | self._pending
                self._wake.wait(backoff)  # close() cuts the wait short
            backoff = min(backoff * 2, self.max_backoff)
        self._disconnect()

    def _deliver(self, keys: list[str]) -> bool:
        try:
            if self._conn is None:
                self._conn = psycopg.connect(autocommit=True, **self._params)
                self._conn.execute("SET synchronous_commit = off")
            self._conn.execute(_NOTIFY, (keys,))
        except (psycopg.Error, OSError) as exc:
            log.warning("change notifications: cannot send %d keys (%s)", len(keys), exc)
            self._disconnect()
            return False
        self.batches += 1
        self.keys_sent += len(keys)
        return True

    def _disconnect(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                self._conn.close()
            self._conn = None
