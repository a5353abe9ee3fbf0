"""No 500 for bad input (#12 item 6): what the fuzzer of the review found, case by case, on SQLite
and PostgreSQL. A bad cursor is a 422 naming `cursor`; a log offset past any possible output is an
empty answer (or a 422 past a SQL BIGINT), never an integer overflow in the database."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cloudhpc.config import Settings
from cloudhpc.porter.app import create_app
from cloudhpc.store import Store

BATCH = {"name": "hello", "cluster": "local", "script": "echo hi"}
INT64_MAX = 2**63 - 1


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def b64json(value: Any) -> str:
    return b64(json.dumps(value).encode())


class Api:
    def __init__(self, client: TestClient, store: Store) -> None:
        self.client = client
        self.alice = store.create_token("alice", "user")
        self.agent = store.create_token("alice", "agent", ["local"])  # alice may use `local`

    def get(self, path: str, token: str | None = None, **params: Any) -> Any:
        headers = {"Authorization": f"Bearer {token or self.alice}"}
        return self.client.get(path, params=params, headers=headers)


@pytest.fixture
def api(store: Store) -> Iterator[Api]:
    # raise_server_exceptions=False: a bug must show as the 500 a client would get, not a traceback
    with TestClient(create_app(Settings(), store=store), raise_server_exceptions=False) as client:
        yield Api(client, store)


BAD_CURSORS = {
    "garbage": "garbage!!",
    "not-base64": "%%%%",
    "non-ascii": "é",
    "short": "abc",
    "base64-of-garbage": b64(b"\xff\xfe\x00garbage"),
    "json-number": b64json(12),
    "json-object": b64json({"a": 1, "b": 2}),
    "wrong-pair": b64json([1, 2]),
    "three": b64json(["2030-01-01T00:00:00+00:00", "00000000-0000-0000-0000-000000000000", 3]),
    "not-a-date": b64json(["yesterday", "00000000-0000-0000-0000-000000000000"]),
    "naive-date": b64json(["2030-01-01T00:00:00", "00000000-0000-0000-0000-000000000000"]),
    "overflowing-date": b64json(["0001-01-01T00:00:00+14:00", "00000000-0000-0000-0000-000000000000"]),
    "not-a-uuid": b64json(["2030-01-01T00:00:00+00:00", "x"]),
    "nested": b64(b"[" * 180 + b"]" * 10),
    "huge": "A" * 10_000,
}


@pytest.mark.parametrize("cursor", BAD_CURSORS.values(), ids=BAD_CURSORS.keys())
def test_a_bad_cursor_is_422_naming_cursor(api: Api, cursor: str) -> None:
    response = api.get("/api/v1/jobs", cursor=cursor)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert [d["field"] for d in error["details"]] == ["cursor"]
    assert "cursor" in error["message"]


def test_a_good_cursor_still_pages(api: Api) -> None:
    for i in range(3):
        api.client.post(
            "/api/v1/jobs",
            json={**BATCH, "name": f"j{i}"},
            headers={"Authorization": f"Bearer {api.alice}"},
        ).raise_for_status()
    first = api.get("/api/v1/jobs", limit=2).json()
    rest = api.get("/api/v1/jobs", limit=2, cursor=first["next_cursor"]).json()
    assert [j["name"] for j in first["jobs"] + rest["jobs"]] == ["j2", "j1", "j0"]
    assert rest["next_cursor"] is None


@pytest.fixture
def job_with_output(api: Api) -> str:
    headers = {"Authorization": f"Bearer {api.alice}"}
    job: str = api.client.post("/api/v1/jobs", json=BATCH, headers=headers).json()["id"]
    upload = api.client.post(
        f"/api/v1/agent/jobs/{job}/output",
        params={"offset": 0},
        content=b"hello\n",
        headers={"Authorization": f"Bearer {api.agent}"},
    )
    assert upload.json() == {"size": 6}
    return job


@pytest.mark.parametrize("offset", [7, 2**62, INT64_MAX - (1 << 20), INT64_MAX - 10, INT64_MAX])
@pytest.mark.parametrize("limit", [1, 1 << 20])
def test_a_log_offset_past_the_end_is_empty(api: Api, job_with_output: str, offset: int, limit: int) -> None:
    response = api.get(f"/api/v1/jobs/{job_with_output}/logs", offset=offset, limit=limit)
    assert response.status_code == 200, response.text
    assert response.content == b""
    assert response.headers["X-Next-Offset"] == str(offset)


def test_the_output_before_the_end_is_still_read(api: Api, job_with_output: str) -> None:
    response = api.get(f"/api/v1/jobs/{job_with_output}/logs", offset=2, limit=3)
    assert response.content == b"llo"
    assert response.headers["X-Next-Offset"] == "5"


@pytest.mark.parametrize(
    ("field", "params"),
    [
        ("offset", {"offset": INT64_MAX + 1}),
        ("offset", {"offset": 2**64}),
        ("offset", {"offset": -1}),
        ("limit", {"limit": 0}),
        ("limit", {"limit": 2**63}),
        ("limit", {"limit": -5}),
    ],
)
def test_log_offsets_and_limits_out_of_range_are_422(
    api: Api, job_with_output: str, field: str, params: dict[str, int]
) -> None:
    response = api.get(f"/api/v1/jobs/{job_with_output}/logs", **params)
    assert response.status_code == 422, response.text
    assert [d["field"] for d in response.json()["error"]["details"]] == [field]


def test_an_output_upload_far_past_the_end_stores_nothing(api: Api, job_with_output: str) -> None:
    for offset in (INT64_MAX, 2**62):
        response = api.client.post(
            f"/api/v1/agent/jobs/{job_with_output}/output",
            params={"offset": offset},
            content=b"x",
            headers={"Authorization": f"Bearer {api.agent}"},
        )
        assert response.json() == {"size": 6}
    response = api.client.post(
        f"/api/v1/agent/jobs/{job_with_output}/output",
        params={"offset": INT64_MAX + 1},
        content=b"x",
        headers={"Authorization": f"Bearer {api.agent}"},
    )
    assert response.status_code == 422


# -- text PostgreSQL cannot store: NUL is bad input, not a store failure (503) ---------------------


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/api/v1/jobs?name=a%00b", "name"),
        ("/api/v1/jobs?cluster=a%00b", "cluster"),
        ("/api/v1/agent/work?cluster=local&agent=x%00y", "agent"),
        ("/api/v1/agent/jobs?cluster=local&agent=x%00y", "agent"),
    ],
)
def test_nul_in_a_query_is_422(api: Api, path: str, field: str) -> None:
    token = api.agent if "/agent/" in path else api.alice
    response = api.client.get(path, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 422, response.text
    assert [d["field"] for d in response.json()["error"]["details"]] == [field]


@pytest.mark.parametrize(
    "extra", [{"reason": "a\x00b"}, {"slurm_job_id": "1\x00"}], ids=["reason", "slurm_job_id"]
)
def test_nul_in_a_report_is_422(api: Api, job_with_output: str, extra: dict[str, str]) -> None:
    report = {"job_id": job_with_output, "seq": 1, "state": "preparing", **extra}
    response = api.client.post(
        "/api/v1/agent/reports", json={"reports": [report]}, headers={"Authorization": f"Bearer {api.agent}"}
    )
    assert response.status_code == 422, response.text
    assert [d["field"] for d in response.json()["error"]["details"]] == [f"reports.0.{next(iter(extra))}"]
