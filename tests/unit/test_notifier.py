"""porter's in-process wake-ups (`Notifier`): what a long-poll waits on between its reads."""

from __future__ import annotations

import asyncio
import time
from typing import cast

from cloudhpc.config import Settings
from cloudhpc.porter.state import FALLBACK_RECHECK, SAFETY_RECHECK, Notifier, PorterState
from cloudhpc.store import AsyncStore, normalize_url
from cloudhpc.store.notify import ChangeListener


async def test_a_notification_during_the_read_before_a_wait_is_not_lost() -> None:
    """A waiter reads, then waits: a change notified while it was reading must end the wait at
    once, or the waiter sleeps until its next re-check (5 s with cross-replica wake-ups)."""
    notifier = Notifier()
    read_at = time.monotonic()
    notifier.notify("job:1")  # lands while the waiter's read runs
    started = time.monotonic()
    assert await notifier.wait("job:1", 5.0, since=read_at)
    assert time.monotonic() - started < 0.1
    # a notification from before the read is already in what the read saw: the wait sleeps
    assert not await notifier.wait("job:1", 0.05, since=time.monotonic())
    assert not await notifier.wait("job:2", 0.05, since=read_at)  # another key's does not count


async def test_notify_all_wakes_every_waiter_and_counts_for_later_waits() -> None:
    notifier = Notifier()
    read_at = time.monotonic()
    waits = [asyncio.create_task(notifier.wait(f"job:{n}", 5.0)) for n in range(3)]
    await asyncio.sleep(0.01)
    notifier.notify_all()
    assert await asyncio.wait_for(asyncio.gather(*waits), 1.0) == [True, True, True]
    assert await notifier.wait("cluster:x", 5.0, since=read_at)


def test_it_remembers_a_bounded_number_of_keys() -> None:
    notifier = Notifier(remember=100)
    for n in range(10_000):
        notifier.notify(f"job:{n}")
    assert len(notifier._notified) <= 100  # the bound is the point of the test


def test_long_polls_recheck_often_unless_other_replicas_can_wake_them() -> None:
    """Re-reads are a safety net every 5 s while the LISTEN connection is up, and the way to see
    other replicas' changes (every 1 s) while it is not, or on SQLite, where there is none."""
    state = PorterState(settings=Settings(), store=cast(AsyncStore, None))
    assert state.recheck_interval == FALLBACK_RECHECK
    listener = ChangeListener(normalize_url("postgresql://u@127.0.0.1/db"), print, print)
    state.listener = listener
    assert state.recheck_interval == FALLBACK_RECHECK  # not connected yet
    listener.connected = True
    assert state.recheck_interval == SAFETY_RECHECK > FALLBACK_RECHECK
    state.recheck_interval = 0.2  # tests shorten both
    assert state.recheck_interval == 0.2
    listener.connected = False
    assert state.recheck_interval == 0.2
