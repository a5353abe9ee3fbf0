"""Python SDK over porter's API, used by the CLI, pipeline components and notebooks.

    from cloudhpc.client import Client
    with Client("http://127.0.0.1:5555", token) as c:
        job = c.submit({"name": "hello", "cluster": "local", "script": "echo hi"})
        job = c.wait(job.id)
        print(job.state, c.logs(job.id))

    from cloudhpc.client import AsyncClient
    async with AsyncClient(url, token) as c:
        job = await c.wait((await c.submit(spec)).id)
        async for summary in c.list(state="RUNNING"):
            ...

Every answer is a typed model (`Job`, `JobSummary`, `ClusterInfo`, `Me`, `Artifact`, `Accounting`,
...). Errors from the API are raised as `ApiError` carrying the status and the API's `code`,
`message` and `details`, so callers can tell a bad field (422) from a missing job (404) without
parsing text.

How the two clients share one implementation (httpx's sync/async pair is the model): each API call
is described once, as a `_Call` (method, path, parameters, and how to read the answer), by the
functions below the clients; a call made of several requests (`wait`, `wait_bridges`) is a
generator that yields its requests and receives their answers. `Client` and `AsyncClient` are two
thin transports that send the descriptions, one blocking and one awaiting.

Idempotent calls (every GET, and a submission with an Idempotency-Key) are retried with backoff
when porter cannot be reached or answers 502/503/504 (`cloudhpc.retries`); a submission without a
key, a cancel, is sent once.
"""

from __future__ import annotations

import base64
import builtins
import os
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar
from urllib.parse import quote
from uuid import UUID

import httpx
from pydantic import BaseModel

from cloudhpc.domain.api import Accounting, Artifact, ClusterInfo, JobPage, Me, TaskPage
from cloudhpc.domain.arrays import TaskObservation
from cloudhpc.domain.billing import Estimate
from cloudhpc.domain.directives import apply_directives
from cloudhpc.domain.job_files import MAX_FILE_READ, EntryType, FilesAnswer
from cloudhpc.domain.jobs import Bridge, Job, JobSpec, JobSummary
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import CloudHPCError
from cloudhpc.retries import TRANSIENT_STATUSES, RetryPolicy

__all__ = [
    "Accounting",
    "ApiError",
    "Artifact",
    "AsyncClient",
    "Client",
    "ClusterInfo",
    "LogChunk",
    "Me",
    "RetryPolicy",
    "SessionOpened",
    "default_client",
]

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


class ApiError(CloudHPCError):
    """porter answered with an error (or could not be reached: status 0)."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{message} (HTTP {status}, {code})" if status else message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details


@dataclass(frozen=True)
class LogChunk:
    data: bytes
    next_offset: int
    complete: bool


JobRef = UUID | str | JobSummary


def _job_id(ref: JobRef) -> str:
    return str(ref.id if isinstance(ref, JobSummary) else ref)


# ---- one description of each call ---------------------------------------------------------------


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One request and how to read its answer. `timeout` None: the client's. `idempotent` None: only
    a GET may be sent again on a transient failure (`may_repeat`)."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: Mapping[str, Any] = field(default_factory=dict)
    json: Any = None
    content: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout: float | None = None
    idempotent: bool | None = None

    @property
    def may_repeat(self) -> bool:
        return self.method == "GET" if self.idempotent is None else self.idempotent

    def send_arguments(self) -> dict[str, Any]:
        """The keyword arguments of `httpx.Client.request` / `httpx.AsyncClient.request`."""
        extra: dict[str, Any] = {} if self.timeout is None else {"timeout": self.timeout}
        if self.json is not None:
            extra["json"] = self.json
        if self.content is not None:
            extra["content"] = self.content
        return {"params": dict(self.params), "headers": dict(self.headers), **extra}


_Steps = Generator[_Call[Any], Any, T]
"""A call of several requests: yields each request, is sent its parsed answer, returns the result."""

_PageCall = Callable[[str | None], _Call[tuple[builtins.list[T], str | None]]]
"""cursor (None: the first page) -> the request of that page, read as (items, next cursor)."""


def _model(model: type[M], key: str | None = None) -> Callable[[httpx.Response], M]:
    """The answer's JSON (or its `key`) validated as `model`."""

    def parse(response: httpx.Response) -> M:
        body = response.json()
        return model.model_validate(body if key is None else body[key])

    return parse


def _models(model: type[M], key: str) -> Callable[[httpx.Response], builtins.list[M]]:
    """The answer's `key`, a list, each item validated as `model`."""

    def parse(response: httpx.Response) -> builtins.list[M]:
        return [model.model_validate(item) for item in response.json()[key]]

    return parse


def _submit(spec: JobSpec | Mapping[str, Any], idempotency_key: str | None) -> _Call[Job]:
    body = (
        apply_directives(spec).model_dump(mode="json", by_alias=True, exclude_none=True)
        if isinstance(spec, JobSpec)
        else dict(spec)
    )
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    # the same key returns the same job: only then is sending it twice harmless
    return _Call("POST", "/api/v1/jobs", _model(Job), json=body, headers=headers, idempotent=bool(headers))


def _estimate(spec: JobSpec | Mapping[str, Any]) -> _Call[Estimate]:
    body = _submit(spec, None).json
    # sent once, like files(): porter has already waited for the agent's sbatch --test-only
    return _Call(
        "POST", "/api/v1/jobs:estimate", _model(Estimate), json=body, timeout=150.0, idempotent=False
    )


def _get(job: JobRef, wait: float = 0, since_state: JobState | str | None = None) -> _Call[Job]:
    params: dict[str, Any] = {}
    if wait:
        params["wait"] = wait
        if since_state:
            params["since_state"] = str(since_state)
    return _Call(
        "GET", f"/api/v1/jobs/{_job_id(job)}", _model(Job), params, timeout=wait + 30 if wait else None
    )


def _list_page(
    state: JobState | str | None, cluster: str | None, name: str | None, limit: int
) -> _PageCall[JobSummary]:
    params: dict[str, Any] = {"limit": limit}
    for key, value in (("state", state), ("cluster", cluster), ("name", name)):
        if value is not None:
            params[key] = str(value)

    def page(cursor: str | None) -> _Call[tuple[builtins.list[JobSummary], str | None]]:
        def parse(response: httpx.Response) -> tuple[builtins.list[JobSummary], str | None]:
            body = JobPage.model_validate(response.json())
            return body.jobs, body.next_cursor

        return _Call("GET", "/api/v1/jobs", parse, params | ({"cursor": cursor} if cursor else {}))

    return page


def _tasks_page(job: JobRef, page_size: int) -> _PageCall[TaskObservation]:
    def page(cursor: str | None) -> _Call[tuple[builtins.list[TaskObservation], str | None]]:
        def parse(response: httpx.Response) -> tuple[builtins.list[TaskObservation], str | None]:
            body = TaskPage.model_validate(response.json())
            return body.tasks, body.next_cursor

        params: dict[str, Any] = {"limit": page_size} | ({"cursor": cursor} if cursor else {})
        return _Call("GET", f"/api/v1/jobs/{_job_id(job)}/tasks", parse, params)

    return page


def _wait(
    job: JobRef, timeout: float | None, on_change: Callable[[Job], None] | None, poll: float
) -> _Steps[Job]:
    """Long-polls `GET /jobs/{id}?wait=` until the job ends (or `timeout`)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    current: Job = yield _get(job)
    if on_change:
        on_change(current)
    while not current.state.terminal:
        step = poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic()))
        if deadline is not None and step <= 0:
            break
        nxt: Job = yield _get(current.id, step, current.state)
        if nxt.state != current.state and on_change:
            on_change(nxt)
        current = nxt
    return current


def _cancel(job: JobRef) -> _Call[Job]:
    return _Call("POST", f"/api/v1/jobs/{_job_id(job)}/cancel", _model(Job), idempotent=False)


def _cancel_task(job: JobRef, index: int) -> _Call[Job]:
    path = f"/api/v1/jobs/{_job_id(job)}/tasks/{int(index)}/cancel"
    return _Call("POST", path, _model(Job), idempotent=False)


def _download_artifact(job: JobRef, name: str) -> _Call[bytes]:
    # quoted: a collected output's name may hold `%`, `?`, `#` or spaces (`outputs/100%25.txt`)
    path = f"/api/v1/jobs/{_job_id(job)}/artifacts/{quote(name, safe='/')}"
    return _Call("GET", path, lambda response: response.content)


def _task_output(job: JobRef, index: int) -> _Call[bytes]:
    return _download_artifact(job, f"tasks/{int(index)}/output.log")


def _delete_upload(url: str) -> _Call[None]:
    """`url` as `upload` returned it: `.../uploads/<id>/<name>`."""
    *_, root, upload_id, name = url.rsplit("/", 3)
    if root != "uploads":
        raise ValueError(f"{url!r} is not the URL of an upload (.../uploads/<id>/<name>)")
    path = f"/api/v1/uploads/{quote(upload_id)}/{quote(name)}"
    return _Call("DELETE", path, lambda response: None, idempotent=True)


def _upload(data: bytes, name: str) -> _Call[str]:
    # each upload stores a new object: sent once, like a submission without a key
    return _Call(
        "POST",
        "/api/v1/uploads",
        lambda response: str(response.json()["url"]),
        {"name": name},
        content=data,
        idempotent=False,
    )


def _logs(job: JobRef, offset: int) -> _Call[LogChunk]:
    def parse(response: httpx.Response) -> LogChunk:
        return LogChunk(
            data=response.content,
            next_offset=int(response.headers.get("X-Next-Offset", offset + len(response.content))),
            complete=response.headers.get("X-Complete") == "true",
        )

    return _Call("GET", f"/api/v1/jobs/{_job_id(job)}/logs", parse, {"offset": offset})


def _follow_logs(job: JobRef, offset: int) -> tuple[str, dict[str, Any], _Call[LogChunk]]:
    """The streamed request's path and parameters, and the plain request whose error answer a
    refused stream is reported with."""
    return f"/api/v1/jobs/{_job_id(job)}/logs", {"offset": offset, "follow": "true"}, _logs(job, offset)


def _accounting(job: JobRef) -> _Call[Accounting]:
    return _Call("GET", f"/api/v1/jobs/{_job_id(job)}/accounting", _model(Accounting))


def _bridges(job: JobRef) -> _Call[builtins.list[Bridge]]:
    return _Call("GET", f"/api/v1/jobs/{_job_id(job)}/bridges", _models(Bridge, "bridges"))


def _wait_bridges(job: JobRef, names: Iterable[str] | None, timeout: float) -> _Steps[builtins.list[Bridge]]:
    wanted = set(names) if names is not None else None
    deadline = time.monotonic() + timeout
    job_id = _job_id(job)
    path = f"/api/v1/jobs/{job_id}/bridges"
    while True:
        step = min(20.0, max(0.0, deadline - time.monotonic()))
        body: dict[str, Any] = yield _Call("GET", path, lambda r: r.json(), {"wait": step}, timeout=step + 30)
        if JobState(body["state"]).terminal:
            raise ApiError(
                409, "job_ended", f"job {job_id} ended ({body['state']}) before its bridges were ready"
            )
        bridges = [Bridge.model_validate(b) for b in body["bridges"]]
        missing = (wanted or set()) - {b.name for b in bridges}
        if missing or not bridges:
            what = ", ".join(sorted(missing)) if missing else "any port"
            raise ApiError(404, "not_found", f"job {job_id} does not expose {what} (ray.expose)")
        relevant = [b for b in bridges if wanted is None or b.name in wanted]
        if all(b.ready for b in relevant):
            return bridges
        if time.monotonic() >= deadline:
            waiting = ", ".join(b.name for b in relevant if not b.ready)
            raise ApiError(0, "timeout", f"bridges of job {job_id} not ready after {timeout:.0f}s: {waiting}")


def _ray_dashboard_url(job: JobRef, timeout: float, in_cluster: bool) -> _Steps[str]:
    bridges = yield from _wait_bridges(job, ["dashboard"], timeout)
    dashboard = next(b for b in bridges if b.name == "dashboard")
    if in_cluster:
        if not dashboard.service_dns:
            raise ApiError(
                404,
                "not_published",
                "the dashboard is not published in Kubernetes (porter.bridge.kubernetes)",
            )
        return f"http://{dashboard.service_dns}:{dashboard.remote_port}"
    if dashboard.url is None:
        return f"http://{dashboard.bridge_host}:{dashboard.bridge_port}"
    return dashboard.url


@dataclass(frozen=True)
class SessionOpened:
    """An opened warm Ray session (`open_ray_session`): its `ray-cluster` job, Ray's job-submission
    `address` through the bridge, and whether an active session of that name was re-attached."""

    job: Job
    address: str
    reattached: bool


def _open_session(spec: JobSpec | Mapping[str, Any]) -> _Call[tuple[Job, bool]]:
    body = _submit(spec, None).json
    # sent again on a transient failure: a second open re-attaches to the session the first made
    return _Call(
        "POST",
        "/api/v1/ray-sessions",
        lambda r: (Job.model_validate(r.json()), r.status_code == 200),
        json=body,
        idempotent=True,
    )


def _open_ray_session(
    spec: JobSpec | Mapping[str, Any], timeout: float, in_cluster: bool
) -> _Steps[SessionOpened]:
    job, reattached = yield _open_session(spec)
    address = yield from _ray_dashboard_url(job, timeout, in_cluster)
    job = yield _get(job)  # running now, with its bridges ready
    return SessionOpened(job, address, reattached)


def _artifacts(job: JobRef) -> _Call[builtins.list[Artifact]]:
    return _Call("GET", f"/api/v1/jobs/{_job_id(job)}/artifacts", _models(Artifact, "artifacts"))


def _files(job: JobRef, path: str, offset: int, length: int | None) -> _Call[FilesAnswer]:
    params: dict[str, Any] = {"path": path, "offset": offset} | ({} if length is None else {"length": length})
    # Sent once: porter has already waited for the cluster's agent (`porter.agent_query_wait`, at
    # most 120 s), so its 504 `agent_timeout` or 503 (an S3-mailbox cluster) would only come again.
    path_ = f"/api/v1/jobs/{_job_id(job)}/files"
    return _Call("GET", path_, _model(FilesAnswer), params, timeout=150.0, idempotent=False)


def _chunk(length: int | None, done: int) -> int | None:
    """What one `read_file` request asks for: the rest of `length`, at most porter's largest read."""
    return MAX_FILE_READ if length is None else min(length - done, MAX_FILE_READ)


def _file_bytes(path: str, answer: FilesAnswer) -> bytes:
    if answer.type != EntryType.FILE:
        raise ApiError(
            422, "not_a_file", f"{path!r} is a {answer.type.value}, not a file (use `files` to list it)"
        )
    return base64.b64decode(answer.content or "")


def _read_file(job: JobRef, path: str, offset: int, length: int | None) -> _Steps[bytes]:
    """`files` reads one after the other, each at most porter's largest, until `length` or the end."""
    data = bytearray()
    while True:
        answer: FilesAnswer = yield _files(job, path, offset + len(data), _chunk(length, len(data)))
        data += _file_bytes(path, answer)
        if answer.eof or not answer.content or (length is not None and len(data) >= length):
            return bytes(data)


def _clusters() -> _Call[builtins.list[ClusterInfo]]:
    return _Call("GET", "/api/v1/clusters", _models(ClusterInfo, "clusters"))


def _raw(method: str, path: str, params: Mapping[str, Any] | None, json: Any) -> _Call[httpx.Response]:
    return _Call(
        method.upper(),
        path,
        lambda response: response,
        params or {},
        json=json,
    )


def _me() -> _Call[Me]:
    return _Call("GET", "/api/v1/me", _model(Me))


# ---- what both transports share ----------------------------------------------------------------


def _checked(response: httpx.Response) -> httpx.Response:
    """The response, or the API's error answer as `ApiError` (the body must have been read)."""
    if response.status_code >= 400:
        try:
            err = response.json()["error"]
            raise ApiError(response.status_code, err["code"], err["message"], err.get("details"))
        except (ValueError, KeyError, TypeError):
            raise ApiError(response.status_code, "http_error", response.text[:500]) from None
    return response


def _no_answer(url: str, exc: httpx.TransportError) -> ApiError:
    if isinstance(exc, httpx.TimeoutException):
        return ApiError(0, "timeout", f"porter at {url} did not answer in time")
    return ApiError(0, "unreachable", f"cannot reach porter at {url} ({exc}); is `cloudhpc serve` running?")


def _transient(exc: BaseException) -> bool:
    """Worth sending again: no connection was made (a connect timeout included: nothing was sent),
    or porter (or a proxy before it) said "not now". A read timeout is not: porter may be working."""
    if not isinstance(exc, ApiError):
        return False
    if exc.status == 0:
        return exc.code == "unreachable" or isinstance(exc.__cause__, httpx.ConnectTimeout)
    return exc.status in TRANSIENT_STATUSES


def _refused_at_once(exc: BaseException) -> bool:
    """porter's 429 `too_many_requests`: refused before it did anything (the caller's uploads or
    agent questions in progress are at their cap), so any call, a POST too, may be sent again."""
    return isinstance(exc, ApiError) and exc.status == 429


def _retry_on(call: _Call[Any]) -> Callable[[BaseException], bool]:
    """What `call` is sent again after (by the client's `retries`): a call that may not be repeated
    only after a 429, which did nothing."""
    if call.may_repeat:
        return lambda exc: _transient(exc) or _refused_at_once(exc)
    return _refused_at_once


class _Base:
    """The connection settings both clients share: URL, token, timeout, retry policy."""

    def __init__(self, url: str | None, token: str | None, retries: RetryPolicy | None) -> None:
        self.url = (url or os.environ.get("CLOUDHPC_URL") or "http://127.0.0.1:5555").rstrip("/")
        token = token or os.environ.get("CLOUDHPC_TOKEN")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.retries = retries or RetryPolicy()

    def __repr__(self) -> str:  # never show the token
        return f"{type(self).__name__}({self.url!r})"


# ---- the blocking transport --------------------------------------------------------------------


class Client(_Base):
    """A synchronous client. `url` and `token` default to CLOUDHPC_URL and CLOUDHPC_TOKEN;
    `retries` is how idempotent calls are retried (default `RetryPolicy()`: 5 attempts over ~8 s)."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        retries: RetryPolicy | None = None,
    ) -> None:
        super().__init__(url, token, retries)
        self._http = httpx.Client(
            base_url=self.url, headers=self._headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: tuple[type[BaseException], BaseException, TracebackType] | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send_once(self, call: _Call[T]) -> T:
        try:
            response = self._http.request(call.method, call.path, **call.send_arguments())
        except httpx.TransportError as exc:
            raise _no_answer(self.url, exc) from exc
        return call.parse(_checked(response))

    def _send(self, call: _Call[T]) -> T:
        for attempt in self.retries.blocking(_retry_on(call), f"{call.method} {call.path}"):
            with attempt:
                return self._send_once(call)
        raise AssertionError("unreachable")  # pragma: no cover: tenacity re-raises the last error

    def _run(self, steps: _Steps[T]) -> T:
        try:
            call = next(steps)
            while True:
                call = steps.send(self._send(call))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    def _pages(self, page: _PageCall[T]) -> Iterator[T]:
        cursor: str | None = None
        while True:
            items, cursor = self._send(page(cursor))
            yield from items
            if cursor is None:
                return

    def request(
        self, method: str, path: str, *, params: Mapping[str, Any] | None = None, json: Any = None
    ) -> httpx.Response:
        """A route the SDK has no method for (`/api/v1/...`), with the token, the same errors
        (`ApiError`) and, for a GET, the same retries; the answer as httpx gives it."""
        return self._send(_raw(method, path, params, json))

    def submit(self, spec: JobSpec | Mapping[str, Any], *, idempotency_key: str | None = None) -> Job:
        """Submit a job. A `JobSpec` is checked here first, its script's #SBATCH directives merged
        as porter merges them (ValueError naming the line before anything is sent); a mapping is
        sent as it is and checked by porter (ApiError 422 naming the field). Retried on a transient
        failure only with an `idempotency_key` (without one, a retry could start the job twice)."""
        return self._send(_submit(spec, idempotency_key))

    def estimate(self, spec: JobSpec | Mapping[str, Any]) -> Estimate:
        """When SLURM predicts the job would start on each partition it may go to (`sbatch
        --test-only` through the cluster's agent), what it would cost there in the site's units if
        it ran to its time limit, and the partition of the earliest start. Nothing is submitted."""
        return self._send(_estimate(spec))

    def get(self, job: JobRef, *, wait: float = 0, since_state: JobState | str | None = None) -> Job:
        return self._send(_get(job, wait, since_state))

    def list(
        self,
        *,
        state: JobState | str | None = None,
        cluster: str | None = None,
        name: str | None = None,
        limit: int = 50,
    ) -> Iterator[JobSummary]:
        """Every matching job as a summary (no spec, bridges or artifacts: `get` has them), newest
        first, fetching each page of `limit` only when the previous one is used up: stop early and
        the rest is never asked for. `builtins.list(client.list())` for all of them at once."""
        return self._pages(_list_page(state, cluster, name, limit))

    def wait(
        self,
        job: JobRef,
        *,
        timeout: float | None = None,
        on_change: Callable[[Job], None] | None = None,
        poll: float = 20.0,
    ) -> Job:
        """Block until the job ends (or `timeout`), calling `on_change` at every state change."""
        return self._run(_wait(job, timeout, on_change, poll))

    def cancel(self, job: JobRef) -> Job:
        return self._send(_cancel(job))

    def cancel_task(self, job: JobRef, index: int) -> Job:
        """Cancel one task of an array job; the other tasks go on."""
        return self._send(_cancel_task(job, index))

    def tasks(self, job: JobRef, *, page_size: int = 500) -> builtins.list[TaskObservation]:
        """Every task of an array job (all pages), by index: state, SLURM state, exit code, times."""
        return builtins.list(self._pages(_tasks_page(job, page_size)))

    def task_output(self, job: JobRef, index: int) -> bytes:
        """The output of one array task, stored when the task ended (`tasks/<index>/output.log`),
        while the other tasks of the array may still run."""
        return self._send(_task_output(job, index))

    def download_artifact(self, job: JobRef, name: str) -> bytes:
        """One stored file of the job, by its name in `artifacts()` (through porter, with the token)."""
        return self._send(_download_artifact(job, name))

    def upload(self, data: bytes, *, name: str) -> str:
        """Store `data` as a job input under the caller's own prefix; returns the URL to name in a
        job's `files` (`{"data.pkl": url}`). Up to 1 GiB; sent once (not retried)."""
        return self._send(_upload(data, name))

    def delete_upload(self, url: str) -> None:
        """Delete one of this user's uploads, by the URL `upload` returned (gone already: no error)."""
        self._send(_delete_upload(url))

    def logs(self, job: JobRef, *, offset: int = 0) -> LogChunk:
        return self._send(_logs(job, offset))

    def follow_logs(self, job: JobRef, *, offset: int = 0) -> Iterator[bytes]:
        """Stream output as it arrives, until the job has ended and everything was delivered."""
        path, params, plain = _follow_logs(job, offset)
        with self._http.stream("GET", path, params=params, timeout=None) as response:
            if response.status_code >= 400:
                response.read()
                self._send(plain)  # raises the API's error
            yield from response.iter_bytes()

    def accounting(self, job: JobRef) -> Accounting:
        """The job's sacct rows and efficiency (ApiError 404 `not_available` until it has ended)."""
        return self._send(_accounting(job))

    def bridges(self, job: JobRef) -> builtins.list[Bridge]:
        """Where the job's exposed ports are reachable from the cloud, and whether they answer."""
        return self._send(_bridges(job))

    def wait_bridges(
        self, job: JobRef, *, names: Iterable[str] | None = None, timeout: float = 300.0
    ) -> builtins.list[Bridge]:
        """Block until the job's bridges (or those in `names`) are ready; return all its bridges.

        Raises `ApiError` with code `job_ended` when the job ends first and `timeout` when they are
        not ready in time (a queued job waits for SLURM: give a timeout that covers the queue).
        """
        return self._run(_wait_bridges(job, names, timeout))

    def ray_dashboard_url(self, job: JobRef, *, timeout: float = 300.0, in_cluster: bool = False) -> str:
        """The URL of the job's Ray dashboard, once its `dashboard` bridge answers, for
        `ray.job_submission.JobSubmissionClient(url)`. `in_cluster=True` gives the Kubernetes
        Service address instead (from a pod; porter must publish bridges to Kubernetes)."""
        return self._run(_ray_dashboard_url(job, timeout, in_cluster))

    def open_ray_session(
        self, spec: JobSpec | Mapping[str, Any], *, timeout: float = 1800.0, in_cluster: bool = False
    ) -> SessionOpened:
        """Open the caller's warm Ray session `spec.name` on `spec.cluster` (`POST /ray-sessions`:
        her active one, or a new `ray-cluster` from `spec`; two opens at once make one), once its
        dashboard answers through the bridge. `cloudhpc.ray_session` is the friendlier form."""
        return self._run(_open_ray_session(spec, timeout, in_cluster))

    def artifacts(self, job: JobRef) -> builtins.list[Artifact]:
        """The job's stored files (`spec.json`, `job.sh`, `output.log`, `sacct.json`, ...), each with
        `name`, `key` and `url`: a presigned S3 URL, or porter's own download route (needs the token)."""
        return self._send(_artifacts(job))

    def files(
        self, job: JobRef, path: str = "", *, offset: int = 0, length: int | None = None
    ) -> FilesAnswer:
        """A directory of the job's directory on its cluster (`entries`), or up to `length` bytes of
        a file from `offset` (`content`, base64), while the job runs and after it ended. ApiError
        409 `not_on_cluster` before the job reached its cluster, 403 for a path leading outside."""
        return self._send(_files(job, path, offset, length))

    def read_file(self, job: JobRef, path: str, *, offset: int = 0, length: int | None = None) -> bytes:
        """The bytes of a file of the job's directory from `offset`: `length` of them, or all to
        its end (in requests of porter's largest read, `files` one after the other)."""
        return self._run(_read_file(job, path, offset, length))

    def clusters(self) -> builtins.list[ClusterInfo]:
        """The clusters this token may use, with their agent's liveness."""
        return self._send(_clusters())

    def me(self) -> Me:
        """Who this token speaks for (`user`, `role`), and the URL prefixes under which its jobs'
        `files` may name objects (`inputs`: store a job's inputs there before submitting it)."""
        return self._send(_me())


# ---- the asyncio transport ---------------------------------------------------------------------


class AsyncClient(_Base):
    """`Client` for asyncio code: the same methods, awaited (`list` and `follow_logs` are async
    iterators), the same retries."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        retries: RetryPolicy | None = None,
    ) -> None:
        super().__init__(url, token, retries)
        self._http = httpx.AsyncClient(
            base_url=self.url, headers=self._headers, timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: tuple[type[BaseException], BaseException, TracebackType] | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send_once(self, call: _Call[T]) -> T:
        try:
            response = await self._http.request(call.method, call.path, **call.send_arguments())
        except httpx.TransportError as exc:
            raise _no_answer(self.url, exc) from exc
        return call.parse(_checked(response))

    async def _send(self, call: _Call[T]) -> T:
        async for attempt in self.retries.asynchronous(_retry_on(call), f"{call.method} {call.path}"):
            with attempt:
                return await self._send_once(call)
        raise AssertionError("unreachable")  # pragma: no cover: tenacity re-raises the last error

    async def _run(self, steps: _Steps[T]) -> T:
        try:
            call = next(steps)
            while True:
                call = steps.send(await self._send(call))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    async def _pages(self, page: _PageCall[T]) -> AsyncIterator[T]:
        cursor: str | None = None
        while True:
            items, cursor = await self._send(page(cursor))
            for item in items:
                yield item
            if cursor is None:
                return

    async def request(
        self, method: str, path: str, *, params: Mapping[str, Any] | None = None, json: Any = None
    ) -> httpx.Response:
        return await self._send(_raw(method, path, params, json))

    async def submit(self, spec: JobSpec | Mapping[str, Any], *, idempotency_key: str | None = None) -> Job:
        return await self._send(_submit(spec, idempotency_key))

    async def estimate(self, spec: JobSpec | Mapping[str, Any]) -> Estimate:
        return await self._send(_estimate(spec))

    async def get(self, job: JobRef, *, wait: float = 0, since_state: JobState | str | None = None) -> Job:
        return await self._send(_get(job, wait, since_state))

    def list(
        self,
        *,
        state: JobState | str | None = None,
        cluster: str | None = None,
        name: str | None = None,
        limit: int = 50,
    ) -> AsyncIterator[JobSummary]:
        """`async for job in client.list(...)`: pages fetched as they are used up."""
        return self._pages(_list_page(state, cluster, name, limit))

    async def wait(
        self,
        job: JobRef,
        *,
        timeout: float | None = None,
        on_change: Callable[[Job], None] | None = None,
        poll: float = 20.0,
    ) -> Job:
        return await self._run(_wait(job, timeout, on_change, poll))

    async def cancel(self, job: JobRef) -> Job:
        return await self._send(_cancel(job))

    async def cancel_task(self, job: JobRef, index: int) -> Job:
        return await self._send(_cancel_task(job, index))

    async def tasks(self, job: JobRef, *, page_size: int = 500) -> builtins.list[TaskObservation]:
        return [task async for task in self._pages(_tasks_page(job, page_size))]

    async def task_output(self, job: JobRef, index: int) -> bytes:
        return await self._send(_task_output(job, index))

    async def download_artifact(self, job: JobRef, name: str) -> bytes:
        return await self._send(_download_artifact(job, name))

    async def upload(self, data: bytes, *, name: str) -> str:
        return await self._send(_upload(data, name))

    async def delete_upload(self, url: str) -> None:
        await self._send(_delete_upload(url))

    async def logs(self, job: JobRef, *, offset: int = 0) -> LogChunk:
        return await self._send(_logs(job, offset))

    async def follow_logs(self, job: JobRef, *, offset: int = 0) -> AsyncIterator[bytes]:
        path, params, plain = _follow_logs(job, offset)
        async with self._http.stream("GET", path, params=params, timeout=None) as response:
            if response.status_code >= 400:
                await response.aread()
                await self._send(plain)  # raises the API's error
            async for data in response.aiter_bytes():
                yield data

    async def accounting(self, job: JobRef) -> Accounting:
        return await self._send(_accounting(job))

    async def bridges(self, job: JobRef) -> builtins.list[Bridge]:
        return await self._send(_bridges(job))

    async def wait_bridges(
        self, job: JobRef, *, names: Iterable[str] | None = None, timeout: float = 300.0
    ) -> builtins.list[Bridge]:
        return await self._run(_wait_bridges(job, names, timeout))

    async def ray_dashboard_url(
        self, job: JobRef, *, timeout: float = 300.0, in_cluster: bool = False
    ) -> str:
        return await self._run(_ray_dashboard_url(job, timeout, in_cluster))

    async def open_ray_session(
        self, spec: JobSpec | Mapping[str, Any], *, timeout: float = 1800.0, in_cluster: bool = False
    ) -> SessionOpened:
        return await self._run(_open_ray_session(spec, timeout, in_cluster))

    async def artifacts(self, job: JobRef) -> builtins.list[Artifact]:
        return await self._send(_artifacts(job))

    async def files(
        self, job: JobRef, path: str = "", *, offset: int = 0, length: int | None = None
    ) -> FilesAnswer:
        return await self._send(_files(job, path, offset, length))

    async def read_file(self, job: JobRef, path: str, *, offset: int = 0, length: int | None = None) -> bytes:
        return await self._run(_read_file(job, path, offset, length))

    async def clusters(self) -> builtins.list[ClusterInfo]:
        return await self._send(_clusters())

    async def me(self) -> Me:
        return await self._send(_me())


CLI_RETRIES = RetryPolicy(attempts=3, initial=0.3, maximum=1.0)
"""A command retries for about a second only: a person (or a script, on exit code 69) is waiting,
and can run it again; the SDK's default rides out a porter restart (~8 s)."""


def default_client(url: str | None = None, token: str | None = None) -> Client:
    """A client for the CLI: CLOUDHPC_URL / CLOUDHPC_TOKEN, else the admin token of `serve all`."""
    if token is None and not os.environ.get("CLOUDHPC_TOKEN"):
        candidate = Path(".cloudhpc/admin-token")
        if candidate.exists():
            token = candidate.read_text().strip()
    return Client(url, token, retries=CLI_RETRIES)
