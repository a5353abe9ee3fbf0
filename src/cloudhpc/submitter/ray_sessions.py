"""The agent's half of warm Ray sessions: a `ray-job` naming a running `ray-cluster` (`ray.session`).

Why the agent and not porter: the agent is the one writer of a job's observed state (its reports
carry the sequence numbers porter orders them by), it already uploads a job's output by offset and
turns a cancel request into an action on the cluster, and it is restarted without losing a job
(reconciliation). Submitting to Ray is one more such action; porter stays a control plane that
never runs anything. The path is the session's `dashboard` bridge (the same address
`cloudhpc.ray_session` gives a notebook), so the agent needs no SSH for it and nothing is written
into the cluster's file system (`ray/jobs_api.py`).

A session job, step by step:

1. the session is looked up in porter's view of the cluster (`Channel.reconciliation`): an active
   `ray-cluster` of the same owner whose id or name is `ray.session` (by name: the newest). None:
   the job fails at once with the reason. One still queued is waited for;
2. its files are fetched (as for any job) and packed with the entrypoint and the `env` file; the
   package is stored in the session's Ray and the Ray job submitted under the cloudhpc job's id;
3. the Ray job is followed: its state (`queued`, `running`) and output reach porter as for a SLURM
   job; at its end the job is `completed`, `failed` (with Ray's message) or `cancelled`;
4. a cancel request stops the Ray job (`POST /api/jobs/{id}/stop`), never the session;
5. if the session ends under the job (its time limit, a cancel), the job fails with that reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol
from uuid import UUID

import httpx

from cloudhpc.domain.jobs import Job, JobKind
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import ChannelError, CloudHPCError, RayJobsError, SessionNotActive
from cloudhpc.hpc.jobscript import ENV_FILE, environment_file
from cloudhpc.ray.jobs_api import SESSION_TOKEN_FILE, RayJobInfo, RayJobsApi, session_package
from cloudhpc.submitter.channel import Channel

__all__ = ["SessionJobs", "is_session_job"]

log = logging.getLogger(__name__)

STATUS_INTERVAL = 0.1
"""Seconds between reads of the Ray job's state: its end reaches porter within about this (a GET
through the bridge to the dashboard's loopback, which answers from Ray's job table)."""
LOG_INTERVAL = 1.0
"""Seconds between reads of its output while it runs (the agent's output interval for SLURM jobs)."""
SESSION_CHECK = 10.0
"""Seconds of Ray not answering after which the agent asks porter whether the session still runs."""
QUEUED_SESSION_POLL = 2.0
"""Seconds between looks at a session that is not running yet."""
REFUSED_FOR = 60.0
"""Seconds the session's Ray may refuse the agent's token (its copy appears once Ray is ready)."""


def is_session_job(job: Job) -> bool:
    """A ray-job that runs on a session, not on a SLURM allocation of its own."""
    return job.spec.kind == JobKind.RAY_JOB and job.spec.ray is not None and job.spec.ray.session is not None


class _Report(Protocol):
    def __call__(self, job_id: UUID, state: JobState, **fields: Any) -> Awaitable[None]: ...


@dataclass
class SessionJobs:
    """Runs the session jobs of one cluster's agent (`Agent._submit` hands them here)."""

    cluster: str
    channel: Channel
    report: _Report
    file_content: Callable[[str, Job], Awaitable[bytes]]
    """A `files` value's bytes: inline, or fetched from the object store for the job's owner."""
    read_session_file: Callable[[UUID, str], Awaitable[bytes]]
    """A file of a job's directory on the cluster (b"" when missing): the session's Ray token."""
    cancel_asked: Callable[[UUID], bool]
    status_interval: float = STATUS_INTERVAL
    log_interval: float = LOG_INTERVAL
    _tokens: dict[UUID, str | None] = field(default_factory=dict)
    """Each session's token as last read (one SSH read per session, not per job)."""
    _answering: set[UUID] = field(default_factory=set)
    """Sessions whose Ray has answered the agent: their jobs are submitted without a probe first."""

    async def run(self, job: Job) -> None:
        """Take the job from wherever it is (new, or adopted after an agent restart) to its end."""
        if job.state == JobState.PENDING and job.cancel_requested:
            await self.report(job.id, JobState.CANCELLED, reason="cancelled before submission")
            return
        # `preparing` is reported while the session is looked up: one round trip less before Ray
        # gets the job. The report takes its number as it starts (the sleep lets it), so every
        # later report of the job supersedes it whatever order they arrive in.
        preparing: asyncio.Future[None] | None = None
        if job.state == JobState.PENDING:
            preparing = asyncio.ensure_future(self.report(job.id, JobState.PREPARING))
            await asyncio.sleep(0)
        try:
            session = await self._find_session(job)
            if session is None:
                reason = "cancelled while its session was queued (nothing was submitted)"
                await self.report(job.id, JobState.CANCELLED, reason=reason, ended_at=datetime.now(UTC))
                return
            api_args = await self._api_args(session)
            async with httpx.AsyncClient(trust_env=False, timeout=30.0) as http:
                api = RayJobsApi(http, *api_args)
                await self._submit(job, session, api)
                if preparing is not None:
                    await preparing
                await self._follow(job, session, api)
        except SessionNotActive as exc:
            await self.report(job.id, JobState.FAILED, reason=str(exc), ended_at=datetime.now(UTC))
        except CloudHPCError as exc:  # RayJobsError, or a file that could not be fetched
            log.warning("job %s: could not run it on its session: %s", job.id, exc)
            await self.report(
                job.id, JobState.FAILED, reason=f"ray.session: {exc}", ended_at=datetime.now(UTC)
            )
        finally:
            if preparing is not None:
                await preparing

    # ---- the session -------------------------------------------------------------------------

    async def _active_session(self, job: Job) -> Job | None:
        """The owner's active ray-cluster on this cluster named by `ray.session` (id, else name:
        the newest), as porter knows it now."""
        assert job.spec.ray is not None
        assert job.spec.ray.session is not None
        wanted = job.spec.ray.session
        view = await self.channel.reconciliation(self.cluster)
        active = {j.id for j in view.jobs}  # what is known of ended sessions is dropped
        self._answering &= active
        self._tokens = {k: v for k, v in self._tokens.items() if k in active}
        mine = [
            j
            for j in view.jobs
            if j.spec.kind == JobKind.RAY_CLUSTER and j.owner == job.owner and j.id != job.id
        ]
        by_id = [j for j in mine if str(j.id) == wanted]
        by_name = sorted((j for j in mine if j.name == wanted), key=lambda j: j.created_at)
        found = by_id or by_name
        return found[-1] if found else None

    async def _find_session(self, job: Job) -> Job | None:
        """The running session (waiting while it is queued; None when the job is cancelled
        meanwhile); `SessionNotActive` when there is none."""
        assert job.spec.ray is not None
        while True:
            try:
                session = await self._active_session(job)
            except ChannelError as exc:
                log.warning("job %s: cannot ask porter for its session (%s); retrying", job.id, exc)
                await asyncio.sleep(QUEUED_SESSION_POLL)
                continue
            if session is None:
                raise SessionNotActive(
                    f"ray.session {job.spec.ray.session!r}: no ray-cluster of {job.owner} with this id or "
                    f"name is active on cluster {self.cluster} (it does not exist or has ended)"
                )
            if session.state == JobState.RUNNING:
                return session
            if self.cancel_asked(job.id) or job.cancel_requested:
                return None
            await asyncio.sleep(QUEUED_SESSION_POLL)

    async def _api_args(self, session: Job) -> tuple[str, str | None]:
        """The session's dashboard bridge URL and Ray's token (when the session has one)."""
        dashboard = next((b for b in session.bridges if b.name == "dashboard"), None)
        if dashboard is None:
            raise SessionNotActive(
                f"session {session.id} ({session.name}) does not expose its dashboard (ray.expose: "
                "[dashboard]): the agent submits Ray jobs through it"
            )
        if session.id not in self._tokens:
            self._tokens[session.id] = await self._token(session)
        return f"http://{dashboard.bridge_host}:{dashboard.bridge_port}", self._tokens[session.id]

    async def _token(self, session: Job) -> str | None:
        """Ray's token as the session's script copied it into its job directory (None: no token)."""
        token = (await self.read_session_file(session.id, SESSION_TOKEN_FILE)).decode().strip() or None
        self._tokens[session.id] = token
        return token

    async def _still_active(self, job: Job, session: Job) -> None:
        current = await self._active_session(job)
        if current is None or current.id != session.id or current.state.terminal:
            raise SessionNotActive(f"its session {session.id} ({session.name}) ended while the job was on it")

    # ---- the Ray job -------------------------------------------------------------------------

    async def _submit(self, job: Job, session: Job, api: RayJobsApi) -> None:
        """Package and submit, once Ray answers behind the bridge (a session just started may not)."""
        assert job.spec.ray is not None
        assert job.spec.ray.entrypoint is not None
        files = {path: await self.file_content(value, job) for path, value in job.spec.files.items()}
        uri, package = session_package(
            job.spec.ray.entrypoint, files, environment_file(job.spec.env).get(ENV_FILE)
        )
        metadata = {"cloudhpc_job": str(job.id), "cloudhpc_session": str(session.id)}
        for attempt in range(5):
            await self._until_answering(job, session, api)
            try:  # both idempotent: the package's name is its digest, the job's is the job id
                await api.upload_package(uri, package)
                await api.submit(job.id, uri, metadata)
                break
            except RayJobsError as exc:
                if exc.status not in (0, 401, 403) or attempt == 4:
                    raise
                self._answering.discard(session.id)  # a tunnel restart, or a new token: wait again
                await asyncio.sleep(1.0)
        log.info("job %s: submitted to Ray session %s", job.id, session.id)

    async def _until_answering(self, job: Job, session: Job, api: RayJobsApi) -> None:
        """Until the session's Ray answers the agent (a session just started may not yet, and its
        token may appear only then); at once for a session that answered before."""
        waited = refused = time.monotonic()
        while session.id not in self._answering and (status := await api.probe()) != 200:
            if status in (401, 403):  # token auth: the session's copy of the token may be new
                if time.monotonic() - refused > REFUSED_FOR:
                    raise RayJobsError(
                        status, "the session's Ray refuses the token the session left for the agent"
                    )
                api.use_token(await self._token(session))
            else:
                refused = time.monotonic()
            if time.monotonic() - waited > SESSION_CHECK:
                await self._still_active(job, session)
                waited = time.monotonic()
            await asyncio.sleep(0.5)
        self._answering.add(session.id)

    async def _follow(self, job: Job, session: Job, api: RayJobsApi) -> None:
        offset = 0
        last_logs = 0.0
        stopping = False
        seen = job.state
        unanswered_since: float | None = None
        while True:
            try:
                info = await api.info(job.id)
                if info is None:
                    raise RayJobsError(404, "the session's Ray has no record of the job")
                unanswered_since = None
            except RayJobsError as exc:
                if exc.status not in (0, 404) and exc.status < 500:
                    raise
                unanswered_since = unanswered_since or time.monotonic()
                if time.monotonic() - unanswered_since > SESSION_CHECK:
                    await self._still_active(job, session)
                    if exc.status == 404:  # the session runs, and its Ray lost the job
                        raise
                    unanswered_since = time.monotonic()
                await asyncio.sleep(1.0)
                continue
            if not stopping and (self.cancel_asked(job.id) or job.cancel_requested) and not info.terminal:
                log.info("job %s: cancel requested; stopping the Ray job (the session goes on)", job.id)
                await api.stop(job.id)
                stopping = True
            if info.terminal or time.monotonic() - last_logs >= self.log_interval:
                offset = await self._upload_logs(job, api, offset)
                last_logs = time.monotonic()
            if info.terminal:
                await self._report_end(job, info, cancelled=stopping)
                return
            if info.state != seen and info.state == JobState.RUNNING:
                await self.report(job.id, JobState.RUNNING, started_at=info.started_at)
                seen = info.state
            elif info.state != seen and seen in (JobState.PENDING, JobState.PREPARING):
                await self.report(job.id, JobState.QUEUED)
                seen = JobState.QUEUED
            await asyncio.sleep(self.status_interval)

    async def _upload_logs(self, job: Job, api: RayJobsApi, offset: int) -> int:
        """What the driver printed since `offset`, to porter (best effort: retried next time)."""
        try:
            data = await api.logs(job.id)
            if len(data) > offset:
                return await self.channel.upload_output(job.id, offset, data[offset:])
        except (RayJobsError, ChannelError) as exc:
            log.info("job %s: output not uploaded this time (%s)", job.id, exc)
        return offset

    async def _report_end(self, job: Job, info: RayJobInfo, *, cancelled: bool) -> None:
        state = info.state
        reason = None
        if state == JobState.CANCELLED and not cancelled:
            state, reason = JobState.FAILED, f"the Ray job was stopped outside cloudhpc: {info.message or ''}"
        elif state == JobState.FAILED:
            reason = info.message
        await self.report(
            job.id,
            state,
            exit_code=info.exit_code,
            reason=reason[:4000] if reason else None,
            started_at=info.started_at,
            ended_at=info.ended_at or datetime.now(UTC),
        )
