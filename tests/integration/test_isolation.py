"""Users kept apart (issue 12, item 1): a job's inputs come only from its owner's own objects, and a
cluster is used only by the users it is tied to. Real parts: the testbed's S3 (SeaweedFS) and a
local object store, porter's app on SQLite and PostgreSQL."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient

from cloudhpc.config import Settings
from cloudhpc.domain.jobs import JobSpec
from cloudhpc.exceptions import StorageError
from cloudhpc.porter.app import create_app
from cloudhpc.storage import ObjectStore
from cloudhpc.storage.artifacts import artifact_key
from cloudhpc.storage.inputs import InputScope
from cloudhpc.storage.local import LocalObjectStore
from cloudhpc.storage.s3 import S3ObjectStore
from cloudhpc.store import Store
from cloudhpc.submitter.files import FileFetcher
from tests.integration.stores import object_url, store_url
from tests.integration.test_cli import ServeAll
from tests.testbed import Testbed


class Users:
    """porter over `objects`, with alice and mallory allowed on the `local` cluster."""

    def __init__(self, client: TestClient, store: Store) -> None:
        self.client = client
        self.alice = store.create_token("alice", "user")
        self.mallory = store.create_token("mallory", "user")

    def submit(self, token: str, files: dict[str, str]) -> Any:
        body = {"name": "inputs", "cluster": "local", "script": "cat data.txt", "files": files}
        return self.client.post("/api/v1/jobs", json=body, headers={"Authorization": f"Bearer {token}"})


@pytest.fixture
def users(store: Store, objects: ObjectStore) -> Iterator[Users]:
    settings = Settings.model_validate(
        {"porter": {"object_store": store_url(objects), "access": {"clusters": {"local": {"users": ["*"]}}}}}
    )
    with TestClient(create_app(settings, store=store, object_store=objects)) as client:
        yield Users(client, store)


def alices_objects(objects: ObjectStore) -> dict[str, str]:
    """alice's artifacts of an earlier job and an input she stored: what mallory is after."""
    job_id = uuid.uuid4()
    spec_key = artifact_key("alice", job_id, "spec.json")
    objects.put(spec_key, b'{"env": {"API_KEY": "alice-secret"}}')
    objects.put("users/alice/data.txt", b"alice's data")
    return {"spec": spec_key, "input": "users/alice/data.txt"}


def test_a_job_cannot_name_another_users_objects(users: Users, objects: ObjectStore) -> None:
    keys = alices_objects(objects)
    for key in keys.values():
        refused = users.submit(users.mallory, {"data.txt": object_url(objects, key)})
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["details"][0]["field"] == "files.data.txt"
        assert "a job may read only its owner's own objects" in error["message"]
        assert object_url(objects, "users/mallory/") in error["message"]
    # outside the store altogether: the agent's own files, another bucket, a traversal
    outside = [
        "file:///etc/hostname",
        "s3://other-bucket/users/mallory/x",
        object_url(objects, "users/mallory/../alice/data.txt"),
        object_url(objects, "mailbox/x"),
    ]
    for url in outside:
        refused = users.submit(users.mallory, {"a": url, "b": "inline content"})
        assert refused.status_code == 422, (url, refused.text)
        assert [d["field"] for d in refused.json()["error"]["details"]] == ["files.a"]


def test_a_job_may_name_its_owners_objects(users: Users, objects: ObjectStore) -> None:
    keys = alices_objects(objects)
    for key in keys.values():
        accepted = users.submit(users.alice, {"data.txt": object_url(objects, key)})
        assert accepted.status_code == 201, accepted.text
    me = users.client.get("/api/v1/me", headers={"Authorization": f"Bearer {users.alice}"}).json()
    assert me == {
        "user": "alice",
        "role": "user",
        "inputs": [object_url(objects, "users/alice/"), object_url(objects, "jobs/alice/")],
    }


def test_the_agent_refuses_a_forged_work_item(objects: ObjectStore) -> None:
    """A work item that did not pass porter's check (a forged mailbox message): the agent's fetch
    reads only the job owner's objects, through its own store."""
    keys = alices_objects(objects)
    fetcher = FileFetcher(objects, InputScope.from_store_url(store_url(objects)))
    for key in keys.values():
        with pytest.raises(StorageError, match="a job may read only its owner's own objects"):
            fetcher.fetch(object_url(objects, key), "mallory")
    assert fetcher.fetch(object_url(objects, keys["input"]), "alice") == b"alice's data"
    assert b"alice-secret" in fetcher.fetch(object_url(objects, keys["spec"]), "alice")
    with pytest.raises(StorageError):
        fetcher.fetch("file:///etc/hostname", "alice")


@pytest.fixture
def tied(store: Store, tmp_path: Path) -> Iterator[tuple[TestClient, Store]]:
    """Clusters `local` (configured) and `mahti` (known from its agent): mahti's agent token is
    olivia's, so she owns it; carol is listed on mahti, the ml group (bob) on local."""
    settings = Settings.model_validate(
        {
            "porter": {
                "object_store": f"file://{tmp_path / 'objects'}",
                "access": {
                    "groups": {"ml": ["bob"]},
                    "clusters": {"mahti": {"users": ["carol"]}, "local": {"groups": ["ml"]}},
                },
            }
        }
    )
    store.create_token("olivia", "agent", ["mahti"])
    store.touch_agent("mahti", "agent-1")  # porter knows mahti from its agent only
    with TestClient(create_app(settings, store=store)) as client:
        yield client, store


def _as(client: TestClient, token: str, method: str, path: str, **kwargs: Any) -> Any:
    return client.request(method, path, headers={"Authorization": f"Bearer {token}"}, **kwargs)


def test_a_cluster_is_used_only_by_its_users(tied: tuple[TestClient, Store]) -> None:
    client, store = tied
    tokens = {u: store.create_token(u, "user") for u in ("olivia", "carol", "bob", "mallory")}
    tokens["root"] = store.create_token("root", "admin")
    visible = {
        user: [c["name"] for c in _as(client, token, "GET", "/api/v1/clusters").json()["clusters"]]
        for user, token in tokens.items()
    }
    assert visible["mallory"] == []
    assert visible["bob"] == ["local"]
    assert visible["carol"] == ["mahti"]
    assert visible["olivia"] == ["mahti"]
    assert visible["root"] == ["local", "mahti"]
    for user, cluster, status in [
        ("mallory", "local", 404),
        ("mallory", "mahti", 404),
        ("mallory", "nowhere", 404),
        ("carol", "local", 404),
        ("bob", "local", 201),
        ("carol", "mahti", 201),
        ("olivia", "mahti", 201),
        ("root", "mahti", 201),
    ]:
        body = {"name": "tied", "cluster": cluster, "script": "true"}
        answer = _as(client, tokens[user], "POST", "/api/v1/jobs", json=body)
        assert answer.status_code == status, (user, cluster, answer.text)
        if status == 404:
            error = answer.json()["error"]
            assert error["code"] == "not_found"
            assert f"cluster {cluster!r}: no such cluster, or not one you may use" in error["message"]
    # revoking the owner's agent token ends the ownership
    (agent,) = [t for t in store.list_tokens("olivia") if t.role == "agent"]
    store.revoke_token_id(agent.id)
    answer = _as(
        client,
        tokens["olivia"],
        "POST",
        "/api/v1/jobs",
        json={"name": "t", "cluster": "mahti", "script": "true"},
    )
    assert answer.status_code == 404


# ---- end to end: a real `serve all` (porter + agent + the local backend) -----------------------


def _wait_ended(client: httpx.Client, job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = client.get(f"/api/v1/jobs/{job_id}", params={"wait": 5}).json()
        if job["state"] in ("completed", "failed", "cancelled", "timeout"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_serve_all_keeps_users_inputs_apart(
    kind: str, testbed: Testbed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mallory's job naming alice's objects is refused at submit; the same job forged straight into
    the store (as a work item that never passed porter's check) is failed by the agent with the
    reason, her secret nowhere in its output; alice's job reading her own objects completes."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", testbed.s3_access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", testbed.s3_secret_key)
    porter: dict[str, Any] = {
        "database": f"sqlite:///{tmp_path / 'state.db'}",
        "access": {"clusters": {"local": {"users": ["alice", "mallory"]}}},
    }
    if kind == "local":
        porter["object_store"] = f"file://{tmp_path / 'objects'}"
        objects: ObjectStore = LocalObjectStore(tmp_path / "objects")
    else:
        prefix = f"test-{uuid.uuid4().hex}"
        porter |= {
            "object_store": f"s3://{testbed.s3_bucket}/{prefix}",
            "s3_endpoint_url": testbed.s3_endpoint,
        }
        objects = S3ObjectStore(testbed.s3_bucket, prefix, endpoint_url=testbed.s3_endpoint)
    config = {
        "porter": porter,
        "clusters": {"local": {"backend": "local", "workdir": str(tmp_path / "work")}},
    }
    (tmp_path / "cloudhpc.yaml").write_text(yaml.safe_dump(config))
    keys = alices_objects(objects)
    stolen = object_url(objects, keys["spec"])
    server = ServeAll(tmp_path, config=tmp_path / "cloudhpc.yaml")
    server.start()
    store = Store(porter["database"])
    try:
        tokens = {user: store.create_token(user, "user") for user in ("alice", "mallory")}
        spec = {
            "name": "steal",
            "cluster": "local",
            "script": "cat stolen.json\n",
            "files": {"stolen.json": stolen},
        }
        with httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {tokens['mallory']}"}
        ) as mallory:
            refused = mallory.post("/api/v1/jobs", json=spec)
            assert refused.status_code == 422, refused.text
            assert refused.json()["error"]["details"][0]["field"] == "files.stolen.json"
            forged, _ = store.create_job("mallory", JobSpec.model_validate(spec))
            job = _wait_ended(mallory, str(forged.id))
            assert job["state"] == "failed"
            assert job["reason"].startswith(f"{stolen}: a job may read only its owner's own objects")
            assert b"alice-secret" not in mallory.get(f"/api/v1/jobs/{forged.id}/logs").content
        own = {
            **spec,
            "name": "own",
            "files": {"stolen.json": stolen, "data.txt": object_url(objects, keys["input"])},
        }
        # ...and what the job's code can see of the agent: its environment and its own files
        own["script"] = "cat stolen.json data.txt\nenv\ncat .cloudhpc/job.sh .cloudhpc/script\n"
        with httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {tokens['alice']}"}
        ) as alice:
            created = alice.post("/api/v1/jobs", json=own)
            assert created.status_code == 201, created.text
            job = _wait_ended(alice, created.json()["id"])
            assert job["state"] == "completed", job
            output = alice.get(f"/api/v1/jobs/{job['id']}/logs").content
            assert b"alice-secret" in output
            assert b"alice's data" in output
            agent_token = (tmp_path / ".cloudhpc" / "agent-token").read_text().strip()
            admin_token = (tmp_path / ".cloudhpc" / "admin-token").read_text().strip()
            for secret in (testbed.s3_secret_key, agent_token, admin_token):
                assert secret.encode() not in output, "an agent secret reached the job"
    finally:
        store.close()
        server.stop()
        if kind == "s3":
            for key in objects.list(""):
                objects.delete(key)
