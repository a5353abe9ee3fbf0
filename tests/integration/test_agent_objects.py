"""Objects through porter: an agent with no object store of its own (the compose submitter on a
laptop) reads job inputs and writes artifacts through porter's agent routes.

porter runs under uvicorn on a loopback port (the real HTTP path: chunked bodies, the app-wide body
limit), over a local directory or the testbed's S3; the agent side is `PorterFileFetcher` and
`PorterArtifactWriter`, as `serve submitter` builds them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cloudhpc.config import PorterConfig, Settings
from cloudhpc.domain.jobs import Job, JobSpec
from cloudhpc.exceptions import ObjectNotFound, StorageError
from cloudhpc.porter import routes_agent_objects
from cloudhpc.porter.app import create_app
from cloudhpc.storage import LocalObjectStore, ObjectStore
from cloudhpc.storage.artifacts import ArtifactWriter
from cloudhpc.store import Store
from cloudhpc.submitter.porter_objects import PorterArtifactWriter, PorterFileFetcher, PorterObjects
from tests.integration.stores import object_url, served, store_url

CAP = 16 << 20
"""The artifact cap in these tests (porter's default is 1 GiB): above the 8 MiB app-wide limit,
so an artifact between the two shows the upload route has its own."""


class Porter:
    def __init__(self, url: str, store: Store, objects: ObjectStore) -> None:
        self.url = url
        self.store = store
        self.objects = objects
        self.agent = store.create_token("alice", "agent", ["local"])
        self.other_agent = store.create_token("carol", "agent", ["elsewhere"])
        self.user = store.create_token("alice", "user")

    def through(self, token: str | None = None) -> PorterObjects:
        return PorterObjects(self.url, token or self.agent, attempts=1)


@pytest.fixture
def porter(
    store: Store, objects: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Porter]:
    monkeypatch.setattr(routes_agent_objects, "MAX_ARTIFACT_BYTES", CAP)
    settings = Settings(porter=PorterConfig(object_store=store_url(objects)))
    app = create_app(settings, store=store, object_store=objects)
    with served(app) as url:
        yield Porter(url, store, objects)


def job_with(store: Store, owner: str, files: dict[str, str]) -> Job:
    """A job as porter stored it. Created in the store directly, so a spec porter's submit check
    would refuse (another user's object) can stand for a forged or older job."""
    job, _ = store.create_job(owner, JobSpec(name="j", cluster="local", script="cat data.bin", files=files))
    return job


def test_an_input_is_streamed_to_the_agent_of_its_jobs_cluster(porter: Porter) -> None:
    data = os.urandom(3 << 20)
    porter.objects.put("users/alice/sets/data.bin", data)
    url = object_url(porter.objects, "users/alice/sets/data.bin")
    job = job_with(porter.store, "alice", {"data.bin": url, "inline.txt": "x"})
    through = porter.through()
    try:
        assert PorterFileFetcher(through).fetch_for(url, job) == data
    finally:
        through.close()


def test_an_input_is_refused_unless_the_job_names_it_and_its_owner_owns_it(porter: Porter) -> None:
    objects = porter.objects
    objects.put("users/alice/a.txt", b"alice's")
    objects.put("users/bob/b.txt", b"bob's")
    alices, bobs = object_url(objects, "users/alice/a.txt"), object_url(objects, "users/bob/b.txt")
    missing = object_url(objects, "users/alice/gone.txt")
    job = job_with(porter.store, "alice", {"a.txt": alices, "b.txt": bobs, "gone.txt": missing})
    through = porter.through()
    fetch = PorterFileFetcher(through).fetch_for
    try:
        # in the job's files, but another user's object: the owner rule, as at submission
        with pytest.raises(StorageError, match=r"422.*a job may read only its owner's own objects") as exc:
            fetch(bobs, job)
        assert "b.txt" in str(exc.value)
        # alice's object, but not one this job was given
        objects.put("users/alice/other.txt", b"not given")
        with pytest.raises(StorageError, match=r"422.*not one of the job's files"):
            fetch(object_url(objects, "users/alice/other.txt"), job)
        with pytest.raises(ObjectNotFound, match="no such object"):
            fetch(missing, job)
        assert fetch(alices, job) == b"alice's"
    finally:
        through.close()
    # an agent of another cluster, and a user token: the agent routes' own rules
    for token, status in ((porter.other_agent, "403"), (porter.user, "403")):
        other = porter.through(token)
        try:
            with pytest.raises(StorageError, match=status):
                PorterFileFetcher(other).fetch_for(alices, job)
        finally:
            other.close()


def test_artifacts_go_to_porters_store_under_the_jobs_prefix(porter: Porter, tmp_path: Path) -> None:
    job = job_with(porter.store, "alice", {"conf/params.yaml": "lr: 0.1\n"})
    output = os.urandom(1 << 20) * 12  # 12 MiB: over the app-wide 8 MiB, under the artifact cap
    log = tmp_path / "output.log"
    log.write_bytes(output)
    record = {"slurm_job_id": "7", "records": [{"step": None}], "efficiency": {"cpu": 0.5}}
    through = porter.through()
    writer = PorterArtifactWriter(through)
    try:
        keys = [
            *writer.save_submission(job, batch_script="#!/bin/bash\necho hi\n"),
            *writer.save_output(job, log),
            *writer.save_accounting(job, record),
        ]
    finally:
        through.close()
    # the same keys as an agent writing into porter's store itself, and the same bytes
    elsewhere = LocalObjectStore(tmp_path / "reference")
    direct = ArtifactWriter(elsewhere)
    expected = [
        *direct.save_submission(job, batch_script="#!/bin/bash\necho hi\n"),
        *direct.save_output(job, log),
        *direct.save_accounting(job, record),
    ]
    assert keys == expected
    for key in keys:
        assert porter.objects.get(key) == elsewhere.get(key), key
    # ... and porter records them as the job's artifacts, and serves them to the user
    headers = {"Authorization": f"Bearer {porter.agent}"}
    recorded = httpx.post(
        f"{porter.url}/api/v1/agent/jobs/{job.id}/artifacts", json={"keys": keys}, headers=headers
    )
    assert recorded.status_code == 200, recorded.text
    got = httpx.get(
        f"{porter.url}/api/v1/jobs/{job.id}/artifacts/output.log",
        headers={"Authorization": f"Bearer {porter.user}"},
        timeout=30,
    )
    if isinstance(porter.objects, LocalObjectStore):
        assert got.status_code == 200
        assert got.content == output


def test_an_artifact_over_the_cap_is_refused_while_it_streams(porter: Porter) -> None:
    job = job_with(porter.store, "alice", {})
    headers = {"Authorization": f"Bearer {porter.agent}"}
    route = f"{porter.url}/api/v1/agent/jobs/{job.id}/artifacts/output.log"

    def body() -> Iterator[bytes]:  # chunked: no Content-Length to refuse up front
        chunk = b"x" * (1 << 20)
        for _ in range(4 * CAP // len(chunk)):
            yield chunk

    try:
        answer = httpx.put(route, content=body(), headers=headers, timeout=60)
    except httpx.TransportError:
        answer = None  # porter may close the connection while the client still sends
    if answer is not None:
        assert answer.status_code == 413, answer.text
        assert answer.json()["error"]["details"] == {"limit": CAP}
        assert "an artifact" in answer.json()["error"]["message"]
    declared = httpx.put(route, content=b"x" * (CAP + 1), headers=headers, timeout=60)
    assert declared.status_code == 413, declared.text
    assert porter.objects.list(f"jobs/alice/{job.id}/") == []
    # a bad name, another cluster's agent
    bad = httpx.put(f"{porter.url}/api/v1/agent/jobs/{job.id}/artifacts/a//b", content=b"x", headers=headers)
    assert bad.status_code == 422, bad.text
    assert bad.json()["error"]["details"][0]["field"] == "name"
    other = httpx.put(route, content=b"x", headers={"Authorization": f"Bearer {porter.other_agent}"})
    assert other.status_code == 403, other.text
    assert porter.objects.list(f"jobs/alice/{job.id}/") == []


def test_an_agent_whose_own_store_is_not_porters_says_so(objects: ObjectStore, tmp_path: Path) -> None:
    """An agent with `submitter.object_store` set to another store than porter's: an input URL that
    porter accepted (its owner's object in porter's store) is not in the agent's store, and the
    reason says that, not that the object is someone else's."""
    from cloudhpc.storage.inputs import InputScope
    from cloudhpc.submitter.files import FileFetcher

    objects.put("users/alice/a.txt", b"alice's")
    url = object_url(objects, "users/alice/a.txt")
    own = LocalObjectStore(tmp_path / "the-laptops-own-store")
    fetcher = FileFetcher(own, InputScope.from_store_url(store_url(own)))
    with pytest.raises(StorageError) as refused:
        fetcher.fetch(url, "alice")
    message = str(refused.value)
    assert "not in this submitter's object store" in message, message
    assert "submitter.object_store" in message, message
    assert "only its owner's own objects" not in message, message
    # the same store: read
    assert (
        FileFetcher(objects, InputScope.from_store_url(store_url(objects))).fetch(url, "alice") == b"alice's"
    )
