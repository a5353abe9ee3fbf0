"""`POST /api/v1/uploads`: job inputs larger than a spec may carry, streamed into porter's object
store under the caller's own prefix (the `cloudhpc.Executor`'s pickled calls travel this way).

porter runs under uvicorn (the real HTTP path: chunked bodies, the app-wide body limit) over a local
directory or the testbed's S3, with SQLite or the testbed's PostgreSQL."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from cloudhpc.client import ApiError, Client
from cloudhpc.config import PorterConfig, Settings
from cloudhpc.porter import routes_uploads
from cloudhpc.porter.app import create_app
from cloudhpc.storage import ObjectStore
from cloudhpc.store import Store
from tests.integration.stores import served, store_url

CAP = 16 << 20
"""The upload cap in these tests (porter's is 1 GiB): above the 8 MiB app-wide limit, so an upload
between the two shows the route has its own."""


@dataclass
class Porter:
    url: str
    alice: str
    bob: str


@pytest.fixture
def porter(store: Store, objects: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> Iterator[Porter]:
    monkeypatch.setattr(routes_uploads, "MAX_UPLOAD_BYTES", CAP)
    settings = Settings(porter=PorterConfig(object_store=store_url(objects)))
    for user in ("alice", "bob"):  # both may use the cluster: only the object's owner differs
        store.create_token(user, "agent", ["local"])
    with served(create_app(settings, store=store, object_store=objects)) as url:
        yield Porter(url, store.create_token("alice", "user"), store.create_token("bob", "user"))


def spec(url: str) -> dict[str, object]:
    return {"name": "reads", "cluster": "local", "script": "wc -c data.bin", "files": {"data.bin": url}}


def test_an_upload_over_the_body_limit_is_stored_under_the_callers_prefix(
    porter: Porter, objects: ObjectStore
) -> None:
    data = os.urandom(12 << 20)  # over porter.max_request_bytes (8 MiB), under the upload cap
    with Client(porter.url, porter.alice) as alice:
        url = alice.upload(data, name="data.bin")
        key = next(k for k in objects.list("users/alice/uploads/") if k.endswith("/data.bin"))
        assert url.endswith(key)
        assert b"".join(objects.iter_bytes(key)) == data
        # alice's job may name it...
        assert alice.submit(spec(url)).spec.files["data.bin"] == url
    # ...nobody else's may
    with Client(porter.url, porter.bob) as bob, pytest.raises(ApiError) as refused:
        bob.submit(spec(url))
    assert refused.value.status == 422
    assert refused.value.details[0]["field"] == "files.data.bin"


def test_an_upload_over_its_cap_is_refused_and_nothing_is_stored(
    porter: Porter, objects: ObjectStore
) -> None:
    headers = {"Authorization": f"Bearer {porter.alice}"}
    with httpx.Client(base_url=porter.url, headers=headers, timeout=60) as http:
        declared = http.post("/api/v1/uploads", params={"name": "big"}, content=b"x" * (CAP + 1))
        assert declared.status_code == 413
        assert declared.json()["error"]["details"] == {"limit": CAP}

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams in
            for _ in range(CAP // (1 << 20) + 2):
                yield b"y" * (1 << 20)

        streamed = http.post("/api/v1/uploads", params={"name": "big"}, content=chunks())
        assert streamed.status_code == 413
    assert objects.list("users/alice/uploads/") == []


def test_uploads_need_a_user_token_and_a_plain_name(porter: Porter) -> None:
    anonymous = httpx.post(f"{porter.url}/api/v1/uploads", params={"name": "a"}, content=b"1")
    assert anonymous.status_code == 401
    headers = {"Authorization": f"Bearer {porter.alice}"}
    for name in ("../escape", "a/b", ""):
        bad = httpx.post(f"{porter.url}/api/v1/uploads", params={"name": name}, content=b"1", headers=headers)
        assert bad.status_code == 422, (name, bad.text)
        assert bad.json()["error"]["details"][0]["field"] == "name"


def test_an_upload_is_deleted_by_its_owner_only(porter: Porter, objects: ObjectStore) -> None:
    with Client(porter.url, porter.alice) as alice, Client(porter.url, porter.bob) as bob:
        url = alice.upload(b"mine", name="call.pkl")
        bob.delete_upload(url)  # the same id and name, under bob's own prefix: nothing of alice's
        assert len(objects.list("users/alice/uploads/")) == 1
        alice.delete_upload(url)
        assert objects.list("users/alice/uploads/") == []
        alice.delete_upload(url)  # gone already: not an error
        with pytest.raises(ValueError, match="not the URL of an upload"):
            alice.delete_upload("s3://bucket/users/alice/data.bin")
    headers = {"Authorization": f"Bearer {porter.alice}"}
    bad = httpx.delete(f"{porter.url}/api/v1/uploads/..%2F..%2Fjobs/x", headers=headers)
    assert bad.status_code in (404, 422), bad.text
    bad_id = httpx.delete(f"{porter.url}/api/v1/uploads/not-an-id/x", headers=headers)
    assert bad_id.status_code == 422
    assert bad_id.json()["error"]["details"][0]["field"] == "upload_id"
