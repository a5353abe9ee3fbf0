"""Job artifacts in the testbed's real S3 server (SeaweedFS) and in a local directory: the layout
the agent writes, porter's listing with presigned URLs (fetched for real) or its streaming route,
the agent route's prefix check, and the retention sweep."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from cloudhpc.config import PorterConfig, Settings
from cloudhpc.domain.jobs import Job, JobSpec
from cloudhpc.domain.reports import JobReport
from cloudhpc.domain.states import JobState
from cloudhpc.porter.app import create_app
from cloudhpc.porter.mailbox import MailboxRelay
from cloudhpc.porter.retention import retention, sweep_artifacts
from cloudhpc.storage import ObjectStore
from cloudhpc.storage.artifacts import ArtifactWriter, artifact_key, delete_job_artifacts, job_prefix
from cloudhpc.storage.mailbox_seal import MailboxKey
from cloudhpc.storage.s3 import S3ObjectStore
from cloudhpc.store import Store
from cloudhpc.submitter.s3_channel import S3Channel
from tests.testbed import Testbed

SCRIPT = "#!/bin/bash\n#SBATCH --job-name=chpc-x\necho hi\n"


def submit(store: Store, owner: str = "alice") -> Job:
    spec = JobSpec(
        name="train",
        cluster="local",
        script="echo hi",
        files={"conf/params.yaml": "lr: 0.1\n", "data dir/in.txt": "x\n"},
    )
    job, _ = store.create_job(owner, spec)
    return job


def end(store: Store, job: Job, ended_at: datetime) -> None:
    for seq, state in enumerate(
        (JobState.PREPARING, JobState.QUEUED, JobState.RUNNING, JobState.COMPLETED), 1
    ):
        fields = {"ended_at": ended_at, "exit_code": 0} if state == JobState.COMPLETED else {}
        store.apply_report(JobReport(job_id=job.id, seq=seq, state=state, **fields), actor="test")


def write_all(objects: ObjectStore, job: Job, tmp_path: Path, output: bytes) -> list[str]:
    writer = ArtifactWriter(objects)
    log = tmp_path / "output.log"
    log.write_bytes(output)
    record = {
        "slurm_job_id": "7",
        "records": [{"step": None, "state": "COMPLETED"}],
        "efficiency": {"cpu": 0.5},
    }
    return [
        *writer.save_submission(job, batch_script=SCRIPT),
        *writer.save_output(job, log),
        *writer.save_accounting(job, record),
    ]


def test_layout_and_contents(objects: ObjectStore, store: Store, tmp_path: Path, testbed: Testbed) -> None:
    job = submit(store)
    output = os.urandom(1024) * (12 * 1024)  # 12 MiB: above the multipart threshold
    keys = write_all(objects, job, tmp_path, output)
    prefix = f"jobs/alice/{job.id}/"
    assert keys == [
        prefix + "spec.json",
        prefix + "job.sh",
        prefix + "files/conf/params.yaml",
        prefix + "files/data dir/in.txt",
        prefix + "output.log",
        prefix + "sacct.json",
        prefix + "efficiency.json",
    ]
    assert objects.list(prefix) == sorted(keys)
    assert json.loads(objects.get(prefix + "spec.json")) == job.spec.model_dump(mode="json", by_alias=True)
    assert objects.get(prefix + "job.sh").decode() == SCRIPT
    assert objects.get(prefix + "files/data dir/in.txt") == b"x\n"
    assert objects.get(prefix + "output.log") == output
    assert b"".join(objects.iter_bytes(prefix + "output.log", chunk_size=1 << 20)) == output
    assert json.loads(objects.get(prefix + "sacct.json")) == {
        "slurm_job_id": "7",
        "records": [{"step": None, "state": "COMPLETED"}],
    }
    assert json.loads(objects.get(prefix + "efficiency.json")) == {"cpu": 0.5}
    ArtifactWriter(objects).save_accounting(job, {"slurm_job_id": "7", "final": False, "records": []})
    assert json.loads(objects.get(prefix + "sacct.json")) == {
        "slurm_job_id": "7",
        "records": [],
        "final": False,
    }
    write_all(objects, job, tmp_path, output)  # the final document replaces it
    for key in keys:
        assert not objects.get(key).startswith(b"\x80")  # JSON and text, never a pickle
    if isinstance(objects, S3ObjectStore):
        client = testbed.s3_client()
        etag = client.head_object(Bucket=objects.bucket, Key=objects.prefix + prefix + "output.log")["ETag"]
        assert "-" in etag, f"a 12 MiB log must go up in parts (ETag {etag})"


def test_porter_lists_and_serves_artifacts(objects: ObjectStore, store: Store, tmp_path: Path) -> None:
    settings = Settings(porter=PorterConfig(object_store=f"file://{tmp_path / 'unused'}"))
    alice = store.create_token("alice", "user")
    bob = store.create_token("bob", "user")
    agent = store.create_token("agent-local", "agent", ["local"])
    job = submit(store)
    keys = write_all(objects, job, tmp_path, b"the output\n")
    with TestClient(create_app(settings, store=store, object_store=objects)) as client:

        def call(method: str, path: str, token: str, **kwargs: object) -> httpx.Response:
            return client.request(method, path, headers={"Authorization": f"Bearer {token}"}, **kwargs)  # type: ignore[arg-type]

        base = f"/api/v1/agent/jobs/{job.id}/artifacts"
        assert call("POST", base, agent, json={"keys": keys[:3]}).status_code == 200
        assert call("POST", base, agent, json={"keys": keys[2:]}).json()["artifacts"] == keys  # merged
        foreign = call("POST", base, agent, json={"keys": [f"jobs/bob/{job.id}/job.sh"]})
        assert foreign.status_code == 422
        assert foreign.json()["error"]["details"][0]["field"] == "keys"
        assert call("POST", base, alice, json={"keys": keys}).status_code == 403

        listing = call("GET", f"/api/v1/jobs/{job.id}/artifacts", alice).json()["artifacts"]
        by_name = {item["name"]: item for item in listing}
        assert set(by_name) == {k.removeprefix(job_prefix("alice", job.id)) for k in keys}
        for name, item in by_name.items():
            expected = objects.get(item["key"])
            if isinstance(objects, S3ObjectStore):
                assert "X-Amz-Signature=" in item["url"]
                fetched = httpx.get(item["url"], timeout=10)  # presigned: no token, straight from S3
            else:
                assert item["url"].startswith("http://testserver/api/v1/jobs/")
                fetched = call("GET", item["url"], alice)
            assert fetched.status_code == 200, (name, fetched.text)
            assert fetched.content == expected, name
        streamed = call("GET", f"/api/v1/jobs/{job.id}/artifacts/output.log", alice)
        assert streamed.content == b"the output\n"
        assert streamed.headers["content-type"].startswith("text/plain")
        assert call("GET", f"/api/v1/jobs/{job.id}/artifacts", bob).status_code == 404
        assert call("GET", f"/api/v1/jobs/{job.id}/artifacts/output.log", bob).status_code == 404
        assert call("GET", f"/api/v1/jobs/{job.id}/artifacts/nothing.txt", alice).status_code == 404
        climbing = call("GET", f"/api/v1/jobs/{job.id}/artifacts/%2E%2E/%2E%2E/bob/x", alice)
        assert climbing.status_code == 404


ODD_KEYS = [
    "{prefix}../../bob/x",  # climbs out of the job's prefix while starting with it
    "{prefix}a/../../../bob/x",
    "{prefix}./job.sh",
    "{prefix}a//b",
    "{prefix}x\\y",
    "{prefix}x\ny",
    "/{prefix}job.sh",
    "{prefix}",
]


def test_odd_artifact_keys_are_refused_and_never_break_the_listing(
    objects: ObjectStore, store: Store, tmp_path: Path
) -> None:
    """An agent reporting `..` (or absolute, or otherwise odd) keys gets 422, and a bad key already
    recorded leaves the owner's listing working (it answered 502)."""
    settings = Settings(porter=PorterConfig(object_store=f"file://{tmp_path / 'unused'}"))
    alice = store.create_token("alice", "user")
    agent = store.create_token("agent-local", "agent", ["local"])
    job = submit(store)
    keys = write_all(objects, job, tmp_path, b"the output\n")
    prefix = job_prefix("alice", job.id)
    odd = [key.format(prefix=prefix) for key in ODD_KEYS]
    with TestClient(create_app(settings, store=store, object_store=objects)) as client:
        auth = {"agent": {"Authorization": f"Bearer {agent}"}, "alice": {"Authorization": f"Bearer {alice}"}}
        route = f"/api/v1/agent/jobs/{job.id}/artifacts"
        assert client.post(route, json={"keys": keys}, headers=auth["agent"]).status_code == 200
        for key in odd:
            refused = client.post(route, json={"keys": [keys[0], key]}, headers=auth["agent"])
            assert refused.status_code == 422, key
            assert refused.json()["error"]["details"][0]["field"] == "keys"
        assert store.get_job(job.id).artifacts == keys  # nothing of a refused report was kept

        store.add_artifacts(job.id, odd)  # as recorded by a porter that did not check
        listing = client.get(f"/api/v1/jobs/{job.id}/artifacts", headers=auth["alice"])
        assert listing.status_code == 200, listing.text
        assert sorted(item["key"] for item in listing.json()["artifacts"]) == sorted(keys)
    assert delete_job_artifacts(objects, "alice", job.id, store.get_job(job.id).artifacts) >= len(keys)
    assert objects.list(prefix) == []


def test_retention_deletes_only_old_artifacts(objects: ObjectStore, store: Store, tmp_path: Path) -> None:
    old, recent, live = submit(store), submit(store, owner="bob"), submit(store)
    end(store, old, datetime.now(UTC) - timedelta(days=40))
    end(store, recent, datetime.now(UTC) - timedelta(days=2))
    for job in (old, recent, live):
        store.add_artifacts(job.id, write_all(objects, job, tmp_path, b"log\n"))
    stray = artifact_key(old.owner, old.id, "files/written-but-never-reported")
    objects.put(stray, b"?")

    assert sweep_artifacts(store, objects, datetime.now(UTC) - timedelta(days=30), batch=1) == 1
    assert objects.list(job_prefix(old.owner, old.id)) == []
    swept = store.get_job(old.id)
    assert swept is not None
    assert swept.artifacts == []
    assert swept.state == JobState.COMPLETED  # the job itself stays
    for job in (recent, live):
        current = store.get_job(job.id)
        assert current is not None
        assert current.artifacts
        assert objects.list(job_prefix(job.owner, job.id)) == sorted(current.artifacts)
    assert sweep_artifacts(store, objects, datetime.now(UTC) - timedelta(days=30)) == 0


async def test_retention_reconciler_runs_in_porter(
    objects: ObjectStore, store: Store, tmp_path: Path
) -> None:
    job = submit(store)
    end(store, job, datetime.now(UTC) - timedelta(hours=2))
    store.add_artifacts(job.id, write_all(objects, job, tmp_path, b"log\n"))
    settings = Settings(porter=PorterConfig(artifact_retention_days=1 / 24, artifact_sweep_interval=0.2))
    async with retention(settings, store, objects):
        for _ in range(50):
            current = store.get_job(job.id)
            if current is not None and not current.artifacts:
                break
            await asyncio.sleep(0.1)
    assert objects.list(job_prefix(job.owner, job.id)) == []


async def test_keys_reported_through_the_s3_mailbox(store: Store, s3_objects: S3ObjectStore) -> None:
    """An agent behind the S3 mailbox reports its keys there; porter's relay records those under
    the job's prefix and refuses the rest."""
    mailbox = s3_objects
    job, _ = store.create_job("alice", JobSpec(name="edge", cluster="edge", script="echo hi"))
    key = MailboxKey.generate()
    relay = MailboxRelay(store, mailbox, {"edge": key}, ack_interval=0)
    channel = S3Channel(mailbox, "edge", key=key, heartbeat_interval=3600)
    await relay.tick()
    mine = artifact_key("alice", job.id, "job.sh")
    await channel.put_artifacts(job.id, [mine, f"jobs/bob/{job.id}/job.sh"])
    await relay.tick()
    current = store.get_job(job.id)
    assert current is not None
    assert current.artifacts == [mine]
