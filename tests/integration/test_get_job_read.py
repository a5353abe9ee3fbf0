"""`Store.get_job`, the read behind every `GET /jobs/{id}`, builds no ORM objects (#12 item 9).

bench/api.py measured porter's CPU per paced GET on SQLite (docs/benchmarks.md, "The SQLite GET
tail"): the ORM read of the job and its bridges took ~0.9 ms of the ~2.5 ms porter spends per
request under its one GIL, and the p99 at 250/s was the queueing that this CPU load causes. The
read is now one Core statement built once; these tests hold it to that, and to giving exactly the
job the ORM rows describe.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event

from cloudhpc.domain.jobs import Job
from cloudhpc.domain.states import JobState
from cloudhpc.store import Store
from cloudhpc.store.jobs import to_job
from cloudhpc.store.models import BridgeRow, JobRow
from tests.integration.test_bridges import create, move


def _through_orm(store: Store, job: Job) -> Job:
    """The job as the ORM rows describe it (what `get_job` returned before it read Core rows)."""
    with store._read() as session:
        row = session.get(JobRow, str(job.id))
        assert row is not None
        return to_job(row)


@contextmanager
def _orm_loads() -> Iterator[list[str]]:
    """The ORM instances loaded from the database while the block runs (their table names)."""
    loaded: list[str] = []

    def on_load(target: Any, _context: Any) -> None:
        loaded.append(type(target).__tablename__)

    for model in (JobRow, BridgeRow):
        event.listen(model, "load", on_load)
    try:
        yield loaded
    finally:
        for model in (JobRow, BridgeRow):
            event.remove(model, "load", on_load)


def test_get_job_builds_no_orm_objects(store: Store) -> None:
    """Before, each call loaded a JobRow and a BridgeRow per bridge through the identity map."""
    job = create(store, "dashboard", "client")
    with _orm_loads() as loaded:
        read = store.get_job(job.id)
    assert read is not None
    assert read.id == job.id
    assert loaded == []


def test_get_job_gives_the_job_its_rows_describe(store: Store) -> None:
    """Bridges in allocation order with their readiness; none once the job ended; a job without
    bridges; an unknown id."""
    live = create(store, "dashboard", "client")
    move(store, live, JobState.PREPARING, JobState.QUEUED, JobState.RUNNING)
    assert store.set_bridge_ready(live.id, "client", True)
    plain = create(store)
    ended = create(store, "dashboard")
    move(store, ended, JobState.PREPARING, JobState.QUEUED, JobState.RUNNING, JobState.COMPLETED)

    read = store.get_job(live.id)
    assert read is not None
    assert [(b.name, b.ready) for b in read.bridges] == [("dashboard", False), ("client", True)]
    for job in (live, plain, ended):
        assert store.get_job(job.id) == _through_orm(store, job)
    ended_read = store.get_job(ended.id)
    assert ended_read is not None
    assert ended_read.bridges == []
    assert store.get_job(type(live.id)(int=0)) is None
