"""Rotating the S3 mailbox key without a stop, over the testbed's real S3 server.

The key files of porter (`porter.mailbox_key_dir/<cluster>.key`) and of the agent
(`submitter.mailbox_key_file`) go through the steps docs/submitter.md gives, one side at a time,
each side restarted (a new relay, a new channel, keys read from their files) after each change:
add the new key as accepted, sign with it, remove the old one. At every step a job travels both
ways (porter's snapshot with an encrypted `env` value, the agent's report) and nothing is refused.
At the end, an agent still on the old key alone is refused by porter, and refuses porter.
"""

from __future__ import annotations

import base64
import secrets
from pathlib import Path

import pytest

from cloudhpc.domain.jobs import Job, JobSpec
from cloudhpc.domain.states import JobState
from cloudhpc.porter.mailbox import MailboxRelay
from cloudhpc.storage.mailbox_seal import MailboxKey
from cloudhpc.storage.s3 import S3ObjectStore
from cloudhpc.store import Store
from cloudhpc.submitter.s3_channel import S3Channel
from tests.integration.test_mailbox import CLUSTER, report

OLD, NEW = "old", "new"

STEPS: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = [
    ("before", (OLD,), (OLD,)),
    ("1. porter accepts the new key", (OLD, NEW), (OLD,)),
    ("1. the agent accepts the new key", (OLD, NEW), (OLD, NEW)),
    ("2. porter signs with the new key", (NEW, OLD), (OLD, NEW)),
    ("2. the agent signs with the new key", (NEW, OLD), (NEW, OLD)),
    ("3. porter drops the old key", (NEW,), (NEW, OLD)),
    ("3. the agent drops the old key", (NEW,), (NEW,)),
]
"""(step, porter's key file lines, the agent's key file lines), in the order docs/submitter.md gives."""


def write_keys(path: Path, names: tuple[str, ...], secrets_by_name: dict[str, bytes]) -> MailboxKey:
    path.write_text(
        f"# {' then '.join(names)}\n"
        + "".join(base64.b64encode(secrets_by_name[n]).decode() + "\n" for n in names)
    )
    path.chmod(0o600)
    return MailboxKey.from_file(path, setting="test")


def secret_job(store: Store, step: int) -> Job:
    spec = JobSpec(name=f"rot-{step}", cluster=CLUSTER, script="echo hi", env={"API_KEY": f"value-{step}"})
    job, created = store.create_job("alice", spec)
    assert created
    return job


@pytest.mark.timeout(120)
async def test_the_mailbox_key_rotates_without_a_stop(
    store: Store, s3_objects: S3ObjectStore, tmp_path: Path
) -> None:
    material = {OLD: secrets.token_bytes(32), NEW: secrets.token_bytes(32)}
    porter_file = tmp_path / "mailbox-keys" / f"{CLUSTER}.key"
    porter_file.parent.mkdir(mode=0o700)
    agent_file = tmp_path / "agent-mailbox.key"
    for number, (step, porter_names, agent_names) in enumerate(STEPS):
        porter_key = write_keys(porter_file, porter_names, material)
        agent_key = write_keys(agent_file, agent_names, material)
        assert porter_key.fingerprint == MailboxKey(material[porter_names[0]]).fingerprint
        relay = MailboxRelay(store, s3_objects, {CLUSTER: porter_key}, ack_interval=0)
        channel = S3Channel(
            s3_objects, CLUSTER, key=agent_key, agent_name="edge-agent", heartbeat_interval=3600
        )
        job = secret_job(store, number)
        await relay.tick()
        claimed = {j.id: j for j in await channel.claim_work(CLUSTER, wait=0)}
        assert job.id in claimed, step
        assert claimed[job.id].spec.env == {"API_KEY": f"value-{number}"}, step  # decrypted
        await channel.report([report(job, 1, JobState.QUEUED, slurm_job_id=str(100 + number))])
        await relay.tick()
        current = store.get_job(job.id)
        assert current is not None
        assert current.state == JobState.QUEUED, step
        assert relay.refused == {}, step
        assert channel.refused == {}, step

    # An agent left on the old key alone after the rotation: refused both ways, nothing applied.
    stale_agent = S3Channel(
        s3_objects, CLUSTER, key=MailboxKey(material[OLD]), agent_name="edge-agent", heartbeat_interval=3600
    )
    assert await stale_agent.claim_work(CLUSTER, wait=0) == []
    assert stale_agent.refused
    await stale_agent.report([report(job, 2, JobState.RUNNING)])
    await relay.tick()
    current = store.get_job(job.id)
    assert current is not None
    assert current.state == JobState.QUEUED
    assert set(relay.refused) == {(CLUSTER, "bad_signature")}  # each of its messages


def test_a_key_file_with_two_keys_signs_with_the_first_and_accepts_both(tmp_path: Path) -> None:
    old, new = secrets.token_bytes(32), secrets.token_bytes(32)
    ring = write_keys(tmp_path / "k", (NEW, OLD), {NEW: new, OLD: old})
    assert ring.fingerprints == (MailboxKey(new).fingerprint, MailboxKey(old).fingerprint)
    assert ring.describe() == f"{MailboxKey(new).fingerprint} (also accepting {MailboxKey(old).fingerprint})"
    sealed = ring.seal("up/1", b"{}")
    assert MailboxKey(new).open("up/1", sealed) == b"{}"  # signed with the first key
    assert ring.open("up/1", MailboxKey(old).seal("up/1", b"{}")) == b"{}"  # the second is accepted
    token = MailboxKey(old).encrypt("secret", "ctx")
    assert ring.decrypt(token, "ctx", key="down/1") == "secret"
    assert MailboxKey(new).decrypt(ring.encrypt("secret", "ctx"), "ctx", key="down/1") == "secret"
    assert str(old) not in repr(ring)
    assert base64.b64encode(old).decode() not in repr(ring)
