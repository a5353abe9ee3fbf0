"""Security review (#13's new surfaces) of agent queries: one user's flood of files requests must not
take a cluster's agent away from everyone else.

porter runs under uvicorn over SQLite or the testbed's PostgreSQL; the agent is this test speaking
the agent routes, answering one question at a time as the real one's SFTP channel is served (one
request at a time by sftp-server)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from cloudhpc.config import PorterConfig, Settings
from cloudhpc.porter.app import create_app
from cloudhpc.porter.routes_agent_queries import MAX_OPEN_QUESTIONS
from cloudhpc.storage import LocalObjectStore
from cloudhpc.store import Store
from tests.integration.stores import served
from tests.integration.test_agent_queries import running_job

WAIT = 3.0
"""porter.agent_query_wait here."""
ANSWER_TIME = 0.15
"""Seconds the test's agent takes per answer: a flood of 24 questions ahead of alice's takes 3.6 s
(over WAIT), the capped 8 take 1.2 s."""
FLOOD = 24
LISTING = {"result": {"path": "", "type": "directory", "entries": []}}


def _agent(url: str, token: str, stop: threading.Event) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
        while not stop.is_set():
            claimed = http.get("/api/v1/agent/queries", params={"cluster": "local", "wait": 0.5})
            for query in claimed.json()["queries"]:
                time.sleep(ANSWER_TIME)
                http.post(f"/api/v1/agent/queries/{query['id']}/answer", json=LISTING)


@pytest.fixture
def porter(store: Store, tmp_path: Path) -> Iterator[str]:
    settings = Settings(porter=PorterConfig(object_store=f"file://{tmp_path}/o", agent_query_wait=WAIT))
    app = create_app(settings, store=store, object_store=LocalObjectStore(tmp_path / "o"))
    stop = threading.Event()
    with served(app) as url:
        agent = threading.Thread(
            target=_agent, args=(url, store.create_token("ops", "agent", ["local"]), stop)
        )
        agent.start()
        try:
            yield url
        finally:
            stop.set()
            agent.join()


def test_one_users_flood_of_files_requests_leaves_the_agent_to_others(porter: str, store: Store) -> None:
    """mallory's 24 parallel files requests all became questions ahead of alice's, so alice waited
    out porter's agent_query_wait and got 504. Now mallory waits for at most MAX_OPEN_QUESTIONS
    answers at once (the rest 429 at once, naming the limit) and alice is answered."""
    mallory_job, alice_job = running_job(store, "mallory"), running_job(store, "alice")
    mallory, alice = store.create_token("mallory", "user"), store.create_token("alice", "user")

    def files(token: str, job_id: object) -> httpx.Response:
        with httpx.Client(base_url=porter, headers={"Authorization": f"Bearer {token}"}, timeout=30) as h:
            return h.get(f"/api/v1/jobs/{job_id}/files")

    with ThreadPoolExecutor(FLOOD) as pool:
        flood = [pool.submit(files, mallory, mallory_job.id) for _ in range(FLOOD)]
        time.sleep(0.3)  # mallory's questions are in first
        answer = files(alice, alice_job.id)
        codes = sorted(f.result().status_code for f in flood)
    assert answer.status_code == 200, answer.text
    assert codes.count(429) >= FLOOD - MAX_OPEN_QUESTIONS, codes
    refused = next(f.result() for f in flood if f.result().status_code == 429)
    assert refused.json()["error"]["code"] == "too_many_requests"
    assert f"at most {MAX_OPEN_QUESTIONS}" in refused.json()["error"]["message"]


def test_an_answer_porter_cannot_read_is_a_502_not_a_500(store: Store, tmp_path: Path) -> None:
    """An agent (of another version, or its owner's own making) answered a files question with a
    result that is not a listing: porter answered the user 500. Now 502 `cluster_error` naming the
    cluster."""
    settings = Settings(porter=PorterConfig(object_store=f"file://{tmp_path}/o", agent_query_wait=WAIT))
    app = create_app(settings, store=store, object_store=LocalObjectStore(tmp_path / "o"))
    job = running_job(store, "alice")
    user = {"Authorization": f"Bearer {store.create_token('alice', 'user')}"}
    agent = {"Authorization": f"Bearer {store.create_token('alice', 'agent', ['local'])}"}
    with (
        served(app) as url,
        ThreadPoolExecutor(1) as pool,
        httpx.Client(base_url=url, timeout=30) as http,
    ):
        asked = pool.submit(http.get, f"/api/v1/jobs/{job.id}/files", headers=user)
        claimed = http.get("/api/v1/agent/queries", params={"cluster": "local", "wait": WAIT}, headers=agent)
        [query] = claimed.json()["queries"]
        posted = http.post(
            f"/api/v1/agent/queries/{query['id']}/answer", json={"result": {"x": 1}}, headers=agent
        )
        assert posted.status_code == 200, posted.text
        answer = asked.result()
    assert answer.status_code == 502, answer.text
    assert answer.json()["error"]["code"] == "cluster_error"
    assert "'local'" in answer.json()["error"]["message"]
