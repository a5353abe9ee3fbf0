"""`POST /api/v1/jobs:estimate` on SQLite and PostgreSQL (#15 item 3): porter refuses what a
submission would refuse (422 naming the field, 404) and asks nothing then; a good body becomes an
`estimate` question carrying neither `env` values nor file contents, answered here by the agent's
own answering function over the local backend; a mailbox cluster is a 503 that says what to do;
and the units billed to ended jobs are summed per owner and project into
`cloudhpc_billed_units_total`. The estimate against SLURM itself is in tests/e2e/test_estimates.py."""

from __future__ import annotations

import asyncio
import base64
import secrets
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
from fastapi.testclient import TestClient

from cloudhpc.config import ClusterConfig, PorterConfig, Settings
from cloudhpc.domain.jobs import JobSpec
from cloudhpc.domain.queries import AgentQuery
from cloudhpc.domain.reports import JobReport
from cloudhpc.domain.states import JobState
from cloudhpc.hpc.local import LocalBackend
from cloudhpc.metrics.porter import PorterMetrics
from cloudhpc.porter.app import create_app
from cloudhpc.store import Store
from cloudhpc.submitter.queries import answer_query

CLUSTER = ClusterConfig.model_validate(
    {
        "backend": "local",
        "limits": {"partitions": {"small": {"max_time": "01:00:00"}, "gpu": {}}},
        "billing": {
            "unit": "BU",
            "partitions": {"small": {"cpu_hour": 1}, "gpu": {"cpu_hour": 1, "gpu_hour": 60}},
        },
    }
)
SPEC: dict[str, Any] = {
    "name": "est",
    "cluster": "local",
    "script": "true",
    "resources": {"cpus_per_task": 4, "time": "00:30:00", "gpus": 1},
    "env": {"API_KEY": "s3cret-value"},
    "files": {"data.txt": "private contents"},
}


class Api:
    def __init__(self, client: TestClient, store: Store, tmp_path: Path) -> None:
        self.client = client
        self.store = store
        self.user = {"Authorization": f"Bearer {store.create_token('alice', 'user')}"}
        self.agent = {"Authorization": f"Bearer {store.create_token('alice', 'agent', ['local'])}"}
        self.backend = LocalBackend("local", workdir=tmp_path / "work")
        self.questions: list[dict[str, Any]] = []

    def estimate(self, body: dict[str, Any]) -> httpx.Response:
        return self.client.post("/api/v1/jobs:estimate", json=body, headers=self.user)

    def answer_one(self) -> None:
        """Act as the agent: claim one question and answer it with the agent's own function."""
        body = self.client.get(
            "/api/v1/agent/queries", params={"cluster": "local", "wait": 10, "agent": "a"}, headers=self.agent
        ).json()
        [raw] = body["queries"]
        self.questions.append(raw)
        answer = asyncio.run(answer_query(self.backend, AgentQuery.model_validate(raw), CLUSTER))  # type: ignore[arg-type]
        posted = self.client.post(
            f"/api/v1/agent/queries/{raw['id']}/answer",
            json=answer.model_dump(mode="json"),
            headers=self.agent,
        )
        assert posted.status_code == 200, posted.text

    def estimate_answered(self, body: dict[str, Any]) -> httpx.Response:
        result: list[httpx.Response] = []
        asking = threading.Thread(target=lambda: result.append(self.estimate(body)))
        asking.start()
        self.answer_one()
        asking.join(30)
        return result[0]


def make_api(store: Store, tmp_path: Path, porter: PorterConfig) -> Iterator[Api]:
    settings = Settings(porter=porter, clusters={"local": CLUSTER})
    with TestClient(create_app(settings, store=store), raise_server_exceptions=False) as client:
        yield Api(client, store, tmp_path)


@pytest.fixture
def api(store: Store, tmp_path: Path) -> Iterator[Api]:
    yield from make_api(store, tmp_path, PorterConfig(agent_query_wait=5))


def test_an_estimate_names_each_allowed_partition_its_start_and_cost(api: Api) -> None:
    answer = api.estimate_answered(SPEC)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["cluster"], body["unit"], body["requested"], body["earliest"]) == (
        "local",
        "BU",
        None,
        "small",
    )
    # half an hour of 4 CPUs (and one GPU, priced on gpu only): 2 BU on small, 2 + 30 on gpu
    assert [(p["partition"], p["cost"], p["error"]) for p in body["partitions"]] == [
        ("small", 2.0, None),
        ("gpu", 32.0, None),
    ]
    assert all(p["start"] is not None for p in body["partitions"])
    [question] = api.questions
    assert question["kind"] == "estimate"
    sent = question["params"]["spec"]
    assert sent["env"] == {}
    assert sent["files"] == {"data.txt": ""}
    assert "s3cret-value" not in str(question)
    assert "private contents" not in str(question)
    assert api.store.list_jobs(owner="alice")[0] == []  # nothing was submitted


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"resources": {"time": "xx"}}, "resources.time"),
        ({"resources": {"time": "02:00:00", "partition": "small"}}, "resources.time"),
        ({"resources": {"partition": "debug"}}, "resources.partition"),
        ({"resources": {"nodes": 0}}, "resources.nodes"),
        ({"script": None}, "(body)"),
    ],
)
def test_what_a_submission_refuses_an_estimate_refuses_and_asks_nothing(
    api: Api, store: Store, change: dict[str, Any], field: str
) -> None:
    answer = api.estimate(SPEC | change)
    assert answer.status_code == 422, answer.text
    fields = [d["field"] for d in answer.json()["error"]["details"]]
    assert field in fields, answer.json()
    assert store.claim_queries("local", "a") == []


def test_auto_on_a_cluster_with_no_partitions_is_a_422_naming_partition(store: Store, tmp_path: Path) -> None:
    bare = Settings(
        porter=PorterConfig(agent_query_wait=2), clusters={"local": ClusterConfig(backend="local")}
    )
    with TestClient(create_app(bare, store=store), raise_server_exceptions=False) as client:
        store.create_token("alice", "agent", ["local"])  # her cluster: an agent token's user owns it
        headers = {"Authorization": f"Bearer {store.create_token('alice', 'user')}"}
        body = SPEC | {"resources": {"partition": "auto", "time": "10"}}
        for route in ("/api/v1/jobs:estimate", "/api/v1/jobs"):
            answer = client.post(route, json=body, headers=headers)
            assert answer.status_code == 422, answer.text
            assert answer.json()["error"]["details"][0]["field"] == "resources.partition"


def test_an_unknown_cluster_is_a_404(api: Api) -> None:
    assert api.estimate(SPEC | {"cluster": "elsewhere"}).status_code == 404


def test_a_mailbox_cluster_is_a_503_that_says_what_to_do(store: Store, tmp_path: Path) -> None:
    key = tmp_path / "local.key"
    key.write_text(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
    key.chmod(0o600)
    porter = PorterConfig(
        mailbox_clusters=["local"],
        mailbox_key_dir=tmp_path,
        object_store=f"file://{tmp_path / 'objects'}",
        agent_query_wait=2,
    )
    for api in make_api(store, tmp_path, porter):
        answer = api.estimate(SPEC)
        assert answer.status_code == 503
        error = answer.json()["error"]
        assert error["code"] == "agent_query_unsupported"
        assert "S3 mailbox" in error["message"]
        assert "partition: auto" in error["message"]


def ended_job(store: Store, owner: str, billed: dict[str, Any] | None, account: str | None) -> UUID:
    job, _ = store.create_job(owner, JobSpec(name="b", cluster="local", script="true"))
    for seq, state in enumerate((JobState.PREPARING, JobState.QUEUED, JobState.COMPLETED), 1):
        store.apply_report(JobReport(job_id=job.id, seq=seq, state=state, slurm_job_id="7"), actor="t")
    document: dict[str, Any] = {"slurm_job_id": "7", "records": [{"job_id": "7", "account": account}]}
    if billed is not None:
        document["billed"] = billed
    store.set_accounting(job.id, document)
    return job.id


def test_billed_units_are_summed_per_owner_and_project(store: Store) -> None:
    ended_job(store, "alice", {"units": 2.5, "unit": "BU", "source": "rates"}, "project_1")
    ended_job(store, "alice", {"units": 1.25, "unit": "BU", "source": "sacct"}, "project_1")
    ended_job(store, "alice", {"units": 4.0, "unit": "BU", "source": "rates"}, None)
    ended_job(store, "bob", {"units": 8.0, "unit": "BU", "source": "rates"}, "project_2")
    ended_job(store, "bob", None, "project_2")  # no rates on its cluster: not counted
    assert store.billed_units() == {
        ("local", "alice", "project_1", "BU"): 3.75,
        ("local", "alice", "", "BU"): 4.0,
        ("local", "bob", "project_2", "BU"): 8.0,
    }
    body = PorterMetrics(store, clusters=["local"]).render().decode()
    lines = [line for line in body.splitlines() if line.startswith("cloudhpc_billed_units_total{")]
    assert (
        'cloudhpc_billed_units_total{cluster="local",owner="alice",project="project_1",unit="BU"} 3.75'
        in lines
    )
    assert len(lines) == 3
    assert "# TYPE cloudhpc_billed_units_total counter" in body


def _billed_lines(metrics: PorterMetrics) -> dict[str, float]:
    lines = metrics.render().decode().splitlines()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith("cloudhpc_billed_units_total{")
    }


def test_billed_units_after_the_first_scrape_come_from_the_documents_stored_since(store: Store) -> None:
    """The first scrape reads every document; later ones only those stored since (10,000 documents
    parsed on every scrape took /metrics from 21 to 109 ms in bench/metrics.py): a document stored
    or replaced after a scrape still counts, once."""
    metrics = PorterMetrics(store, clusters=["local"])
    first = ended_job(store, "alice", {"units": 2.5, "unit": "BU", "source": "rates"}, "p1")
    alice = 'cloudhpc_billed_units_total{cluster="local",owner="alice",project="p1",unit="BU"}'
    assert _billed_lines(metrics) == {alice: 2.5}
    ended_job(store, "alice", {"units": 1.0, "unit": "BU", "source": "rates"}, "p1")
    assert _billed_lines(metrics) == {alice: 3.5}
    assert _billed_lines(metrics) == {alice: 3.5}  # read again (the settle margin), counted once
    document = {"slurm_job_id": "7", "records": [{"job_id": "7", "account": "p1"}]}
    store.set_accounting(first, document | {"billed": {"units": 4.0, "unit": "BU", "source": "sacct"}})
    assert _billed_lines(metrics) == {alice: 5.0}  # replaced: its new figure, not both
    store.set_accounting(first, document)  # replaced by one without units
    assert _billed_lines(metrics) == {alice: 1.0}
    assert len(store.billed_documents(datetime.now(UTC) + timedelta(minutes=5))) == 0


def test_the_web_view_shows_a_jobs_estimate_on_demand(api: Api) -> None:
    """The job page links to its estimate (asked only when followed: a round trip to the agent); the
    estimate page shows each partition's start and cost with the earliest marked; another
    user's job is a 404 without a question to the agent."""
    created = api.client.post("/api/v1/jobs", json=SPEC, headers=api.user)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    page = api.client.get(f"/ui/jobs/{job_id}", headers=api.user)
    assert page.status_code == 200
    assert f'href="{job_id}/estimate"' in page.text
    assert api.store.claim_queries("local", "nobody") == []  # the job page asked nothing

    result: list[httpx.Response] = []
    asking = threading.Thread(
        target=lambda: result.append(api.client.get(f"/ui/jobs/{job_id}/estimate", headers=api.user))
    )
    asking.start()
    api.answer_one()
    asking.join(30)
    answer = result[0]
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/html")
    assert '<h1 id="job-name">est</h1>' in answer.text
    assert '<tr class="earliest"><td>small</td>' in answer.text
    assert "<td>gpu</td>" in answer.text
    assert " BU</td>" in answer.text
    assert '<strong id="earliest">small</strong>' in answer.text
    assert "s3cret-value" not in repr(api.questions[-1]["params"])

    bob = {"Authorization": f"Bearer {api.store.create_token('bob', 'user')}"}
    assert api.client.get(f"/ui/jobs/{job_id}/estimate", headers=bob).status_code == 404
    assert api.store.claim_queries("local", "nobody") == []
