"""Both object-store backends: a local directory, and the testbed's real SeaweedFS S3 server.

Every S3 test works under its own `test-<uuid>/` prefix of the testbed bucket and deletes it.
The S3 store lists with a page size of 2 here, so every listing also exercises pagination.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

import httpx
import pytest

from cloudhpc.exceptions import ConfigError, ObjectNotFound, StorageError
from cloudhpc.storage import LocalObjectStore, ObjectStore, open_object_store
from cloudhpc.storage.s3 import S3ObjectStore
from tests.conftest import HOSTILE_STRINGS
from tests.integration.stores import purge, s3_object_store

if TYPE_CHECKING:
    from tests.testbed import Testbed


@pytest.fixture
def s3_options() -> dict[str, object]:
    return {"page_size": 2}


@pytest.fixture
def store(objects: ObjectStore) -> ObjectStore:
    """Here `store` is the object store under test: a local directory, or S3 paged by two."""
    return objects


def test_put_get_overwrite_delete(store: ObjectStore) -> None:
    store.put("jobs/alice/1/spec.json", b'{"a": 1}', content_type="application/json")
    assert store.get("jobs/alice/1/spec.json") == b'{"a": 1}'
    store.put("jobs/alice/1/spec.json", b"")
    assert store.get("jobs/alice/1/spec.json") == b""
    store.delete("jobs/alice/1/spec.json")
    with pytest.raises(ObjectNotFound):
        store.get("jobs/alice/1/spec.json")
    store.delete("jobs/alice/1/spec.json")  # deleting twice is fine, as in S3
    assert store.list("jobs/") == []


def test_missing_object(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound, match="nothing-here"):
        store.get("nothing-here")
    store.put("dir/obj", b"x")
    with pytest.raises(ObjectNotFound):
        store.get("dir")  # a prefix is not an object


def test_list_prefix_start_after_and_limit(store: ObjectStore) -> None:
    # SeaweedFS lists a "directory" before a sibling that sorts before it by bytes (`a/...` before
    # `a-c`), unlike AWS; these keys avoid that case. The mailbox needs order only within one level.
    keys = [
        "jobs/alice/1/output.log",
        "jobs/alice/1/spec.json",
        "jobs/alice/2/spec.json",
        "jobs/bob/1/spec.json",
        *(f"mailbox/c/up/{n:020d}-0000000{n % 10}.json" for n in (5, 9, 10, 11, 100)),
    ]
    for key in reversed(keys):
        store.put(key, key.encode())
    assert store.list() == keys
    assert store.list("jobs/alice/") == keys[:3]
    assert store.list("jobs/al") == keys[:3]
    assert store.list("jobs/alice/1/") == keys[:2]
    assert store.list("jobs/carol/") == []
    up = "mailbox/c/up/"
    assert store.list(up) == keys[4:]
    assert store.list(up, start_after=keys[5]) == keys[6:]
    assert store.list(up, start_after=keys[5], limit=2) == keys[6:8]
    assert store.list(up, start_after=keys[-1]) == []
    # a cursor that was deleted meanwhile still works: start_after needs no existing key
    store.delete(keys[5])
    assert store.list(up, start_after=keys[5], limit=1) == [keys[6]]
    assert store.list(limit=0) == []
    assert store.list("jobs/", start_after="jobs/alice/1/spec.json", limit=3) == keys[2:4]


def test_multipart_upload_of_a_large_file(store: ObjectStore, tmp_path: Path) -> None:
    data = os.urandom(9 << 20)  # above the 8 MiB threshold: two parts
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    store.upload_file("jobs/alice/1/files/big.bin", path, content_type="application/octet-stream")
    assert store.get("jobs/alice/1/files/big.bin") == data
    if isinstance(store, S3ObjectStore):
        response = httpx.get(store.url("jobs/alice/1/files/big.bin"), timeout=30)
        assert response.status_code == 200
        assert response.content == data
        # S3 gives a multipart object an ETag ending in -<number of parts>.
        assert response.headers["etag"].strip('"').endswith("-2"), response.headers["etag"]
    with pytest.raises(StorageError, match="not a regular file"):
        store.upload_file("x", tmp_path / "missing.bin")


def test_download_url(store: ObjectStore) -> None:
    store.put("jobs/alice/1/output.log", b"hello\n", content_type="text/plain; charset=utf-8")
    url = store.url("jobs/alice/1/output.log", expires=60)
    if isinstance(store, LocalObjectStore):
        assert url.startswith("file://")
        assert Path(unquote(urlsplit(url).path)).read_bytes() == b"hello\n"
        return
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200
    assert response.content == b"hello\n"
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert httpx.get(store.url("jobs/alice/1/none.log"), timeout=10).status_code == 404


def test_presigned_url_expires(testbed: Testbed) -> None:
    store = s3_object_store(testbed, f"test-{uuid.uuid4().hex}")
    try:
        store.put("k", b"v")
        # The signature's clock has whole seconds: 2 s is the shortest lifetime that surely
        # covers the first request.
        url = store.url("k", expires=2)
        assert httpx.get(url, timeout=10).status_code == 200
        time.sleep(3.2)
        assert httpx.get(url, timeout=10).status_code == 403
    finally:
        purge(store)


def test_wrong_secret_key_is_a_storage_error(testbed: Testbed) -> None:
    good = s3_object_store(testbed, f"test-{uuid.uuid4().hex}")
    bad = s3_object_store(testbed, good.prefix, secret_key="not-the-secret")
    try:
        good.put("k", b"v")
        for call in (lambda: bad.put("k2", b"x"), lambda: bad.get("k"), lambda: bad.list()):
            with pytest.raises(StorageError) as excinfo:
                call()
            assert not isinstance(excinfo.value, ObjectNotFound)
            assert "SignatureDoesNotMatch" in str(excinfo.value)
            assert "not-the-secret" not in str(excinfo.value)
        assert good.list() == ["k"]
    finally:
        purge(good)


def test_unreachable_endpoint_is_a_storage_error() -> None:
    store = S3ObjectStore(
        "bucket",
        endpoint_url="http://127.0.0.1:9",
        access_key="a",
        secret_key="b",
        max_attempts=1,
        connect_timeout=1,
    )
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"127\.0\.0\.1:9"):
        store.get("k")
    assert time.monotonic() - started < 10


UNSAFE_KEYS = [
    "",
    "/etc/passwd",
    "../outside",
    "a/../../outside",
    "a/./b",
    "a//b",
    "a/",
    "a\\..\\b",
    "nul\x00byte",
    "new\nline",
    "x" * 1025,
]


@pytest.mark.parametrize("key", UNSAFE_KEYS)
def test_unsafe_keys_are_refused(store: ObjectStore, key: str, tmp_path: Path) -> None:
    for call in (
        lambda: store.put(key, b"x"),
        lambda: store.get(key),
        lambda: store.delete(key),
        lambda: store.url(key),
    ):
        with pytest.raises(StorageError) as excinfo:
            call()
        assert not isinstance(excinfo.value, ObjectNotFound)
    with pytest.raises(StorageError):
        store.list("../")
    assert not (tmp_path / "outside").exists()


def test_hostile_strings_are_plain_keys(store: ObjectStore) -> None:
    stored = []
    for text in HOSTILE_STRINGS:
        key = f"hostile/{text}"
        try:
            store.put(key, text.encode())
        except StorageError:
            assert "\n" in text or "\t" in text or ".." in text.split("/") or "\\" in text
            continue
        stored.append(key)
        assert store.get(key) == text.encode()
    assert len(stored) >= 6
    assert sorted(store.list("hostile/")) == sorted(stored)
    assert not Path("/tmp/pwned").exists()


def test_local_symlinks_cannot_escape(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    (store.root / "link").symlink_to(outside)
    with pytest.raises(StorageError, match="outside"):
        store.put("link/x", b"x")
    with pytest.raises(StorageError, match="outside"):
        store.get("link/secret")
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert store.list() == []  # symlinks are never objects


def test_local_writes_leave_no_partial_objects(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    for n in range(20):
        store.put(f"k/{n:02d}", b"x" * n)
    store.upload_file("big", Path(__file__))
    assert len(store.list()) == 21
    assert list((store.root / ".cloudhpc-tmp").iterdir()) == []
    with pytest.raises(StorageError, match="reserved"):
        store.put(".cloudhpc-tmp/x", b"x")
    # A key cannot also be a directory of other keys on a filesystem; that is refused cleanly.
    with pytest.raises(StorageError, match="prefix"):
        store.put("k/00/child", b"x")
    for key in store.list():
        store.delete(key)
    assert sorted(p.name for p in store.root.iterdir()) == [".cloudhpc-tmp"]  # empty dirs pruned


def test_open_object_store(testbed: Testbed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    local = open_object_store("file://.cloudhpc/objects")
    assert isinstance(local, LocalObjectStore)
    assert local.root == tmp_path / ".cloudhpc" / "objects"
    absolute = open_object_store(f"file://{tmp_path}/abs")
    assert isinstance(absolute, LocalObjectStore)
    assert absolute.root == tmp_path / "abs"

    # S3 credentials come from the standard AWS variables, never from the URL.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", testbed.s3_access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", testbed.s3_secret_key)
    prefix = f"test-{uuid.uuid4().hex}/nested"
    s3 = open_object_store(f"s3://{testbed.s3_bucket}/{prefix}/", endpoint_url=testbed.s3_endpoint)
    assert isinstance(s3, S3ObjectStore)
    try:
        s3.put("a/b", b"c")
        direct = s3_object_store(testbed, "")
        assert direct.get(f"{prefix}/a/b") == b"c"
        assert s3.list() == ["a/b"]
    finally:
        purge(s3)

    for url in ["http://x/y", "s3://", "s3://user:secret@bucket/p", "file://", "objects"]:
        with pytest.raises(ConfigError):
            open_object_store(url)
