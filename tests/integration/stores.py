"""Job-store URLs for tests: a fresh SQLite file, and a fresh schema on the testbed's PostgreSQL."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import psycopg

from tests.testbed import load_testbed

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
