"""Bridge ports in the job store, porter's reconciler and the bridges route, on SQLite and the testbed's
PostgreSQL.

The far ends of the bridges are real sockets on loopback: an HTTP server (a dashboard behind a working
tunnel), a silent TCP server (a Ray client port), and a server that closes every connection at once,
which is what the bridge VM's sshd does on a forwarded port while nothing listens behind the tunnel.
Kubernetes is the recording API (no API server can run here).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from cloudhpc.bridges.kubernetes import BridgePublisher, RecordingKubernetesApi, service_dns
from cloudhpc.config import Settings
from cloudhpc.domain.bridges import BridgePlan, PlannedBridge
from cloudhpc.domain.jobs import Job, JobSpec
from cloudhpc.domain.reports import JobReport
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import BridgePortsExhausted
from cloudhpc.porter.app import create_app
from cloudhpc.porter.bridges import BridgeReconciler
from cloudhpc.porter.state import Notifier
from cloudhpc.store import Store

LOW, HIGH = 20510, 20529


def ray_spec(*expose: str) -> JobSpec:
    return JobSpec.model_validate(
        {"name": "r", "cluster": "local", "kind": "ray-cluster", "ray": {"expose": list(expose)}}
    )


def plan(*names: str, low: int = LOW, high: int = HIGH) -> BridgePlan:
    schemes = {"dashboard": "http", "client": "ray"}
    ports = {"dashboard": 8265, "client": 10001, "metrics": 8080}
    return BridgePlan(
        "127.0.0.1", (low, high), tuple(PlannedBridge(n, ports[n], schemes.get(n)) for n in names)
    )


def create(store: Store, *names: str, owner: str = "alice", **kw: Any) -> Job:
    job, created = store.create_job(owner, ray_spec(*names), bridges=plan(*names, **kw))
    assert created
    return job


_seq = iter(range(1, 10**9))


def move(store: Store, job: Job, *states: JobState) -> None:
    for state in states:
        assert (
            store.apply_report(JobReport(job_id=job.id, seq=next(_seq), state=state), actor="agent")
            is not None
        )


# ---- allocation ---------------------------------------------------------------------------------


def test_ports_are_allocated_with_the_job_and_never_shared(store: Store) -> None:
    a = create(store, "dashboard", "client", low=LOW, high=LOW + 2)
    assert [b.name for b in a.bridges] == ["dashboard", "client"]
    assert {b.bridge_port for b in a.bridges} <= {LOW, LOW + 1, LOW + 2}
    assert a.bridges[0].url == f"http://127.0.0.1:{a.bridges[0].bridge_port}"
    assert a.bridges[1].url == f"ray://127.0.0.1:{a.bridges[1].bridge_port}"
    assert not any(b.ready for b in a.bridges)
    with pytest.raises(BridgePortsExhausted, match="1 free port"):
        store.create_job(
            "bob", ray_spec("dashboard", "client"), bridges=plan("dashboard", "client", low=LOW, high=LOW + 2)
        )
    jobs, _ = store.list_jobs(owner=None)
    assert [j.id for j in jobs] == [a.id], "a job is created with all its ports or not at all"
    assert store.get_job(a.id) == a

    # ports come back only when released (the reconciler does it once the job has ended)
    move(store, a, JobState.CANCELLED)
    assert store.get_job(a.id).bridges == []  # type: ignore[union-attr]  # forgotten at once
    with pytest.raises(BridgePortsExhausted):
        create(store, "dashboard", "client", low=LOW, high=LOW + 2)
    assert store.release_bridges(a.id) == 2
    create(store, "dashboard", "client", low=LOW, high=LOW + 2)


def test_concurrent_jobs_get_distinct_ports(store: Store) -> None:
    barrier = threading.Barrier(8)
    results: list[Job | Exception] = []

    def one(_: int) -> None:
        barrier.wait()
        try:
            results.append(
                store.create_job(
                    "alice", ray_spec("dashboard"), bridges=plan("dashboard", low=LOW, high=LOW + 5)
                )[0]
            )
        except BridgePortsExhausted as exc:
            results.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    jobs = [r for r in results if isinstance(r, Job)]
    assert len(jobs) == 6
    assert len([r for r in results if isinstance(r, BridgePortsExhausted)]) == 2
    assert sorted(j.bridges[0].bridge_port for j in jobs) == list(range(LOW, LOW + 6))


# ---- the reconciler -----------------------------------------------------------------------------


class _Page(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def http_server(port: int) -> Iterator[None]:
    server = ThreadingHTTPServer(("127.0.0.1", port), _Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


class TcpServer:
    """`silent`: keeps connections open and says nothing (a gRPC server waiting for its client);
    else closes each connection at once (sshd with nothing behind the tunnel)."""

    def __init__(self, port: int, *, silent: bool) -> None:
        self.port = port
        self.silent = silent
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> TcpServer:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if self.silent:
                with contextlib.suppress(OSError):
                    await reader.read()
            writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", self.port, reuse_address=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def bridge_of(store: Store, job: Job, name: str) -> Any:
    current = store.get_job(job.id)
    assert current is not None
    return next(b for b in current.bridges if b.name == name)


async def test_reconciler_probes_publishes_withdraws_and_releases(store: Store) -> None:
    api = RecordingKubernetesApi()
    notifier = Notifier()
    reconciler = BridgeReconciler(store, notifier, BridgePublisher(api, "cloudhpc"), ready_recheck=0.0)
    job = create(store, "dashboard", "client")
    ports = {b.name: b.bridge_port for b in job.bridges}
    async with httpx.AsyncClient(trust_env=False) as client:
        move(store, job, JobState.PREPARING, JobState.QUEUED)
        await reconciler.reconcile(client)
        assert not bridge_of(store, job, "dashboard").ready  # not running: nothing to probe
        move(store, job, JobState.RUNNING)
        await reconciler.reconcile(client)
        assert not bridge_of(store, job, "dashboard").ready  # running, tunnel not up yet
        assert not [c for c in api.calls if c.verb == "apply"]

        waiter = asyncio.create_task(notifier.wait(f"job:{job.id}", 10))
        async with TcpServer(ports["client"], silent=False):
            with http_server(ports["dashboard"]):
                await reconciler.reconcile(client)
        assert await waiter, "a readiness change wakes the long-polls"
        dashboard = bridge_of(store, job, "dashboard")
        assert dashboard.ready
        assert dashboard.service_dns == service_dns(job.id, "dashboard", "cloudhpc")
        assert not bridge_of(store, job, "client").ready, "sshd accepting then closing is not a service"
        assert {k[0] for k in api.objects} == {"Service", "EndpointSlice"}
        assert len(api.objects) == 2

        async with TcpServer(ports["client"], silent=True):
            await reconciler.reconcile(client)
            assert bridge_of(store, job, "client").ready
        assert len(api.objects) == 4
        assert store.bridge_readiness() == [(str(job.id), "dashboard", True), (str(job.id), "client", True)]
        # that pass found the dashboard's server gone: two failed probes in a row to lose `ready`
        assert bridge_of(store, job, "dashboard").ready
        await reconciler.reconcile(client)
        assert not bridge_of(store, job, "dashboard").ready

        # porter restarts: a new reconciler finds the objects of a job that ended meanwhile (an
        # orphan) and deletes them; the live job's objects are re-applied, never duplicated
        orphan = uuid.uuid4()
        BridgePublisher(api, "cloudhpc").publish(orphan, "bob", bridge_of(store, job, "client"))
        restarted = BridgeReconciler(store, notifier, BridgePublisher(api, "cloudhpc"), ready_recheck=0.0)
        async with TcpServer(ports["client"], silent=True):
            await restarted.reconcile(client)
        assert {k[2] for k in api.objects} == {o["metadata"]["name"] for o in api.objects.values()}
        assert len(api.objects) == 4
        assert all(o["metadata"]["labels"]["cloudhpc.io/job-id"] == str(job.id) for o in api.objects.values())

        # the job ends: withdrawn from Kubernetes, then its ports released
        move(store, job, JobState.COMPLETED)
        await restarted.reconcile(client)
        assert api.objects == {}
        assert store.bridge_records() == []
        deletes = [c for c in api.calls if c.verb == "delete"]
        assert all(f"cloudhpc.io/job-id={job.id}" in (c.label_selector or "") for c in deletes[-2:])


async def test_ports_stay_held_until_kubernetes_lets_go(store: Store) -> None:
    api = RecordingKubernetesApi()
    reconciler = BridgeReconciler(store, Notifier(), BridgePublisher(api, "cloudhpc"))
    job = create(store, "dashboard")
    port = job.bridges[0].bridge_port
    move(store, job, JobState.PREPARING, JobState.QUEUED, JobState.RUNNING)
    async with httpx.AsyncClient(trust_env=False) as client:
        api.fail = True
        with http_server(port):
            await reconciler.reconcile(client)
        assert bridge_of(store, job, "dashboard").ready
        assert bridge_of(store, job, "dashboard").service_dns is None, "never marked published when it failed"
        api.fail = False
        with http_server(port):
            await reconciler.reconcile(client)
        assert bridge_of(store, job, "dashboard").service_dns is not None
        move(store, job, JobState.CANCELLED)
        api.fail = True
        await reconciler.reconcile(client)
        assert len(store.bridge_records()) == 1, "the port is not released while a Service may point at it"
        api.fail = False
        await reconciler.reconcile(client)
        assert store.bridge_records() == []
        assert api.objects == {}


# ---- the route ----------------------------------------------------------------------------------


def test_bridges_route_and_configuration(store: Store) -> None:
    bridge = {
        "host": "127.0.0.1",
        "ssh_user": "u",
        "key_file": "/nonexistent",
        "known_hosts": "/nonexistent",
        "port_range": [LOW, HIGH],
    }
    body = {"name": "r", "cluster": "local", "kind": "ray-cluster", "ray": {"expose": ["dashboard"]}}
    alice, bob = store.create_token("alice", "user"), store.create_token("bob", "user")
    access = {"clusters": {"local": {"users": ["alice", "bob"]}}}
    with TestClient(create_app(Settings.model_validate({"porter": {"access": access}}), store=store)) as http:
        refused = http.post("/api/v1/jobs", json=body, headers={"Authorization": f"Bearer {alice}"})
        assert refused.status_code == 422
        assert "porter.bridge" in refused.json()["error"]["message"]
    app = create_app(Settings.model_validate({"porter": {"bridge": bridge, "access": access}}), store=store)
    app.state.porter.recheck_interval = 0.1
    with TestClient(app) as http:
        created = http.post("/api/v1/jobs", json=body, headers={"Authorization": f"Bearer {alice}"}).json()
        assert created["bridges"][0]["name"] == "dashboard"
        path = f"/api/v1/jobs/{created['id']}/bridges"
        listed = http.get(path, headers={"Authorization": f"Bearer {alice}"}).json()
        assert listed["state"] == "pending"
        assert set(listed["bridges"][0]) == {
            "name", "remote_port", "bridge_host", "bridge_port", "url", "service_dns", "ready",
        }  # fmt: skip
        assert http.get(path, headers={"Authorization": f"Bearer {bob}"}).status_code == 404
        started = time.monotonic()
        waited = http.get(path, params={"wait": 0.5}, headers={"Authorization": f"Bearer {alice}"}).json()
        assert time.monotonic() - started >= 0.4
        assert not waited["bridges"][0]["ready"]
