"""porter's retention sweep: deletes what nobody will read again, at start and every
`porter.artifact_sweep_interval` seconds while porter runs.

- The artifacts of jobs that ended `porter.artifact_retention_days` ago. The job row stays (with an
  empty `artifacts` list): its state, accounting and audit trail are small, and the metrics'
  transition counters are computed from them. Each job is cleared only after its objects are gone,
  so a sweep interrupted halfway is simply finished by the next one.
- Uploads (`POST /api/v1/uploads`) made `porter.upload_retention_days` ago that their owner never
  deleted (the SDK's process died before its job ended), found through porter's upload index
  (`porter/routes_uploads.py`), oldest first.
- Agent queries whose question expired (answered or not: the asking route reads the answer only
  before then), so their table does not keep growing on a porter that stops being asked.

Several porter replicas may sweep at once: deleting an object or a row twice is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

from cloudhpc.config import Settings
from cloudhpc.exceptions import StorageError, StoreError
from cloudhpc.porter.routes_uploads import UPLOAD_INDEX, indexed_upload
from cloudhpc.storage import ObjectStore
from cloudhpc.storage.artifacts import delete_job_artifacts
from cloudhpc.store import Store

__all__ = ["retention", "sweep_artifacts", "sweep_once", "sweep_uploads"]

log = logging.getLogger(__name__)


def sweep_artifacts(store: Store, objects: ObjectStore, ended_before: datetime, *, batch: int = 200) -> int:
    """Delete the artifacts of every job that ended before `ended_before`; returns how many jobs
    were cleared. Blocking: run it in a thread from async code."""
    cleared = 0
    while True:
        expired = store.expired_artifacts(ended_before, limit=batch)
        if not expired:
            return cleared
        for job in expired:
            deleted = delete_job_artifacts(objects, job.owner, job.job_id, job.keys)
            store.set_artifacts(job.job_id, [])
            log.info("retention: deleted %d artifact(s) of job %s", deleted, job.job_id)
            cleared += 1


def sweep_uploads(objects: ObjectStore, made_before: datetime, *, batch: int = 500) -> int:
    """Delete every indexed upload made before `made_before`, and its index entry; returns how
    many. The index lists oldest first, so the sweep stops at the first younger upload. Blocking."""
    deleted = 0
    after: str | None = None
    while True:
        markers = objects.list(UPLOAD_INDEX, start_after=after, limit=batch)
        if not markers:
            return deleted
        for marker in markers:
            after = marker
            entry = indexed_upload(marker)
            if entry is None:
                continue  # not an entry porter wrote: left alone
            if entry.created >= made_before:
                return deleted
            objects.delete(entry.key)  # the upload first: an entry left over is swept next time
            objects.delete(entry.marker)
            log.info(
                "retention: deleted the upload %s, made %s and never deleted by its owner",
                entry.key,
                entry.created,
            )
            deleted += 1


def sweep_once(settings: Settings, store: Store, objects: ObjectStore, now: datetime | None = None) -> None:
    """One run of every sweep the settings ask for (the finished agent queries always). Blocking.
    One failing sweep does not keep the others from running."""
    now = now or datetime.now(UTC)
    porter = settings.porter
    sweeps: list[tuple[str, Callable[[], int]]] = []
    if porter.artifact_retention_days is not None:
        ended = now - timedelta(days=porter.artifact_retention_days)
        sweeps.append(
            (f"jobs ended before {ended}", functools.partial(sweep_artifacts, store, objects, ended))
        )
    if porter.upload_retention_days is not None:
        made = now - timedelta(days=porter.upload_retention_days)
        sweeps.append((f"uploads made before {made}", functools.partial(sweep_uploads, objects, made)))
    sweeps.append(("finished agent queries", functools.partial(store.purge_queries, now)))
    for what, sweep in sweeps:
        try:
            cleared = sweep()
        except (StorageError, StoreError) as exc:
            log.warning("retention: sweep of %s failed (%s); trying again at the next interval", what, exc)
            continue
        if cleared:
            log.info("retention: cleared %d: %s", cleared, what)


@asynccontextmanager
async def retention(settings: Settings, store: Store, objects: ObjectStore) -> AsyncIterator[None]:
    """Run `sweep_once` at start and every `porter.artifact_sweep_interval` seconds while porter
    runs."""

    async def run() -> None:
        while True:
            await asyncio.to_thread(sweep_once, settings, store, objects)
            await asyncio.sleep(settings.porter.artifact_sweep_interval)

    task = asyncio.create_task(run(), name="retention")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
