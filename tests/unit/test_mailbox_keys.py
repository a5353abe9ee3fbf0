"""Key naming, clocks, message formats and the agent's cursor logic of the S3 mailbox.

The channel tests use the local-directory object store (a real backend, no S3 needed): the logic
under test is the cursor and hand-out bookkeeping, which is the same over both backends.
"""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID, uuid4

import pytest
from pydantic import ValidationError

from cloudhpc.domain.jobs import Job, JobSpec
from cloudhpc.domain.reports import JobReport
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import ChannelError, ConfigError
from cloudhpc.storage import LocalObjectStore
from cloudhpc.storage.mailbox import (
    TIME_DIGITS,
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
    up_key,
    up_prefix,
)
from cloudhpc.storage.mailbox_seal import MailboxKey, Refused
from cloudhpc.submitter.s3_channel import S3Channel
from tests.jobs import job_from

KEY = MailboxKey.generate()
CODEC = MailboxCodec("c1", KEY)


def make_job(state: JobState = JobState.PENDING, *, cancel: bool = False, cluster: str = "c1") -> Job:
    return job_from(
        JobSpec(name="j", cluster=cluster, script="echo hi"), state=state, cancel_requested=cancel
    )


# ---- keys ------------------------------------------------------------------------------------


def test_key_layout() -> None:
    assert up_prefix("mahti") == "mailbox/mahti/up/"
    assert down_prefix("mahti") == "mailbox/mahti/down/"
    assert cursor_key("mahti") == "mailbox/mahti/porter-cursor.json"
    assert up_key("mahti", 1_700_000_000_123_456_789, "0badcafe") == (
        "mailbox/mahti/up/01700000000123456789-0badcafe.json"
    )
    assert down_key("mahti", 42) == "mailbox/mahti/down/00000000000000000042.json"


@pytest.mark.parametrize(
    ("earlier", "later"),
    [(9, 10), (99, 100), (1_699_999_999_999_999_999, 1_700_000_000_000_000_000), (5, 6)],
)
def test_lexicographic_order_is_time_order(earlier: int, later: int) -> None:
    # Zero padding is what makes a string cursor (S3 StartAfter) follow time.
    assert down_key("c", earlier) < down_key("c", later)
    assert up_key("c", earlier, "ffffffff") < up_key("c", later, "00000000")


def test_stamps_round_trip_and_foreign_names_are_none() -> None:
    ns = time.time_ns()
    assert key_time_ns(up_key("c", ns)) == ns
    assert key_time_ns(down_key("c", ns)) == ns
    for name in [
        "mailbox/c/up/123-0badcafe.json",
        "mailbox/c/up/01700000000123456789-0BADCAFE.json",
        "mailbox/c/up/01700000000123456789.json.tmp",
        "mailbox/c/porter-cursor.json",
        "mailbox/c/down/x.json",
    ]:
        assert key_time_ns(name) is None, name


@pytest.mark.parametrize("cluster", ["", "a/b", "..", "a b", "x" * 65, "$(id)"])
def test_unsafe_cluster_names_never_reach_a_key(cluster: str) -> None:
    with pytest.raises(ValueError, match="cluster name"):
        up_prefix(cluster)


def test_stamp_and_nonce_ranges() -> None:
    with pytest.raises(ValueError, match="out of range"):
        down_key("c", 0)
    with pytest.raises(ValueError, match="out of range"):
        down_key("c", 10**TIME_DIGITS)
    with pytest.raises(ValueError, match="nonce"):
        up_key("c", 1, "../../x")
    assert up_key("c", 1) != up_key("c", 1)  # random nonces


# ---- the clock --------------------------------------------------------------------------------


def test_clock_strictly_increases_within_one_tick() -> None:
    clock = KeyClock()
    stamps = [clock.next() for _ in range(10_000)]
    assert stamps == sorted(set(stamps))


def test_clock_never_goes_below_what_was_observed() -> None:
    clock = KeyClock()
    future = time.time_ns() + 3_600 * 10**9  # a key written by a machine whose clock is an hour ahead
    clock.observe(future)
    clock.observe(None)
    clock.observe(5)
    assert clock.next() == future + 1
    assert clock.next() == future + 2


# ---- messages ---------------------------------------------------------------------------------


def test_output_bytes_survive_json() -> None:
    data = bytes(range(256)) * 3
    message = OutputMessage.of(uuid4(), 17, data)
    batch = UpBatch(agent="a", messages=[message])
    back = UpBatch.model_validate_json(batch.model_dump_json())
    out = back.messages[0]
    assert isinstance(out, OutputMessage)
    assert (out.offset, out.data) == (17, data)


def test_bad_messages_are_rejected() -> None:
    job_id = str(uuid4())
    bad = [
        {"version": 1, "agent": "a", "messages": []},
        {
            "version": 2,
            "agent": "a",
            "messages": [{"type": "heartbeat", "agent": "a", "at": "2024-01-01T00:00:00Z"}],
        },
        {"version": 1, "agent": "a", "messages": [{"type": "exec", "cmd": "rm -rf /"}]},
        {
            "version": 1,
            "agent": "a",
            "messages": [{"type": "output", "job_id": job_id, "offset": 0, "data_b64": "@@@"}],
        },
        {
            "version": 1,
            "agent": "a",
            "messages": [{"type": "output", "job_id": job_id, "offset": -1, "data_b64": ""}],
        },
        {
            "version": 1,
            "agent": "a",
            "messages": [{"type": "report", "report": {"job_id": job_id, "seq": 0, "state": "running"}}],
        },
    ]
    for body in bad:
        with pytest.raises(ValidationError):
            UpBatch.model_validate_json(json.dumps(body))


def test_mixed_batch_keeps_order_and_types() -> None:
    job_id = uuid4()
    batch = UpBatch(
        agent="a",
        messages=[
            ReportMessage(report=JobReport(job_id=job_id, seq=1, state=JobState.PREPARING)),
            HeartbeatMessage(agent="a", at=datetime.now(UTC)),
            OutputMessage.of(job_id, 0, b"x"),
        ],
    )
    back = UpBatch.model_validate_json(batch.model_dump_json())
    assert [m.type for m in back.messages] == ["report", "heartbeat", "output"]


def test_snapshot_round_trips_jobs() -> None:
    jobs = [make_job(), make_job(JobState.RUNNING, cancel=True)]
    snap = Snapshot(cluster="c1", published_at=datetime.now(UTC), jobs=jobs, ack=up_key("c1", 5, "00000000"))
    back = Snapshot.model_validate_json(snap.model_dump_json(by_alias=True))
    assert back == snap
    assert PorterCursor.model_validate_json(PorterCursor().model_dump_json()) == PorterCursor()


# ---- sealing ----------------------------------------------------------------------------------


def test_a_sealed_object_opens_only_at_its_key_with_its_key() -> None:
    key = up_key("c1", 5, "00000000")
    sealed = KEY.seal(key, b'{"a": 1}')
    assert sealed.startswith(b"cloudhpc-mailbox/1 hmac-sha256=")
    assert KEY.open(key, sealed) == b'{"a": 1}'
    cases = {
        "unsigned": [(key, b'{"a": 1}'), (key, b""), (key, sealed.partition(b"\n")[2])],
        "bad_signature": [
            (key, sealed.replace(b'"a": 1', b'"a": 2')),  # altered
            (up_key("c1", 6, "00000000"), sealed),  # moved to a later key
            (up_key("c2", 5, "00000000"), sealed),  # moved to another cluster's mailbox
        ],
    }
    for reason, attempts in cases.items():
        for where, data in attempts:
            with pytest.raises(Refused) as caught:
                KEY.open(where, data)
            assert caught.value.reason == reason
    with pytest.raises(Refused, match="signature does not match"):
        MailboxKey.generate().open(key, sealed)


def test_values_are_encrypted_for_their_place() -> None:
    token = KEY.encrypt("s3cret", "c1/job/env/TOKEN")
    assert "s3cret" not in token
    assert token != KEY.encrypt("s3cret", "c1/job/env/TOKEN")  # a fresh nonce each time
    assert KEY.decrypt(token, "c1/job/env/TOKEN", key="k") == "s3cret"
    for context in ("c1/job/env/OTHER", "c2/job/env/TOKEN"):
        with pytest.raises(Refused, match="does not open"):
            KEY.decrypt(token, context, key="k")


def test_a_snapshot_carries_env_values_encrypted() -> None:
    job = make_job()
    job = job.model_copy(update={"spec": job.spec.model_copy(update={"env": {"TOKEN": "s3cret-value"}})})
    key = down_key("c1", 7)
    snap = Snapshot(cluster="c1", published_at=datetime.now(UTC), jobs=[job], unaccounted=[job])
    sealed = CODEC.dump_snapshot(key, snap)
    assert b"s3cret-value" not in sealed
    assert b'"TOKEN"' in sealed
    assert CODEC.load_snapshot(key, sealed) == snap
    # Another cluster's codec with the same key opens neither the object nor the values.
    with pytest.raises(Refused):
        MailboxCodec("c2", KEY).load_snapshot(key, sealed)


def test_key_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = tmp_path / "good.key"
    good.write_text(base64.b64encode(bytes(range(32))).decode() + "\n")
    good.chmod(0o600)
    key = MailboxKey.from_file(good, setting="submitter.mailbox_key_file")
    assert "readable by other users" not in caplog.text
    good.chmod(0o644)
    MailboxKey.from_file(good, setting="submitter.mailbox_key_file")
    assert "good.key is readable by other users (mode 644)" in caplog.text
    assert repr(key) == f"MailboxKey(fingerprint={key.fingerprint})"
    assert key.fingerprint == MailboxKey.from_file(good, setting="x").fingerprint
    short = tmp_path / "short.key"
    short.write_text(base64.b64encode(b"sixteen byte key").decode())
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not base64 at all!")
    for path, message in (
        (tmp_path / "missing.key", "does not exist"),
        (short, "holds 16 bytes, at least 32"),
        (garbage, "is not base64"),
    ):
        with pytest.raises(ConfigError, match=message) as caught:
            MailboxKey.from_file(path, setting="submitter.mailbox_key_file")
        text = str(caught.value)
        assert text.startswith("submitter.mailbox_key_file: ")
        assert "openssl rand -base64 32" in text
        assert "sixteen" not in text
        assert "base64 at all" not in text


# ---- the agent's cursor ------------------------------------------------------------------------


def publish(store: LocalObjectStore, ns: int, jobs: list[Job], ack: str | None = None) -> str:
    """A snapshot as porter seals it, stamped now + `ns` (later calls sort later)."""
    key = down_key("c1", time.time_ns() + ns)
    snap = Snapshot(cluster="c1", published_at=datetime.now(UTC), jobs=jobs, ack=ack)
    store.put(key, CODEC.dump_snapshot(key, snap))
    return key


def batch_at(store: LocalObjectStore, key: str) -> UpBatch:
    return CODEC.load_batch(key, store.get(key))


@pytest.fixture
def objects(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "objects")


async def test_channel_reads_only_the_newest_snapshot(objects: LocalObjectStore) -> None:
    channel = S3Channel(objects, "c1", key=KEY, heartbeat_interval=3600)
    with pytest.raises(ChannelError, match="no snapshot"):
        await channel.reconciliation("c1")
    old, new = make_job(), make_job()
    publish(objects, 10, [old])
    publish(objects, 20, [new])
    assert [j.id for j in (await channel.reconciliation("c1")).jobs] == [new.id]
    # Nothing newer: the cursor stays and the same snapshot keeps answering.
    assert [j.id for j in (await channel.reconciliation("c1")).jobs] == [new.id]
    with pytest.raises(ChannelError, match="serves cluster"):
        await channel.reconciliation("c2")


async def test_pending_and_cancel_are_handed_out_once_per_lease(objects: LocalObjectStore) -> None:
    channel = S3Channel(objects, "c1", key=KEY, heartbeat_interval=3600, lease_seconds=30)
    pending, running, cancel = make_job(), make_job(JobState.RUNNING), make_job(JobState.QUEUED, cancel=True)
    publish(objects, 10, [pending, running, cancel])
    first = await channel.claim_work("c1", wait=0)
    assert {j.id for j in first} == {pending.id, cancel.id}
    assert await channel.claim_work("c1", wait=0) == []
    # The pending job now has a cancel request: that is a new action, handed out at once.
    cancelled = pending.model_copy(update={"cancel_requested": True})
    publish(objects, 11, [cancelled, running, cancel])
    assert [j.id for j in await channel.claim_work("c1", wait=0)] == [pending.id]


async def test_hand_out_again_after_the_lease(objects: LocalObjectStore) -> None:
    channel = S3Channel(objects, "c1", key=KEY, heartbeat_interval=3600, lease_seconds=0.2)
    job = make_job()
    publish(objects, 10, [job])
    assert [j.id for j in await channel.claim_work("c1", wait=0)] == [job.id]
    started = time.monotonic()
    assert [j.id for j in await channel.claim_work("c1", wait=2)] == [job.id]
    assert 0.15 <= time.monotonic() - started < 1.5


async def test_claim_waits_for_a_snapshot(objects: LocalObjectStore) -> None:
    channel = S3Channel(objects, "c1", key=KEY, heartbeat_interval=3600, poll_interval=0.05)
    started = time.monotonic()
    assert await channel.claim_work("c1", wait=0.3) == []
    assert 0.25 <= time.monotonic() - started < 1.0


async def test_up_keys_follow_the_ack_and_acked_ones_are_deleted(objects: LocalObjectStore) -> None:
    # Porter acknowledged a key stamped an hour ahead of this machine's clock (another machine).
    ahead = time.time_ns() + 3_600 * 10**9
    acked = up_key("c1", ahead, "00000000")
    publish(objects, 10, [], ack=acked)
    channel = S3Channel(objects, "c1", key=KEY, heartbeat_interval=3600)
    job_id = uuid4()
    await channel.report([JobReport(job_id=job_id, seq=1, state=JobState.PREPARING)])
    size = await channel.upload_output(job_id, 0, b"hello")
    assert size == 5
    keys = objects.list(up_prefix("c1"))
    assert len(keys) == 2
    assert all(k > acked for k in keys), "a new key behind porter's cursor would never be read"
    first = batch_at(objects, keys[0])
    assert isinstance(first.messages[0], ReportMessage)
    # Porter acknowledges the first one: the agent deletes it (and only it) on its next read.
    publish(objects, 11, [], ack=keys[0])
    await channel.reconciliation("c1")
    assert objects.list(up_prefix("c1")) == keys[1:]


async def test_heartbeat_written_when_idle(objects: LocalObjectStore) -> None:
    publish(objects, 10, [])
    channel = S3Channel(objects, "c1", key=KEY, agent_name="edge", heartbeat_interval=0.1, poll_interval=0.05)
    await channel.claim_work("c1", wait=0.35)
    beats = [batch_at(objects, k) for k in objects.list(up_prefix("c1"))]
    assert 2 <= len(beats) <= 5
    assert all(isinstance(b.messages[0], HeartbeatMessage) and b.agent == "edge" for b in beats)


def test_job_ids_in_messages_are_uuids() -> None:
    message = OutputMessage.of(UUID(int=1), 0, b"")
    assert message.job_id == UUID(int=1)
    assert message.data == b""


# ---- configuration ------------------------------------------------------------------------------


def test_mailbox_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from cloudhpc.config import PorterConfig, Settings, SubmitterConfig

    with pytest.raises(ValidationError, match=r"submitter\.mailbox"):
        SubmitterConfig(channel="s3")
    with pytest.raises(ValidationError, match="s3://"):
        SubmitterConfig(channel="s3", mailbox="http://bucket/x")
    assert SubmitterConfig(channel="s3", mailbox="s3://bucket/x").mailbox == "s3://bucket/x"
    with pytest.raises(ValidationError, match=r"porter\.mailbox"):
        PorterConfig(object_store="/srv/objects", mailbox_clusters=["edge"])
    # the mailbox defaults to porter's object store, whose keys it shares (`mailbox/...`)
    assert PorterConfig(object_store="s3://b/p", mailbox_clusters=["edge"]).mailbox is None
    with pytest.raises(ValidationError):
        PorterConfig(mailbox_clusters=["../x"])
    monkeypatch.setenv("CLOUDHPC_PORTER__MAILBOX_CLUSTERS", '["edge", "mahti"]')
    monkeypatch.setenv("CLOUDHPC_PORTER__S3_ENDPOINT_URL", "https://a3s.fi")
    settings = Settings()
    assert settings.porter.mailbox_clusters == ["edge", "mahti"]
    assert settings.porter.s3_endpoint_url == "https://a3s.fi"
