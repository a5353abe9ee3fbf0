"""Agent queries (#13 item 8) on SQLite and PostgreSQL: the store's question/answer rows, and
porter's `GET /jobs/{id}/files` waiting for an agent that answers over HTTP, with its errors, the
504 when no agent answers, the 503 for an S3-mailbox cluster and the 422s for bad paths and
`outputs`. The agent here is the test itself, speaking the agent routes; the real agent on the
real clusters is in tests/e2e/test_job_files.py."""

from __future__ import annotations

import base64
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from cloudhpc.config import PorterConfig, Settings
from cloudhpc.domain.jobs import Job, JobSpec
from cloudhpc.domain.queries import QueryAnswer, QueryError
from cloudhpc.domain.reports import JobReport
from cloudhpc.domain.states import JobState
from cloudhpc.porter.app import create_app
from cloudhpc.store import Store
from cloudhpc.store.engine import utcnow
from cloudhpc.store.queries import _finished
from tests.integration.stores import open_store, postgres_url
from tests.integration.test_replicas import BATCH, QUICK, two_replicas

LISTING = {"path": "", "type": "directory", "entries": [{"name": "a b.txt", "type": "file", "size": 3}]}


def running_job(store: Store, owner: str = "alice") -> Job:
    job, _ = store.create_job(owner, JobSpec(name="j", cluster="local", script="sleep 60"))
    for seq, state in enumerate((JobState.PREPARING, JobState.QUEUED, JobState.RUNNING), 1):
        store.apply_report(JobReport(job_id=job.id, seq=seq, state=state, slurm_job_id="local-x"), actor="t")
    return job


def test_a_question_is_claimed_once_and_answered_once(store: Store) -> None:
    job = running_job(store)
    query_id = store.ask_agent("local", "job_files", {"path": "x"}, job_id=job.id, ttl=30)
    [query] = store.claim_queries("local", "agent-1")
    assert (query.id, query.kind, query.job_id, query.params) == (
        query_id,
        "job_files",
        job.id,
        {"path": "x"},
    )
    assert store.claim_queries("local", "agent-1") == []  # claimed: not handed out again at once
    assert store.claim_queries("other", "agent-2") == []
    assert store.query_cluster(query_id) == "local"
    assert store.query_answer(query_id) is None
    answer = QueryAnswer(error=QueryError(status=403, code="outside_job_directory", message="no"))
    assert store.answer_query(query_id, answer) is True
    assert store.answer_query(query_id, QueryAnswer(result={})) is False  # the first answer stays
    assert store.query_answer(query_id) == answer


def test_an_expired_question_is_not_handed_out(store: Store) -> None:
    store.ask_agent("local", "job_files", {}, ttl=0)
    assert store.claim_queries("local", "agent-1") == []


def test_the_sweep_of_finished_questions_finds_them_by_index(store: Store) -> None:
    """Every new question first deletes the finished ones (`_finished`): through the index on
    `expires_at` (migration 0007), not a scan of every live question (67.5 ms per question with
    240,000 rows on SQLite before; `bench/agent_queries.py`)."""
    sweep = _finished(utcnow()).compile(dialect=store.engine.dialect, compile_kwargs={"literal_binds": True})
    with store.engine.connect() as conn:
        if store.is_postgresql:
            conn.exec_driver_sql("SET LOCAL enable_seqscan = off")  # a small table is scanned anyway
            plan = " ".join(str(row[0]) for row in conn.exec_driver_sql(f"EXPLAIN {sweep}"))
        else:
            plan = " ".join(str(row[-1]) for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sweep}"))
    assert "ix_agent_queries_expires_at" in plan, plan


class Api:
    def __init__(self, client: TestClient, store: Store) -> None:
        self.client = client
        self.user = {"Authorization": f"Bearer {store.create_token('alice', 'user')}"}
        self.agent = {"Authorization": f"Bearer {store.create_token('alice', 'agent', ['local'])}"}

    def files(self, job: Job, **params: Any) -> httpx.Response:
        return self.client.get(f"/api/v1/jobs/{job.id}/files", params=params, headers=self.user)

    def answer_next(self, answer: dict[str, Any]) -> dict[str, Any]:
        """Act as the agent: wait for one question, answer it; returns the question."""
        body = self.client.get(
            "/api/v1/agent/queries", params={"cluster": "local", "wait": 10, "agent": "a"}, headers=self.agent
        ).json()
        [query] = body["queries"]
        posted = self.client.post(
            f"/api/v1/agent/queries/{query['id']}/answer", json=answer, headers=self.agent
        )
        assert posted.status_code == 200, posted.text
        return dict(query)

    def ask_while_answering(
        self, job: Job, answer: dict[str, Any], **params: Any
    ) -> tuple[httpx.Response, dict[str, Any]]:
        result: list[httpx.Response] = []
        asking = threading.Thread(target=lambda: result.append(self.files(job, **params)))
        asking.start()
        query = self.answer_next(answer)
        asking.join(30)
        return result[0], query


def make_api(store: Store, porter: PorterConfig) -> Iterator[Api]:
    settings = Settings(porter=porter)
    with TestClient(create_app(settings, store=store), raise_server_exceptions=False) as client:
        yield Api(client, store)


@pytest.fixture
def api(store: Store) -> Iterator[Api]:
    yield from make_api(store, PorterConfig(agent_query_wait=2))


def test_files_are_answered_by_the_agent(api: Api, store: Store) -> None:
    job = running_job(store)
    answer, query = api.ask_while_answering(job, {"result": LISTING}, path="sub dir/", offset=5, length=7)
    assert answer.status_code == 200, answer.text
    assert answer.json() == LISTING | {"truncated": False}
    assert query["kind"] == "job_files"
    assert query["job_id"] == str(job.id)
    assert query["params"] == {"path": "sub dir", "offset": 5, "length": 7}
    assert store.query_cluster(query["id"]) is None  # the asker deleted its question with the answer


def test_a_question_given_up_on_is_deleted_and_a_late_answer_finds_none(api: Api, store: Store) -> None:
    """Rows live only while a request waits: the table does not grow with every files request (the
    sweep of finished rows scans it)."""
    job = running_job(store)
    result: list[httpx.Response] = []
    asking = threading.Thread(target=lambda: result.append(api.files(job, path="x")))
    asking.start()
    claimed = api.client.get(
        "/api/v1/agent/queries", params={"cluster": "local", "wait": 10, "agent": "a"}, headers=api.agent
    ).json()
    [query] = claimed["queries"]  # a slow agent: claimed in time, answered after the 2 s wait
    asking.join(30)
    assert result[0].status_code == 504
    assert store.query_cluster(query["id"]) is None
    late = api.client.post(
        f"/api/v1/agent/queries/{query['id']}/answer", json={"result": LISTING}, headers=api.agent
    )
    assert late.status_code == 404
    assert store.claim_queries("local", "another-agent") == []


def test_the_agents_refusal_is_the_answer(api: Api, store: Store) -> None:
    job = running_job(store)
    error = {
        "status": 403,
        "code": "outside_job_directory",
        "message": "'etc' resolves outside the job directory",
    }
    answer, _ = api.ask_while_answering(job, {"error": error}, path="etc")
    assert answer.status_code == 403
    assert answer.json()["error"]["code"] == "outside_job_directory"


def test_no_agent_is_a_504_after_the_wait(api: Api, store: Store) -> None:
    job = running_job(store)
    started = time.monotonic()
    answer = api.files(job, path="x")
    assert answer.status_code == 504
    assert answer.json()["error"]["code"] == "agent_timeout"
    assert "did not answer within 2 s" in answer.json()["error"]["message"]
    assert 2 <= time.monotonic() - started < 6


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/../../b", "a//b", ".cloudhpc/env", "a\x00b"])
def test_bad_paths_are_422_naming_path_and_never_asked(api: Api, store: Store, path: str) -> None:
    job = running_job(store)
    answer = api.files(job, path=path)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["details"][0]["field"] == "path"
    assert store.claim_queries("local", "a") == []


def test_a_job_not_on_its_cluster_is_a_409(api: Api, store: Store) -> None:
    job, _ = store.create_job("alice", JobSpec(name="j", cluster="local", script="x"))
    answer = api.files(job)
    assert answer.status_code == 409
    assert answer.json()["error"]["code"] == "not_on_cluster"


def test_another_users_job_is_a_404(api: Api, store: Store) -> None:
    job = running_job(store, owner="bob")
    assert api.files(job).status_code == 404


def test_an_answer_must_be_result_or_error(api: Api, store: Store) -> None:
    job = running_job(store)
    query_id = store.ask_agent("local", "job_files", {}, job_id=job.id)
    both = {"result": {}, "error": {"status": 404, "code": "x", "message": "y"}}
    for body in (both, {}):
        posted = api.client.post(f"/api/v1/agent/queries/{query_id}/answer", json=body, headers=api.agent)
        assert posted.status_code == 422, posted.text


def test_an_agent_of_another_cluster_cannot_claim_or_answer(api: Api, store: Store) -> None:
    other = {"Authorization": f"Bearer {store.create_token('alice', 'agent', ['elsewhere'])}"}
    claimed = api.client.get("/api/v1/agent/queries", params={"cluster": "local"}, headers=other)
    assert claimed.status_code == 403
    query_id = store.ask_agent("local", "job_files", {})
    posted = api.client.post(f"/api/v1/agent/queries/{query_id}/answer", json={"result": {}}, headers=other)
    assert posted.status_code == 403


def test_a_mailbox_cluster_is_a_503_that_says_why(store: Store, tmp_path: Path) -> None:
    key = tmp_path / "local.key"
    key.write_text(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
    key.chmod(0o600)
    porter = PorterConfig(
        mailbox_clusters=["local"],
        mailbox_key_dir=tmp_path,
        object_store=f"file://{tmp_path / 'objects'}",
        agent_query_wait=2,
    )
    for api in make_api(store, porter):
        answer = api.files(running_job(store))
        assert answer.status_code == 503
        assert answer.json()["error"]["code"] == "agent_query_unsupported"
        assert "S3 mailbox" in answer.json()["error"]["message"]


def test_bad_outputs_are_422_naming_the_pattern(api: Api) -> None:
    for patterns, field in (
        (["ok/*.csv", "../x"], "outputs.1"),
        (["/abs"], "outputs.0"),
        (["x"] * 65, "outputs"),
    ):
        spec = {"name": "j", "cluster": "local", "script": "x", "outputs": patterns}
        answer = api.client.post("/api/v1/jobs", json=spec, headers=api.user)
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["details"][0]["field"] == field


def test_a_question_and_its_answer_cross_replicas(tmp_path: Path) -> None:
    """On PostgreSQL with two porter replicas that re-check the store only once a minute: the
    question asked on one wakes the agent's poll on the other, and the answer posted there wakes
    the asking route, each within QUICK (only the store's NOTIFY can do that)."""
    with postgres_url(tmp_path) as url, open_store(url), two_replicas(url) as (a, b):
        job = a.client.post("/api/v1/jobs", json=BATCH, headers=a.user).json()
        a.client.get("/api/v1/agent/work", params={"cluster": "local", "agent": "a1"}, headers=a.agent)
        report = {"job_id": job["id"], "seq": 1, "state": "running", "slurm_job_id": "local-1"}
        a.client.post("/api/v1/agent/reports", json={"reports": [report]}, headers=a.agent)
        with ThreadPoolExecutor(2) as pool:
            poll = pool.submit(
                b.client.get,
                "/api/v1/agent/queries",
                params={"cluster": "local", "agent": "a1", "wait": 30},
                headers=b.agent,
            )
            time.sleep(1.0)  # the poll waits inside replica b now
            asked_at = time.monotonic()
            asking = pool.submit(
                a.client.get, f"/api/v1/jobs/{job['id']}/files", params={"path": "x"}, headers=a.user
            )
            [query] = poll.result(timeout=40).json()["queries"]
            assert time.monotonic() - asked_at < QUICK
            answered_at = time.monotonic()
            b.client.post(
                f"/api/v1/agent/queries/{query['id']}/answer", json={"result": LISTING}, headers=b.agent
            )
            answer = asking.result(timeout=40)
        assert answer.status_code == 200, answer.text
        assert time.monotonic() - answered_at < QUICK
