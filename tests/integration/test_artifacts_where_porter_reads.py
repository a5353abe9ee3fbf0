"""porter records only artifact keys it can serve.

A submitter on a laptop (deploy/compose) has, by default, a file:// object store of its own that
porter cannot read; before this check porter listed its keys and users got links answering
NoSuchKey (tests/e2e/test_topology_shipped.py found it). Now the report is refused with a 422
naming `keys`, and the keys that are in porter's store are recorded as before.
"""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from cloudhpc.config import PorterConfig, Settings
from cloudhpc.domain.jobs import JobSpec
from cloudhpc.porter.app import create_app
from cloudhpc.storage import LocalObjectStore, ObjectStore
from cloudhpc.storage.artifacts import ArtifactWriter
from cloudhpc.store import Store


def test_keys_porter_cannot_read_are_refused(objects: ObjectStore, store: Store, tmp_path: Path) -> None:
    settings = Settings(porter=PorterConfig(object_store=f"file://{tmp_path / 'unused'}"))
    store.create_token("alice", "user")
    agent = store.create_token("alice", "agent", ["local"])
    job, _ = store.create_job("alice", JobSpec(name="j", cluster="local", script="echo hi"))
    elsewhere = LocalObjectStore(tmp_path / "the-laptops-own-store")
    theirs = ArtifactWriter(elsewhere).save_submission(job, batch_script="#!/bin/bash\necho hi\n")
    ours = ArtifactWriter(objects).save_submission(job, batch_script="#!/bin/bash\necho hi\n")
    assert theirs == ours  # the same keys, in two different stores
    ours = ours[:1]
    for key in theirs[1:]:
        objects.delete(key)
    with TestClient(create_app(settings, store=store, object_store=objects)) as client:
        route = f"/api/v1/agent/jobs/{job.id}/artifacts"
        headers = {"Authorization": f"Bearer {agent}"}
        refused = client.post(route, json={"keys": theirs}, headers=headers)
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["details"][0]["field"] == "keys"
        assert "not in porter's object store" in error["message"]
        assert "submitter.object_store" in error["message"]
        fetched = store.get_job(job.id)
        assert fetched is not None
        assert fetched.artifacts == []  # nothing of a refused report is kept
        accepted = client.post(route, json={"keys": ours}, headers=headers)
        assert accepted.status_code == 200, accepted.text
        assert accepted.json()["artifacts"] == ours
