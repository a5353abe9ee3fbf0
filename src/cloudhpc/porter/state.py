"""What porter's routes share: the store, the settings and the change notifier, built once per app."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request

from cloudhpc.config import Settings
from cloudhpc.exceptions import HttpProblem
from cloudhpc.storage import ObjectStore
from cloudhpc.store import AsyncStore, Principal

__all__ = ["Notifier", "PorterState", "TokenCache", "object_store", "state_of"]

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

    In-process only: with several porter replicas a change made by another replica is seen by the
    periodic re-read that every waiter does anyway (see `wait`), so the events are a latency
    optimisation, never the source of truth.
    """

    def __init__(self) -> None:
        self._events: defaultdict[str, set[asyncio.Event]] = defaultdict(set)

    def notify(self, key: str) -> None:
        for event in self._events.pop(key, set()):
            event.set()

    async def wait(self, key: str, timeout: float) -> bool:
        """Sleep until `key` is notified or `timeout` passes; True when notified."""
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


def job_key(job_id: object) -> str:
    return f"job:{job_id}"


def cluster_key(cluster: str) -> str:
    return f"cluster:{cluster}"


@dataclass
class PorterState:
    settings: Settings
    store: AsyncStore
    """The job store, awaitable: every call runs in a worker thread, never on the event loop."""
    notifier: Notifier = field(default_factory=Notifier)
    tokens: TokenCache = field(default_factory=TokenCache)
    objects: ObjectStore | None = None
    """Where job artifacts are (`porter.object_store`); None only in tests that need none."""
    recheck_interval: float = 1.0
    """How often long-polls re-read the store, for changes made by other replicas."""
    stopping: bool = False
    """Set when porter is asked to stop: long-polls answer with what they have at their next
    re-check (within `recheck_interval`), inside the server's short graceful-shutdown window,
    instead of being cut off with a 500."""

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
