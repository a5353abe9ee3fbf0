"""Opening a warm Ray session is atomic (#15): two opens of one name by one user at the same moment
make ONE session (one ray-cluster job, so one SLURM job), the others re-attach to it. The store
decides with a unique index over the active sessions (`JobRepository.open_session`), on SQLite and
the testbed's PostgreSQL (the `store` fixture); porter's `POST /api/v1/ray-sessions` and the SDK's
`ray_session` / `async_ray_session` go through it. No agent runs here: the tests move the session
to running and mark its dashboard bridge ready in the store, as the agent and porter's bridge
reconciler would.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cloudhpc.client import ApiError, AsyncClient, Client
from cloudhpc.config import Settings
from cloudhpc.domain.jobs import Job, JobKind, JobSpec
from cloudhpc.domain.states import JobState
from cloudhpc.porter.app import create_app
from cloudhpc.sessions import async_ray_session, ray_session, session_spec
from cloudhpc.store import Store
from tests.integration.stores import served
from tests.integration.test_store import concurrently, move, table_count

OPENS = 8
BRIDGE = {
    "host": "127.0.0.1",
    "ssh_user": "u",
    "key_file": "/nonexistent",
    "known_hosts": "/nonexistent",
    "port_range": [20540, 20599],
}


def dev(name: str = "dev", cluster: str = "local") -> JobSpec:
    return JobSpec.model_validate(session_spec(cluster=cluster, name=name, idle_timeout=60))


def test_concurrent_opens_in_the_store_make_one_session(store: Store) -> None:
    results = concurrently(OPENS, lambda _: store.open_session("alice", dev()))
    assert len({job.id for job, _ in results}) == 1, results
    assert sum(created for _, created in results) == 1
    assert table_count(store, "jobs") == 1
    assert table_count(store, "job_transitions") == 1


def test_what_holds_a_session_name(store: Store) -> None:
    first, created = store.open_session("alice", dev())
    assert created
    assert store.open_session("alice", dev()) == (first, False)
    # another user's, another cluster's, another name's session are their own
    assert store.open_session("bob", dev())[1]
    assert store.open_session("alice", dev(cluster="elsewhere"))[1]
    assert store.open_session("alice", dev("other"))[1]
    # a ray-cluster submitted as a plain job is no session, and a session does not block it
    plain, made = store.create_job("alice", dev())
    assert made
    assert store.open_session("alice", dev()) == (first, False)
    # running still holds the name; a session being cancelled frees it, and so does one that ended
    move(store, first, JobState.PREPARING, JobState.QUEUED, JobState.RUNNING)
    assert store.open_session("alice", dev())[0].id == first.id
    store.request_cancel(first.id, "alice")
    second, created = store.open_session("alice", dev())
    assert created
    assert second.id not in {first.id, plain.id}
    move(store, second, JobState.FAILED)
    third, created = store.open_session("alice", dev())
    assert created
    assert third.id != second.id


@pytest.fixture
def porter(store: Store) -> Iterator[tuple[str, dict[str, str]]]:
    """porter under uvicorn with a bridge range (a session exposes its dashboard); alice's and
    bob's tokens."""
    access = {"clusters": {"local": {"users": ["alice", "bob"]}}}
    app = create_app(Settings.model_validate({"porter": {"bridge": BRIDGE, "access": access}}), store=store)
    with served(app) as url:
        yield url, {"alice": store.create_token("alice", "user"), "bob": store.create_token("bob", "user")}


def test_threads_opening_through_porter_make_one_session(
    store: Store, porter: tuple[str, dict[str, str]]
) -> None:
    url, tokens = porter
    body = session_spec(cluster="local", name="dev", idle_timeout=60)
    barrier = threading.Barrier(OPENS)

    def open_one(_: int) -> tuple[int, str]:
        with Client(url, tokens["alice"]) as alice:
            barrier.wait()
            answer = alice.request("POST", "/api/v1/ray-sessions", json=body)
            return answer.status_code, answer.json()["id"]

    answers = concurrently(OPENS, open_one)
    assert len({job_id for _, job_id in answers}) == 1, answers
    assert sorted(status for status, _ in answers) == [200] * (OPENS - 1) + [201]
    assert table_count(store, "jobs") == 1
    [(job_id, _)] = {(j, s) for s, j in answers if s == 201}
    job = store.get_job(job_id)
    assert job is not None
    assert [b.name for b in job.bridges] == ["dashboard"]  # one set of bridge ports, the winner's

    with Client(url, tokens["bob"]) as bob:
        theirs = bob.request("POST", "/api/v1/ray-sessions", json=body)
        assert theirs.status_code == 201
        assert theirs.json()["id"] != job_id
        # what is not a session is a 422 naming the field
        batch = {"name": "dev", "cluster": "local", "script": "true"}
        blind = body | {"ray": {"idle_timeout": 60}}
        for wrong, field in ((batch, "kind"), (blind, "ray.expose")):
            with pytest.raises(ApiError) as refused:
                bob.request("POST", "/api/v1/ray-sessions", json=wrong)
            assert refused.value.status == 422
            assert refused.value.details[0]["field"] == field


def _bring_up(store: Store, owner: str, stop: threading.Event) -> threading.Thread:
    """A thread that plays the agent and the bridge reconciler: the owner's newest session runs and
    its dashboard bridge is ready."""

    def run() -> None:
        while not stop.is_set():
            jobs, _ = store.list_jobs(owner=owner, name="dev")
            for summary in jobs:
                if summary.state == JobState.PENDING and summary.kind == JobKind.RAY_CLUSTER:
                    job = store.get_job(summary.id)
                    assert job is not None
                    move(store, job, JobState.PREPARING, JobState.QUEUED, JobState.RUNNING)
                    store.set_bridge_ready(job.id, "dashboard", True)
            time.sleep(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_async_and_sync_sessions_open_one_session_together(
    store: Store, porter: tuple[str, dict[str, str]]
) -> None:
    """`async with async_ray_session(...)` next to `ray_session(...)` in another thread, at the same
    moment: one session, the address of its bridge, one of them re-attached; a ray-job submitted
    from the async session names it; `keep=False` cancels it on leaving the block."""
    url, tokens = porter
    stop = threading.Event()
    helper = _bring_up(store, "alice", stop)
    barrier = threading.Barrier(2)
    synced: list[Any] = []

    def sync_open() -> None:
        with Client(url, tokens["alice"]) as alice:
            barrier.wait()
            synced.append(ray_session("local", name="dev", idle_timeout=60, client=alice, timeout=30))

    async def async_side() -> tuple[bool, str, Job, Job, Job]:
        async with AsyncClient(url, tokens["alice"]) as alice:
            await asyncio.to_thread(barrier.wait)
            async with async_ray_session(
                "local", name="dev", idle_timeout=60, client=alice, timeout=30, keep=False
            ) as session:
                again = await async_ray_session("local", name="dev", client=alice, timeout=30)
                assert again.reattached
                assert again.job_id == session.job_id
                job = await session.submit("python train.py", name="on-dev", files={"train.py": "print(1)"})
                return session.reattached, session.address, session.job, again.job, job

    try:
        other = threading.Thread(target=sync_open)
        other.start()
        reattached, address, opened, again, ray_job = asyncio.run(async_side())
        other.join(timeout=60)
    finally:
        stop.set()
        helper.join(timeout=10)
    [sync_session] = synced
    assert sync_session.job_id == opened.id
    assert sorted([reattached, sync_session.reattached]) == [False, True]  # one opened, one re-attached
    assert len([j for j in store.list_jobs(owner="alice")[0] if j.kind == JobKind.RAY_CLUSTER]) == 1
    bridge = opened.bridges[0]
    assert address == sync_session.address == f"http://{bridge.bridge_host}:{bridge.bridge_port}"
    assert opened.state == again.state == JobState.RUNNING
    assert ray_job.spec.kind == JobKind.RAY_JOB
    assert ray_job.spec.ray is not None
    assert ray_job.spec.ray.session == str(opened.id)
    closed = store.get_job(opened.id)
    assert closed is not None
    assert closed.cancel_requested, "keep=False cancels the session on leaving the block"
