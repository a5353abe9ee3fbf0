"""Bounded inputs (#12 item 3): porter reads no more of a request than it is willing to store.

The size limits are measured on a real porter process (`cloudhpc serve porter`): a 100 MiB body,
declared or chunked, is answered 413 at once and porter's resident memory stays within
`RSS_BOUND` of what it was; the agent's output route stops reading at its own 8 MiB cap even when
the app-wide limit is larger. The caps on the spec and the summaries of `GET /jobs` are checked
in-process, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cloudhpc.config import Settings
from cloudhpc.domain.jobs import JobSpec
from cloudhpc.porter.app import create_app
from cloudhpc.store import Store
from tests.e2e.harness import Deployment, porter_alone
from tests.testbed import Testbed
from tests.unit.test_jobspec_caps import CAPS, IDS, over_cap

MiB = 1 << 20
RSS_BOUND = 50 * MiB
"""How much porter's resident memory may grow while it refuses a 100 MiB request."""
BATCH = {"name": "hello", "cluster": "local", "script": "echo hi"}


# -- a real porter, and requests written on a socket ---------------------------------------------


def rss(pid: int) -> int:
    """Resident set size of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@dataclass
class PeakRss:
    """Samples a process's RSS every few milliseconds while a block runs."""

    pid: int
    baseline: int = 0
    peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> PeakRss:
        self.baseline = self.peak = rss(self.pid)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss(self.pid))
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.2)  # let a late allocation show
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss(self.pid))

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


@dataclass
class RawAnswer:
    status: int
    body: dict[str, Any]
    seconds: float
    """From the end of the request head to the status line."""


def post_raw(port: int, path: str, token: str, size: int, *, chunked: bool) -> RawAnswer:
    """POST `size` bytes of JSON-ish filler, with Content-Length or chunked, written from a thread
    while the answer is read: a server that answers early and closes must not hide its answer
    behind the client's failed write (what an HTTP client library that sends first would do)."""
    sock = socket.create_connection(("127.0.0.1", port))
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\n{framing}\r\n\r\n"
    )
    sock.sendall(head.encode())
    started = time.monotonic()

    def send_body() -> None:
        piece = b"x" * (64 << 10)
        sent = 0
        try:
            while sent < size:
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                sent += len(piece)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed: what is being tested

    writer = threading.Thread(target=send_body, daemon=True)
    writer.start()
    try:
        reader = sock.makefile("rb")
        status_line = reader.readline()
        seconds = time.monotonic() - started
        headers: dict[str, str] = {}
        while (line := reader.readline().strip()) != b"":
            name, _, value = line.decode().partition(":")
            headers[name.lower()] = value.strip()
        body = json.loads(reader.read(int(headers["content-length"])))
    finally:
        sock.close()
        writer.join(timeout=10)
    return RawAnswer(int(status_line.split()[1]), body, seconds)


@pytest.fixture
def porter(testbed: Testbed, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Deployment]:
    """A real porter process (no submitter) on SQLite; `porter_settings` via indirect params."""
    extra: dict[str, Any] = getattr(request, "param", {})
    with porter_alone(tmp_path, testbed, **extra) as dep:
        yield dep


def assert_too_large(answer: RawAnswer, limit: int) -> None:
    assert answer.status == 413, answer
    assert answer.body["error"]["code"] == "too_large"
    assert answer.body["error"]["details"] == {"limit": limit}
    assert str(limit) in answer.body["error"]["message"]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_100_mib_post_is_413_at_once_and_porter_stays_small(porter: Deployment, chunked: bool) -> None:
    pid = porter.processes["porter"].pid
    with PeakRss(pid) as memory:
        answer = post_raw(porter.port, "/api/v1/jobs", porter.user_token, 100 * MiB, chunked=chunked)
    print(
        f"100 MiB POST /jobs ({'chunked' if chunked else 'content-length'}): {answer.status} in "
        f"{answer.seconds * 1000:.0f} ms, porter RSS {memory.baseline / MiB:.0f} -> peak {memory.peak / MiB:.0f} MiB"
    )
    assert_too_large(answer, 8 * MiB)
    assert answer.seconds < 2.0
    assert memory.growth < RSS_BOUND, f"porter grew by {memory.growth / MiB:.0f} MiB"
    assert list(porter.client().list()) == []  # still answering, nothing stored


@pytest.mark.parametrize("porter", [{"max_request_bytes": 512 * MiB}], indirect=True)
def test_output_upload_stops_reading_at_its_cap(porter: Deployment) -> None:
    """With an app-wide limit far above it, the output route itself stops at 8 MiB while streaming."""
    store = Store(porter.database)
    try:
        job, _ = store.create_job("alice", JobSpec(name="out", cluster="testbed", script="echo"))
    finally:
        store.close()
    agent_token = (porter.root / "agent-token").read_text()
    pid = porter.processes["porter"].pid
    with PeakRss(pid) as memory:
        answer = post_raw(
            porter.port, f"/api/v1/agent/jobs/{job.id}/output?offset=0", agent_token, 100 * MiB, chunked=True
        )
    print(f"100 MiB chunked output upload: {answer.status}, porter RSS grew {memory.growth / MiB:.0f} MiB")
    assert_too_large(answer, 8 * MiB)
    assert memory.growth < RSS_BOUND, f"porter grew by {memory.growth / MiB:.0f} MiB"


# -- in-process: the limit's answer, the agent routes' caps, the spec caps, summaries -------------


class Api:
    def __init__(self, client: TestClient, store: Store) -> None:
        self.client = client
        self.alice = store.create_token("alice", "user")
        # alice owns the `local` cluster's agent token, so she may submit there
        self.agent = store.create_token("alice", "agent", ["local"])

    def call(self, method: str, path: str, token: str, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {token}", **kwargs.pop("headers", {})}
        return self.client.request(method, path, headers=headers, **kwargs)


def make_api(store: Store, **porter: Any) -> Iterator[Api]:
    with TestClient(create_app(Settings(porter=porter), store=store)) as client:
        yield Api(client, store)


@pytest.fixture
def api(store: Store) -> Iterator[Api]:
    yield from make_api(store)


@pytest.fixture
def roomy_api(store: Store) -> Iterator[Api]:
    """An app-wide limit of 64 MiB, so the routes' own caps are what answers."""
    yield from make_api(store, max_request_bytes=64 * MiB)


def test_the_limit_is_configurable_and_named(store: Store) -> None:
    for api in make_api(store, max_request_bytes=5 * MiB):
        body = json.dumps({**BATCH, "script": "x" * (5 * MiB)})
        response = api.call("POST", "/api/v1/jobs", api.alice, content=body.encode())
        assert response.status_code == 413
        error = response.json()["error"]
        assert error == {
            "code": "too_large",
            "message": f"the request body is over the limit of {5 * MiB} bytes (porter.max_request_bytes)",
            "details": {"limit": 5 * MiB},
        }
        assert api.call("POST", "/api/v1/jobs", api.alice, json=BATCH).status_code == 201


def test_a_body_without_length_is_counted(api: Api) -> None:
    """No Content-Length (a generator body is sent chunked): the middleware counts what arrives."""

    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b" " * MiB

    response = api.call("POST", "/api/v1/jobs", api.alice, content=chunks())
    assert response.status_code == 413, response.text
    assert response.json()["error"]["details"] == {"limit": 8 * MiB}


def test_output_and_accounting_caps(roomy_api: Api) -> None:
    api = roomy_api
    job = api.call("POST", "/api/v1/jobs", api.alice, json=BATCH).json()
    base = f"/api/v1/agent/jobs/{job['id']}"
    big = api.call("POST", f"{base}/output?offset=0", api.agent, content=b"x" * (8 * MiB + 1))
    assert big.status_code == 413
    assert big.json()["error"]["details"] == {"limit": 8 * MiB}
    ok = api.call("POST", f"{base}/output?offset=0", api.agent, content=b"x" * (4 * MiB))
    assert ok.json() == {"size": 4 * MiB}

    document = {"slurm_job_id": "1", "records": [{"Comment": "y" * MiB}]}
    big = api.call("PUT", f"{base}/accounting", api.agent, json=document)
    assert big.status_code == 413
    assert big.json()["error"]["details"] == {"limit": MiB}
    for bad in (b"[1, 2]", b"{not json", b"[" * 100_000 + b"]" * 100_000):
        answer = api.call("PUT", f"{base}/accounting", api.agent, content=bad)
        assert answer.status_code == 422, (bad[:20], answer.text)
        assert answer.json()["error"]["details"][0]["field"] == "(body)"
    good = api.call("PUT", f"{base}/accounting", api.agent, json={"slurm_job_id": "1", "records": []})
    assert good.json() == {"stored": True}
    assert api.call("GET", f"/api/v1/jobs/{job['id']}/accounting", api.alice).json()["records"] == []


def test_list_items_are_summaries(api: Api) -> None:
    spec = {**BATCH, "files": {"data.txt": "z" * 100_000}, "env": {"A": "b"}}
    made = api.call("POST", "/api/v1/jobs", api.alice, json=spec).json()
    page = api.call("GET", "/api/v1/jobs", api.alice)
    (item,) = page.json()["jobs"]
    assert len(page.content) < 2000, len(page.content)
    assert "spec" not in item
    assert "artifacts" not in item
    assert "bridges" not in item
    assert {k: made[k] for k in item} == item
    assert api.call("GET", f"/api/v1/jobs/{made['id']}", api.alice).json()["spec"]["files"] == spec["files"]


@pytest.mark.parametrize(("field", "base", "build", "cap"), CAPS, ids=IDS)
def test_spec_caps_are_422_naming_the_field(
    api: Api, field: str, base: dict[str, Any], build: Any, cap: int
) -> None:
    response = api.call("POST", "/api/v1/jobs", api.alice, json=over_cap(base, build, cap))
    assert response.status_code == 422, response.text[:500]
    fields = [d["field"] for d in response.json()["error"]["details"]]
    assert any(f.startswith(field) for f in fields), fields
