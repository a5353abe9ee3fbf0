"""What porter's routes share: the store, the settings and the change notifier, built once per app."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, TypeVar

from fastapi import Request

from cloudhpc.config import Settings
from cloudhpc.exceptions import HttpProblem
from cloudhpc.porter.limits import UserSlots
from cloudhpc.storage import ObjectStore
from cloudhpc.store import AsyncStore, Principal, Store
from cloudhpc.store.notify import ChangeListener, cluster_key, job_key

__all__ = [
    "Notifier",
    "PorterState",
    "TokenCache",
    "change_listener",
    "cluster_key",
    "job_key",
    "object_store",
    "state_of",
]

log = logging.getLogger(__name__)

FALLBACK_RECHECK: Final = 1.0
"""How often a long-poll re-reads the store when only in-process wake-ups exist (SQLite), or while
the PostgreSQL LISTEN connection is down."""
_RECENT: Final = 60.0
"""How long a notification is remembered for `Notifier.wait(since=)`: far longer than a read takes."""
SAFETY_RECHECK: Final = 5.0
"""How often a long-poll re-reads the store while cross-replica wake-ups (LISTEN) are live: a safety
net against a wake-up lost between a waiter's read and its registration, not the mechanism."""

V = TypeVar("V")


class TokenCache:
    """Recently verified tokens, so that a client's burst of requests costs one store lookup.

    Every API call carries a token; looking each one up in the database was the biggest single
    cost of `GET /jobs/{id}` (bench/api.py). Entries live `ttl` seconds, so a revoked token
    keeps working on this replica for at most that long. Keys are the tokens' SHA-256, never the
    tokens.

    Unknown tokens are remembered too (a flood of bad tokens does not reach the database), but in
    a separate, smaller map (`max_unknown`): a flood of bad tokens only pushes out other bad
    tokens, never a good one. When a map is full its oldest entry goes (expired ones first), so
    10,000 bad tokens cannot empty the cache of the tokens in use (issue 12).
    """

    def __init__(self, ttl: float = 5.0, max_entries: int = 10_000, max_unknown: int = 1_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_unknown = max_unknown
        self._known: dict[str, tuple[float, Principal]] = {}
        self._unknown: dict[str, float] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    def get(self, key: str) -> tuple[bool, Principal | None]:
        """(True, principal or None) when `key` was verified less than `ttl` seconds ago."""
        now = time.monotonic()
        with self._lock:
            known = self._known.get(key)
            unknown_until = self._unknown.get(key)
        if known is not None and known[0] >= now:
            return True, known[1]
        if unknown_until is not None and unknown_until >= now:
            return True, None
        return False, None

    def put(self, key: str, principal: Principal | None) -> None:
        until = time.monotonic() + self.ttl
        with self._lock:
            if principal is None:
                self._known.pop(key, None)
                _insert_bounded(self._unknown, key, until, self.max_unknown, lambda v: v)
            else:
                self._unknown.pop(key, None)
                _insert_bounded(self._known, key, (until, principal), self.max_entries, lambda v: v[0])


def _insert_bounded(
    entries: dict[str, V], key: str, value: V, limit: int, expiry: Callable[[V], float]
) -> None:
    """Insert `key` as the newest entry, after dropping the expired entries at the front and, while
    the map is full, the oldest ones. Dicts keep insertion order, which is expiry order since every
    entry lives the same `ttl`: the oldest entry is the first to expire."""
    entries.pop(key, None)
    now = time.monotonic()
    while entries:
        oldest = next(iter(entries))
        if len(entries) < limit and expiry(entries[oldest]) >= now:
            break
        del entries[oldest]
    entries[key] = value


class Notifier:
    """Wakes long-polls (`GET /jobs/{id}?wait=`, the agent's work poll) when something changes.

    Routes call `notify` after their own changes (the waiters on this replica wake at once); on
    PostgreSQL the store's write also sends a `NOTIFY` in its transaction, which every replica's
    `ChangeListener` passes to `notify` (see `change_listener`), so a change made on one replica
    wakes waiters on all of them. The events only wake: a woken waiter re-reads the store, which
    stays the source of truth, and a spurious wake costs one read.
    """

    def __init__(self, remember: int = 10_000) -> None:
        self._events: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        self._notified: dict[str, float] = {}
        """When each key was last notified (monotonic), for `wait(since=)`; the latest `remember`
        keys of the last `_RECENT` seconds."""
        self._all_notified = -math.inf
        self.remember = remember

    def notify(self, key: str) -> None:
        _insert_bounded(self._notified, key, time.monotonic(), self.remember, lambda at: at + _RECENT)
        for event in self._events.pop(key, set()):
            event.set()

    def notify_all(self) -> None:
        """Wake every waiter (after notifications may have been lost, and when porter stops)."""
        self._all_notified = time.monotonic()
        events, self._events = self._events, defaultdict(set)
        for waiters in events.values():
            for event in waiters:
                event.set()

    async def wait(self, key: str, timeout: float, *, since: float | None = None) -> bool:
        """Sleep until `key` is notified or `timeout` passes; True when notified.

        `since` is when the caller began the read it is waiting to repeat (`time.monotonic()`): a
        notification that came after that (while the read ran, before this wait) returns at once,
        instead of being lost until the next re-check."""
        if since is not None and max(self._notified.get(key, -math.inf), self._all_notified) >= since:
            return True
        event = asyncio.Event()
        self._events[key].add(event)
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
            return True
        except TimeoutError:
            return False
        finally:
            waiters = self._events.get(key)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    self._events.pop(key, None)


@dataclass
class PorterState:
    settings: Settings
    store: AsyncStore
    """The job store, awaitable: every call runs in a worker thread, never on the event loop."""
    notifier: Notifier = field(default_factory=Notifier)
    tokens: TokenCache = field(default_factory=TokenCache)
    objects: ObjectStore | None = None
    """Where job artifacts are (`porter.object_store`); None only in tests that need none."""
    listener: ChangeListener | None = None
    """The LISTEN connection that brings other replicas' changes (PostgreSQL only)."""
    fallback_recheck: float = FALLBACK_RECHECK
    safety_recheck: float = SAFETY_RECHECK
    user_slots: UserSlots = field(default_factory=UserSlots)
    """Each user's uploads and questions to agents in progress on this replica, capped per user."""
    stopping: bool = False
    """Set when porter is asked to stop (with every waiter woken): long-polls answer with what they
    have, inside the server's short graceful-shutdown window, instead of being cut off with a 500."""

    @property
    def recheck_interval(self) -> float:
        """How long a long-poll sleeps at most before it re-reads the store: `safety_recheck` while
        the listener brings every replica's changes, `fallback_recheck` otherwise."""
        live = self.listener is not None and self.listener.connected
        return self.safety_recheck if live else self.fallback_recheck

    @recheck_interval.setter
    def recheck_interval(self, seconds: float) -> None:
        """Tests shorten both intervals at once."""
        self.fallback_recheck = self.safety_recheck = seconds

    async def long_poll(
        self,
        key: str,
        wait: float,
        read: Callable[[], Awaitable[V]],
        done: Callable[[V], bool],
        *,
        request: Request | None = None,
    ) -> V:
        """`read()` again on each wake-up of `key` until `done` says its value is the answer, `wait`
        seconds pass, porter stops or the client has gone: the one loop behind every long-poll, so
        each re-reads the store after a missed or foreign (other replica's) change the same way."""
        deadline = time.monotonic() + wait
        while True:
            read_at = time.monotonic()
            value = await read()
            remaining = deadline - time.monotonic()
            if done(value) or remaining <= 0 or self.stopping:
                return value
            if request is not None and await request.is_disconnected():
                return value
            await self.notifier.wait(key, min(remaining, self.recheck_interval), since=read_at)

    def stop(self) -> None:
        """Long-polls answer now with what they have (see `stopping`)."""
        self.stopping = True
        self.notifier.notify_all()

    def cluster_names(self, agents_seen: Iterable[str]) -> list[str]:
        """The configured clusters and those an agent has served (`agents_seen`), sorted."""
        return sorted(set(self.settings.clusters) | set(agents_seen))

    async def known_clusters(self) -> list[str]:
        return self.cluster_names(await self.store.agents())


def state_of(request: Request) -> PorterState:
    """The porter state of the app serving `request`."""
    state: PorterState = request.app.state.porter
    return state


def object_store(state: PorterState) -> ObjectStore:
    """Porter's object store; 404 when this porter has none configured."""
    if state.objects is None:
        raise HttpProblem(404, "not_available", "this porter has no object store configured")
    return state.objects


@contextlib.asynccontextmanager
async def change_listener(state: PorterState, store: Store, *, wait: float = 5.0) -> AsyncIterator[None]:
    """For porter's lifetime on PostgreSQL, listen for every replica's changes and wake this one's
    waiters (nothing on SQLite: one process, the in-process notifier is complete).

    Start-up waits up to `wait` seconds for the first LISTEN, so a porter that reports ready is
    normally already hearing the others; if PostgreSQL does not answer by then porter starts anyway
    and its waiters re-check every `fallback_recheck` seconds until the listener connects."""
    if not store.is_postgresql:
        yield
        return
    listener = ChangeListener(store.url, state.notifier.notify, state.notifier.notify_all)
    task = asyncio.create_task(listener.run(), name="change-listener")
    state.listener = listener
    if not await listener.wait_connected(wait):
        log.warning(
            "change notifications: not listening yet; long-polls re-check every %.1f s",
            state.fallback_recheck,
        )
    try:
        yield
    finally:
        state.listener = None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
