"""PostgreSQL connections that die under porter: pinged when idle, reconnected after a failure.

The pool pings a connection only after it sat idle (`_PG_PING_AFTER_IDLE_S`), not at every
checkout (that round trip cost ~40% of `GET /jobs/{id}`). These tests kill the server side of
porter's connections on the testbed's PostgreSQL (`pg_terminate_backend`) and check both paths.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text

from cloudhpc.domain.jobs import JobSpec
from cloudhpc.exceptions import StoreError
from cloudhpc.store import Store
from cloudhpc.store import engine as store_engine
from tests.integration.stores import open_store, postgres_url
from tests.testbed import Testbed

SPEC = JobSpec.model_validate({"name": "pool", "cluster": "c", "script": "true"})


@pytest.fixture
def store(tmp_path: Path, testbed: Testbed) -> Iterator[Store]:
    """PostgreSQL only: the pool's ping rules are PostgreSQL's."""
    with postgres_url(tmp_path) as url, open_store(url) as the_store:
        yield the_store


def kill_pooled_connections(store: Store, dsn: str) -> int:
    """Terminate the server process of the store's (single, idle) pooled connection."""
    with store.engine.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
    with psycopg.connect(dsn, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
    return int(pid)


def test_an_idle_dead_connection_is_pinged_and_replaced(
    store: Store, testbed: Testbed, monkeypatch: pytest.MonkeyPatch
) -> None:
    job, _ = store.create_job("u", SPEC)
    kill_pooled_connections(store, testbed.pg_dsn)
    monkeypatch.setattr(store_engine, "_PG_PING_AFTER_IDLE_S", 0.0)  # every connection counts as idle
    fetched = store.get_job(job.id)  # the ping fails, the pool connects anew, the call succeeds
    assert fetched is not None
    assert fetched.id == job.id


def test_a_connection_dying_in_steady_use_fails_one_call_then_recovers(
    store: Store, testbed: Testbed, monkeypatch: pytest.MonkeyPatch
) -> None:
    job, _ = store.create_job("u", SPEC)
    monkeypatch.setattr(store_engine, "_PG_PING_AFTER_IDLE_S", 3600.0)  # never pinged
    kill_pooled_connections(store, testbed.pg_dsn)
    with pytest.raises(StoreError):
        store.get_job(job.id)
    fetched = store.get_job(job.id)
    assert fetched is not None
    assert fetched.id == job.id


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
def test_bursts_of_reads_reuse_pooled_connections(tmp_path: Path, testbed: Testbed, dialect: str) -> None:
    """porter's worker threads (up to 25 at once) read through kept connections: a second burst opens
    none. With SQLAlchemy's defaults (5 kept on SQLite, 10 on PostgreSQL at the time) each burst
    opened and closed connections again, 1,437 and 1,646 of them in one bench/api.py run: the GET
    tail on both stores."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    from sqlalchemy import event

    url_of = {
        "sqlite": lambda: contextlib.nullcontext(f"sqlite:///{tmp_path}/state.db"),
        "postgres": lambda: postgres_url(tmp_path),
    }
    with url_of[dialect]() as url, open_store(url) as store:
        job, _ = store.create_job("alice", SPEC)
        opened: list[int] = []
        event.listen(store.engine, "connect", lambda *_: opened.append(1))
        threads = 20
        barrier = Barrier(threads)

        def read(_: int) -> None:
            barrier.wait()  # all at once: 20 connections checked out together
            with store.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
                barrier.wait()
            assert store.get_job(job.id) is not None

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, range(threads)))
            first = len(opened)
            list(pool.map(read, range(threads)))
        assert first >= threads - 1
        assert len(opened) == first, f"the second burst opened {len(opened) - first} connections"
