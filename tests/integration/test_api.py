"""porter's HTTP API contract: routes, auth matrix, bad input, on SQLite and the testbed's PostgreSQL."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cloudhpc.config import Settings
from cloudhpc.domain.reports import JobReport
from cloudhpc.porter.app import create_app
from cloudhpc.store import Store

BATCH = {"name": "hello", "cluster": "local", "script": "echo hi"}


class Api:
    def __init__(self, client: TestClient, store: Store) -> None:
        self.client = client
        self.store = store
        self.alice = store.create_token("alice", "user")
        self.bob = store.create_token("bob", "user")
        self.admin = store.create_token("root", "admin")
        self.agent = store.create_token("agent-local", "agent", ["local"])
        self.other_agent = store.create_token("agent-x", "agent", ["elsewhere"])

    def call(self, method: str, path: str, token: str | None, **kwargs: Any) -> Any:
        headers = kwargs.pop("headers", {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return self.client.request(method, path, headers=headers, **kwargs)

    def submit(self, token: str, body: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        return self.call("POST", "/api/v1/jobs", token, json=body or BATCH, **kwargs)


@pytest.fixture
def api(store: Store) -> Iterator[Api]:
    # alice and bob may use the embedded `local` cluster (its agent token is agent-local's)
    access = {"clusters": {"local": {"users": ["alice", "bob"]}}}
    app = create_app(Settings.model_validate({"porter": {"access": access}}), store=store)
    app.state.porter.recheck_interval = 0.2
    with TestClient(app) as client:
        yield Api(client, store)


def assert_error(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    if code:
        assert body["error"]["code"] == code
    error: dict[str, Any] = body["error"]
    return error


def test_health_and_openapi_need_no_token(api: Api) -> None:
    assert api.call("GET", "/healthz", None).json() == {"status": "ok"}
    assert api.call("GET", "/readyz", None).status_code == 200
    spec = api.call("GET", "/openapi.json", None).json()
    assert "/api/v1/jobs" in spec["paths"]
    assert "/api/v1/jobs/{job_id}/accounting" in spec["paths"]


def test_submit_get_list(api: Api) -> None:
    created = api.submit(api.alice)
    assert created.status_code == 201
    job = created.json()
    assert job["state"] == "pending"
    assert job["owner"] == "alice"
    assert job["spec"]["script"] == "echo hi"
    expected = {
        "id", "name", "owner", "cluster", "kind", "state", "reason", "cancel_requested", "slurm_job_id",
        "exit_code", "created_at", "submitted_at", "started_at", "ended_at", "spec", "bridges", "artifacts",
        "dependency", "cancel_tasks",  # since #13: arrays and `after`
        "restarts",  # since #13: checkpoint and requeue
    }  # fmt: skip
    assert set(job) == expected
    got = api.call("GET", f"/api/v1/jobs/{job['id']}", api.alice).json()
    assert got["id"] == job["id"]
    listed = api.call("GET", "/api/v1/jobs", api.alice).json()
    assert [j["id"] for j in listed["jobs"]] == [job["id"]]


def test_auth_matrix(api: Api) -> None:
    job = api.submit(api.alice).json()
    path = f"/api/v1/jobs/{job['id']}"
    assert_error(api.call("GET", path, None), 401, "unauthorized")
    assert_error(api.call("GET", path, "chpc_not-a-token"), 401, "unauthorized")
    assert_error(api.call("GET", path, api.bob), 404, "not_found")  # no existence leak
    assert_error(api.call("POST", f"{path}/cancel", api.bob), 404)
    assert_error(api.call("GET", path, api.agent), 403, "forbidden")
    assert_error(api.call("GET", "/api/v1/agent/jobs?cluster=local", api.alice), 403)
    assert_error(api.call("GET", "/api/v1/agent/jobs?cluster=local", api.other_agent), 403)
    assert api.call("GET", path, api.admin).status_code == 200
    assert api.call("GET", "/api/v1/jobs", api.bob).json()["jobs"] == []
    assert len(api.call("GET", "/api/v1/jobs", api.admin).json()["jobs"]) == 1
    nothing = api.call("GET", f"/api/v1/jobs/{uuid.uuid4()}", api.alice)
    assert_error(nothing, 404, "not_found")
    assert nothing.json()["error"]["message"] == api.call("GET", path, api.bob).json()["error"]["message"]


BAD_BODIES: list[tuple[dict[str, Any], str]] = [
    ({**BATCH, "name": "$(id)"}, "name"),
    ({**BATCH, "name": ""}, "name"),
    ({**BATCH, "files": {"data": "file:///etc/hostname"}}, "files.data"),
    ({**BATCH, "kind": "spark"}, "kind"),
    ({**BATCH, "script": None}, "(body)"),
    ({**BATCH, "surprise": 1}, "surprise"),
    ({**BATCH, "resources": {"nodes": 0}}, "resources.nodes"),
    ({**BATCH, "resources": {"time": "forever"}}, "resources.time"),
    ({**BATCH, "resources": {"mem": "1 GB"}}, "resources.mem"),
    ({**BATCH, "resources": {"partition": "a b"}}, "resources.partition"),
    ({**BATCH, "environment": {"packages": ["--index-url=x"]}}, "environment.packages"),
    ({**BATCH, "environment": {"packages": ["git+https://example.org/x.git"]}}, "environment.packages"),
    ({**BATCH, "environment": {"packages": ["x @ file:///home/bob/x"]}}, "environment.packages"),
    ({**BATCH, "environment": {"packages": ["x --index-url http://evil"]}}, "environment.packages"),
    ({**BATCH, "environment": {"modules": ["a;b"]}}, "environment.modules.0"),
    ({**BATCH, "files": {"../escape": "x"}}, "files"),
    ({**BATCH, "files": {"/etc/passwd": "x"}}, "files"),
    ({**BATCH, "env": {"BAD NAME": "x"}}, "env"),
    ({**BATCH, "env": {"X": 5}}, "env.X"),
]


@pytest.mark.parametrize(("body", "field"), BAD_BODIES)
def test_bad_input_is_422_naming_the_field_and_stores_nothing(
    api: Api, body: dict[str, Any], field: str
) -> None:
    error = assert_error(api.submit(api.alice, body), 422, "invalid_request")
    fields = [d["field"] for d in error["details"]]
    assert any(f == field or f.startswith(field) for f in fields), fields
    assert field.split(".")[0] in error["message"] or field == "(body)"
    assert api.call("GET", "/api/v1/jobs", api.admin).json()["jobs"] == []


def test_bad_json_and_bad_query(api: Api) -> None:
    raw = api.call(
        "POST", "/api/v1/jobs", api.alice, content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_error(raw, 422)
    assert_error(api.call("GET", "/api/v1/jobs?state=bogus", api.alice), 422)
    assert_error(api.call("GET", "/api/v1/jobs?limit=0", api.alice), 422)
    assert_error(api.call("GET", "/api/v1/jobs/not-a-uuid", api.alice), 422)


def test_idempotency_key(api: Api) -> None:
    first = api.submit(api.alice, headers={"Idempotency-Key": "k1"})
    again = api.submit(api.alice, headers={"Idempotency-Key": "k1"})
    assert first.status_code == 201
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    other_user = api.submit(api.bob, headers={"Idempotency-Key": "k1"})
    assert other_user.status_code == 201
    assert other_user.json()["id"] != first.json()["id"]
    conflict = api.submit(api.alice, {**BATCH, "script": "echo different"}, headers={"Idempotency-Key": "k1"})
    assert_error(conflict, 409, "idempotency_conflict")


def test_cancel_pending_job_is_immediate(api: Api) -> None:
    job = api.submit(api.alice).json()
    cancelled = api.call("POST", f"/api/v1/jobs/{job['id']}/cancel", api.alice).json()
    assert cancelled["state"] == "cancelled"
    assert cancelled["cancel_requested"] is True


def test_list_filters_and_paging(api: Api) -> None:
    ids = [api.submit(api.alice, {**BATCH, "name": f"job{i}"}).json()["id"] for i in range(5)]
    api.call("POST", f"/api/v1/jobs/{ids[0]}/cancel", api.alice)
    page = api.call("GET", "/api/v1/jobs?limit=2", api.alice).json()
    assert [j["id"] for j in page["jobs"]] == ids[::-1][:2]
    seen = [j["id"] for j in page["jobs"]]
    while page["next_cursor"]:
        page = api.call(
            "GET", "/api/v1/jobs", api.alice, params={"limit": 2, "cursor": page["next_cursor"]}
        ).json()
        seen += [j["id"] for j in page["jobs"]]
    assert seen == ids[::-1]
    cancelled = api.call("GET", "/api/v1/jobs?state=cancelled", api.alice).json()["jobs"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    named = api.call("GET", "/api/v1/jobs?name=job3", api.alice).json()["jobs"]
    assert [j["id"] for j in named] == [ids[3]]


def _report(api: Api, job_id: str, seq: int, state: str, **extra: Any) -> Any:
    report = JobReport(job_id=uuid.UUID(job_id), seq=seq, state=state, **extra).model_dump(mode="json")  # type: ignore[arg-type]
    return api.call("POST", "/api/v1/agent/reports", api.agent, json={"reports": [report]})


def test_agent_protocol_and_stale_reports(api: Api) -> None:
    job = api.submit(api.alice).json()
    work = api.call("GET", "/api/v1/agent/work?cluster=local", api.agent).json()["jobs"]
    assert [j["id"] for j in work] == [job["id"]]
    assert api.call("GET", "/api/v1/agent/work?cluster=local", api.agent).json()["jobs"] == []  # leased
    assert _report(api, job["id"], 10, "queued", slurm_job_id="42").json() == {"applied": 1, "ignored": 0}
    assert _report(api, job["id"], 30, "running").json()["applied"] == 1
    assert _report(api, job["id"], 20, "queued").json() == {"applied": 0, "ignored": 1}  # stale
    current = api.call("GET", f"/api/v1/jobs/{job['id']}", api.alice).json()
    assert (current["state"], current["slurm_job_id"]) == ("running", "42")
    assert [
        j["id"] for j in api.call("GET", "/api/v1/agent/jobs?cluster=local", api.agent).json()["jobs"]
    ] == [job["id"]]
    out = api.call("POST", f"/api/v1/agent/jobs/{job['id']}/output?offset=0", api.agent, content=b"hello ")
    assert out.json() == {"size": 6}
    again = api.call("POST", f"/api/v1/agent/jobs/{job['id']}/output?offset=0", api.agent, content=b"hello ")
    assert again.json() == {"size": 6}  # a retried upload never duplicates bytes
    api.call("POST", f"/api/v1/agent/jobs/{job['id']}/output?offset=6", api.agent, content=b"world")
    assert _report(api, job["id"], 40, "completed", exit_code=0).json()["applied"] == 1
    logs = api.call("GET", f"/api/v1/jobs/{job['id']}/logs", api.alice)
    assert logs.content == b"hello world"
    assert logs.headers["X-Complete"] == "true"
    assert api.call("GET", f"/api/v1/jobs/{job['id']}/logs?offset=6", api.alice).content == b"world"
    followed = api.call("GET", f"/api/v1/jobs/{job['id']}/logs?follow=true", api.alice)
    assert followed.content == b"hello world"
    assert_error(api.call("GET", f"/api/v1/jobs/{job['id']}/accounting", api.alice), 404)
    record = {
        "records": [{"state": "COMPLETED", "elapsed_seconds": 3}],
        "efficiency": {"cpu_efficiency": 0.5},
    }
    assert_error(api.call("PUT", f"/api/v1/jobs/{job['id']}/accounting", api.agent, json=record), 405)
    api.call("PUT", f"/api/v1/agent/jobs/{job['id']}/accounting", api.agent, json=record)
    assert api.call("GET", f"/api/v1/jobs/{job['id']}/accounting", api.alice).json() == record
    other = api.call("POST", "/api/v1/agent/reports", api.other_agent, json={"reports": [
        JobReport(job_id=uuid.UUID(job["id"]), seq=99, state="failed").model_dump(mode="json")  # type: ignore[arg-type]
    ]})  # fmt: skip
    assert_error(other, 403, "forbidden")


def test_wait_returns_on_state_change(api: Api) -> None:
    job = api.submit(api.alice).json()
    timer = threading.Timer(0.5, lambda: _report(api, job["id"], 5, "queued", slurm_job_id="7"))
    started = time.monotonic()
    timer.start()
    try:
        got = api.call("GET", f"/api/v1/jobs/{job['id']}?wait=10&since_state=pending", api.alice).json()
    finally:
        timer.join()
    elapsed = time.monotonic() - started
    assert got["state"] == "queued"
    assert 0.4 < elapsed < 5
    started = time.monotonic()
    same = api.call("GET", f"/api/v1/jobs/{job['id']}?wait=0.6", api.alice).json()
    assert same["state"] == "queued"
    assert time.monotonic() - started >= 0.5


def test_clusters_and_metrics(api: Api) -> None:
    api.call("GET", "/api/v1/agent/work?cluster=local", api.agent)
    clusters = api.call("GET", "/api/v1/clusters", api.alice).json()["clusters"]
    assert clusters == [
        {
            "name": "local",
            "backend": "local",
            "agent_last_seen": clusters[0]["agent_last_seen"],
            "agent_online": True,
        }
    ]
    api.submit(api.alice)
    assert api.call("GET", "/metrics", None).status_code == 401  # owners and job names: not for anyone
    metrics = api.call("GET", "/metrics", api.admin).text
    assert 'cloudhpc_jobs{cluster="local",state="pending"} 1\n' in metrics
    assert "cloudhpc_api_request_duration_seconds_bucket" in metrics
    assert "cloudhpc_agent_last_seen_timestamp_seconds" in metrics


def test_a_task_output_not_stored_yet_is_asked_again_for_not_missing(api: Api) -> None:
    """The agent stores an array's last tasks' outputs after it reports the end: right after
    `wait`, such an output is 503 `not_stored_yet` (the SDK asks again), not missing; long after
    the end, or before the task ended, it is 404."""
    fresh, old, running = (api.submit(api.alice, {**BATCH, "name": n, "array": "0-2"}).json() for n in "abc")
    api.call("GET", "/api/v1/agent/work?cluster=local", api.agent)
    now = datetime.now(UTC)
    seq = iter(range(1, 100))
    for job, ended in ((fresh, now), (old, now - timedelta(minutes=11))):
        for state in ("queued", "running"):
            assert _report(api, job["id"], next(seq), state, slurm_job_id="7").status_code == 200
        answer = _report(api, job["id"], next(seq), "completed", ended_at=ended.isoformat())
        assert answer.status_code == 200, answer.text
    for job, status, code in (
        (fresh, 503, "not_stored_yet"),
        (old, 404, "not_available"),
        (running, 404, "not_available"),
    ):
        logs = api.call("GET", f"/api/v1/jobs/{job['id']}/logs?task=1", api.alice)
        assert_error(logs, status, code)
        artifact = api.call("GET", f"/api/v1/jobs/{job['id']}/artifacts/tasks/1/output.log", api.alice)
        assert_error(artifact, status, code)
    # a name that is no task's output of the array stays plainly missing
    assert_error(
        api.call("GET", f"/api/v1/jobs/{fresh['id']}/artifacts/tasks/9/output.log", api.alice),
        404,
        "not_found",
    )
    # and another user learns nothing of it
    assert_error(api.call("GET", f"/api/v1/jobs/{fresh['id']}/logs?task=1", api.bob), 404, "not_found")
