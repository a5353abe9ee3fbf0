"""porter as several replicas on one PostgreSQL (issue 12 item 8): wake-ups cross replicas through
LISTEN/NOTIFY, and the one-agent-per-cluster rule is the database's.

The in-process tests run two porter applications, each with its own `Store` (own connection pool,
own LISTEN connection) on one schema of the testbed's PostgreSQL, with their periodic re-check set
to a minute: whatever wakes a waiter on one replica within a second can only be the other replica's
NOTIFY. The whole-flow test at the end runs two real porter processes behind `tests/balancer.py`
with a real submitter on the testbed's SLURM, and kills one replica with `kill -9`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from cloudhpc.client import ApiError, Client, RetryPolicy
from cloudhpc.config import Settings
from cloudhpc.domain.jobs import Job, JobSpec
from cloudhpc.domain.states import JobState
from cloudhpc.porter.app import create_app
from cloudhpc.porter.state import PorterState
from cloudhpc.store import Store
from cloudhpc.store.notify import ChangeListener, ChangeSender, cluster_key, job_key
from tests.balancer import balancing
from tests.e2e.harness import Deployment, free_port, slurm_jobs_named
from tests.integration.stores import open_store, postgres_url
from tests.testbed import Testbed, load_testbed

BATCH = {"name": "replicated", "cluster": "local", "script": "echo hi"}
T = TypeVar("T")
QUICK = 1.5
"""A cross-replica wake-up must arrive well within this (measured: a few milliseconds)."""


@pytest.fixture
def pg_url(tmp_path: Path) -> Iterator[str]:
    """A migrated schema of its own on the testbed's PostgreSQL."""
    with postgres_url(tmp_path) as url, open_store(url):
        yield url


class Replica:
    def __init__(self, client: TestClient, user: str, agent: str, state: PorterState) -> None:
        self.client = client
        self.user = {"Authorization": f"Bearer {user}"}
        self.agent = {"Authorization": f"Bearer {agent}"}
        self.state = state


@contextmanager
def two_replicas(url: str) -> Iterator[tuple[Replica, Replica]]:
    """Two porter apps on the database at `url`, re-checking the store only once a minute."""
    with open_store(url) as admin:
        user = admin.create_token("alice", "user")
        agent = admin.create_token("agent-local", "agent", ["local"])
    settings = Settings.model_validate({"porter": {"access": {"clusters": {"local": {"users": ["alice"]}}}}})
    with ExitStack() as stack:
        out = []
        for _ in range(2):
            store = Store(url)
            stack.callback(store.close)
            app = create_app(settings, store=store)
            app.state.porter.recheck_interval = 60.0
            client = stack.enter_context(TestClient(app))
            assert app.state.porter.listener is not None
            assert app.state.porter.listener.connected
            out.append(Replica(client, user, agent, app.state.porter))
        yield out[0], out[1]


@pytest.fixture
def replicas(pg_url: str) -> Iterator[tuple[Replica, Replica]]:
    with two_replicas(pg_url) as pair:
        yield pair


def _timed(call: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    started = time.monotonic()
    result = call(*args, **kwargs)
    return result, time.monotonic() - started


def test_a_submission_on_one_replica_wakes_the_agent_poll_on_the_other(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    params = {"cluster": "local", "agent": "a1", "wait": 30}
    with ThreadPoolExecutor(1) as pool:
        poll = pool.submit(_timed, b.client.get, "/api/v1/agent/work", params=params, headers=b.agent)
        time.sleep(1.0)  # the poll waits inside replica b now
        job = a.client.post("/api/v1/jobs", json=BATCH, headers=a.user).json()
        submitted = time.monotonic()
        answer, _ = poll.result(timeout=40)
    woken_after = time.monotonic() - submitted
    assert answer.status_code == 200, answer.text
    assert [j["id"] for j in answer.json()["jobs"]] == [job["id"]]
    assert woken_after < QUICK


def test_a_report_on_one_replica_wakes_a_job_wait_on_the_other(replicas: tuple[Replica, Replica]) -> None:
    _reports_wake_waits_across(*replicas)


def _reports_wake_waits_across(a: Replica, b: Replica) -> None:
    """A job submitted on `a` and reported through its states on `a`: each report wakes a
    `GET /jobs/{id}?wait=` parked on `b` within QUICK."""
    job = a.client.post("/api/v1/jobs", json=BATCH, headers=a.user).json()
    work = a.client.get("/api/v1/agent/work", params={"cluster": "local", "agent": "a1"}, headers=a.agent)
    assert [j["id"] for j in work.json()["jobs"]] == [job["id"]]
    for seq, state in enumerate(["preparing", "queued", "running", "completed"], start=1):
        with ThreadPoolExecutor(1) as pool:
            wait = pool.submit(b.client.get, f"/api/v1/jobs/{job['id']}", params={"wait": 30}, headers=b.user)
            time.sleep(0.5)
            report = {"job_id": job["id"], "seq": seq, "state": state}
            if state == "completed":
                report["exit_code"] = 0
            posted = a.client.post("/api/v1/agent/reports", json={"reports": [report]}, headers=a.agent)
            assert posted.json() == {"applied": 1, "ignored": 0}
            reported = time.monotonic()
            answer = wait.result(timeout=40)
        assert answer.json()["state"] == state
        assert time.monotonic() - reported < QUICK, state


def test_output_on_one_replica_reaches_a_follow_on_the_other(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    job = a.client.post("/api/v1/jobs", json=BATCH, headers=a.user).json()
    a.client.get("/api/v1/agent/work", params={"cluster": "local", "agent": "a1"}, headers=a.agent)
    received: list[tuple[float, bytes]] = []

    def follow() -> None:
        url = f"/api/v1/jobs/{job['id']}/logs"
        with b.client.stream("GET", url, params={"follow": "true"}, headers=b.user) as response:
            for chunk in response.iter_bytes():
                received.append((time.monotonic(), chunk))

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    time.sleep(0.5)
    sent = time.monotonic()
    url = f"/api/v1/agent/jobs/{job['id']}/output"
    a.client.post(url, params={"offset": 0}, content=b"first line\n", headers=a.agent)
    deadline = time.monotonic() + 10
    while not received and time.monotonic() < deadline:
        time.sleep(0.02)
    assert received
    assert received[0][1] == b"first line\n"
    assert received[0][0] - sent < QUICK
    report = {"job_id": job["id"], "seq": 1, "state": "failed", "exit_code": 1}
    a.client.post("/api/v1/agent/reports", json={"reports": [report]}, headers=a.agent)
    reader.join(timeout=10)  # the end, reported on a, ends the follow on b
    assert not reader.is_alive()


def test_two_agents_asking_at_once_on_two_replicas_get_the_cluster_once(pg_url: str) -> None:
    """Each round is a cluster without a slot row yet, asked for by two agents at the same instant
    through two stores (two replicas): exactly one may serve it."""
    with open_store(pg_url) as one, open_store(pg_url) as two:
        barrier = threading.Barrier(2)

        def ask(store: Store, cluster: str, agent: str) -> tuple[str, float] | None:
            barrier.wait()
            return store.take_agent_slot(cluster, agent, hold_seconds=30)

        with ThreadPoolExecutor(2) as pool:
            for round_ in range(30):
                cluster = f"race{round_}"
                first = pool.submit(ask, one, cluster, "agent-1")
                second = pool.submit(ask, two, cluster, "agent-2")
                outcomes = {"agent-1": first.result(), "agent-2": second.result()}
                winners = [agent for agent, held in outcomes.items() if held is None]
                assert len(winners) == 1, (cluster, outcomes)
                loser = next(held for held in outcomes.values() if held is not None)
                assert loser[0] == winners[0]  # told who holds it


async def test_the_listener_reconnects_after_its_connection_dies_and_wakes_everybody(pg_url: str) -> None:
    """A PostgreSQL restart, as one LISTEN connection sees it: the server ends the connection. The
    listener tells its waiters to re-read (a gap), reconnects, and hears later changes again."""
    keys: list[str] = []
    gaps: list[float] = []
    listener = ChangeListener(
        Store(pg_url).url, keys.append, lambda: gaps.append(time.monotonic()), min_backoff=0.1
    )
    task = asyncio.create_task(listener.run())
    try:
        assert await listener.wait_connected(10)
        assert listener.connects == 1
        await _notify_until(pg_url, keys, "before")
        with psycopg.connect(load_testbed().pg_dsn, autocommit=True) as admin:
            ended = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = %s",
                (f'LISTEN "{listener.channel}"',),
            ).fetchall()
        assert ended == [(True,)]
        deadline = time.monotonic() + 10
        while listener.connects < 2:
            assert time.monotonic() < deadline, "the listener did not reconnect"
            await asyncio.sleep(0.05)
        assert len(gaps) >= 3  # connected, lost, connected again: each a reason to re-read
        await _notify_until(pg_url, keys, "after")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _notify_until(url: str, keys: list[str], cluster: str) -> None:
    """Make a change that notifies (a job submitted to `cluster`) and wait until it is heard."""
    with open_store(url) as store:
        store.create_job("alice", JobSpec.model_validate({**BATCH, "cluster": cluster}))
    deadline = time.monotonic() + QUICK
    while cluster_key(cluster) not in keys:
        assert time.monotonic() < deadline, (cluster, keys)
        await asyncio.sleep(0.01)


async def test_a_change_notifies_only_its_own_schema(pg_url: str, tmp_path: Path) -> None:
    """Deployments sharing one database with a schema each hear only their own changes."""
    with postgres_url(tmp_path / "other") as other_url, open_store(other_url):
        heard: dict[str, list[str]] = {pg_url: [], other_url: []}
        listeners = [ChangeListener(Store(u).url, heard[u].append, lambda: None) for u in heard]
        tasks = [asyncio.create_task(listener.run()) for listener in listeners]
        try:
            for listener in listeners:
                assert await listener.wait_connected(10)
            assert listeners[0].channel != listeners[1].channel
            await _notify_until(pg_url, heard[pg_url], "mine")
            await asyncio.sleep(0.3)
            assert heard[other_url] == []
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def _heard(keys: list[str], expected: set[str]) -> None:
    deadline = time.monotonic() + QUICK
    while not expected <= set(keys):
        assert time.monotonic() < deadline, sorted(expected - set(keys))
        await asyncio.sleep(0.01)


@pytest.fixture
async def listening(pg_url: str) -> AsyncIterator[list[str]]:
    """The keys a LISTEN connection on `pg_url`'s schema hears, as they come."""
    keys: list[str] = []
    listener = ChangeListener(Store(pg_url).url, keys.append, lambda: None)
    task = asyncio.create_task(listener.run())
    try:
        assert await listener.wait_connected(10)
        yield keys
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_write_notifies_after_its_commit_not_inside_its_transaction(
    pg_url: str, listening: list[str]
) -> None:
    """PostgreSQL serialises the commits of every transaction that sent a NOTIFY (one lock for the
    whole cluster, across the WAL flush): a NOTIFY inside each write halved POST /jobs on
    PostgreSQL. The write's own statements must hold none; the key is still heard."""
    with open_store(pg_url) as store:
        statements: list[str] = []
        event.listen(store.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
        job, _ = store.create_job("alice", JobSpec.model_validate({**BATCH, "cluster": "after-commit"}))
        store.request_cancel(job.id, "alice")
        assert statements
        assert not [s for s in statements if "notify" in s.lower()], statements
        await _heard(listening, {cluster_key("after-commit"), job_key(job.id)})


async def test_concurrent_writes_share_notifying_commits_and_every_key_is_heard(
    pg_url: str, listening: list[str]
) -> None:
    """32 threads writing at once: every write's key arrives, in fewer NOTIFY statements (each a
    commit taking the cluster-wide lock) than writes."""
    writes = 64
    with open_store(pg_url) as store:
        barrier = threading.Barrier(32)

        def submit(n: int) -> None:
            if n < 32:
                barrier.wait()
            store.create_job("alice", JobSpec.model_validate({**BATCH, "cluster": f"c{n}"}))

        with ThreadPoolExecutor(32) as pool:
            list(pool.map(submit, range(writes)))
        await _heard(listening, {cluster_key(f"c{n}") for n in range(writes)})
        sender = store.notifications
        assert sender is not None
        assert sender.keys_sent == writes
        assert sender.batches < writes, sender.batches


async def test_the_sender_reconnects_when_its_connection_dies(pg_url: str, listening: list[str]) -> None:
    """The sender's own connection ended by the server (a restart, an idle cut): the next write's
    key still arrives, sent again on a new connection."""
    with open_store(pg_url) as store:
        store.create_job("alice", JobSpec.model_validate({**BATCH, "cluster": "first"}))
        await _heard(listening, {cluster_key("first")})
        sender = store.notifications
        assert sender is not None
        assert sender.backend_pid is not None
        with psycopg.connect(load_testbed().pg_dsn, autocommit=True) as admin:
            ended = admin.execute("SELECT pg_terminate_backend(%s)", (sender.backend_pid,)).fetchall()
        assert ended == [(True,)]
        store.create_job("alice", JobSpec.model_validate({**BATCH, "cluster": "second"}))
        await _heard(listening, {cluster_key("second")})


PGBIN = Path("/usr/lib/postgresql/15/bin")
"""The testbed's PostgreSQL binaries (scripts/testbed-lib.sh); a cluster of our own is started from them."""


class OwnPostgres:
    """A PostgreSQL cluster of this test's own (the testbed's is shared with every other test), run
    as the `postgres` user from a fresh data directory on a free port; stopped and started by the
    postmaster's PID, as a server restart happens."""

    def __init__(self, root: Path) -> None:
        self.data = root / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._server: subprocess.Popen[bytes] | None = None
        root.chmod(0o755)  # the postgres user reaches its data directory through it
        self.data.mkdir(mode=0o700)
        shutil.chown(self.data, "postgres", "postgres")
        subprocess.run(
            ["runuser", "-u", "postgres", "--", str(PGBIN / "initdb"), "-D", str(self.data), "-U", "postgres",
             "--auth=trust", "-E", "UTF8"],
            cwd="/", check=True, capture_output=True, timeout=120,
        )  # fmt: skip

    def start(self) -> None:
        log = (self.data.parent / "server.log").open("ab")
        self._server = subprocess.Popen(
            ["runuser", "-u", "postgres", "--", str(PGBIN / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.data}"],
            cwd="/", stdout=log, stderr=log, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(psycopg.OperationalError):
                psycopg.connect(self.url, connect_timeout=2).close()
                return
            assert self._server.poll() is None, (self.data.parent / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "own PostgreSQL did not start"
            time.sleep(0.1)

    def stop(self) -> None:
        """A fast shutdown (SIGINT to the postmaster): every session is ended, as in a restart."""
        if self._server is None:
            return
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGINT)
        self._server.wait(timeout=60)
        self._server = None


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    root = Path(tempfile.mkdtemp(prefix="chpc-own-pg-"))
    server = OwnPostgres(root)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_two_replicas_carry_on_across_a_real_postgresql_restart(own_postgres: OwnPostgres) -> None:
    """PostgreSQL itself restarted under two replicas: each replica's LISTEN connection and NOTIFY
    sender reconnect, the pools drop their dead connections, and afterwards a report on one replica
    wakes a wait on the other within QUICK again (not at the minute-long re-check)."""
    with open_store(own_postgres.url):
        pass
    with two_replicas(own_postgres.url) as (a, b):
        _reports_wake_waits_across(a, b)
        own_postgres.stop()
        own_postgres.start()
        deadline = time.monotonic() + 30
        for replica in (a, b):
            listener = replica.state.listener
            assert listener is not None
            while not (listener.connected and listener.connects >= 2):
                assert time.monotonic() < deadline, "a listener did not reconnect"
                time.sleep(0.1)
        # the first request on each replica may meet a pooled connection the restart ended: a 503
        for replica in (a, b):
            while (answer := replica.client.get("/api/v1/jobs", headers=replica.user)).status_code != 200:
                assert answer.status_code == 503, answer.text
                assert time.monotonic() < deadline, "the store did not come back"
                time.sleep(0.2)
        _reports_wake_waits_across(a, b)
        _reports_wake_waits_across(b, a)


async def test_keys_queued_while_postgresql_is_down_are_sent_once_it_is_back(
    own_postgres: OwnPostgres,
) -> None:
    """A commit whose NOTIFY could not go out (the server went down right after it) is not dropped:
    the sender keeps the keys through its failed attempts and sends them once the server is back.
    (Whether a given listener hears them depends on whether it listens again by then; one that
    reconnects wakes all its waiters anyway: `ChangeListener`'s gap.)"""
    with open_store(own_postgres.url) as store:
        url = store.url
    heard: list[str] = []
    listener = ChangeListener(url, heard.append, lambda: None)
    sender = ChangeSender(url, min_backoff=0.1, max_backoff=0.5)
    task = asyncio.create_task(listener.run())
    try:
        assert await listener.wait_connected(10)
        sender.send(["up"])
        await _heard(heard, {"up"})
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        own_postgres.stop()
        sender.send(["while-down"])
        await asyncio.sleep(1.5)  # several failed attempts, with backoff
        assert sender.keys_sent == 1
        own_postgres.start()
        deadline = time.monotonic() + 15
        while sender.keys_sent < 2:
            assert time.monotonic() < deadline, "the kept key was not sent after the restart"
            await asyncio.sleep(0.05)
        assert sender.batches == 2
    finally:
        sender.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# -- two real porter processes behind a balancer, a real agent on the testbed's SLURM ------------

JOBS = 24
WAITERS = 8


def _until_answered(call: Callable[[], T], *, timeout: float = 90) -> tuple[T, int]:
    """`call()`'s result, re-issued while porter cannot answer (a replica died under it: the
    balancer sends the retry to a live one); also how many attempts were cut."""
    deadline = time.monotonic() + timeout
    cut = 0
    while True:
        try:
            return call(), cut
        except ApiError as exc:
            if exc.status not in (0, 502, 503) or time.monotonic() > deadline:
                raise
            cut += 1
            time.sleep(0.2)


def test_two_replicas_behind_a_balancer_lose_nothing_when_one_is_killed(
    tmp_path: Path, testbed: Testbed, pg_url: str
) -> None:
    """A load of jobs through a balancer in front of two porter processes on one PostgreSQL, one
    submitter on the testbed's SLURM; one replica gets `kill -9` in the middle and is restarted.

    Every job reaches SLURM exactly once and ends; waits cut by the kill resume on the other
    replica; a second agent for the cluster is refused by both replicas."""
    ports = [free_port(), free_port()]
    replicas = {f"porter-{n}": f"127.0.0.1:{p}" for n, p in zip("ab", ports, strict=True)}
    with balancing([("127.0.0.1", p) for p in ports]) as lb:
        dep = Deployment(tmp_path / "deploy", testbed, pg_url, port=lb.port)
        try:
            # The submitter connects while only porter-a is up (the balancer skips porter-b, which
            # refuses connections), so the replica killed below is the one its long-poll is on.
            dep.start("porter", name="porter-a", listen=replicas["porter-a"])
            dep.start("submitter")
            deadline = time.monotonic() + 60
            while "reconciled" not in dep.log("submitter"):
                assert time.monotonic() < deadline, dep.log("submitter")[-3000:]
                time.sleep(0.2)
            dep.start("porter", name="porter-b", listen=replicas["porter-b"])
            run = uuid.uuid4().hex[:6]

            def submit(i: int) -> Job:
                spec = {"name": f"rep{run}-{i}", "cluster": "testbed", "script": f"echo job {i}; sleep 3"}
                with dep.client() as client:
                    job, _ = _until_answered(lambda: client.submit(spec, idempotency_key=f"{run}-{i}"))
                return job

            def wait_end(job: Job) -> tuple[Job, int]:
                # its own connection (the balancer spreads the waiters), and no retry of the SDK's
                # own: a wait cut by the kill must reach `_until_answered`, which counts it
                with Client(dep.url, dep.user_token, retries=RetryPolicy(attempts=1)) as client:
                    cut_total = 0
                    current = job
                    while not current.state.terminal:
                        current, cut = _until_answered(
                            lambda c=current: client.get(c.id, wait=20, since_state=c.state), timeout=180
                        )
                        cut_total += cut
                    return current, cut_total

            with ThreadPoolExecutor(WAITERS + 2) as pool:
                first = list(pool.map(submit, range(JOBS // 2)))
                waits = [pool.submit(wait_end, job) for job in first[:WAITERS]]
                time.sleep(1.0)  # the waits are inside both replicas now
                dep.kill("porter-a")  # SIGKILL, under load
                second = list(pool.map(submit, range(JOBS // 2, JOBS)))
                dep.start("porter", name="porter-a", listen=replicas["porter-a"])
                waited = [w.result(timeout=300) for w in waits]
            jobs = first + second
            with dep.client() as client:
                final = [wait_end(job)[0] for job in jobs]
                named = list(client.list(cluster="testbed", limit=100))
            assert len({j.id for j in jobs}) == JOBS
            assert len([j for j in named if j.name.startswith(f"rep{run}-")]) == JOBS  # no duplicate
            with dep.client() as client:
                for job in final:
                    assert job.state == JobState.COMPLETED, (job, dep.log("submitter")[-3000:])
                    assert slurm_jobs_named(f"chpc-{job.id}") == [job.slurm_job_id], job
                    number = job.name.rpartition("-")[2]
                    assert client.logs(job).data == f"job {number}\n".encode(), job  # its whole output
            assert all(job.state == JobState.COMPLETED for job, _ in waited)
            assert sum(cut for _, cut in waited) >= 1, "no wait was on the killed replica"
            assert lb.refused > 0  # porter-b before it started, porter-a while it was dead
            # the agent's long-poll (its one connection, made while only porter-a was up) was cut by
            # the kill, and its channel retried it (cloudhpc.retries names the call it retries)
            assert "porter call GET /api/v1/agent/work failed" in dep.log("submitter")
            token = (dep.root / "agent-token").read_text().strip()
            for name, listen in replicas.items():
                intruder = httpx.get(
                    f"http://{listen}/api/v1/agent/work",
                    params={"cluster": "testbed", "agent": "intruder"},
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=30,
                )
                assert intruder.status_code == 409, (name, intruder.text)
                assert intruder.json()["error"]["code"] == "agent_conflict"
        finally:
            dep.stop()
