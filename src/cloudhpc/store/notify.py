"""Wake-ups that cross porter replicas: PostgreSQL `NOTIFY` sent by the writing transaction, and one
`LISTEN` connection per porter that hands each notification to its local waiters.

Why this shape (issue 12 item 8):

- The notification is part of the change's own transaction (`notify_in`), so PostgreSQL delivers it
  exactly when the change becomes visible to other connections, and never for a change that was
  rolled back. A replica that dies right after its commit has still notified the others.
- Payloads are the waiters' keys (`job:<id>`, `cluster:<name>`); a listener only wakes, it never
  trusts a payload as data: every waiter re-reads the store after waking.
- The channel is named after the connection's schema (`cloudhpc:<schema>`), because `NOTIFY`
  channels are database-wide while several deployments (or tests) may share one database with a
  schema each. Repeating the same key in one transaction sends it once (PostgreSQL folds duplicates).
- `ChangeListener` keeps one connection, reconnects with backoff when PostgreSQL restarts or the
  connection dies, and calls `on_gap` whenever it may have missed notifications (the connection was
  lost, and again once it is back), so that the waiters re-read instead of sleeping on a
  notification that will never come.
- SQLite has one process by design: `notify_in` does nothing there and porter's in-process
  notifier is the whole mechanism.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any, Final
from uuid import UUID

import psycopg
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

__all__ = ["ChangeListener", "cluster_key", "job_key", "notify_in"]

log = logging.getLogger(__name__)

# The channel, `cloudhpc:<schema>`; PostgreSQL truncates identifiers (channel names) to 63 bytes,
# so both the sender and the listener truncate alike.
_CHANNEL_QUERY: Final = "SELECT left('cloudhpc:' || current_schema(), 63)"
_NOTIFY: Final = text(
    "SELECT pg_notify(left('cloudhpc:' || current_schema(), 63), k) FROM unnest(CAST(:keys AS text[])) AS k"
)


def job_key(job_id: UUID | str) -> str:
    """What waiters on one job (its state, output, bridges) wait for."""
    return f"job:{job_id}"


def cluster_key(cluster: str) -> str:
    """What a cluster's agent work poll (and the mailbox relay) wait for."""
    return f"cluster:{cluster}"


def notify_in(session: Session, keys: Iterable[str]) -> None:
    """Have `session`'s transaction notify `keys` when it commits (PostgreSQL; nothing on SQLite).

    One statement for all keys: the change's transaction gets one more round trip, not one per key.
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    unique = list(dict.fromkeys(keys))
    if unique:
        session.execute(_NOTIFY, {"keys": unique})


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
