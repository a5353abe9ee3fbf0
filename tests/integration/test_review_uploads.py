"""Security review (#13's new surfaces) of uploads and the input URLs porter hands out: what a user
whose name is not a plain word gets back must be usable by that user, and by nobody else.

porter runs under uvicorn (`served`) over SQLite or the testbed's PostgreSQL, with a local object
directory or the testbed's S3 (the conftest fixtures)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest

from cloudhpc.client import ApiError, Client
from cloudhpc.config import PorterConfig, Settings
from cloudhpc.porter.app import create_app
from cloudhpc.porter.routes_uploads import MAX_OPEN_UPLOADS
from cloudhpc.retries import RetryPolicy
from cloudhpc.storage import ObjectStore
from cloudhpc.store import Store
from tests.integration.stores import served, store_url

ODD_USERS = ("bob smith", "ops:ci", "50%off")
"""User names are free text (`cloudhpc tokens create --user`); these need percent-encoding in a key."""


@dataclass
class Porter:
    url: str
    tokens: dict[str, str]


@pytest.fixture
def porter(store: Store, objects: ObjectStore) -> Iterator[Porter]:
    settings = Settings(porter=PorterConfig(object_store=store_url(objects)))
    users = (*ODD_USERS, "bob")
    for user in users:
        store.create_token(user, "agent", ["local"])  # each may use the cluster
    with served(create_app(settings, store=store, object_store=objects)) as url:
        yield Porter(url, {user: store.create_token(user, "user") for user in users})


def spec(url: str) -> dict[str, object]:
    return {"name": "reads", "cluster": "local", "script": "wc -c data.bin", "files": {"data.bin": url}}


@pytest.mark.parametrize("user", ODD_USERS)
def test_an_upload_of_a_user_with_an_odd_name_is_her_input(porter: Porter, user: str) -> None:
    """The URL `POST /uploads` answered was not percent-encoded, so porter decoded `bob%20smith` in it
    to `bob smith` and refused the user's own upload (422 `files.data.bin`): the Executor could not
    run for such a user. Now it is accepted for her, still refused for anyone else, and the prefixes
    `GET /me` shows accept what is stored under them."""
    with Client(porter.url, porter.tokens[user]) as owner:
        url = owner.upload(b"12345", name="data.bin")
        assert owner.submit(spec(url)).spec.files["data.bin"] == url
        mine = owner.me().inputs[0]
        assert url.startswith(mine), (url, mine)
    with Client(porter.url, porter.tokens["bob"]) as bob, pytest.raises(ApiError) as refused:
        bob.submit(spec(url))
    assert refused.value.status == 422
    assert refused.value.details[0]["field"] == "files.data.bin"


@pytest.mark.parametrize("name", [".", ".."])
def test_a_dot_name_is_refused_as_bad_input(porter: Porter, objects: ObjectStore, name: str) -> None:
    """`name=..` passed the route's pattern and was refused only by the object-key check, answered as
    a 502 `storage_unavailable` (for POST and DELETE alike): bad input must be a 422 naming `name`,
    and nothing is stored."""
    headers = {"Authorization": f"Bearer {porter.tokens['bob']}"}
    with httpx.Client(base_url=porter.url, headers=headers, timeout=30) as http:
        posted = http.post("/api/v1/uploads", params={"name": name}, content=b"x")
        deleted = http.delete(f"/api/v1/uploads/{'0' * 32}/{name.replace('.', '%2E')}")  # not `..`, as sent
    for answer in (posted, deleted):
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["details"][0]["field"] == "name"
    assert not [k for k in objects.list("users/") if "/uploads/" in k]


def test_one_user_has_at_most_a_few_uploads_in_progress(porter: Porter) -> None:
    """Each upload is spooled to porter's temporary directory (up to 1 GiB): mallory's parallel slow
    uploads were all accepted, each holding its share of that disk. Now the one over
    MAX_OPEN_UPLOADS is a 429 at once, another user's upload still goes through, and mallory's own
    are all stored once they end."""
    release = threading.Event()

    def slow() -> Iterator[bytes]:  # a body that keeps its upload in progress until released
        yield b"x" * 1024
        release.wait(30)
        yield b"y" * 1024

    def upload(user: str, body: Iterator[bytes] | bytes) -> httpx.Response:
        headers = {"Authorization": f"Bearer {porter.tokens[user]}"}
        with httpx.Client(base_url=porter.url, headers=headers, timeout=60) as http:
            return http.post("/api/v1/uploads", params={"name": "part.bin"}, content=body)

    with ThreadPoolExecutor(MAX_OPEN_UPLOADS) as pool:
        held = [pool.submit(upload, "bob smith", slow()) for _ in range(MAX_OPEN_UPLOADS)]
        time.sleep(1.0)  # all of them are being spooled now
        try:
            over = upload("bob smith", b"z")
            other = upload("bob", b"z")
        finally:
            release.set()
        stored = [f.result() for f in held]
    assert over.status_code == 429, over.text
    assert over.json()["error"]["code"] == "too_many_requests"
    assert f"at most {MAX_OPEN_UPLOADS}" in over.json()["error"]["message"]
    assert other.status_code == 200, other.text
    assert [r.status_code for r in stored] == [200] * MAX_OPEN_UPLOADS
    assert upload("bob smith", b"z").status_code == 200  # the slots are free again


def test_the_sdk_sends_an_upload_refused_for_the_cap_again(porter: Porter) -> None:
    """A pipeline whose steps upload at the same time (one user's token) may meet the cap: the SDK
    sends the refused upload again after a pause (the 429 stored nothing), where it used to raise."""
    release = threading.Event()

    def slow() -> Iterator[bytes]:
        yield b"x"
        release.wait(30)

    def held() -> httpx.Response:
        headers = {"Authorization": f"Bearer {porter.tokens['ops:ci']}"}
        with httpx.Client(base_url=porter.url, headers=headers, timeout=60) as http:
            return http.post("/api/v1/uploads", params={"name": "held.bin"}, content=slow())

    retries = RetryPolicy(attempts=6, initial=0.5, maximum=1.0)
    with (
        ThreadPoolExecutor(MAX_OPEN_UPLOADS + 1) as pool,
        Client(porter.url, porter.tokens["ops:ci"], retries=retries) as sdk,
    ):
        holders = [pool.submit(held) for _ in range(MAX_OPEN_UPLOADS)]
        time.sleep(1.0)
        late = pool.submit(sdk.upload, b"late", name="late.bin")
        time.sleep(1.0)  # refused at least once by now
        release.set()
        assert "/late.bin" in late.result(timeout=30)
        assert all(h.result().status_code == 200 for h in holders)
