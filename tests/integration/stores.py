"""The stores tests run against, shared by `tests/integration/conftest.py` and the tests that need
more than its fixtures: job-store URLs (a fresh SQLite file, a fresh schema on the testbed's
PostgreSQL) and object stores (a fresh prefix of the testbed's S3 bucket)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import psycopg
import uvicorn
from fastapi import FastAPI

from cloudhpc.runtime.servers import BoundedHttpToolsProtocol
from cloudhpc.storage import LocalObjectStore, ObjectStore
from cloudhpc.storage.s3 import S3ObjectStore
from cloudhpc.store import Store
from tests.testbed import Testbed, load_testbed

StoreUrlFactory = Callable[[Path], AbstractContextManager[str]]


@contextlib.contextmanager
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    yield f"sqlite:///{tmp_path / 'state.db'}"


@contextlib.contextmanager
def postgres_url(tmp_path: Path) -> Iterator[str]:
    """A schema of its own per test, dropped afterwards, so tests never see each other's rows."""
    dsn = load_testbed().pg_dsn
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        sep = "&" if "?" in dsn else "?"
        yield f"{dsn}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def store_urls() -> list[StoreUrlFactory]:
    return [sqlite_url, postgres_url]


@contextlib.contextmanager
def open_store(url: str) -> Iterator[Store]:
    """A migrated job store at `url`, closed afterwards."""
    store = Store(url)
    try:
        store.migrate()
        yield store
    finally:
        store.close()


def s3_object_store(testbed: Testbed, prefix: str | None = None, **options: Any) -> S3ObjectStore:
    """The testbed bucket under `prefix` (default: a fresh `test-<uuid>/`); `options` override the
    testbed's endpoint and keys or pass S3ObjectStore's own (`page_size`)."""
    settings: dict[str, Any] = {
        "endpoint_url": testbed.s3_endpoint,
        "access_key": testbed.s3_access_key,
        "secret_key": testbed.s3_secret_key,
        **options,
    }
    return S3ObjectStore(
        testbed.s3_bucket, f"test-{uuid.uuid4().hex}" if prefix is None else prefix, **settings
    )


def purge(objects: ObjectStore) -> None:
    """Delete every object under the store's prefix."""
    while keys := objects.list("", limit=1000):
        for key in keys:
            objects.delete(key)


@contextlib.contextmanager
def fresh_s3(testbed: Testbed, **options: Any) -> Iterator[S3ObjectStore]:
    """A fresh prefix of the testbed bucket, emptied afterwards."""
    objects = s3_object_store(testbed, **options)
    try:
        yield objects
    finally:
        purge(objects)


def store_url(objects: ObjectStore) -> str:
    """The URL of the store's root as a job's `files` value names it (`file://...`, `s3://BUCKET/PREFIX`)."""
    if isinstance(objects, LocalObjectStore):
        return f"file://{objects.root}"
    assert isinstance(objects, S3ObjectStore)
    return f"s3://{objects.bucket}/{objects.prefix}"


def object_url(objects: ObjectStore, key: str) -> str:
    """The URL of the object `key` of `objects`."""
    return f"{store_url(objects).rstrip('/')}/{key}"


@contextlib.contextmanager
def served(app: FastAPI) -> Iterator[str]:
    """`app` under uvicorn on a loopback port for the block (the real HTTP path: chunked bodies,
    the app-wide body limit); yields its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", http=BoundedHttpToolsProtocol
    )  # the parser porter serves with (cloudhpc.runtime.servers), not uvicorn's choice
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive(), "porter did not start"
        assert time.monotonic() < deadline, "porter did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
