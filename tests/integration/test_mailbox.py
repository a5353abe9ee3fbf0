"""The S3 mailbox end to end: porter's relay and the agent's `S3Channel` over the testbed's real
SeaweedFS S3 server, with a real job store on SQLite and on PostgreSQL.

Each test has its own `test-<uuid>/` prefix in the testbed bucket, deleted afterwards. Most tests
drive the relay one pass at a time (`relay.tick()`) so that what is applied when is exact; the
round trip and wiring tests run it in the background as porter does.

The attack tests play someone who can write the mailbox prefix but holds no mailbox key: what they
write, alter, replay or move is refused and counted, and the agent's backend never sees a job.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

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
from cloudhpc.exceptions import ChannelError, ConfigError
from cloudhpc.hpc.backend import JobSubmission
from cloudhpc.hpc.local import LocalBackend
from cloudhpc.metrics.agent import AgentMetrics
from cloudhpc.metrics.porter import PorterMetrics
from cloudhpc.porter.app import create_app
from cloudhpc.porter.mailbox import MailboxRelay, mailbox_relay
from cloudhpc.porter.state import Notifier, cluster_key
from cloudhpc.storage.mailbox import (
    KeyClock,
    MailboxCodec,
    OutputMessage,
    ReportMessage,
    Snapshot,
    UpBatch,
    down_key,
    down_prefix,
    key_time_ns,
    up_key,
    up_prefix,
)
from cloudhpc.storage.mailbox_seal import REASONS, MailboxKey
from cloudhpc.storage.s3 import S3ObjectStore
from cloudhpc.store import Store
from cloudhpc.submitter.agent import Agent
from cloudhpc.submitter.s3_channel import S3Channel, count_refusals, open_mailbox_channels
from tests.jobs import job_from

if TYPE_CHECKING:
    from tests.testbed import Testbed

CLUSTER = "edge"


@pytest.fixture
def objects(s3_objects: S3ObjectStore) -> S3ObjectStore:
    """The mailbox's medium: a fresh prefix of the testbed's S3 bucket (no local directory here)."""
    return s3_objects


@pytest.fixture
def key() -> MailboxKey:
    """The mailbox key porter and the agent of `edge` share."""
    return MailboxKey.generate()


@pytest.fixture
def codec(key: MailboxKey) -> MailboxCodec:
    return MailboxCodec(CLUSTER, key)


@pytest.fixture
def relay(store: Store, objects: S3ObjectStore, key: MailboxKey) -> MailboxRelay:
    return MailboxRelay(store, objects, {CLUSTER: key}, ack_interval=0)


@pytest.fixture
def channel(objects: S3ObjectStore, key: MailboxKey) -> S3Channel:
    return S3Channel(
        objects, CLUSTER, key=key, agent_name="edge-agent", heartbeat_interval=3600, poll_interval=0.05
    )


def submit(store: Store, cluster: str = CLUSTER, name: str = "job") -> Job:
    job, created = store.create_job("alice", JobSpec(name=name, cluster=cluster, script="echo hi"))
    assert created
    return job


def report(job: Job, seq: int, state: JobState, **fields: Any) -> JobReport:
    return JobReport(job_id=job.id, seq=seq, state=state, **fields)


def path_of(store: Store, job: Job) -> list[tuple[str | None, str]]:
    return [(t.from_state, t.to_state) for t in store.transitions(job.id)]


def latest_snapshot(objects: S3ObjectStore, codec: MailboxCodec) -> Snapshot:
    keys = objects.list(down_prefix(CLUSTER))
    return codec.load_snapshot(keys[-1], objects.get(keys[-1]))


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
    store: Store,
    channel: S3Channel,
    running_relay: MailboxRelay,
    objects: S3ObjectStore,
    codec: MailboxCodec,
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
    await wait_until(lambda: latest_snapshot(objects, codec).jobs == [])
    assert (await channel.reconciliation(CLUSTER)).jobs == []
    assert objects.list(up_prefix(CLUSTER)) == []
    assert len(objects.list(down_prefix(CLUSTER))) <= 3
    assert running_relay.refused == {}
    assert channel.refused == {}


async def test_reports_apply_in_seq_order_and_replays_change_nothing(
    store: Store, relay: MailboxRelay, channel: S3Channel, objects: S3ObjectStore, codec: MailboxCodec
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

    # Every message again under new, later keys, sealed with the key (a confused agent, a restored
    # backup...): authentic, and still nothing changes.
    clock = KeyClock()
    originals = objects.list(up_prefix(CLUSTER))
    assert len(originals) == 7  # the six above, after the heartbeat of the first claim
    for key in originals:
        clock.observe(key_time_ns(key))
    for key in originals:
        again = up_key(CLUSTER, clock.next())
        objects.put(again, codec.dump_batch(again, codec.load_batch(key, objects.get(key))))
    applied_before = relay.applied[CLUSTER]
    await relay.tick()
    assert relay.applied[CLUSTER] == applied_before + 7
    assert path_of(store, job)[1:] == [("pending", "preparing"), ("preparing", "running")]
    assert store.read_output(job.id, 0, 100) == b"abcdef"
    assert store.report_counts().get("stale", 0) == stale_before + 3


async def test_porter_restart_resumes_from_its_cursor(
    store: Store, relay: MailboxRelay, channel: S3Channel, objects: S3ObjectStore, key: MailboxKey
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

    restarted = MailboxRelay(store, objects, {CLUSTER: key}, ack_interval=0)
    await restarted.tick()
    assert restarted.applied[CLUSTER] == 0, "a restarted relay must not re-read what was applied"
    assert store.report_counts() == counts
    # Its snapshots sort after the old ones, and still offer the job the old relay had claimed.
    newest = objects.list(down_prefix(CLUSTER))[-1]
    assert newest > first_snapshots[-1]
    assert {j.id for j in latest_snapshot(objects, channel.codec).jobs} == {job.id, waiting.id}
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
    ack = latest_snapshot(objects, channel.codec).ack
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
    assert relay.refused == {(CLUSTER, "unsigned"): 3}
    other = store.get_job(foreign.id)
    assert other is not None
    assert other.state == JobState.PENDING
    assert store.read_output(foreign.id, 0, 100) == b""
    current = store.get_job(mine.id)
    assert current is not None
    assert current.state == JobState.QUEUED  # the mailbox kept going past the bad objects


async def test_heartbeats_and_accounting(
    store: Store, relay: MailboxRelay, objects: S3ObjectStore, key: MailboxKey
) -> None:
    channel = S3Channel(objects, CLUSTER, key=key, agent_name="edge-agent", heartbeat_interval=0)
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
    """porter and the agent of `edge` as they are deployed: the key in `<dir>/edge.key` on porter's
    side (a mounted Secret), the same file beside the HPC key on the agent's."""
    url = f"s3://{objects.bucket}/{objects.prefix}"
    keys = tmp_path / "mailbox-keys"
    keys.mkdir(exist_ok=True)
    key_file = keys / f"{CLUSTER}.key"
    if not key_file.exists():
        key_file.write_text(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
        key_file.chmod(0o600)
    return Settings(
        porter=PorterConfig(
            database=f"sqlite:///{tmp_path / 'state.db'}",
            object_store=f"file://{tmp_path / 'objects'}",
            mailbox=url,
            s3_endpoint_url=testbed.s3_endpoint,
            mailbox_clusters=[CLUSTER],
            mailbox_key_dir=keys,
            access=AccessConfig(clusters={CLUSTER: ClusterAccess(users=["alice"])}),
        ),
        submitter=SubmitterConfig(
            channel="s3", mailbox=url, s3_endpoint_url=testbed.s3_endpoint, mailbox_key_file=key_file
        ),
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
    testbed: Testbed, store: Store, objects: S3ObjectStore, tmp_path: Path
) -> None:
    """porter's job routes notify the cluster on submit; the relay then runs at once, so dispatch
    does not wait for the relay's interval (30 s here)."""
    notifier = Notifier()
    settings = mailbox_settings(testbed, objects, tmp_path)
    assert settings.submitter.mailbox_key_file is not None
    key = MailboxKey.from_file(settings.submitter.mailbox_key_file, setting="submitter.mailbox_key_file")
    channel = S3Channel(objects, CLUSTER, key=key, heartbeat_interval=3600, poll_interval=0.05)
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
    store: Store, objects: S3ObjectStore, running_relay: MailboxRelay, tmp_path: Path, key: MailboxKey
) -> None:
    """The real agent with the local backend, talking to porter only through the bucket."""
    cluster = ClusterConfig(backend="local", workdir=str(tmp_path / "work"))
    backend = LocalBackend(CLUSTER, workdir=tmp_path / "work")
    channel = S3Channel(objects, CLUSTER, key=key, agent_name="edge-agent", poll_interval=0.05)
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


# ---- someone who can write the prefix, without the mailbox key --------------------------------


class RecordingBackend(LocalBackend):
    """The local backend, remembering every job handed to it: what "SLURM saw"."""

    def __init__(self, cluster: str, *, workdir: Path) -> None:
        super().__init__(cluster, workdir=workdir)
        self.submitted: list[uuid.UUID] = []

    async def submit(self, submission: JobSubmission) -> str:
        self.submitted.append(submission.job_id)
        return await super().submit(submission)


def forged_job(script: str = "echo pwned", cluster: str = CLUSTER) -> Job:
    """A pending job porter never made, as an attacker would put it in a snapshot."""
    return job_from(
        JobSpec(name="forged", cluster=cluster, script=script, env={"STOLEN": "x"}), owner="mallory"
    )


def next_down_key(objects: S3ObjectStore) -> str:
    """A key that sorts after every snapshot in the mailbox (the attacker's clock is as good as porter's)."""
    clock = KeyClock()
    for existing in objects.list(down_prefix(CLUSTER)):
        clock.observe(key_time_ns(existing))
    return down_key(CLUSTER, clock.next())


def with_job(sealed: bytes, job: Job) -> bytes:
    """A sealed snapshot with `job` added to its body and its signature line kept."""
    header, _, body = sealed.partition(b"\n")
    doc = json.loads(body)
    doc["jobs"].append(job.model_dump(mode="json", by_alias=True))
    return header + b"\n" + json.dumps(doc).encode()


def refusals(text: str, metric: str) -> dict[str, float]:
    """{reason: count} of `edge` in a /metrics text."""
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == metric.removesuffix("_total")]
    return {s.labels["reason"]: s.value for s in family.samples if s.labels["cluster"] == CLUSTER}


async def test_env_values_are_not_readable_in_the_bucket(
    store: Store, relay: MailboxRelay, channel: S3Channel, objects: S3ObjectStore
) -> None:
    secret = f"sk-{uuid.uuid4().hex}"
    job, _ = store.create_job(
        "alice", JobSpec(name="keyed", cluster=CLUSTER, script="echo hi", env={"API_TOKEN": secret})
    )
    await relay.tick()
    work = await channel.claim_work(CLUSTER, wait=0)
    assert [(j.id, j.spec.env) for j in work] == [(job.id, {"API_TOKEN": secret})]
    await relay.tick()
    stored = objects.list("")
    assert any(k.startswith(down_prefix(CLUSTER)) for k in stored)
    for key in stored:
        raw = objects.get(key)
        assert secret.encode() not in raw, key
        assert base64.b64encode(secret.encode()) not in raw, key
    snapshot_key = objects.list(down_prefix(CLUSTER))[-1]
    assert b'"API_TOKEN"' in objects.get(snapshot_key)  # the name stays readable, the value does not


async def test_forged_altered_replayed_and_moved_snapshots_run_nothing(
    store: Store, relay: MailboxRelay, objects: S3ObjectStore, key: MailboxKey, tmp_path: Path
) -> None:
    """The agent, with a real backend, against four kinds of planted snapshot, each offering a job:
    none reaches the backend, each is refused once and counted in the agent's /metrics."""
    cancelled = submit(store, name="cancelled-later")
    await relay.tick()
    first = objects.list(down_prefix(CLUSTER))[-1]
    first_bytes = objects.get(first)  # the attacker keeps a genuine snapshot offering `cancelled`
    store.request_cancel(cancelled.id, "alice")
    await relay.tick()
    objects.delete(first)

    metrics = AgentMetrics()
    backend = RecordingBackend(CLUSTER, workdir=tmp_path / "work")
    channel = S3Channel(objects, CLUSTER, key=key, agent_name="edge-agent", poll_interval=0.05)
    count_refusals({CLUSTER: channel}, metrics)
    cluster = ClusterConfig(backend="local", workdir=str(tmp_path / "work"))
    agent = Agent(CLUSTER, cluster, backend, channel, workdir=backend.workdir, work_wait=0.2)
    await agent.start()
    try:
        for _ in range(100):  # porter's passes until the agent's cancel report is in
            await relay.tick()
            if (j := store.get_job(cancelled.id)) is not None and j.state.terminal:
                break
            await asyncio.sleep(0.1)
        genuine = objects.list(down_prefix(CLUSTER))[-1]
        unsigned, altered, replayed, moved = (forged_job() for _ in range(4))
        # 1. the protocol before signatures: plain JSON
        plain = Snapshot(cluster=CLUSTER, published_at=datetime.now(UTC), jobs=[unsigned])
        objects.put(next_down_key(objects), plain.model_dump_json(by_alias=True).encode())
        # 2. porter's newest snapshot with one more job, its signature line kept
        objects.put(next_down_key(objects), with_job(objects.get(genuine), altered))
        # 3. the genuine old snapshot back, under a newer key: it offers the job cancelled since
        objects.put(next_down_key(objects), first_bytes)
        # 4. a snapshot signed for another cluster's mailbox (the same key: one agent, two clusters)
        other = MailboxCodec("other", key)
        other_key = down_key("other", time.time_ns())
        other_bytes = other.dump_snapshot(
            other_key,
            Snapshot(cluster=CLUSTER, published_at=datetime.now(UTC), jobs=[moved]),
        )
        objects.put(next_down_key(objects), other_bytes)
        await wait_until(lambda: sum(channel.refused.values()) == 4 or backend.submitted != [])
        await asyncio.sleep(1.0)  # the agent's work loop had every chance to act
    finally:
        await agent.stop()
        await backend.close()
    assert backend.submitted == []
    for job in (unsigned, altered, replayed, moved, cancelled):
        assert await backend.find(job.id) is None
    final = store.get_job(cancelled.id)
    assert final is not None
    assert final.state == JobState.CANCELLED
    assert channel.refused == {"unsigned": 1, "bad_signature": 3}
    text = metrics.render().decode()
    assert refusals(text, "cloudhpc_mailbox_refused_snapshots_total") == {
        "unsigned": 1,
        "bad_signature": 3,
        "stale": 0,
    }


async def test_an_old_snapshot_put_back_at_its_own_key_is_stale(
    store: Store, relay: MailboxRelay, objects: S3ObjectStore, key: MailboxKey
) -> None:
    """The one replay a signature cannot refuse: a genuine snapshot at its genuine key, after the
    newer ones were deleted. A restarted agent refuses it for its age instead."""
    job = submit(store)
    await relay.tick()
    (old,) = objects.list(down_prefix(CLUSTER))
    saved = objects.get(old)
    store.request_cancel(job.id, "alice")
    await relay.tick()
    await asyncio.sleep(1.2)
    for existing in objects.list(down_prefix(CLUSTER)):
        objects.delete(existing)
    objects.put(old, saved)
    restarted = S3Channel(objects, CLUSTER, key=key, heartbeat_interval=3600, max_age=1.0)
    assert await restarted.claim_work(CLUSTER, wait=0) == []
    with pytest.raises(ChannelError, match="no snapshot"):
        await restarted.reconciliation(CLUSTER)
    assert restarted.refused == {"stale": 1}
    # The same snapshot while fresh is acted on: the age is what refused it.
    fresh = S3Channel(objects, CLUSTER, key=key, heartbeat_interval=3600, max_age=60)
    assert [j.id for j in await fresh.claim_work(CLUSTER, wait=0)] == [job.id]


async def test_forged_altered_and_moved_messages_change_nothing(
    store: Store, relay: MailboxRelay, channel: S3Channel, objects: S3ObjectStore, key: MailboxKey
) -> None:
    """porter's side: planted up objects are not applied, are counted in porter's /metrics, and a
    planted key that sorts after the agent's does not hide the agent's later messages."""
    metrics = PorterMetrics(store, clusters=[CLUSTER])
    relay.on_refused = metrics.mailbox_refusals([CLUSTER], REASONS)
    job = submit(store)
    await relay.tick()
    await channel.claim_work(CLUSTER, wait=0)
    await channel.report([report(job, 1, JobState.QUEUED, slurm_job_id="21")])
    await relay.tick()
    genuine = objects.list(up_prefix(CLUSTER))[-1]
    sealed = objects.get(genuine)

    clock = KeyClock()
    clock.observe(key_time_ns(genuine))
    forged = UpBatch(
        agent="edge-agent",
        messages=[
            ReportMessage(report=report(job, 50, JobState.COMPLETED, exit_code=0)),
            OutputMessage.of(job.id, 0, b"forged output"),
        ],
    )
    objects.put(up_key(CLUSTER, clock.next()), forged.model_dump_json().encode())  # unsigned
    header, _, body = sealed.partition(b"\n")
    altered = body.replace(b'"seq":1', b'"seq":60').replace(b'"queued"', b'"failed"')
    assert altered != body
    objects.put(up_key(CLUSTER, clock.next()), header + b"\n" + altered)  # altered in place of a copy
    objects.put(up_key(CLUSTER, clock.next()), sealed)  # a genuine message moved to a newer key
    other = MailboxCodec("other", key)  # signed for another cluster's mailbox with the same key
    other_key = up_key("other", clock.next())
    objects.put(up_key(CLUSTER, clock.next()), other.dump_batch(other_key, forged))
    planted = f"{up_prefix(CLUSTER)}{'9' * 20}-00000000.json"
    objects.put(planted, forged.model_dump_json().encode())
    objects.put(f"{down_prefix(CLUSTER)}{'9' * 20}.json", b"{}")  # would push porter's snapshots out
    await relay.tick()
    # The agent, restarted after all of that, still finds a stamp to write with.
    restarted = S3Channel(objects, CLUSTER, key=key, agent_name="edge-agent", heartbeat_interval=3600)
    await restarted.report([report(job, 2, JobState.RUNNING)])
    await relay.tick()
    await relay.tick()  # a second pass reads nothing again (each refused object is counted once)

    current = store.get_job(job.id)
    assert current is not None
    assert (current.state, current.exit_code) == (JobState.RUNNING, None)
    assert store.read_output(job.id, 0, 100) == b""
    assert relay.refused == {(CLUSTER, "unsigned"): 2, (CLUSTER, "bad_signature"): 3}
    assert refusals(metrics.render().decode(), "cloudhpc_mailbox_refused_objects_total") == {
        "unsigned": 2,
        "bad_signature": 3,
        "stale": 0,
    }
    assert planted in objects.list(up_prefix(CLUSTER))  # left as evidence, never applied
    # The planted snapshot key is gone, and the agent reads porter's newest.
    assert all(k < f"{down_prefix(CLUSTER)}{'9' * 20}.json" for k in objects.list(down_prefix(CLUSTER)))
    assert [j.state for j in (await channel.reconciliation(CLUSTER)).jobs] == [JobState.RUNNING]


@pytest.mark.usefixtures("aws_env")
async def test_a_missing_key_stops_both_sides_at_startup(
    testbed: Testbed, store: Store, objects: S3ObjectStore, tmp_path: Path
) -> None:
    settings = mailbox_settings(testbed, objects, tmp_path)
    unset_agent = settings.model_copy(
        update={"submitter": settings.submitter.model_copy(update={"mailbox_key_file": None})}
    )
    with pytest.raises(ConfigError, match=r"submitter\.mailbox_key_file: not set.*openssl rand"):
        open_mailbox_channels(unset_agent)
    unset_porter = settings.model_copy(
        update={"porter": settings.porter.model_copy(update={"mailbox_key_dir": None})}
    )
    with pytest.raises(ConfigError, match=r"porter\.mailbox_key_dir: not set"):
        create_app(unset_porter, store=store)
    empty = tmp_path / "empty-keys"
    empty.mkdir()
    elsewhere = settings.model_copy(
        update={"porter": settings.porter.model_copy(update={"mailbox_key_dir": empty})}
    )
    with pytest.raises(ConfigError, match=r"porter\.mailbox_key_dir: .*edge\.key does not exist"):
        create_app(elsewhere, store=store)
