"""porter's side of the S3 mailbox: relays between the job store and agents that cannot reach porter.

For each mailbox cluster, every `interval` seconds, `MailboxRelay`:

1. applies the agent's `up/` objects written after its cursor, in key (= time) order: reports
   through `Store.apply_report` (stale seq numbers are ignored there), output through
   `Store.append_output` (idempotent by offset), accounting, heartbeats. The cursor is saved in a
   key only porter writes, so a restarted porter resumes where it stopped;
2. claims the cluster's new work in the store (so no HTTP agent takes it too) and, when the
   cluster's desired state changed, publishes a snapshot under `down/`, with the last applied up
   key as `ack` so the agent can delete what was read; older snapshots are deleted.

Run one relay per mailbox cluster (one porter replica): the cursor key has one writer.

Every object is sealed with the cluster's mailbox key (`porter.mailbox_key_dir/<cluster>.key`, the
same key as the agent's `submitter.mailbox_key_file`): only the key's holders speak for the
cluster, whatever the bucket's credentials allow. An up object that is unsigned, altered or moved
from another key is refused: not applied, logged once, counted in
`cloudhpc_mailbox_refused_objects_total`, and the cursor does not move past it (so a planted key
that sorts after the agent's cannot hide them). A report for a job of another cluster is refused,
as the HTTP routes refuse it. Replayed authentic messages change nothing: they can only be put
back at their own keys, which the cursor has passed, and a re-read after a lost cursor meets the
store's seq numbers and output offsets.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from uuid import UUID

from cloudhpc.config import Settings
from cloudhpc.domain.jobs import Job
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import CloudHPCError, ConfigError, ObjectNotFound, UnknownJob
from cloudhpc.metrics.porter import PorterMetrics
from cloudhpc.porter.state import Notifier, cluster_key, job_key
from cloudhpc.storage import ObjectStore, open_object_store
from cloudhpc.storage.artifacts import foreign_keys
from cloudhpc.storage.mailbox import (
    AccountingMessage,
    ArtifactsMessage,
    HeartbeatMessage,
    KeyClock,
    MailboxCodec,
    OutputMessage,
    PorterCursor,
    ReportMessage,
    Snapshot,
    UpBatch,
    cursor_key,
    down_key,
    down_prefix,
    key_time_ns,
    up_prefix,
)
from cloudhpc.storage.mailbox_seal import CONTENT_TYPE, KEYGEN_HINT, REASONS, MailboxKey, Reason, Refused
from cloudhpc.store import Store

__all__ = ["MailboxRelay", "mailbox_relay", "porter_mailbox_keys"]

# How often a relay re-reads the jobs whose accounting never arrived (they matter only to an agent
# that restarts, and change only when a job ends or its accounting arrives).
UNACCOUNTED_INTERVAL = 10.0

REPUBLISH_INTERVAL = 60.0
"""A snapshot is published at least this often, changed or not, so the agent can tell a fresh one
from a replayed one by its age (`s3_channel.SNAPSHOT_MAX_AGE`)."""

OnRefused = Callable[[str, Reason], None]
"""Told (cluster, reason) for every refused object: the refusal metric."""

log = logging.getLogger(__name__)


@dataclass
class _Cluster:
    """What the relay knows about one cluster's mailbox between ticks."""

    name: str
    codec: MailboxCodec
    loaded: bool = False
    cursor: str | None = None
    claims: set[UUID] = field(default_factory=set)
    saved: PorterCursor | None = None
    clock: KeyClock = field(default_factory=KeyClock)
    fingerprint: str | None = None
    unaccounted: list[Job] = field(default_factory=list)
    unaccounted_read: float = float("-inf")
    published_ack: str | None = None
    last_publish: float = 0.0
    owned: set[UUID] = field(default_factory=set)
    failing_since: float | None = None
    last_failure_log: float = 0.0
    refused_keys: set[str] = field(default_factory=set)
    """Up keys refused after the cursor: skipped without another read, log line or count."""


class MailboxRelay:
    """`MailboxRelay(store, object_store, {"mahti": MailboxKey.from_file(...)})`; `await relay.run()`
    until `stop()`.

    `tick()` does one pass over every cluster (tests drive it directly). Store and object-store
    calls block, so each cluster's pass runs in a worker thread and never stalls porter's loop.
    """

    def __init__(
        self,
        store: Store,
        object_store: ObjectStore,
        keys: Mapping[str, MailboxKey],
        interval: float = 0.5,
        *,
        lease_seconds: float = 30.0,
        ack_interval: float = 2.0,
        keep_snapshots: int = 3,
        heartbeat_max_age: float = 120.0,
        batch: int = 100,
        republish_interval: float = REPUBLISH_INTERVAL,
        on_change: Callable[[UUID], None] | None = None,
        on_refused: OnRefused | None = None,
    ) -> None:
        self.store = store
        self.object_store = object_store
        self.interval = interval
        self.lease_seconds = lease_seconds
        self.ack_interval = ack_interval
        self.keep_snapshots = max(1, keep_snapshots)
        self.heartbeat_max_age = heartbeat_max_age
        self.batch = batch
        self.republish_interval = republish_interval
        self.on_change = on_change
        self.on_refused = on_refused
        self._clusters = {name: _Cluster(name, MailboxCodec(name, key)) for name, key in keys.items()}
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self.applied: Counter[str] = Counter()
        """Up objects read past (applied, or signed but unreadable), per cluster; refused ones are
        counted in `refused` instead."""
        self.published: Counter[str] = Counter()
        """Snapshots published, per cluster."""
        self.refused: Counter[tuple[str, Reason]] = Counter()
        """Objects refused, per cluster and reason (the metric counts the same)."""

    def __repr__(self) -> str:
        return f"MailboxRelay({sorted(self._clusters)}, {self.object_store!r})"

    @staticmethod
    def agent_name(cluster: str) -> str:
        """The lease owner recorded in the store for jobs handed to the mailbox."""
        return f"mailbox:{cluster}"

    # ---- running ---------------------------------------------------------------------------

    async def run(self) -> None:
        log.info("mailbox relay started for %s", ", ".join(sorted(self._clusters)))
        while not self._stopping.is_set():
            await self.tick()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            self._wake.clear()

    def poke(self) -> None:
        """Run the next pass now (a job was submitted or cancelled) instead of at the next interval."""
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def tick(self) -> None:
        """One pass over every cluster; a failing cluster is logged and retried next tick."""
        for state in self._clusters.values():
            try:
                changed = await asyncio.to_thread(self._tick, state)
            except Exception as exc:
                self._failed(state, exc)
                continue
            if state.failing_since is not None:
                log.info(
                    "mailbox %s: working again after %.0f s",
                    state.name,
                    time.monotonic() - state.failing_since,
                )
                state.failing_since = None
            if self.on_change is not None:
                for job_id in changed:
                    self.on_change(job_id)

    def _failed(self, state: _Cluster, exc: Exception) -> None:
        """Log the first failure of a streak, then once a minute: S3 or the database may be down for
        a while and a line every half second would bury everything else."""
        now = time.monotonic()
        if state.failing_since is None:
            state.failing_since = now
        elif now - state.last_failure_log < 60:
            return
        state.last_failure_log = now
        if isinstance(exc, CloudHPCError):
            log.warning("mailbox %s: relay pass failed (%s); retrying", state.name, exc)
        else:
            log.error("mailbox %s: relay pass failed unexpectedly; retrying", state.name, exc_info=exc)

    # ---- one pass (in a worker thread) -------------------------------------------------------

    def _tick(self, state: _Cluster) -> set[UUID]:
        if not state.loaded:
            self._load(state)
        changed: set[UUID] = set()
        try:
            self._read_up(state, changed)
        finally:
            # Progress made before an error is kept; it is re-applied harmlessly if this save fails.
            self._save_cursor(state)
        self._publish_if_changed(state)
        self._save_cursor(state)
        return changed

    def _load(self, state: _Cluster) -> None:
        key = cursor_key(state.name)
        try:
            saved = state.codec.load_cursor(key, self.object_store.get(key))
        except ObjectNotFound:
            saved = PorterCursor()
        except Refused as exc:
            self._refuse(state, key, exc)
            saved = PorterCursor()  # re-reading is harmless (seq numbers, offsets): only slower
        except ValueError as exc:
            log.error("mailbox %s: unreadable cursor ignored, re-reading the mailbox (%s)", state.name, exc)
            saved = PorterCursor()
        state.cursor, state.claims, state.saved = saved.cursor, set(saved.claims), saved
        # Snapshot keys must keep increasing across restarts, whatever this machine's clock says:
        # above the newest one this porter signed (not above a key anyone could plant).
        for down in reversed(self._list_all(down_prefix(state.name))):
            if key_time_ns(down) is not None and self._authentic_snapshot(state, down):
                state.clock.observe(key_time_ns(down))
                break
        state.loaded = True
        log.info("mailbox %s: resuming after %s", state.name, state.cursor or "(the beginning)")

    def _authentic_snapshot(self, state: _Cluster, key: str) -> bool:
        try:
            state.codec.load_snapshot(key, self.object_store.get(key))
        except (ObjectNotFound, Refused, ValueError):
            return False
        return True

    def _refuse(self, state: _Cluster, key: str, exc: Refused) -> None:
        log.warning("mailbox %s: refused, not acted on: %s", state.name, exc)
        self.refused[(state.name, exc.reason)] += 1
        if self.on_refused is not None:
            self.on_refused(state.name, exc.reason)

    def _list_all(self, prefix: str, start_after: str | None = None) -> list[str]:
        keys: list[str] = []
        while True:
            page = self.object_store.list(prefix, start_after=start_after, limit=1000)
            keys += page
            if len(page) < 1000:
                return keys
            start_after = page[-1]

    def _save_cursor(self, state: _Cluster) -> None:
        current = PorterCursor(cursor=state.cursor, claims=sorted(state.claims))
        if current != state.saved:
            key = cursor_key(state.name)
            self.object_store.put(key, state.codec.dump_cursor(key, current), content_type=CONTENT_TYPE)
            state.saved = current

    # ---- (a) the agent's messages -------------------------------------------------------------

    def _read_up(self, state: _Cluster, changed: set[UUID]) -> None:
        """Apply the objects after the cursor in key order. The cursor moves past authentic ones
        only; the listing pages on its own, past refused ones."""
        prefix = up_prefix(state.name)
        start = state.cursor
        state.refused_keys = {k for k in state.refused_keys if state.cursor is None or k > state.cursor}
        while True:
            keys = self.object_store.list(prefix, start_after=start, limit=self.batch)
            for key in keys:
                if key in state.refused_keys:
                    continue
                if self._apply_object(state, key, changed):
                    state.cursor = key
                    self.applied[state.name] += 1
                else:
                    state.refused_keys.add(key)
            if len(keys) < self.batch:
                return
            start = keys[-1]

    def _apply_object(self, state: _Cluster, key: str, changed: set[UUID]) -> bool:
        """Apply one up object; False when it was refused (the cursor must not pass it)."""
        try:
            if key_time_ns(key) is None:
                raise Refused("unsigned", f"{key} is not a message key")
            batch = state.codec.load_batch(key, self.object_store.get(key))
        except ObjectNotFound:
            return True  # deleted by the agent: it was acked, so applied before
        except Refused as exc:
            self._refuse(state, key, exc)
            return False
        except ValueError as exc:
            # Signed but unreadable (a version skew): skipped, not retried forever, so that one
            # bad object does not block the mailbox.
            log.error("mailbox %s: skipping malformed %s: %s", state.name, key, exc)
            return True
        self._apply_batch(state, key, batch, changed)
        return True

    def _apply_batch(self, state: _Cluster, key: str, batch: UpBatch, changed: set[UUID]) -> None:
        actor = self.agent_name(state.name)
        for message in batch.messages:
            if isinstance(message, HeartbeatMessage):
                age = (datetime.now(UTC) - message.at).total_seconds()
                if age <= self.heartbeat_max_age:  # an old one read after a porter outage says nothing
                    self.store.touch_agent(state.name, message.agent)
                continue
            job_id = message.report.job_id if isinstance(message, ReportMessage) else message.job_id
            if not self._owns(state, job_id, key):
                continue
            try:
                if isinstance(message, ReportMessage):
                    if self.store.apply_report(message.report, actor=actor) is not None:
                        changed.add(job_id)
                elif isinstance(message, OutputMessage):
                    self.store.append_output(job_id, message.offset, message.data)
                    changed.add(job_id)
                elif isinstance(message, AccountingMessage):
                    self.store.set_accounting(job_id, message.record)
                    changed.add(job_id)
                elif isinstance(message, ArtifactsMessage):
                    self._add_artifacts(state, job_id, message.keys, key)
            except UnknownJob:
                log.warning("mailbox %s: %s names job %s, which no longer exists", state.name, key, job_id)

    def _add_artifacts(self, state: _Cluster, job_id: UUID, keys: list[str], key: str) -> None:
        job = self.store.get_job(job_id)
        if job is None:
            raise UnknownJob(f"no job {job_id}")
        outside = set(foreign_keys(job.owner, job.id, keys))
        if outside:
            log.warning(
                "mailbox %s: %s: %d artifact key(s) of job %s are not under its prefix; refused",
                state.name,
                key,
                len(outside),
                job_id,
            )
        good = [k for k in keys if k not in outside]
        if good:
            self.store.add_artifacts(job_id, good)

    def _owns(self, state: _Cluster, job_id: UUID, key: str) -> bool:
        """Whether the job belongs to this mailbox's cluster (cached: a job never changes cluster)."""
        if job_id in state.owned:
            return True
        job = self.store.get_job(job_id)
        if job is None:
            log.warning("mailbox %s: %s names unknown job %s; ignored", state.name, key, job_id)
            return False
        if job.cluster != state.name:
            log.warning(
                "mailbox %s: %s speaks for job %s of cluster %s; refused",
                state.name,
                key,
                job_id,
                job.cluster,
            )
            return False
        state.owned.add(job_id)
        return True

    # ---- (b) desired state --------------------------------------------------------------------

    def _publish_if_changed(self, state: _Cluster) -> None:
        claimed = self.store.claim_work(
            state.name, self.agent_name(state.name), lease_seconds=self.lease_seconds
        )
        state.claims.update(job.id for job in claimed if job.state == JobState.PENDING)
        active = self.store.active_jobs(state.name)
        pending = {job.id for job in active if job.state == JobState.PENDING}
        state.claims &= pending
        state.owned.update(job.id for job in active)
        # A pending job is offered only once claimed here: one that an HTTP agent holds a lease on
        # (a misconfiguration) is not handed to the mailbox agent too.
        jobs = [job for job in active if job.state != JobState.PENDING or job.id in state.claims]
        now = time.monotonic()
        if now - state.unaccounted_read >= UNACCOUNTED_INTERVAL:  # a slow-moving list: off the hot pass
            state.unaccounted, state.unaccounted_read = self.store.unaccounted_jobs(state.name), now
        fingerprint = _fingerprint([*jobs, *state.unaccounted])
        ack_moved = state.cursor != state.published_ack and now - state.last_publish >= self.ack_interval
        due = now - state.last_publish >= self.republish_interval
        if fingerprint == state.fingerprint and not ack_moved and not due:
            return
        snapshot = Snapshot(
            cluster=state.name,
            published_at=datetime.now(UTC),
            jobs=jobs,
            ack=state.cursor,
            unaccounted=state.unaccounted,
            seq_floor=self.store.seq_floor(state.name),
        )
        key = down_key(state.name, state.clock.next())
        self.object_store.put(key, state.codec.dump_snapshot(key, snapshot), content_type=CONTENT_TYPE)
        state.fingerprint, state.published_ack, state.last_publish = fingerprint, state.cursor, now
        self.published[state.name] += 1
        log.debug("mailbox %s: published %s (%d jobs, ack %s)", state.name, key, len(jobs), state.cursor)
        self._prune_snapshots(state, key)

    def _prune_snapshots(self, state: _Cluster, newest: str) -> None:
        """Keep the last few snapshots up to `newest`. A key after it is not one of this porter's
        (its clock is past every key it wrote), so it goes too: planted there, it would otherwise
        count as one of the last few and push porter's own snapshots out."""
        keys = self._list_all(down_prefix(state.name))
        foreign = [k for k in keys if k > newest]
        if foreign:
            log.warning(
                "mailbox %s: deleting %d object(s) under down/ that porter did not write, such as %s",
                state.name,
                len(foreign),
                foreign[0],
            )
        own = [k for k in keys if k <= newest and key_time_ns(k) is not None]
        for key in [*own[: -self.keep_snapshots], *foreign]:
            self.object_store.delete(key)


def _fingerprint(jobs: list[Job]) -> str:
    payload = json.dumps([job.model_dump(mode="json", by_alias=True) for job in jobs], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def porter_mailbox_keys(settings: Settings) -> dict[str, MailboxKey]:
    """The key of each of `porter.mailbox_clusters`, from `porter.mailbox_key_dir/<cluster>.key`;
    a `ConfigError` naming the setting and the file when one is missing or unusable. Called when
    the app is built, so that porter does not start without them."""
    clusters = settings.porter.mailbox_clusters
    directory = settings.porter.mailbox_key_dir
    if not clusters:
        return {}
    if directory is None:
        raise ConfigError(
            f"porter.mailbox_key_dir: not set, and porter.mailbox_clusters ({', '.join(clusters)}) need "
            f"a key each, in <dir>/<cluster>.key, the file the cluster's agent has as "
            f"submitter.mailbox_key_file; {KEYGEN_HINT}"
        )
    keys = {
        name: MailboxKey.from_file(directory / f"{name}.key", setting="porter.mailbox_key_dir")
        for name in clusters
    }
    for name, key in keys.items():
        log.info("mailbox %s: key %s", name, key.describe())
    return keys


@asynccontextmanager
async def mailbox_relay(
    settings: Settings,
    store: Store,
    notifier: Notifier,
    *,
    interval: float = 0.5,
    keys: Mapping[str, MailboxKey] | None = None,
    metrics: PorterMetrics | None = None,
) -> AsyncIterator[MailboxRelay | None]:
    """Run the relay in the background for `porter.mailbox_clusters` (nothing when there are none),
    with `keys` (default: `porter_mailbox_keys(settings)`), counting refusals in `metrics`."""
    clusters = settings.porter.mailbox_clusters
    if not clusters:
        yield None
        return
    keys = keys if keys is not None else porter_mailbox_keys(settings)
    url = settings.porter.mailbox or settings.porter.object_store
    object_store = open_object_store(
        url, endpoint_url=settings.porter.s3_endpoint_url, region=settings.porter.s3_region
    )
    relay = MailboxRelay(
        store,
        object_store,
        keys,
        interval,
        on_change=lambda job_id: notifier.notify(job_key(job_id)),
        on_refused=metrics.mailbox_refusals(keys, REASONS) if metrics is not None else None,
    )

    async def watch(cluster: str) -> None:
        # The job routes notify the cluster on submit and cancel: pass that on without waiting.
        while True:
            if await notifier.wait(cluster_key(cluster), 60.0):
                relay.poke()

    task = asyncio.create_task(relay.run(), name="mailbox-relay")
    watchers = [asyncio.create_task(watch(c), name=f"mailbox-watch-{c}") for c in clusters]
    try:
        yield relay
    finally:
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        relay.stop()
        # A pass blocked on a slow S3 call gets a few seconds to finish, then is abandoned.
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(task, 10)
