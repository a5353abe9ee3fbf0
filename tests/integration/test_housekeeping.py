"""porter's retention sweep beyond artifacts: uploads their owner never deleted, and finished agent
queries, deleted periodically (`porter/retention.py`).

Uploads go through the real route (porter under uvicorn, the SDK) into a local directory or the
testbed's S3; queries live in SQLite or the testbed's PostgreSQL (the `store` fixture).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from cloudhpc.client import Client
from cloudhpc.config import PorterConfig, Settings
from cloudhpc.domain.queries import QueryAnswer
from cloudhpc.porter.app import create_app
from cloudhpc.porter.retention import retention, sweep_once, sweep_uploads
from cloudhpc.porter.routes_uploads import UPLOAD_INDEX, new_upload_id, upload_marker
from cloudhpc.storage import ObjectStore
from cloudhpc.storage.inputs import InputScope
from cloudhpc.store import Store
from cloudhpc.store.queries import KEEP
from tests.integration.stores import served, store_url


def _left_behind(objects: ObjectStore, owner: str, age: timedelta) -> str:
    """An upload as the route makes one, `age` old, whose owner never deleted it; returns its key."""
    upload_id = new_upload_id(time.time() - age.total_seconds())
    key = InputScope.from_store_url(store_url(objects)).upload_key(owner, upload_id, "call.pkl")
    objects.put(upload_marker(upload_id, key), b"")
    objects.put(key, b"pickled call")
    return key


@pytest.fixture
def porter(store: Store, objects: ObjectStore) -> Iterator[tuple[str, str]]:
    settings = Settings(porter=PorterConfig(object_store=store_url(objects)))
    with served(create_app(settings, store=store, object_store=objects)) as url:
        yield url, store.create_token("alice", "user")


def test_uploads_are_indexed_and_deleting_one_takes_its_entry(
    porter: tuple[str, str], objects: ObjectStore
) -> None:
    url, token = porter
    with Client(url, token) as alice:
        kept = alice.upload(b"mine", name="data.bin")
        gone = alice.upload(b"mine too", name="call.pkl")
        entries = objects.list(UPLOAD_INDEX)
        assert len(entries) == 2
        assert {entry.rsplit("/", 1)[-1] for entry in entries} == {"data.bin", "call.pkl"}
        alice.delete_upload(gone)
    [entry] = objects.list(UPLOAD_INDEX)
    assert entry.endswith("/data.bin")
    assert kept.endswith(entry.split("/", 3)[3])  # the entry names the upload's key


def test_the_sweep_deletes_uploads_older_than_the_retention_and_keeps_the_rest(
    porter: tuple[str, str], objects: ObjectStore, store: Store
) -> None:
    url, token = porter
    old = _left_behind(objects, "alice", timedelta(days=8))
    older = _left_behind(objects, "bob", timedelta(days=30))
    with Client(url, token) as alice:
        fresh = alice.upload(b"just now", name="data.bin")
    young = _left_behind(objects, "bob", timedelta(days=6))
    objects.put(f"{UPLOAD_INDEX}not-an-id/users/bob/x", b"")  # not porter's entry: left alone
    # an entry naming something that is not an upload of its id (a job's artifact): never deleted
    artifact = "jobs/bob/1/output.log"
    objects.put(artifact, b"bob's output")
    objects.put(upload_marker(new_upload_id(time.time() - 30 * 86400), artifact), b"")
    settings = Settings(porter=PorterConfig(object_store=store_url(objects), upload_retention_days=7))
    sweep_once(settings, store, objects)
    for key in (old, older):
        assert objects.list(key) == [], key
    assert objects.list(young) == [young]
    assert any(fresh.endswith(k) for k in objects.list("users/alice/uploads/"))
    assert objects.list(artifact) == [artifact]
    assert len(objects.list(UPLOAD_INDEX)) == 4  # the fresh, the young and the two strangers
    assert sweep_uploads(objects, datetime.now(UTC) - timedelta(days=7)) == 0  # nothing left to do


async def test_the_retention_loop_in_porter_sweeps_uploads(store: Store, objects: ObjectStore) -> None:
    old = _left_behind(objects, "alice", timedelta(hours=2))
    settings = Settings(
        porter=PorterConfig(
            object_store=store_url(objects),
            artifact_retention_days=None,  # uploads are swept even when artifacts are kept forever
            upload_retention_days=1 / 24,
            artifact_sweep_interval=0.2,
        )
    )
    async with retention(settings, store, objects):
        for _ in range(50):
            if not objects.list(old):
                break
            await asyncio.sleep(0.1)
    assert objects.list(old) == []
    assert objects.list(UPLOAD_INDEX) == []


def test_finished_agent_queries_are_purged_periodically(store: Store) -> None:
    asked = store.ask_agent("local", "job_files", {"path": "."}, ttl=30)
    answered = store.ask_agent("local", "job_files", {"path": "a"}, ttl=30)
    assert store.answer_query(answered, QueryAnswer(result={"entries": []}))
    now = datetime.now(UTC)
    assert store.purge_queries(now) == 0  # still worth answering, or the answer not yet read
    assert store.query_cluster(asked) == "local"
    later = now + timedelta(seconds=30) + KEEP + timedelta(seconds=1)
    # the retention sweep, with nothing else to do, purges them without a new question being asked
    settings = Settings(porter=PorterConfig(artifact_retention_days=None, upload_retention_days=None))
    sweep_once(settings, store, _Nothing(), later)  # type: ignore[arg-type]
    assert store.query_cluster(asked) is None
    assert store.query_cluster(answered) is None
    assert store.purge_queries(later) == 0


class _Nothing:
    """No object store is touched when neither artifacts nor uploads are swept."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the object store was used ({name})")
