"""A ray-job on a warm session: its package and Ray's job-submission REST API, as the agent uses them.

A `ray-job` that names a running `ray-cluster` (`ray.session`) is not a SLURM job: the agent submits
its entrypoint to the session's Ray through the session's `dashboard` bridge, with the same REST
calls `ray.job_submission.JobSubmissionClient` makes (`PUT /api/packages/...`, `POST /api/jobs/`,
`GET /api/jobs/{id}`, `GET /api/jobs/{id}/logs`, `POST /api/jobs/{id}/stop`), so the agent needs
httpx, not Ray.

The job's `files` (fetched as for any job), its entrypoint and its `env` travel as one zip package
in Ray's object store (the `working_dir` of the Ray job, unpacked under the session's private
temporary directory): nothing is written into the cluster's file system and no user string is ever
part of a command line. The Ray job's submission id is the cloudhpc job id, so a restarted agent
finds the Ray job it submitted instead of starting it twice.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import httpx

from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import RayJobsError

__all__ = [
    "ENTRYPOINT_COMMAND",
    "SESSION_TOKEN_FILE",
    "RayJobInfo",
    "RayJobsApi",
    "session_package",
]

SESSION_TOKEN_FILE = ".cloudhpc/ray/auth_token"  # noqa: S105 -- a path, not a token
"""A session's copy of Ray's token, in its job directory (only when Ray set one up for the account:
the dashboard then refuses requests without it). Written by the session's script, read by the agent,
deleted with the job's other secrets."""
PACKAGE_ENTRYPOINT = ".cloudhpc/entrypoint"
PACKAGE_ENV = ".cloudhpc/env"
PACKAGE_RUNNER = ".cloudhpc/run"
_RUNNER = (
    "# cloudhpc: a ray-job on a session; its env values come from a file, never a command line\n"
    f"if [ -f {PACKAGE_ENV} ]; then . ./{PACKAGE_ENV} || exit 97; fi\n"
    f"exec /bin/bash {PACKAGE_ENTRYPOINT} </dev/null\n"
)
ENTRYPOINT_COMMAND = f"/bin/bash {PACKAGE_RUNNER}"
"""What Ray runs, in the package's directory: a constant; the user's entrypoint is a file in it."""
_ZIP_TIME = (2020, 1, 1, 0, 0, 0)
"""Every member's timestamp: the same job gives the same package, hence the same URI."""


def session_package(entrypoint: str, files: Mapping[str, bytes], env_file: bytes | None) -> tuple[str, bytes]:
    """The Ray package (`gcs://_ray_pkg_<digest>.zip`, zip bytes) of one ray-job on a session:
    its files at their job-relative paths, and under `.cloudhpc/` its entrypoint, its `env` file
    (`hpc/jobscript.environment_file`'s format) and the runner that sources one and runs the other."""
    buffer = io.BytesIO()
    members = {**files, PACKAGE_ENTRYPOINT: entrypoint.encode(), PACKAGE_RUNNER: _RUNNER.encode()}
    if env_file is not None:
        members[PACKAGE_ENV] = env_file
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(members):
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.external_attr = 0o600 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, members[name])
    data = buffer.getvalue()
    return f"gcs://_ray_pkg_{hashlib.sha256(data).hexdigest()[:32]}.zip", data


_TERMINAL = {"SUCCEEDED": JobState.COMPLETED, "FAILED": JobState.FAILED, "STOPPED": JobState.CANCELLED}
_ACTIVE = {"PENDING": JobState.QUEUED, "RUNNING": JobState.RUNNING}


def _time(milliseconds: Any) -> datetime | None:
    if not isinstance(milliseconds, int | float) or milliseconds <= 0:
        return None
    return datetime.fromtimestamp(milliseconds / 1000, UTC)


@dataclass(frozen=True)
class RayJobInfo:
    """What Ray says of one job (`JobDetails`), in cloudhpc's words."""

    status: str
    """Ray's own word: PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED."""
    message: str | None
    exit_code: int | None
    started_at: datetime | None
    ended_at: datetime | None

    @property
    def state(self) -> JobState:
        """The cloudhpc state: a stopped Ray job is `cancelled` (only cancel stops one)."""
        return _TERMINAL.get(self.status) or _ACTIVE.get(self.status, JobState.QUEUED)

    @property
    def terminal(self) -> bool:
        return self.status in _TERMINAL

    @classmethod
    def from_details(cls, body: Mapping[str, Any]) -> RayJobInfo:
        status = str(body.get("status", "PENDING"))
        code = body.get("driver_exit_code")
        if not isinstance(code, int):
            code = {"SUCCEEDED": 0, "FAILED": 1}.get(status)
        message = body.get("message")
        return cls(
            status=status,
            message=str(message) if message else None,
            exit_code=code,
            started_at=_time(body.get("start_time")),
            ended_at=_time(body.get("end_time")) if status in _TERMINAL else None,
        )


class RayJobsApi:
    """Ray's job-submission REST API at `base_url` (a session's dashboard bridge), with Ray's token
    when the session has one. Every method raises `RayJobsError`; status 0 means no answer."""

    def __init__(self, http: httpx.AsyncClient, base_url: str, token: str | None = None) -> None:
        self._http = http
        self._base = base_url.rstrip("/")
        self._headers: dict[str, str] = {}
        self.use_token(token)

    def use_token(self, token: str | None) -> None:
        """Send Ray's token (None: none) from now on."""
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._http.request(method, self._base + path, headers=self._headers, **kwargs)
        except httpx.HTTPError as exc:
            raise RayJobsError(
                0, f"the session's Ray dashboard at {self._base} did not answer: {exc}"
            ) from exc

    @staticmethod
    def _check(response: httpx.Response, what: str) -> httpx.Response:
        if response.status_code >= 400:
            raise RayJobsError(
                response.status_code, f"{what}: HTTP {response.status_code}: {response.text[:500]}"
            )
        return response

    async def probe(self) -> int:
        """The HTTP status of the dashboard's job list (200: Ray is up behind the bridge and takes
        this token; 401/403: it wants another), 0 while nothing answers."""
        try:
            return (await self._request("GET", "/api/jobs/")).status_code
        except RayJobsError:
            return 0

    async def upload_package(self, uri: str, data: bytes) -> None:
        """Store the package in the session's object store (again, if it is there: one request
        instead of a check and an upload; its name is its content's digest)."""
        protocol, name = uri.split("://", 1)
        path = f"/api/packages/{protocol}/{name}"
        self._check(await self._request("PUT", path, content=data), "uploading the job's files")

    async def submit(self, submission_id: UUID, package_uri: str, metadata: Mapping[str, str]) -> None:
        """Start the Ray job `submission_id` (the runner of the package, in its directory). One
        that exists already (a restarted agent) is not started again and not an error."""
        body = {
            "entrypoint": ENTRYPOINT_COMMAND,
            "submission_id": str(submission_id),
            "runtime_env": {"working_dir": package_uri},
            "metadata": dict(metadata),
        }
        response = await self._request("POST", "/api/jobs/", json=body)
        if response.status_code >= 400 and await self.info(submission_id) is not None:
            return
        self._check(response, "submitting the Ray job")

    async def info(self, submission_id: UUID) -> RayJobInfo | None:
        """The job's state; None when Ray has no such job."""
        response = await self._request("GET", f"/api/jobs/{submission_id}")
        if response.status_code == 404:
            return None
        return RayJobInfo.from_details(self._check(response, "reading the Ray job").json())

    async def logs(self, submission_id: UUID) -> bytes:
        """Everything the job's driver printed so far (Ray keeps and serves it whole)."""
        response = self._check(
            await self._request("GET", f"/api/jobs/{submission_id}/logs"), "reading its logs"
        )
        return str(response.json().get("logs", "")).encode()

    async def stop(self, submission_id: UUID) -> None:
        """Ask Ray to stop the job (the session goes on); a job that ended is not an error."""
        response = await self._request("POST", f"/api/jobs/{submission_id}/stop")
        if response.status_code != 404:
            self._check(response, "stopping the Ray job")
