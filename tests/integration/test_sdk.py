"""The SDK against a real porter process (#14 item 9): typed answers, retries of idempotent calls
only, the async client's parity with the sync one, lazy paging.

porter runs as `cloudhpc serve porter` (no submitter: jobs stay pending, which is all these calls
need; the agent's own routes are driven with the agent token through the real `HttpChannel`).
"Down" is porter's port refusing connections, or a real HTTP gateway in front of it that answers
503 while porter is away (what an ingress does with no healthy upstream); nothing in httpx is
replaced. The gateway also counts the requests it forwards, which is how the tests see a retry, a
request not repeated, or a page not fetched.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from cloudhpc.client import Accounting, ApiError, AsyncClient, Client, ClusterInfo, Me, RetryPolicy
from cloudhpc.domain.api import Artifact
from cloudhpc.domain.jobs import Job, JobSummary
from cloudhpc.domain.states import JobState
from cloudhpc.submitter.channel import HttpChannel
from tests.e2e.harness import Deployment, porter_alone
from tests.testbed import Testbed

FAST = RetryPolicy(attempts=30, initial=0.2, maximum=0.5)
"""Up to ~15 s of retries: long enough for porter to start, short waits so the test is quick."""


@pytest.fixture(scope="module")
def porter(tmp_path_factory: pytest.TempPathFactory, testbed: Testbed) -> Iterator[Deployment]:
    with porter_alone(tmp_path_factory.mktemp("sdk"), testbed) as dep:
        yield dep


@dataclass
class Gateway:
    """A real HTTP server in front of porter: forwards each request, or answers 503 while porter
    refuses connections; `seen` is every request it received, as (method, path with query)."""

    backend: str
    seen: list[tuple[str, str]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def requests(self, method: str, path: str) -> int:
        return sum(1 for m, p in self.seen if m == method and p.split("?")[0] == path)

    def __enter__(self) -> Gateway:
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                gateway.seen.append((self.command, self.path))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")
                }
                try:
                    answer = httpx.request(
                        self.command, gateway.backend + self.path, headers=headers, content=body, timeout=30
                    )
                except httpx.TransportError:
                    status, content, kept = 503, b"no healthy upstream", {"Content-Type": "text/plain"}
                else:
                    status, content = answer.status_code, answer.content
                    kept = {
                        k: v
                        for k, v in answer.headers.items()
                        if k.lower().startswith(("content-type", "x-"))
                    }
                self.send_response(status)
                for key, value in kept.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PUT = _forward  # noqa: N815 (http.server's names)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()


def spec(name: str) -> dict[str, Any]:
    return {"name": name, "cluster": "testbed", "script": "echo hi"}


def restart_later(porter: Deployment, delay: float) -> threading.Thread:
    """porter stopped now, started again after `delay` s (in the background)."""
    porter.kill("porter")

    def start() -> None:
        time.sleep(delay)
        porter.start("porter")

    thread = threading.Thread(target=start)
    thread.start()
    return thread


def test_every_answer_is_a_typed_model(porter: Deployment) -> None:
    with porter.client() as client:
        me = client.me()
        assert isinstance(me, Me)
        assert (me.user, me.role) == ("alice", "user")
        clusters = client.clusters()
        assert all(isinstance(c, ClusterInfo) for c in clusters)
        assert "testbed" in {c.name for c in clusters}
        job = client.submit(spec("typed"))
        assert isinstance(job, Job)
        assert isinstance(client.get(job), Job)
        assert all(isinstance(j, JobSummary) for j in client.list())
        assert client.artifacts(job) == []
        with pytest.raises(ApiError) as missing:
            client.accounting(job)
        assert (missing.value.status, missing.value.code) == (404, "not_available")

    # the agent's side through the real channel, then the user's typed view of it
    async def store_accounting() -> None:
        channel = HttpChannel(porter.url, (porter.root / "agent-token").read_text())
        try:
            await channel.put_accounting(
                job.id,
                {
                    "slurm_job_id": "42",
                    "records": [{"job_id": "42", "step": None, "state": "COMPLETED", "elapsed_seconds": 7}],
                    "efficiency": {"state": "COMPLETED", "cpu_efficiency": 0.5, "source": "sacct"},
                },
            )
        finally:
            await channel.close()

    asyncio.run(store_accounting())
    with porter.client() as client:
        accounting = client.accounting(job)
    assert isinstance(accounting, Accounting)
    assert accounting.slurm_job_id == "42"
    assert (accounting.records[0].state, accounting.records[0].elapsed_seconds) == ("COMPLETED", 7)
    assert accounting.efficiency is not None
    assert accounting.efficiency.cpu_efficiency == 0.5
    assert (
        Artifact.model_validate({"name": "a", "key": "k", "url": "u", "new": 1}).name == "a"
    )  # kept, not refused


def test_a_get_is_retried_while_porter_is_down_then_answers(porter: Deployment) -> None:
    """Connection refused: nothing was sent, and a GET is safe to send again anyway."""
    client = Client(porter.url, porter.user_token, retries=FAST)
    thread = restart_later(porter, 1.5)
    started = time.monotonic()
    try:
        assert client.me().user == "alice"
    finally:
        thread.join()
        client.close()
    assert time.monotonic() - started > 1.0  # it answered only once porter was back


def test_a_503_from_the_gateway_is_retried_for_a_get_and_for_a_keyed_submit_only(porter: Deployment) -> None:
    with Gateway(porter.url) as gateway:
        client = Client(gateway.url, porter.user_token, retries=FAST)
        try:
            thread = restart_later(porter, 1.5)
            try:
                assert [c.name for c in client.clusters()]  # answered, after some 503s
            finally:
                thread.join()
            assert gateway.requests("GET", "/api/v1/clusters") > 1

            # a submission without an Idempotency-Key is sent once: a retry could start the job twice
            thread = restart_later(porter, 1.5)
            try:
                with pytest.raises(ApiError) as refused:
                    client.submit(spec("unkeyed"))
            finally:
                thread.join()
            assert refused.value.status == 503
            assert gateway.requests("POST", "/api/v1/jobs") == 1
            assert [j for j in client.list(name="unkeyed")] == []

            # with a key it is retried, and porter's idempotency makes it one job
            thread = restart_later(porter, 1.5)
            try:
                job = client.submit(spec("keyed"), idempotency_key="sdk-retry-1")
            finally:
                thread.join()
            assert gateway.requests("POST", "/api/v1/jobs") > 2
            assert [j.id for j in client.list(name="keyed")] == [job.id]
        finally:
            client.close()


def test_a_cancel_is_not_retried(porter: Deployment) -> None:
    with porter.client() as client:
        job = client.submit(spec("cancel-once"))
    with Gateway(porter.url) as gateway:
        client = Client(gateway.url, porter.user_token, retries=FAST)
        thread = restart_later(porter, 1.0)
        try:
            with pytest.raises(ApiError) as refused:
                client.cancel(job)
        finally:
            thread.join()
            client.close()
    assert refused.value.status == 503
    assert gateway.requests("POST", f"/api/v1/jobs/{job.id}/cancel") == 1


def test_list_fetches_pages_only_as_they_are_used(porter: Deployment) -> None:
    with porter.client() as client:
        made = [client.submit(spec(f"paged-{i}")) for i in range(5)]
    with Gateway(porter.url) as gateway, Client(gateway.url, porter.user_token) as client:
        jobs = client.list(name=None, limit=2)
        assert gateway.requests("GET", "/api/v1/jobs") == 0  # nothing asked yet
        first = next(jobs)
        assert gateway.requests("GET", "/api/v1/jobs") == 1
        next(jobs)
        assert gateway.requests("GET", "/api/v1/jobs") == 1  # the first page still serves
        next(jobs)
        assert gateway.requests("GET", "/api/v1/jobs") == 2
        everything = list(client.list(limit=2))
    assert first.id == made[-1].id  # newest first
    assert {j.id for j in made} <= {j.id for j in everything}


def test_the_async_client_answers_as_the_sync_one(porter: Deployment) -> None:
    async def through_async() -> tuple[Any, ...]:
        async with AsyncClient(porter.url, porter.user_token) as client:
            job = await client.submit(spec("async"), idempotency_key="sdk-async-1")
            again = await client.submit(spec("async"), idempotency_key="sdk-async-1")
            cancelled = await client.cancel(job)
            ended = await client.wait(job, timeout=30)
            listed = [j.id async for j in client.list(name="async", limit=1)]
            with pytest.raises(ApiError) as missing:
                await client.get("00000000-0000-4000-8000-000000000000")
            return (
                await client.me(),
                await client.clusters(),
                job,
                again,
                cancelled,
                ended,
                listed,
                await client.artifacts(job),
                missing.value.status,
            )

    me, clusters, job, again, cancelled, ended, listed, artifacts, missing = asyncio.run(through_async())
    with porter.client() as client:
        assert me == client.me()
        assert [c.name for c in clusters] == [c.name for c in client.clusters()]
        assert again.id == job.id
        assert cancelled.cancel_requested
        assert ended.state == JobState.CANCELLED
        assert ended == client.get(job)
        assert listed == [j.id for j in client.list(name="async")] == [job.id]
        assert artifacts == client.artifacts(job)
    assert missing == 404


def test_retry_policy_refuses_zero_attempts() -> None:
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0)


def test_the_async_client_has_every_method_of_the_sync_one() -> None:
    """Same names and parameters (httpx's pair is the model); `close` is `aclose` there."""
    import inspect

    names = {n for n in vars(Client) if not n.startswith("_")} - {"close"}
    assert names <= set(vars(AsyncClient)), names - set(vars(AsyncClient))
    for name in names:
        sync, asynchronous = getattr(Client, name), getattr(AsyncClient, name)
        assert (
            inspect.signature(sync).parameters.keys() == inspect.signature(asynchronous).parameters.keys()
        ), name
        if name != "list":  # an async iterator, like follow_logs
            assert inspect.iscoroutinefunction(asynchronous) or inspect.isasyncgenfunction(asynchronous), name
