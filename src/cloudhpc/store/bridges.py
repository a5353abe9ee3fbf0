"""Bridge ports on the bridge VM: allocated with their job, probed, published, released.

A port is allocated in the transaction that creates its job (`allocate_bridges`, called by
`JobRepository.create_job`), so a job exists with all its ports or not at all, and a port held by
a live job is never handed out again. Porter's reconciler (`porter/bridges.py`) does the rest
through `BridgeRepository`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from sqlalchemy import delete, select, text, update
from sqlalchemy.orm import Session

from cloudhpc.domain.bridges import BridgePlan
from cloudhpc.domain.jobs import Bridge
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import BridgePortsExhausted
from cloudhpc.store.engine import Database, map_db_errors, utcnow
from cloudhpc.store.models import BridgeRow, JobRow
from cloudhpc.store.notify import job_key, notify_in

__all__ = ["BridgeRecord", "BridgeRepository", "allocate_bridges", "to_bridge"]

# Any constant works; it only has to be the same for every porter replica sharing the database.
_BRIDGE_LOCK_KEY = 0x6272696467657321  # "bridges!"


@dataclass(frozen=True)
class BridgeRecord:
    """A held bridge port, with what the reconciler needs to know of its job."""

    job_id: UUID
    owner: str
    state: JobState
    bridge: Bridge


def to_bridge(row: BridgeRow) -> Bridge:
    return Bridge(
        name=row.name,
        remote_port=row.remote_port,
        bridge_host=row.bridge_host,
        bridge_port=row.bridge_port,
        url=row.url,
        service_dns=row.service_dns,
        ready=row.ready,
    )


def allocate_bridges(session: Session, plan: BridgePlan, now: datetime) -> list[BridgeRow]:
    """Free ports of `plan.host` in the range, picked at random among the free ones, so a port
    released a moment ago (whose old tunnel may still be closing) is rarely handed out at once."""
    if session.get_bind().dialect.name == "postgresql":
        # replicas allocating at once would both see a port free; one lock orders them
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _BRIDGE_LOCK_KEY})
    low, high = plan.port_range
    used = set(
        session.scalars(
            select(BridgeRow.bridge_port).where(
                BridgeRow.bridge_host == plan.host, BridgeRow.bridge_port.between(low, high)
            )
        )
    )
    free = [port for port in range(low, high + 1) if port not in used]
    if len(free) < len(plan.exposed):
        raise BridgePortsExhausted(
            f"the bridge VM {plan.host} has {len(free)} free port(s) in {low}-{high}, this job needs "
            f"{len(plan.exposed)}: wait for jobs to end, or widen porter.bridge.port_range"
        )
    ports = secrets.SystemRandom().sample(free, len(plan.exposed))
    return [
        BridgeRow(
            name=exposed.name,
            remote_port=exposed.remote_port,
            bridge_host=plan.host,
            bridge_port=port,
            url=exposed.url(plan.host, port),
            ready=False,
            created_at=now,
        )
        for exposed, port in zip(plan.exposed, ports, strict=True)
    ]


class BridgeRepository(Database):
    """The bridge ports held by live jobs, as porter's reconciler sees and updates them."""

    @map_db_errors
    def bridge_records(self) -> list[BridgeRecord]:
        """Every held bridge port with its job's owner and state: what porter's reconciler works on."""
        with self._read() as session:
            rows = session.execute(
                select(BridgeRow, JobRow.owner, JobRow.state)
                .join(JobRow, JobRow.id == BridgeRow.job_id)
                .order_by(BridgeRow.id)
            )
            return [
                BridgeRecord(job_id=UUID(b.job_id), owner=owner, state=JobState(state), bridge=to_bridge(b))
                for b, owner, state in rows
            ]

    @map_db_errors
    def set_bridge_ready(self, job_id: UUID, name: str, ready: bool) -> bool:
        """Record a probe's verdict; True when it changed the bridge's `ready`."""
        with self._write() as session:
            result = session.execute(
                update(BridgeRow)
                .where(BridgeRow.job_id == str(job_id), BridgeRow.name == name, BridgeRow.ready != ready)
                .values(ready=ready, ready_at=utcnow() if ready else None)
                .execution_options(synchronize_session=False)
            )
            changed = bool(getattr(result, "rowcount", 0))
            if changed:
                notify_in(session, [job_key(job_id)])
            return changed

    @map_db_errors
    def set_bridge_service(self, job_id: UUID, name: str, service_dns: str | None) -> None:
        """Record where the bridge is published in Kubernetes (None: not published)."""
        with self._write() as session:
            session.execute(
                update(BridgeRow)
                .where(BridgeRow.job_id == str(job_id), BridgeRow.name == name)
                .values(service_dns=service_dns)
                .execution_options(synchronize_session=False)
            )
            notify_in(session, [job_key(job_id)])

    @map_db_errors
    def release_bridges(self, job_id: UUID) -> int:
        """Free a job's bridge ports (its job has ended and its Services are gone); returns how many."""
        with self._write() as session:
            result = session.execute(
                delete(BridgeRow)
                .where(BridgeRow.job_id == str(job_id))
                .execution_options(synchronize_session=False)
            )
            released = int(getattr(result, "rowcount", 0) or 0)
            if released:
                notify_in(session, [job_key(job_id)])
            return released

    @map_db_errors
    def bridge_readiness(self) -> list[tuple[str, str, bool]]:
        """(job id, bridge name, ready) of every bridge of a live job, for `cloudhpc_bridge_ready`."""
        return [
            (str(r.job_id), r.bridge.name, r.bridge.ready)
            for r in self.bridge_records()
            if not r.state.terminal
        ]
