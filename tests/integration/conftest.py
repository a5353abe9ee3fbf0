"""Fixtures shared by the integration tests: the job store on both databases, and the object store
on both backends.

A module that needs another variant overrides the fixture by name (`test_store_pool.py` runs on
PostgreSQL only; `test_mailbox.py` needs S3, the mailbox's medium; `test_storage.py` pages S3
listings by two through `s3_options`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudhpc.storage import LocalObjectStore, ObjectStore
from cloudhpc.storage.s3 import S3ObjectStore
from cloudhpc.store import Store
from tests.integration.stores import StoreUrlFactory, fresh_s3, open_store, store_urls
from tests.testbed import Testbed


@pytest.fixture(params=store_urls(), ids=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A migrated, empty job store: a SQLite file, or a schema of its own on the testbed's PostgreSQL."""
    factory: StoreUrlFactory = request.param
    with factory(tmp_path) as url, open_store(url) as the_store:
        yield the_store


@pytest.fixture
def s3_options() -> dict[str, Any]:
    """Extra `S3ObjectStore` options for `s3_objects`; override it in a module to change them."""
    return {}


@pytest.fixture
def s3_objects(testbed: Testbed, s3_options: dict[str, Any]) -> Iterator[S3ObjectStore]:
    """A fresh `test-<uuid>/` prefix of the testbed's S3 bucket, emptied afterwards."""
    with fresh_s3(testbed, **s3_options) as objects:
        yield objects


@pytest.fixture(params=["local", "s3"])
def objects(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    """An empty object store: a local directory, or a fresh prefix of the testbed's S3 bucket."""
    if request.param == "local":
        return LocalObjectStore(tmp_path / "objects")
    s3: S3ObjectStore = request.getfixturevalue("s3_objects")
    return s3
