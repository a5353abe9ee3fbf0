"""Token verification is cached for a few seconds: a revoked token stops working within the TTL.

Against the real app and job store (SQLite and the testbed's PostgreSQL): the cache saves a
database lookup per request (bench/api.py), and must not keep a revoked token alive for longer
than its TTL.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from cloudhpc.config import Settings
from cloudhpc.porter.app import create_app
from cloudhpc.store import Store

TTL = 0.5


@pytest.fixture
def app(store: Store) -> Iterator[tuple[TestClient, Store]]:
    application = create_app(Settings(), store=store)
    application.state.porter.tokens.ttl = TTL
    with TestClient(application) as client:
        yield client, store


def test_a_revoked_token_stops_working_within_the_ttl(app: tuple[TestClient, Store]) -> None:
    client, store = app
    token = store.create_token("alice", "user")
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/v1/jobs", headers=headers).status_code == 200
    assert store.revoke_token(token)
    revoked_at = time.monotonic()
    while client.get("/api/v1/jobs", headers=headers).status_code == 200:
        assert time.monotonic() - revoked_at < TTL + 0.5, "a revoked token outlived the cache TTL"
        time.sleep(0.05)
    assert client.get("/api/v1/jobs", headers=headers).status_code == 401


def test_a_token_created_after_a_failed_attempt_works_at_once(app: tuple[TestClient, Store]) -> None:
    """Unknown tokens are cached as unknown; a new token is a different key, so it is never hit."""
    client, store = app
    assert client.get("/api/v1/jobs", headers={"Authorization": "Bearer chpc_nope"}).status_code == 401
    token = store.create_token("bob", "user")
    assert client.get("/api/v1/jobs", headers={"Authorization": f"Bearer {token}"}).status_code == 200
