"""What porter's routes share: the store, the settings and the change notifier, built once per app."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field

from cloudhpc.config import Settings
from cloudhpc.store import Store

__all__ = ["Notifier", "PorterState"]


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
    store: Store
    notifier: Notifier = field(default_factory=Notifier)
    recheck_interval: float = 1.0
    """How often long-polls re-read the store, for changes made by other replicas."""

    def known_clusters(self) -> list[str]:
        return sorted(set(self.settings.clusters) | set(self.store.agents()))
