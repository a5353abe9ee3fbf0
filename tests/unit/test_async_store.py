"""`AsyncStore` is `Store` awaitable: the same public methods, run in a worker thread."""

from __future__ import annotations

import inspect
import threading

from cloudhpc.domain.jobs import JobSpec
from cloudhpc.store import AsyncStore, Store


def public_methods(cls: type) -> set[str]:
    return {
        name
        for name, value in inspect.getmembers(cls)
        if not name.startswith("_") and (inspect.isfunction(value) or inspect.iscoroutinefunction(value))
    }


def test_every_public_method_of_store_is_awaitable() -> None:
    assert public_methods(AsyncStore) == public_methods(Store)
    for name in public_methods(AsyncStore):
        assert inspect.iscoroutinefunction(getattr(AsyncStore, name)), name


async def test_calls_run_in_a_worker_thread() -> None:
    store = Store("sqlite://")
    store.migrate()
    threads: list[threading.Thread] = []
    original = store.get_job

    def spy(*args: object, **kwargs: object) -> object:
        threads.append(threading.current_thread())
        return original(*args, **kwargs)  # type: ignore[arg-type]

    store.get_job = spy  # type: ignore[method-assign,assignment]
    db = AsyncStore(store)
    job, created = await db.create_job("alice", JobSpec(name="x", cluster="local", script="true"))
    assert created
    assert await db.get_job(job.id) == job
    assert threads
    assert threads[0] is not threading.main_thread()
    await db.close()
