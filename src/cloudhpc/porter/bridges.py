"""porter's bridge reconciler: probe each bridge, publish the ready ones, release the ended ones.

The store says which bridge ports are held and by which jobs; the reconciler makes the rest of
the world agree, on every pass, from scratch, so a porter restart loses nothing:

- a bridge of a running job is probed (through the tunnel: see `bridges/probe.py`), often while it
  is not ready, every few seconds once it is; `ready` follows the probes (two failures in a row to
  lose it, so one dropped connection does not flap it);
- a ready bridge is published in Kubernetes (when enabled) and its Service's DNS name recorded;
  objects are only ever created for a job that exists and a tunnel that answers, and `service_dns`
  is only set once the API server accepted them;
- a bridge of an ended job is withdrawn from Kubernetes, then its port released: a port is never
  handed out again while a Service still points at it;
- Kubernetes objects whose job holds no bridge any more (porter was down when it ended) are deleted
  on start and every `SWEEP_INTERVAL`.

Several porter replicas may run it at once: every step is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from uuid import UUID

import httpx
from starlette.concurrency import run_in_threadpool

from cloudhpc.bridges.allocation import HTTP_PORTS
from cloudhpc.bridges.kubernetes import BridgePublisher, KubernetesApi, OfficialKubernetesApi
from cloudhpc.bridges.probe import probe_bridge
from cloudhpc.config import Settings
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import CloudHPCError
from cloudhpc.porter.state import Notifier, job_key
from cloudhpc.store import AsyncStore, BridgeRecord, Store

__all__ = ["BridgeReconciler", "bridge_reconciler"]

log = logging.getLogger(__name__)

TICK = 0.5
"""Seconds between passes; a bridge that is not ready yet is probed on every pass."""
READY_RECHECK = 5.0
"""Seconds between probes of a bridge that is ready."""
FAILURES_TO_LOSE = 2
SWEEP_INTERVAL = 60.0
PROBE_CONCURRENCY = 32


@dataclass
class _Probed:
    at: float = 0.0
    failures: int = 0


@dataclass
class BridgeReconciler:
    store: Store
    notifier: Notifier
    publisher: BridgePublisher | None = None
    tick_interval: float = TICK
    ready_recheck: float = READY_RECHECK
    _probed: dict[tuple[UUID, str], _Probed] = field(default_factory=dict)
    _published: set[tuple[UUID, str]] = field(default_factory=set)
    _next_sweep: float = 0.0
    passes: int = 0
    _db: AsyncStore = field(init=False)

    def __post_init__(self) -> None:
        self._db = AsyncStore(self.store)

    async def run(self) -> None:
        async with httpx.AsyncClient(trust_env=False, follow_redirects=False) as client:
            while True:
                started = time.monotonic()
                try:
                    await self.reconcile(client)
                except CloudHPCError as exc:
                    log.warning("bridge reconciliation failed (%s); retrying", exc)
                except Exception:
                    log.exception("bridge reconciliation failed; retrying")
                await asyncio.sleep(max(0.0, self.tick_interval - (time.monotonic() - started)))

    async def reconcile(self, client: httpx.AsyncClient) -> None:
        """One pass over every held bridge port."""
        self.passes += 1
        records = await self._db.bridge_records()
        by_job: dict[UUID, list[BridgeRecord]] = {}
        for record in records:
            by_job.setdefault(record.job_id, []).append(record)
        probes: list[BridgeRecord] = []
        publish: list[BridgeRecord] = []
        for job_id, held in by_job.items():
            state = held[0].state
            if state.terminal:
                await self._release(job_id)
            elif state == JobState.RUNNING:
                probes += [r for r in held if self._due(r)]
                # ready, not due for a probe, and not published yet (restart, or a failed attempt)
                publish += [
                    r for r in held if r.bridge.ready and not self._due(r) and not self._is_published(r)
                ]
            else:
                for record in held:
                    if record.bridge.ready:
                        await self._set_ready(record, False)
        limit = asyncio.Semaphore(PROBE_CONCURRENCY)

        async def one(record: BridgeRecord) -> None:
            async with limit:
                await self._probe(client, record)

        await asyncio.gather(*(one(r) for r in probes))
        if self.publisher is not None:
            for record in publish:
                await self._publish(record)
        if self.publisher is not None and time.monotonic() >= self._next_sweep:
            await self._sweep({job_id for job_id, held in by_job.items() if not held[0].state.terminal})

    def _is_published(self, record: BridgeRecord) -> bool:
        return (record.job_id, record.bridge.name) in self._published

    def _due(self, record: BridgeRecord) -> bool:
        probed = self._probed.get((record.job_id, record.bridge.name))
        if probed is None or not record.bridge.ready:
            return True
        return time.monotonic() - probed.at >= self.ready_recheck

    async def _probe(self, client: httpx.AsyncClient, record: BridgeRecord) -> None:
        bridge = record.bridge
        key = (record.job_id, bridge.name)
        ok = await probe_bridge(
            client, bridge.bridge_host, bridge.bridge_port, http=bridge.name in HTTP_PORTS
        )
        probed = self._probed.setdefault(key, _Probed())
        probed.at = time.monotonic()
        probed.failures = 0 if ok else probed.failures + 1
        if ok and not bridge.ready:
            await self._set_ready(record, True)
            log.info("job %s: bridge %s ready at %s", record.job_id, bridge.name, bridge.url)
        elif not ok and bridge.ready and probed.failures >= FAILURES_TO_LOSE:
            await self._set_ready(record, False)
            log.warning("job %s: bridge %s stopped answering", record.job_id, bridge.name)
        if ok and self.publisher is not None and key not in self._published:
            await self._publish(record)

    async def _set_ready(self, record: BridgeRecord, ready: bool) -> None:
        if await self._db.set_bridge_ready(record.job_id, record.bridge.name, ready):
            self.notifier.notify(job_key(record.job_id))

    async def _publish(self, record: BridgeRecord) -> None:
        assert self.publisher is not None
        publisher = self.publisher
        try:
            dns = await run_in_threadpool(publisher.publish, record.job_id, record.owner, record.bridge)
        except CloudHPCError as exc:
            log.warning(
                "job %s: publishing bridge %s failed (%s); retrying", record.job_id, record.bridge.name, exc
            )
            return
        self._published.add((record.job_id, record.bridge.name))
        if record.bridge.service_dns != dns:
            await self._db.set_bridge_service(record.job_id, record.bridge.name, dns)
            self.notifier.notify(job_key(record.job_id))

    async def _release(self, job_id: UUID) -> None:
        if self.publisher is not None:
            try:
                await run_in_threadpool(self.publisher.withdraw, job_id)
            except CloudHPCError as exc:
                log.warning(
                    "job %s: withdrawing its bridges from Kubernetes failed (%s); retrying", job_id, exc
                )
                return  # the port stays held until nothing points at it any more
        released = await self._db.release_bridges(job_id)
        for key in [k for k in self._probed if k[0] == job_id]:
            self._probed.pop(key, None)
        self._published = {k for k in self._published if k[0] != job_id}
        if released:
            log.info("job %s: released %d bridge port(s)", job_id, released)
            self.notifier.notify(job_key(job_id))

    async def _sweep(self, live: set[UUID]) -> None:
        assert self.publisher is not None
        publisher = self.publisher
        self._next_sweep = time.monotonic() + SWEEP_INTERVAL
        try:
            published = await run_in_threadpool(publisher.published_jobs)
        except CloudHPCError as exc:
            log.warning("listing published bridges failed (%s); retrying", exc)
            self._next_sweep = time.monotonic() + 5.0
            return
        for job_id in sorted(published - live):
            log.info("job %s: deleting its orphaned bridge Services", job_id)
            try:
                await run_in_threadpool(publisher.withdraw, job_id)
            except CloudHPCError as exc:
                log.warning("job %s: deleting orphaned bridge Services failed (%s)", job_id, exc)


@asynccontextmanager
async def bridge_reconciler(
    settings: Settings, store: Store, notifier: Notifier, *, kubernetes: KubernetesApi | None = None
) -> AsyncIterator[BridgeReconciler | None]:
    """Runs the reconciler for porter's lifetime when bridges are configured (else yields None).

    `kubernetes` replaces the official client (tests); with `porter.bridge.kubernetes.enabled` and
    none given, the official client is set up from in-cluster credentials or the kubeconfig.
    """
    config = settings.porter.bridge
    if config is None:
        yield None
        return
    publisher = None
    if config.kubernetes.enabled or kubernetes is not None:
        api = kubernetes if kubernetes is not None else OfficialKubernetesApi()
        publisher = BridgePublisher(api, config.kubernetes.namespace)
    reconciler = BridgeReconciler(store, notifier, publisher)
    task = asyncio.create_task(reconciler.run(), name="bridge-reconciler")
    try:
        yield reconciler
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
