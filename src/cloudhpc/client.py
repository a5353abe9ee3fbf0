"""Python SDK over porter's API, used by the CLI, pipeline components and notebooks.

    from cloudhpc.client import Client
    with Client("http://127.0.0.1:5555", token) as c:
        job = c.submit({"name": "hello", "cluster": "local", "script": "echo hi"})
        job = c.wait(job.id)
        print(job.state, c.logs(job.id))

Errors from the API are raised as `ApiError` carrying the status and the API's `code`, `message`
and `details`, so callers can tell a bad field (422) from a missing job (404) without parsing text.
"""

from __future__ import annotations

import builtins
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from uuid import UUID

import httpx

from cloudhpc.domain.arrays import TaskObservation
from cloudhpc.domain.directives import apply_directives
from cloudhpc.domain.jobs import Bridge, Job, JobSpec, JobSummary
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import CloudHPCError

__all__ = ["ApiError", "Client", "LogChunk", "default_client"]


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


class Client:
    """A synchronous client. `url` and `token` default to CLOUDHPC_URL and CLOUDHPC_TOKEN."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = (url or os.environ.get("CLOUDHPC_URL") or "http://127.0.0.1:5555").rstrip("/")
        token = token or os.environ.get("CLOUDHPC_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def __repr__(self) -> str:  # never show the token
        return f"Client({self.url!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: tuple[type[BaseException], BaseException, TracebackType] | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ApiError(0, "timeout", f"porter at {self.url} did not answer in time") from exc
        except httpx.TransportError as exc:
            raise ApiError(
                0, "unreachable", f"cannot reach porter at {self.url} ({exc}); is `cloudhpc serve` running?"
            ) from exc
        if response.status_code >= 400:
            try:
                err = response.json()["error"]
                raise ApiError(response.status_code, err["code"], err["message"], err.get("details"))
            except (ValueError, KeyError, TypeError):
                raise ApiError(response.status_code, "http_error", response.text[:500]) from None
        return response

    def submit(self, spec: JobSpec | Mapping[str, Any], *, idempotency_key: str | None = None) -> Job:
        """Submit a job. A `JobSpec` is checked here first, its script's #SBATCH directives merged
        as porter merges them (ValueError naming the line before anything is sent); a mapping is
        sent as it is and checked by porter (ApiError 422 naming the field)."""
        body = (
            apply_directives(spec).model_dump(mode="json", by_alias=True, exclude_none=True)
            if isinstance(spec, JobSpec)
            else spec
        )
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return Job.model_validate(self._request("POST", "/api/v1/jobs", json=body, headers=headers).json())

    def get(self, job: JobRef, *, wait: float = 0, since_state: JobState | str | None = None) -> Job:
        params: dict[str, Any] = {}
        if wait:
            params["wait"] = wait
            if since_state:
                params["since_state"] = str(since_state)
        extra = {"timeout": wait + 30} if wait else {}
        return Job.model_validate(
            self._request("GET", f"/api/v1/jobs/{_job_id(job)}", params=params, **extra).json()
        )

    def list(
        self,
        *,
        state: JobState | str | None = None,
        cluster: str | None = None,
        name: str | None = None,
        limit: int = 50,
    ) -> builtins.list[JobSummary]:
        """Every matching job as a summary (no spec, bridges or artifacts: `get` has them), following pages."""
        params: dict[str, Any] = {"limit": limit}
        for key, value in (("state", state), ("cluster", cluster), ("name", name)):
            if value is not None:
                params[key] = str(value)
        out: builtins.list[JobSummary] = []
        while True:
            page = self._request("GET", "/api/v1/jobs", params=params).json()
            out += [JobSummary.model_validate(j) for j in page["jobs"]]
            if not page.get("next_cursor"):
                return out
            params["cursor"] = page["next_cursor"]

    def wait(
        self,
        job: JobRef,
        *,
        timeout: float | None = None,
        on_change: Callable[[Job], None] | None = None,
        poll: float = 20.0,
    ) -> Job:
        """Block until the job ends (or `timeout`), calling `on_change` at every state change."""
        deadline = None if timeout is None else time.monotonic() + timeout
        current = self.get(job)
        if on_change:
            on_change(current)
        while not current.state.terminal:
            step = poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic()))
            if deadline is not None and step <= 0:
                break
            nxt = self.get(current.id, wait=step, since_state=current.state)
            if nxt.state != current.state and on_change:
                on_change(nxt)
            current = nxt
        return current

    def cancel(self, job: JobRef) -> Job:
        return Job.model_validate(self._request("POST", f"/api/v1/jobs/{_job_id(job)}/cancel").json())

    def cancel_task(self, job: JobRef, index: int) -> Job:
        """Cancel one task of an array job; the other tasks go on."""
        path = f"/api/v1/jobs/{_job_id(job)}/tasks/{int(index)}/cancel"
        return Job.model_validate(self._request("POST", path).json())

    def tasks(self, job: JobRef, *, page_size: int = 500) -> builtins.list[TaskObservation]:
        """Every task of an array job (all pages), by index: state, SLURM state, exit code, times."""
        out: builtins.list[TaskObservation] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": page_size} | ({"cursor": cursor} if cursor else {})
            body = self._request("GET", f"/api/v1/jobs/{_job_id(job)}/tasks", params=params).json()
            out.extend(TaskObservation.model_validate(t) for t in body["tasks"])
            cursor = body["next_cursor"]
            if cursor is None:
                return out

    def task_output(self, job: JobRef, index: int) -> bytes:
        """The output of one array task, stored when the array ended (`tasks/<index>/output.log`)."""
        path = f"/api/v1/jobs/{_job_id(job)}/artifacts/tasks/{int(index)}/output.log"
        return self._request("GET", path).content

    def logs(self, job: JobRef, *, offset: int = 0) -> LogChunk:
        response = self._request("GET", f"/api/v1/jobs/{_job_id(job)}/logs", params={"offset": offset})
        return LogChunk(
            data=response.content,
            next_offset=int(response.headers.get("X-Next-Offset", offset + len(response.content))),
            complete=response.headers.get("X-Complete") == "true",
        )

    def follow_logs(self, job: JobRef, *, offset: int = 0) -> Iterator[bytes]:
        """Stream output as it arrives, until the job has ended and everything was delivered."""
        url = f"/api/v1/jobs/{_job_id(job)}/logs"
        with self._http.stream(
            "GET", url, params={"offset": offset, "follow": "true"}, timeout=None
        ) as response:
            if response.status_code >= 400:
                response.read()
                self._request("GET", url, params={"offset": offset})  # raises the API's error
            yield from response.iter_bytes()

    def accounting(self, job: JobRef) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"/api/v1/jobs/{_job_id(job)}/accounting").json()
        return result

    def bridges(self, job: JobRef) -> builtins.list[Bridge]:
        """Where the job's exposed ports are reachable from the cloud, and whether they answer."""
        body = self._request("GET", f"/api/v1/jobs/{_job_id(job)}/bridges").json()
        return [Bridge.model_validate(b) for b in body["bridges"]]

    def wait_bridges(
        self, job: JobRef, *, names: Iterable[str] | None = None, timeout: float = 300.0
    ) -> builtins.list[Bridge]:
        """Block until the job's bridges (or those in `names`) are ready; return all its bridges.

        Raises `ApiError` with code `job_ended` when the job ends first and `timeout` when they are
        not ready in time (a queued job waits for SLURM: give a timeout that covers the queue).
        """
        wanted = set(names) if names is not None else None
        deadline = time.monotonic() + timeout
        job_id = _job_id(job)
        path = f"/api/v1/jobs/{job_id}/bridges"
        while True:
            step = min(20.0, max(0.0, deadline - time.monotonic()))
            body = self._request("GET", path, params={"wait": step}, timeout=step + 30).json()
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
                raise ApiError(
                    0, "timeout", f"bridges of job {job_id} not ready after {timeout:.0f}s: {waiting}"
                )

    def ray_dashboard_url(self, job: JobRef, *, timeout: float = 300.0, in_cluster: bool = False) -> str:
        """The URL of the job's Ray dashboard, once its `dashboard` bridge answers, for
        `ray.job_submission.JobSubmissionClient(url)`. `in_cluster=True` gives the Kubernetes
        Service address instead (from a pod; porter must publish bridges to Kubernetes)."""
        bridges = self.wait_bridges(job, names=["dashboard"], timeout=timeout)
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

    def artifacts(self, job: JobRef) -> builtins.list[dict[str, Any]]:
        """The job's stored files (`spec.json`, `job.sh`, `output.log`, `sacct.json`, ...), each
        `{"name", "key", "url"}`: a presigned S3 URL, or porter's own download route (needs the token)."""
        result: builtins.list[dict[str, Any]] = self._request(
            "GET", f"/api/v1/jobs/{_job_id(job)}/artifacts"
        ).json()["artifacts"]
        return result

    def clusters(self) -> builtins.list[dict[str, Any]]:
        """The clusters this token may use, with their agent's liveness."""
        result: builtins.list[dict[str, Any]] = self._request("GET", "/api/v1/clusters").json()["clusters"]
        return result

    def me(self) -> dict[str, Any]:
        """`{"user", "role", "inputs"}`: who this token speaks for, and the URL prefixes under which
        its jobs' `files` may name objects (store a job's inputs there before submitting it)."""
        result: dict[str, Any] = self._request("GET", "/api/v1/me").json()
        return result


def default_client(url: str | None = None, token: str | None = None) -> Client:
    """A client for the CLI: CLOUDHPC_URL / CLOUDHPC_TOKEN, else the admin token of `serve all`."""
    if token is None and not os.environ.get("CLOUDHPC_TOKEN"):
        candidate = Path(".cloudhpc/admin-token")
        if candidate.exists():
            token = candidate.read_text().strip()
    return Client(url, token)
