"""porter's writers to a SQLite file take turns in arrival order (`engine._WriteGate`).

Before the gate they waited for SQLite's write lock in its busy handler, which sleeps up to 100 ms
between tries and serves whoever tries first: under bench/api.py's POST loop a write waited up to
5.9 s while later ones got in (p99 1.7 s). These tests hold a write transaction open, queue writers
behind it, and check the order they committed in, that a writer gives up after the timeout instead
of waiting forever, and that a write nested in another on one thread fails rather than hangs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from cloudhpc.domain.jobs import JobSpec
from cloudhpc.exceptions import StoreError
from cloudhpc.store import Store
from cloudhpc.store import engine as store_engine
from tests.integration.stores import open_store, sqlite_url

SPEC = JobSpec.model_validate({"name": "gate", "cluster": "c", "script": "true"})
WRITERS = 8


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    """A SQLite file store whose waits (gate and busy_timeout) end after 0.5 s, so that a test
    that fails shows it quickly instead of after porter's 10 s."""
    monkeypatch.setattr(store_engine, "_SQLITE_BUSY_TIMEOUT_MS", 500)
    with sqlite_url(tmp_path) as url, open_store(url) as the_store:
        yield the_store


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


def committed_owners(store: Store) -> list[str]:
    """The owners of the created jobs in the order their write transactions committed (the
    transitions' autoincrement ids follow the inserts, and SQLite runs one write at a time)."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT j.owner FROM job_transitions t JOIN jobs j ON j.id = t.job_id ORDER BY t.id")
        )
        return [owner for (owner,) in rows]


def test_writers_commit_in_the_order_they_arrived(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_engine, "_SQLITE_BUSY_TIMEOUT_MS", 10_000)  # none gives up here
    gate = store._gate
    assert gate is not None
    threads = [threading.Thread(target=store.create_job, args=(f"w{n}", SPEC)) for n in range(WRITERS)]
    with store._write() as session:  # a slow write holding the gate and SQLite's lock
        session.connection()  # BEGIN IMMEDIATE
        for n, thread in enumerate(threads):
            thread.start()
            wait_for(lambda n=n: gate.waiting == n + 1, f"writer {n} queued")
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive()
    assert committed_owners(store) == [f"w{n}" for n in range(WRITERS)]
    assert gate.waiting == 0


def test_a_writer_gives_up_after_the_timeout_and_leaves_the_queue(store: Store) -> None:
    gate = store._gate
    assert gate is not None
    release = threading.Event()

    def slow_write() -> None:
        with store._write() as session:
            session.connection()  # BEGIN IMMEDIATE
            release.wait(30)

    holder = threading.Thread(target=slow_write)
    holder.start()
    try:
        wait_for(lambda: gate.held_by(holder.ident), "the slow write holds the gate")
        with pytest.raises(StoreError, match="no turn to write"):
            store.create_job("late", SPEC)
        assert gate.waiting == 0
    finally:
        release.set()
        holder.join(timeout=30)
    job, _ = store.create_job("after", SPEC)  # the gate is free again
    assert committed_owners(store) == ["after"]
    assert job.owner == "after"


def test_a_write_nested_in_another_on_one_thread_fails_instead_of_hanging(store: Store) -> None:
    """The store has no nested writes; if one appears, it must not wait for its own thread forever
    (a plain lock would): it skips the gate and SQLite's busy_timeout ends it."""
    outcome: list[BaseException | None] = []

    def nested() -> None:
        try:
            with store._write() as session:
                session.connection()  # BEGIN IMMEDIATE: SQLite's lock is this thread's
                store.create_job("inner", SPEC)
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=nested)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive(), "the nested write hung"
    assert isinstance(outcome[0], StoreError)
    assert "locked" in str(outcome[0])
    job, _ = store.create_job("after", SPEC)  # the gate was released
    assert job.owner == "after"
