"""porter's answers are typed in its OpenAPI schema: each user route's 200 body is a model of
`domain/api.py` (the one the SDK reads it with), not an untyped object, and the accounting document
an agent stores is checked against that model, so that what users read back always fits it.

On both job stores (the `store` fixture) through the real app in-process.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cloudhpc.client import Client
from cloudhpc.config import PorterConfig, Settings
from cloudhpc.domain.api import Accounting
from cloudhpc.domain.jobs import JobSpec
from cloudhpc.domain.reports import JobReport
from cloudhpc.domain.states import JobState
from cloudhpc.porter.app import create_app
from cloudhpc.store import Store

TYPED_ANSWERS = {
    ("get", "/api/v1/clusters"): "ClusterList",
    ("get", "/api/v1/me"): "Me",
    ("get", "/api/v1/jobs/{job_id}/artifacts"): "ArtifactList",
    ("get", "/api/v1/jobs/{job_id}/accounting"): "Accounting",
    ("get", "/api/v1/jobs/{job_id}/bridges"): "JobBridges",
    ("post", "/api/v1/uploads"): "Upload",
    ("post", "/api/v1/agent/jobs/{job_id}/artifacts"): "RecordedKeys",
}


@pytest.fixture
def client(store: Store, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(porter=PorterConfig(object_store=f"file://{tmp_path / 'objects'}"))
    with TestClient(create_app(settings, store=store)) as test_client:
        yield test_client


def _schema_of(spec: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    answer: dict[str, Any] = spec["paths"][path][method]["responses"]["200"]["content"]["application/json"]
    return dict(answer["schema"])


def test_every_user_answer_is_a_named_model(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for (method, path), model in TYPED_ANSWERS.items():
        assert _schema_of(spec, method, path) == {"$ref": f"#/components/schemas/{model}"}, (method, path)
    schemas = spec["components"]["schemas"]
    row = schemas["AccountingRow"]["properties"]
    # the fields the agent sends (hpc.backend.AccountingRecord), typed, not an open object
    assert {"start", "end", "partition", "timelimit_seconds", "billing"} <= set(row)
    assert {"type": "string", "format": "date-time"} in row["start"]["anyOf"]
    assert {"memory_requested_bytes", "cpu_utilized_seconds"} <= set(schemas["Efficiency"]["properties"])
    assert schemas["ClusterList"]["properties"]["clusters"]["items"] == {
        "$ref": "#/components/schemas/ClusterInfo"
    }


def _ended_job(store: Store) -> str:
    job, _ = store.create_job("alice", JobSpec(name="done", cluster="local", script="true"))
    for seq, state in enumerate(("preparing", "queued", "running", "completed"), start=1):
        store.apply_report(JobReport(job_id=job.id, seq=seq, state=JobState(state)), actor="agent")
    return str(job.id)


def test_an_accounting_document_that_does_not_fit_is_refused_naming_the_field(
    client: TestClient, store: Store
) -> None:
    agent = {"Authorization": f"Bearer {store.create_token('alice', 'agent', ['local'])}"}
    user_token = store.create_token("alice", "user")
    job_id = _ended_job(store)
    put = f"/api/v1/agent/jobs/{job_id}/accounting"
    bad = client.put(put, json={"slurm_job_id": "7", "records": [{"exit_code": "zero"}]}, headers=agent)
    assert bad.status_code == 422, bad.text
    assert bad.json()["error"]["details"][0]["field"] == "records.0.exit_code"
    assert store.get_accounting(job_id) is None  # nothing stored that GET would fail to answer

    record = {
        "slurm_job_id": "7",
        "records": [
            {"job_id": "7", "state": "COMPLETED", "start": "2026-12-05T10:00:00+00:00", "billing": 2}
        ],
        "efficiency": {"state": "COMPLETED", "cpu_efficiency": 0.5, "source": "sacct"},
        "from_a_newer_agent": 1,  # kept: an answer that gained a field still reads
    }
    assert client.put(put, json=record, headers=agent).status_code == 200
    answer = client.get(
        f"/api/v1/jobs/{job_id}/accounting", headers={"Authorization": f"Bearer {user_token}"}
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["from_a_newer_agent"] == 1
    # the SDK reads the very same model
    sdk = Client(str(client.base_url), user_token, transport=client._transport)
    accounting = sdk.accounting(job_id)
    assert isinstance(accounting, Accounting)
    start = accounting.records[0].start
    assert start is not None
    assert start.hour == 10
    assert accounting.efficiency is not None
    assert accounting.efficiency.source == "sacct"
