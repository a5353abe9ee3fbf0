"""The S3 mailbox end to end: porter's relay and the agent's `S3Channel` over the testbed's real
SeaweedFS S3 server, with a real job store on SQLite and on PostgreSQL.

Each test has its own `test-<uuid>/` prefix in the testbed bucket, deleted afterwards. Most tests
drive the relay one pass at a time (`relay.tick()`) so that what is applied when is exact; the
round trip and wiring tests run it in the background as porter does.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from cloudhpc.config import (
    AccessConfig,
    ClusterAccess,
    ClusterConfig,
    PorterConfig,
    Settings,
    SubmitterConfig,
)
from cloudhpc.domain.jobs import Job, JobSpec
from cloudhpc.domain.reports import JobReport
from cloudhpc.domain.states import JobState
from cloudhpc.hpc.local import LocalBackend
from cloudhpc.porter.app import create_app
from cloudhpc.porter.mailbox import MailboxRelay, mailbox_relay
from cloudhpc.porter.state import Notifier, cluster_key
from cloudhpc.storage.mailbox import KeyClock, Snapshot, down_prefix, key_time_ns, up_key, up_prefix
from cloudhpc.storage.s3 import S3ObjectStore
from cloudhpc.store import Store
from cloudhpc.submitter.agent import Agent
from cloudhpc.submitter.s3_channel import S3Channel, open_mailbox_channels

if TYPE_CHECKING:
    from tests.testbed import Testbed

CLUSTER = "edge"


@pytest.fixture
def objects(s3_objects: S3ObjectStore) -> S3ObjectStore:
    """The mailbox's medium: a fresh prefix of the testbed's S3 bucket (no local directory here)."""
    return s3_objects


@pytest.fixture
def relay(store: Store, objects: S3ObjectStore) -> MailboxRelay:
    return MailboxRelay(store, objects, [CLUSTER], ack_interval=0)


@pytest.fixture
def channel(objects: S3ObjectStore) -> S3Channel:
    return S3Channel(objects, CLUSTER, agent_name="edge-agent", heartbeat_interval=3600, poll_interval=0.05)


def submit(store: Store, cluster: str = CLUSTER, name: str = "job") -> Job:
    job, created = store.create_job("alice", JobSpec(name=name, cluster=cluster, script="echo hi"))
    assert created
    return job


def report(job: Job, seq: int, state: JobState, **fields: Any) -> JobReport:
    return JobReport(job_id=job.id, seq=seq, state=state, **fields)


def path_of(store: Store, job: Job) -> list[tuple[str | None, str]]:
    return [(t.from_state, t.to_state) for t in store.transitions(job.id)]


def latest_snapshot(objects: S3ObjectStore) -> Snapshot:
    keys = objects.list(down_prefix(CLUSTER))
    return Snapshot.model_validate_json(objects.get(keys[-1]))


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


@pytest.fixture
async def running_relay(relay: MailboxRelay) -> AsyncIterator[MailboxRelay]:
    relay.interval = 0.05
    task = asyncio.create_task(relay.run())
    yield relay
    relay.stop()
    await asyncio.wait_for(task, 10)


async def test_round_trip_through_s3(
    store: Store, channel: S3Channel, running_relay: MailboxRelay, objects: S3ObjectStore
) -> None:
    changed: list[uuid.UUID] = []
    running_relay.on_change = changed.append
    job = submit(store)
    started = time.monotonic()
    claimed = await channel.claim_work(CLUSTER, wait=10)
    dispatch = time.monotonic() - started
    assert [j.id for j in claimed] == [job.id]
    assert claimed[0].spec.script == "echo hi"
    assert dispatch < 3, f"dispatch through the mailbox took {dispatch:.2f} s"
    # The relay leased the job in the store, so no HTTP agent could take it as well.
    assert store.claim_work(CLUSTER, "someone-else") == []

    now = datetime.now(UTC)
    await channel.report([report(job, 1, JobState.PREPARING)])
    await channel.report([report(job, 2, JobState.QUEUED, slurm_job_id="4242", submitted_at=now)])
    await channel.report([report(job, 3, JobState.RUNNING, started_at=now)])
    assert await channel.upload_output(job.id, 0, b"hello\n") == 6
    await channel.report([report(job, 4, JobState.COMPLETED, exit_code=0, ended_at=now)])

    await wait_until(lambda: (j := store.get_job(job.id)) is not None and j.state == JobState.COMPLETED)
    final = store.get_job(job.id)
    assert final is not None
    assert (final.slurm_job_id, final.exit_code) == ("4242", 0)
    assert path_of(store, job)[1:] == [
        ("pending", "preparing"),
        ("preparing", "queued"),
        ("queued", "running"),
        ("running", "completed"),
    ]
    assert {t.actor for t in store.transitions(job.id)[1:]} == {"mailbox:edge"}
    assert store.read_output(job.id, 0, 100) == b"hello\n"
    await wait_until(lambda: job.id in changed)  # porter's waiters are woken after each pass
    # The finished job leaves the snapshot, and the agent's messages are deleted once acked.
    await wait_until(lambda: latest_snapshot(objects).jobs == [])
    assert (await channel.reconciliation(CLUSTER)).jobs == []
    assert objects.list(up_prefix(CLUSTER)) == []
    assert len(objects.list(down_prefix(CLUSTER))) <= 3


async def test_reports_apply_in_seq_order_and_replays_change_nothing(
    store: Store, relay: MailboxRelay, channel: S3Channel, objects: S3ObjectStore
) -> None:
    job = submit(store)
    await relay.tick()
    assert [j.id for j in await channel.claim_work(CLUSTER, wait=0)] == [job.id]
    # Reports written out of seq order (two agent tasks racing): the older one is stale.
    await channel.report([report(job, 10, JobState.PREPARING)])
    await channel.report([report(job, 30, JobState.RUNNING, slurm_job_id="7")])
    await channel.report([report(job, 20, JobState.QUEUED, slurm_job_id="7")])
    await channel.upload_output(job.id, 0, b"abc")
    await channel.upload_output(job.id, 0, b"abc")  # a retried upload
    await channel.upload_output(job.id, 3, b"def")
    await relay.tick()
    current = store.get_job(job.id)
    assert current is not None
    assert current.state == JobState.RUNNING
    assert path_of(store, job)[1:] == [("pending", "preparing"), ("preparing", "running")]
    assert store.read_output(job.id, 0, 100) == b"abcdef"
    stale_before = store.report_counts().get("stale", 0)
    assert stale_before == 1

    # Replay every message under new, later keys (a confused agent, a restored backup...).
    clock = KeyClock()
    originals = objects.list(up_prefix(CLUSTER))
    assert len(originals) == 7  # the six above, after the heartbeat of the first claim
    for key in originals:
        clock.observe(key_time_ns(key))
    for key in originals:
        objects.put(up_key(CLUSTER, clock.next()), objects.get(key))
    applied_before = relay.applied[CLUSTER]
    await relay.tick()
    assert relay.applied[CLUSTER] == applied_before + 7
    assert path_of(store, job)[1:] == [("pending", "preparing"), ("preparing", "running")]
    assert store.read_output(job.id, 0, 100) == b"abcdef"
    assert store.report_counts().get("stale", 0) == stale_before + 3


async def test_porter_restart_resumes_from_its_cursor(
    store: Store, relay: MailboxRelay, channel: S3Channel, objects: S3ObjectStore
) -> None:
    job = submit(store)
    await relay.tick()
    await channel.claim_work(CLUSTER, wait=0)
    await channel.report([report(job, 1, JobState.PREPARING)])
    await channel.report([report(job, 2, JobState.QUEUED, slurm_job_id="9")])
    await relay.tick()
    assert relay.applied[CLUSTER] == 3  # a heartbeat (first claim) and two reports
    waiting = submit(store, name="second")  # claimed by the first relay, not yet seen by the agent
    await relay.tick()
    first_snapshots = objects.list(down_prefix(CLUSTER))
    counts = store.report_counts()

    restarted = MailboxRelay(store, objects, [CLUSTER], ack_interval=0)
    await restarted.tick()
    assert restarted.applied[CLUSTER] == 0, "a restarted relay must not re-read what was applied"
    assert store.report_counts() == counts
    # Its snapshots sort after the old ones, and still offer the job the old relay had claimed.
    newest = objects.list(down_prefix(CLUSTER))[-1]
    assert newest > first_snapshots[-1]
    assert {j.id for j in latest_snapshot(objects).jobs} == {job.id, waiting.id}
    assert [j.id for j in await channel.claim_work(CLUSTER, wait=0)] == [waiting.id]

    await channel.report([report(job, 3, JobState.RUNNING)])
    await restarted.tick()
    assert restarted.applied[CLUSTER] == 1
    current = store.get_job(job.id)
    assert current is not None
    assert current.state == JobState.RUNNING


async def test_agent_deletes_only_acknowledged_messages(
    store: Store, relay: MailboxRelay, channel: S3Channel, objects: S3ObjectStore
) -> None:
    job = submit(store)
    await relay.tick()
    await channel.claim_work(CLUSTER, wait=0)
    for seq in (1, 2, 3):
        await channel.upload_output(job.id, seq - 1, b"x")
    assert len(objects.list(up_prefix(CLUSTER))) == 4  # with the first claim's heartbeat
    await relay.tick()
    ack = latest_snapshot(objects).ack
    assert ack is not None
    await channel.report([report(job, 1, JobState.PREPARING)])  # after porter's pass: not acked yet
    await channel.reconciliation(CLUSTER)  # the agent reads the snapshot and cleans up
    remaining = objects.list(up_prefix(CLUSTER))
    assert len(remaining) == 1
    assert remaining[0] > ack
    await relay.tick()
    await channel.reconciliation(CLUSTER)
    assert objects.list(up_prefix(CLUSTER)) == []
    current = store.get_job(job.id)
    assert current is not None
    assert current.state == JobState.PREPARING
    assert store.read_output(job.id, 0, 10) == b"xxx"


async def test_cancel_request_reaches_the_agent(
    store: Store, relay: MailboxRelay, channel: S3Channel
) -> None:
    job = submit(store)
    await relay.tick()
    assert [j.id for j in await channel.claim_work(CLUSTER, wait=0)] == [job.id]
    await channel.report([report(job, 1, JobState.QUEUED, slurm_job_id="11")])
    await relay.tick()
    assert await channel.claim_work(CLUSTER, wait=0) == []
    store.request_cancel(job.id, "alice")
    await relay.tick()
    work = await channel.claim_work(CLUSTER, wait=0)
    assert [(j.id, j.cancel_requested, j.state) for j in work] == [(job.id, True, JobState.QUEUED)]


async def test_messages_about_other_clusters_and_garbage_are_skipped(
    store: Store, relay: MailboxRelay, channel: S3Channel, objects: S3ObjectStore
) -> None:
    mine = submit(store)
    foreign = submit(store, cluster="elsewhere")
    await relay.tick()
    # Whoever writes this mailbox speaks for `edge` only, not for another cluster's jobs.
    await channel.report([report(foreign, 1, JobState.FAILED), report(mine, 1, JobState.PREPARING)])
    await channel.upload_output(foreign.id, 0, b"injected")
    clock = KeyClock()
    clock.observe(key_time_ns(objects.list(up_prefix(CLUSTER))[-1]))
    objects.put(up_key(CLUSTER, clock.next()), b"\x80 not json")
    objects.put(
        up_key(CLUSTER, clock.next()), b'{"version": 1, "agent": "a", "messages": [{"type": "exec"}]}'
    )
    objects.put(f"{up_prefix(CLUSTER)}README.txt", b"not a message key")
    await channel.report([report(mine, 2, JobState.QUEUED, slurm_job_id="5")])
    await relay.tick()
    other = store.get_job(foreign.id)
    assert other is not None
    assert other.state == JobState.PENDING
    assert store.read_output(foreign.id, 0, 100) == b""
    current = store.get_job(mine.id)
    assert current is not None
    assert current.state == JobState.QUEUED  # the mailbox kept going past the bad objects


async def test_heartbeats_and_accounting(store: Store, relay: MailboxRelay, objects: S3ObjectStore) -> None:
    channel = S3Channel(objects, CLUSTER, agent_name="edge-agent", heartbeat_interval=0)
    job = submit(store)
    await relay.tick()
    await channel.claim_work(CLUSTER, wait=0)  # writes a heartbeat
    record = {"slurm_job_id": "12", "records": [{"state": "COMPLETED"}], "efficiency": {"cpu": 0.5}}
    await channel.put_accounting(job.id, record)
    before = datetime.now(UTC)
    await relay.tick()
    seen = store.agents()
    assert CLUSTER in seen
    assert (before - seen[CLUSTER].replace(tzinfo=seen[CLUSTER].tzinfo or UTC)).total_seconds() < 30
    assert store.get_accounting(job.id) == record


def mailbox_settings(testbed: Testbed, objects: S3ObjectStore, tmp_path: Path) -> Settings:
    url = f"s3://{objects.bucket}/{objects.prefix}"
    return Settings(
        porter=PorterConfig(
            database=f"sqlite:///{tmp_path / 'state.db'}",
            object_store=f"file://{tmp_path / 'objects'}",
            mailbox=url,
            s3_endpoint_url=testbed.s3_endpoint,
            mailbox_clusters=[CLUSTER],
            access=AccessConfig(clusters={CLUSTER: ClusterAccess(users=["alice"])}),
        ),
        submitter=SubmitterConfig(channel="s3", mailbox=url, s3_endpoint_url=testbed.s3_endpoint),
        clusters={CLUSTER: ClusterConfig(backend="local", workdir=str(tmp_path / "work"))},
    )


@pytest.fixture
def aws_env(testbed: Testbed, monkeypatch: pytest.MonkeyPatch) -> None:
    """S3 credentials the standard way, as a deployment would pass them."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", testbed.s3_access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", testbed.s3_secret_key)


@pytest.mark.usefixtures("aws_env")
async def test_porter_app_runs_the_relay(
    testbed: Testbed, store: Store, objects: S3ObjectStore, tmp_path: Path
) -> None:
    """The wiring: `porter.mailbox_clusters` starts the relay with the app, a job posted to the API
    reaches an agent built from `submitter.mailbox` the way `serve submitter` builds it."""
    settings = mailbox_settings(testbed, objects, tmp_path)
    channels = open_mailbox_channels(settings, agent_name="wired")
    assert set(channels) == {CLUSTER}
    token = store.create_token("alice", "user")
    app = create_app(settings, store=store)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://porter") as client,
    ):
        response = await client.post(
            "/api/v1/jobs",
            json={"name": "wired", "cluster": CLUSTER, "script": "echo hi"},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert response.status_code in (200, 201, 202), response.text
        job_id = uuid.UUID(response.json()["id"])
        work = await channels[CLUSTER].claim_work(CLUSTER, wait=10)
        assert [j.id for j in work] == [job_id]
        await channels[CLUSTER].report([JobReport(job_id=job_id, seq=1, state=JobState.PREPARING)])
        await wait_until(lambda: (j := store.get_job(job_id)) is not None and j.state == JobState.PREPARING)
    assert store.agents().get(CLUSTER) is not None  # the heartbeat of the first claim


@pytest.mark.usefixtures("aws_env")
async def test_a_submission_wakes_the_relay(
    testbed: Testbed, store: Store, objects: S3ObjectStore, channel: S3Channel, tmp_path: Path
) -> None:
    """porter's job routes notify the cluster on submit; the relay then runs at once, so dispatch
    does not wait for the relay's interval (30 s here)."""
    notifier = Notifier()
    settings = mailbox_settings(testbed, objects, tmp_path)
    async with mailbox_relay(settings, store, notifier, interval=30) as relay:
        assert relay is not None
        await wait_until(lambda: objects.list(down_prefix(CLUSTER)) != [])
        assert await channel.claim_work(CLUSTER, wait=0) == []
        job = submit(store)
        started = time.monotonic()
        notifier.notify(cluster_key(CLUSTER))
        work = await channel.claim_work(CLUSTER, wait=10)
        assert [j.id for j in work] == [job.id]
        assert time.monotonic() - started < 5


async def test_the_agent_runs_a_job_through_the_mailbox(
    store: Store, objects: S3ObjectStore, running_relay: MailboxRelay, tmp_path: Path
) -> None:
    """The real agent with the local backend, talking to porter only through the bucket."""
    cluster = ClusterConfig(backend="local", workdir=str(tmp_path / "work"))
    backend = LocalBackend(CLUSTER, workdir=tmp_path / "work")
    channel = S3Channel(objects, CLUSTER, agent_name="edge-agent", poll_interval=0.05)
    agent = Agent(
        CLUSTER, cluster, backend, channel, workdir=backend.workdir, work_wait=1.0, output_interval=0.3
    )
    job, _ = store.create_job(
        "alice", JobSpec(name="through-s3", cluster=CLUSTER, script="echo hello from the mailbox")
    )
    await agent.start()
    try:
        await wait_until(lambda: (j := store.get_job(job.id)) is not None and j.state.terminal, timeout=30)
    finally:
        await agent.stop()
        await backend.close()
    final = store.get_job(job.id)
    assert final is not None
    assert final.state == JobState.COMPLETED, final.reason
    assert final.exit_code == 0
    assert b"hello from the mailbox" in store.read_output(job.id, 0, 10_000)
    # `running` may be skipped when the job ends between two polls.
    states = [to for _f, to in path_of(store, job)]
    assert states in (
        ["pending", "preparing", "queued", "running", "completed"],
        ["pending", "preparing", "queued", "completed"],
    )
