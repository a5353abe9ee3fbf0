"""The retention reconciler: deletes the artifacts of jobs that ended long ago.

The job row stays (with an empty `artifacts` list): its state, accounting and audit trail are
small, and the metrics' transition counters are computed from them. Several porter replicas may
sweep at once: deleting an object twice is harmless, and each job is cleared only after its
objects are gone, so a sweep interrupted halfway is simply finished by the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

from cloudhpc.config import Settings
from cloudhpc.exceptions import StorageError, StoreError
from cloudhpc.storage import ObjectStore
from cloudhpc.storage.artifacts import delete_job_artifacts
from cloudhpc.store import Store

__all__ = ["artifact_retention", "sweep_artifacts"]

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


@asynccontextmanager
async def artifact_retention(settings: Settings, store: Store, objects: ObjectStore) -> AsyncIterator[None]:
    """Sweep at start and every `porter.artifact_sweep_interval` seconds while porter runs;
    nothing when `porter.artifact_retention_days` is null."""
    days = settings.porter.artifact_retention_days
    if days is None:
        yield
        return

    async def run() -> None:
        while True:
            cutoff = datetime.now(UTC) - timedelta(days=days)
            try:
                cleared = await asyncio.to_thread(sweep_artifacts, store, objects, cutoff)
                if cleared:
                    log.info("retention: cleared the artifacts of %d job(s) ended before %s", cleared, cutoff)
            except (StorageError, StoreError) as exc:
                log.warning("retention: sweep failed (%s); trying again at the next interval", exc)
            await asyncio.sleep(settings.porter.artifact_sweep_interval)

    task = asyncio.create_task(run(), name="artifact-retention")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
