"""The agent's side of the S3 mailbox, for agents that can reach an S3 bucket but not porter.

`S3Channel` implements `Channel` over the layout of `cloudhpc.storage.mailbox`: it reads porter's
newest `down/` snapshot after its cursor, and writes each report, output chunk or accounting
record as a new `up/` object, which porter's relay applies in key order. The agent is the only
writer of `up/`; once a snapshot acknowledges an up key, the agent deletes it and everything
before it. One channel serves one cluster.

Every object is sealed with the mailbox key porter holds too (`storage/mailbox_seal.py`). A
snapshot that is unsigned, altered, moved from another key, or older than `max_age` (a replay: an
authentic snapshot put back after newer ones were deleted) is refused: logged once, counted in
`cloudhpc_mailbox_refused_snapshots_total`, and never acted on. The newest acceptable snapshot after
the cursor is used instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar
from uuid import UUID

from cloudhpc.config import Settings
from cloudhpc.domain.jobs import Job
from cloudhpc.domain.queries import AgentQuery, QueryAnswer
from cloudhpc.domain.reports import JobReport, Reconciliation
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import ChannelError, ConfigError, ObjectNotFound, StorageError
from cloudhpc.metrics.agent import AgentMetrics
from cloudhpc.storage import ObjectStore, open_object_store
from cloudhpc.storage.mailbox import (
    AccountingMessage,
    ArtifactsMessage,
    HeartbeatMessage,
    KeyClock,
    MailboxCodec,
    OutputMessage,
    ReportMessage,
    Snapshot,
    UpBatch,
    UpMessage,
    down_prefix,
    key_time_ns,
    up_key,
    up_prefix,
)
from cloudhpc.storage.mailbox_seal import CONTENT_TYPE, KEYGEN_HINT, REASONS, MailboxKey, Reason, Refused

__all__ = ["S3Channel", "count_refusals", "open_mailbox_channels"]

log = logging.getLogger(__name__)

T = TypeVar("T")

SNAPSHOT_MAX_AGE = 300.0
"""Seconds after which porter's snapshot is too old to act on. porter republishes at least every
`mailbox.REPUBLISH_INTERVAL` (60 s), so a fresh one is always younger; the margin absorbs clock
differences between the two machines (keep them in NTP sync)."""

OnRefused = Callable[[str, Reason], None]
"""Told (cluster, reason) for every refused object: the refusal metric."""


class S3Channel:
    """`S3Channel(open_object_store("s3://bucket/prefix"), "mahti", key=MailboxKey.from_file(...))`.

    porter's snapshots say which jobs are pending or have a cancel request; `claim_work` hands
    each such job out once per `lease_seconds` (as porter's HTTP lease does), so a job whose
    report is still on its way through the bucket is not submitted twice by this process.
    """

    def __init__(
        self,
        object_store: ObjectStore,
        cluster: str,
        *,
        key: MailboxKey,
        agent_name: str = "agent",
        poll_interval: float = 0.25,
        lease_seconds: float = 30.0,
        heartbeat_interval: float = 15.0,
        max_age: float = SNAPSHOT_MAX_AGE,
        on_refused: OnRefused | None = None,
    ) -> None:
        self.object_store = object_store
        self.cluster = cluster
        self.codec = MailboxCodec(cluster, key)
        self.max_age = max_age
        self.on_refused = on_refused
        self.refused: Counter[Reason] = Counter()
        """Snapshots refused, by reason (the metric counts the same)."""
        self._refused_keys: set[str] = set()
        self.agent_name = agent_name
        self.poll_interval = poll_interval
        self.lease_seconds = lease_seconds
        self.heartbeat_interval = heartbeat_interval
        self._up = up_prefix(cluster)
        self._down = down_prefix(cluster)
        self._snapshot: Snapshot | None = None
        self._cursor: str | None = None
        self._acked: str | None = None
        self._handed: dict[tuple[UUID, str], float] = {}
        self._clock = KeyClock()
        self._floor_known = False
        self._write_lock = asyncio.Lock()
        self._last_write = float("-inf")

    def __repr__(self) -> str:
        return f"S3Channel({self.cluster!r}, {self.object_store!r})"

    async def _io(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking object-store call in a thread; storage failures become `ChannelError`."""
        try:
            return await asyncio.to_thread(func, *args, **kwargs)
        except StorageError as exc:
            raise ChannelError(f"mailbox of {self.cluster}: {exc}") from exc

    def _check(self, cluster: str) -> None:
        if cluster != self.cluster:
            raise ChannelError(f"this S3 channel serves cluster {self.cluster!r}, not {cluster!r}")

    # ---- porter -> agent ------------------------------------------------------------------

    async def _list_all(self, prefix: str, start_after: str | None = None) -> list[str]:
        keys: list[str] = []
        while True:
            page = await self._io(self.object_store.list, prefix, start_after=start_after, limit=1000)
            keys += page
            if len(page) < 1000:
                return keys
            start_after = page[-1]

    async def _refresh(self) -> bool:
        """Read porter's newest acceptable snapshot after the cursor; True when one was read.

        Newest first: a refused or vanished key is skipped for the next older one, so an object
        planted after porter's last snapshot cannot hide it. Refused keys are remembered (while
        they are listed) so that each is fetched, logged and counted once."""
        keys = [k for k in await self._list_all(self._down, self._cursor) if key_time_ns(k) is not None]
        self._refused_keys &= set(keys)
        for key in reversed(keys):
            if key in self._refused_keys:
                continue
            try:
                snapshot = await self._read_snapshot(key)
            except Refused as exc:
                self._refuse(key, exc)
                if exc.reason == "stale":  # every older one is older still
                    self._refused_keys.update(k for k in keys if k < key)
                    return False
                continue
            if snapshot is None:
                continue
            self._cursor = key
            await self._adopt(snapshot)
            return True
        return False

    async def _read_snapshot(self, key: str) -> Snapshot | None:
        """The snapshot at `key`; None when unreadable or pruned by porter meanwhile, `Refused` when
        it must not be acted on."""
        try:
            raw = await self._io(self.object_store.get, key)
        except ChannelError as exc:
            if isinstance(exc.__cause__, ObjectNotFound):
                return None  # pruned by porter between list and get
            raise
        try:
            snapshot = self.codec.load_snapshot(key, raw)
        except ValueError as exc:
            log.error("mailbox %s: skipping unreadable snapshot %s: %s", self.cluster, key, exc)
            self._refused_keys.add(key)
            return None
        if snapshot.cluster != self.cluster:  # signed for this cluster's key: porter's bug
            log.error(
                "mailbox %s: snapshot %s is for cluster %s; ignored", self.cluster, key, snapshot.cluster
            )
            self._refused_keys.add(key)
            return None
        # The stamp is in the key, which the signature covers: it cannot be made younger.
        age = time.time() - (key_time_ns(key) or 0) / 1e9
        if age > self.max_age:
            raise Refused(
                "stale",
                f"{key} is {age:.0f} s old (at most {self.max_age:.0f} s): a replayed snapshot, porter "
                "not publishing, or the two machines' clocks apart",
            )
        return snapshot

    def _refuse(self, key: str, exc: Refused) -> None:
        log.warning("mailbox %s: refused snapshot, not acted on: %s", self.cluster, exc)
        self._refused_keys.add(key)
        self.refused[exc.reason] += 1
        if self.on_refused is not None:
            self.on_refused(self.cluster, exc.reason)

    async def _adopt(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        if snapshot.ack is not None:
            self._clock.observe(key_time_ns(snapshot.ack))
            if self._acked is None or snapshot.ack > self._acked:
                await self._delete_acked(snapshot.ack)

    async def _delete_acked(self, ack: str) -> None:
        """Delete our up objects porter has applied. Best effort: a failure is retried at the next ack."""
        try:
            for key in await self._list_all(self._up):
                if key > ack:
                    break
                await self._io(self.object_store.delete, key)
        except ChannelError as exc:
            log.warning("mailbox %s: could not delete acknowledged messages (%s)", self.cluster, exc)
            return
        self._acked = ack

    def _needing_action(self) -> list[Job]:
        if self._snapshot is None:
            return []
        now = time.monotonic()
        wanted: dict[tuple[UUID, str], Job] = {}
        for job in self._snapshot.jobs:
            if job.state.terminal:
                continue
            if job.cancel_requested:
                wanted[(job.id, "cancel")] = job
            elif job.state == JobState.PENDING:
                wanted[(job.id, "submit")] = job
        # Forget hand-outs of jobs that no longer need this action, then hand out the rest.
        self._handed = {k: t for k, t in self._handed.items() if k in wanted}
        jobs: list[Job] = []
        for action, job in wanted.items():
            if now - self._handed.get(action, float("-inf")) >= self.lease_seconds:
                self._handed[action] = now
                jobs.append(job)
        return jobs

    async def claim_work(self, cluster: str, *, wait: float) -> list[Job]:
        self._check(cluster)
        deadline = time.monotonic() + wait
        while True:
            await self._refresh()
            if time.monotonic() - self._last_write >= self.heartbeat_interval:
                await self._write([HeartbeatMessage(agent=self.agent_name, at=datetime.now(UTC))])
            jobs = self._needing_action()
            remaining = deadline - time.monotonic()
            if jobs or remaining <= 0:
                return jobs
            await asyncio.sleep(min(self.poll_interval, remaining))

    async def reconciliation(self, cluster: str) -> Reconciliation:
        self._check(cluster)
        await self._refresh()
        if self._snapshot is None:
            raise ChannelError(
                f"mailbox of {self.cluster}: porter has published no snapshot yet under {self._down} "
                "(is porter.mailbox_clusters set on porter?)"
            )
        snapshot = self._snapshot
        return Reconciliation(
            jobs=snapshot.jobs, unaccounted=snapshot.unaccounted, seq_floor=snapshot.seq_floor
        )

    # ---- agent -> porter ------------------------------------------------------------------

    async def _write(self, messages: list[UpMessage]) -> str:
        """Write one up object. Serialised, so a key is in the bucket before any later key is made
        and porter's cursor, moving in key order, never passes an object still being written."""
        async with self._write_lock:
            if not self._floor_known:
                await self._observe_own_messages()
                await self._refresh()
                self._floor_known = True
            key = up_key(self.cluster, self._clock.next())
            body = self.codec.dump_batch(key, UpBatch(agent=self.agent_name, messages=messages))
            await self._io(self.object_store.put, key, body, content_type=CONTENT_TYPE)
            self._last_write = time.monotonic()
            return key

    async def _observe_own_messages(self) -> None:
        """After a restart, continue after our own newest message still in the bucket, whatever our
        clock says; not after any key found there: one planted with the largest stamp would leave
        no stamp to write with."""
        for key in reversed(await self._list_all(self._up)):
            if key_time_ns(key) is None:
                continue
            try:
                self.codec.load_batch(key, await self._io(self.object_store.get, key))
            except ChannelError as exc:
                if isinstance(exc.__cause__, ObjectNotFound):
                    continue  # acked and deleted meanwhile
                raise
            except (Refused, ValueError):
                continue
            self._clock.observe(key_time_ns(key))
            return

    async def report(self, reports: list[JobReport]) -> None:
        if reports:
            await self._write([ReportMessage(report=r) for r in reports])

    async def upload_output(self, job_id: UUID, offset: int, data: bytes) -> int:
        """Queue the chunk for porter and assume it will be stored: porter applies chunks in order
        and by offset, so a resent chunk is never stored twice."""
        if data:
            await self._write([OutputMessage.of(job_id, offset, data)])
        return offset + len(data)

    async def put_accounting(self, job_id: UUID, record: dict[str, Any]) -> None:
        await self._write([AccountingMessage(job_id=job_id, record=record)])

    async def put_artifacts(self, job_id: UUID, keys: list[str]) -> None:
        if keys:
            await self._write([ArtifactsMessage(job_id=job_id, keys=keys)])

    async def claim_queries(self, cluster: str, *, wait: float) -> list[AgentQuery]:
        """The mailbox carries no questions (porter answers them 503 for a mailbox cluster, see
        `porter/routes_agent_queries.py`): nothing ever comes, after the wait a poll would take."""
        await asyncio.sleep(wait)
        return []

    async def answer_query(self, query_id: UUID, answer: QueryAnswer) -> None:
        raise ChannelError("the S3 mailbox carries no answers to agent queries")

    async def close(self) -> None:
        """Nothing to release: every write is complete when its call returns."""


def open_mailbox_channels(settings: Settings, *, agent_name: str = "agent") -> dict[str, S3Channel]:
    """One channel per configured cluster, over `submitter.mailbox`, sealed with
    `submitter.mailbox_key_file` (a `ConfigError` naming it when it is unset or unusable)."""
    if not settings.submitter.mailbox:
        raise ConfigError("submitter.mailbox: an s3://BUCKET/PREFIX URL is required with channel `s3`")
    key_file = settings.submitter.mailbox_key_file
    if key_file is None:
        raise ConfigError(
            "submitter.mailbox_key_file: not set, and the S3 mailbox needs the key porter holds for "
            f"these clusters (porter.mailbox_key_dir); {KEYGEN_HINT}"
        )
    key = MailboxKey.from_file(key_file, setting="submitter.mailbox_key_file")
    store = open_object_store(
        settings.submitter.mailbox,
        endpoint_url=settings.submitter.s3_endpoint_url,
        region=settings.submitter.s3_region,
    )
    log.info("mailbox: key %s from submitter.mailbox_key_file", key.describe())
    return {name: S3Channel(store, name, key=key, agent_name=agent_name) for name in settings.clusters}


def count_refusals(channels: Mapping[str, S3Channel], metrics: AgentMetrics) -> None:
    """Count the channels' refused snapshots in the agent's `/metrics`."""
    on_refused = metrics.mailbox_refusals(channels, REASONS)
    for channel in channels.values():
        channel.on_refused = on_refused
