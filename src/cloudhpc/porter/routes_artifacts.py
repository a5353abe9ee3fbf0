"""Job artifacts: users list and download them; the agent reports the keys it wrote.

The agent writes the objects itself (it has the files, and the bytes never pass through porter);
porter only records their keys, under the job's own prefix, and hands out download URLs:
presigned S3 URLs, or its own streaming route for a local-directory store, which has no URL a
client could use.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from urllib.parse import quote
from uuid import UUID

from fastapi import APIRouter, Body, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from cloudhpc.domain.api import Artifact, ArtifactList
from cloudhpc.domain.arrays import array_indices
from cloudhpc.domain.jobs import Job
from cloudhpc.exceptions import HttpProblem, StorageError
from cloudhpc.porter.auth import AgentPrincipal, UserPrincipal, require_agent_for
from cloudhpc.porter.state import PorterState, object_store, state_of
from cloudhpc.storage import ObjectStore
from cloudhpc.storage.artifacts import foreign_keys, is_job_artifact, job_prefix, output_name

__all__ = ["agent_router", "router"]

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1", tags=["artifacts"])
agent_router = APIRouter(prefix="/api/v1/agent", tags=["agent"])

_TEXT_SUFFIXES = (".log", ".txt", ".sh")


async def _user_job(state: PorterState, job_id: UUID, principal: Any) -> Job:
    job = await state.store.get_job(job_id)
    if job is None or (principal.role != "admin" and job.owner != principal.user):
        raise HttpProblem(404, "not_found", "no such job (or it is not yours)")
    return job


def _names(job: Job) -> dict[str, str]:
    """Artifact name (the key below the job's prefix) -> key, for the keys porter recorded.

    A key that is not a valid artifact of the job (recorded before porter checked keys) is left
    out, so that one bad key cannot make the whole listing fail."""
    prefix = job_prefix(job.owner, job.id)
    return {key[len(prefix) :]: key for key in job.artifacts if is_job_artifact(prefix, key)}


STORE_GRACE = timedelta(minutes=10)
"""How long after its end a job's task outputs may still be on their way to the object store: the
agent stores the last tasks' outputs of an array after it reports the end (later still when the
store or the agent was down), and a caller reading them right after `wait` must be told to ask
again, not that they do not exist."""


def missing_task_output(job: Job, task: int) -> HttpProblem:
    """The answer for task `task`'s output that is not stored: 503 `not_stored_yet` (the SDK asks
    again) while it may still come, else 404 `not_available`."""
    ended = job.ended_at
    if job.state.terminal and ended is not None and datetime.now(UTC) - ended < STORE_GRACE:
        return HttpProblem(
            503,
            "not_stored_yet",
            f"the output of task {task} of job {job.id} is being stored (the job ended at "
            f"{ended.isoformat()}); ask again in a moment",
        )
    return HttpProblem(
        404,
        "not_available",
        f"no output of task {task} of job {job.id} yet (state {job.state.value}); "
        "each task's output is stored when the task ends",
    )


def task_of_output(job: Job, name: str) -> int | None:
    """The array task whose output artifact `name` is (`tasks/<index>/output.log`), else None."""
    digits = name.removeprefix("tasks/").removesuffix("/output.log")
    if job.spec.array is None or not digits.isdigit() or output_name(int(digits)) != name:
        return None
    return int(digits) if int(digits) in array_indices(job.spec.array) else None


@router.get("/jobs/{job_id}/artifacts", response_model=ArtifactList)
async def list_artifacts(job_id: UUID, request: Request, principal: UserPrincipal) -> ArtifactList:
    """`{"artifacts": [{"name", "key", "url"}]}`. S3 URLs are presigned (valid for
    `porter.artifact_url_expiry` seconds, no token needed); with a local store the URL is porter's
    download route, which needs the bearer token."""
    state = state_of(request)
    job = await _user_job(state, job_id, principal)
    objects = object_store(state)
    expiry = state.settings.porter.artifact_url_expiry
    items = []
    for name, key in sorted(_names(job).items()):
        try:
            url = await run_in_threadpool(objects.url, key, expiry)
        except StorageError as exc:
            # one object the store cannot give a URL for does not hide the job's other artifacts
            log.warning("job %s: artifact %r left out of the listing: %s", job.id, key, exc)
            continue
        if not url.startswith(("https://", "http://")):
            # quoted: Starlette puts the value in the path as it is, and a collected output's
            # name may hold `%`, `?`, `#` or spaces (`outputs/100%25.txt`)
            url = str(request.url_for("download_artifact", job_id=str(job.id), name=quote(name, safe="/")))
        items.append(Artifact(name=name, key=key, url=url))
    return ArtifactList(artifacts=items)


@router.get("/jobs/{job_id}/artifacts/{name:path}", name="download_artifact")
async def download_artifact(
    job_id: UUID, name: str, request: Request, principal: UserPrincipal
) -> StreamingResponse:
    state = state_of(request)
    job = await _user_job(state, job_id, principal)
    key = _names(job).get(name)
    if key is None:
        if (task := task_of_output(job, name)) is not None:
            raise missing_task_output(job, task)
        raise HttpProblem(404, "not_found", f"job {job.id} has no artifact {name!r}")
    chunks = await run_in_threadpool(object_store(state).iter_bytes, key)
    if name.endswith(_TEXT_SUFFIXES):
        media_type = "text/plain; charset=utf-8"
    elif name.endswith(".json"):
        media_type = "application/json"
    else:
        media_type = "application/octet-stream"
    return StreamingResponse(iterate_in_threadpool(chunks), media_type=media_type)


class ArtifactKeys(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[str] = Field(max_length=10_000)


class RecordedKeys(BaseModel):
    """The agent's answer: every key the job now has (those recorded before, and these)."""

    artifacts: list[str]


@agent_router.post("/jobs/{job_id}/artifacts", response_model=RecordedKeys)
async def add_artifacts(
    job_id: UUID, request: Request, principal: AgentPrincipal, body: Annotated[ArtifactKeys, Body()]
) -> RecordedKeys:
    """Record keys the agent wrote. Only keys under the job's own prefix are accepted, so an agent
    cannot make a user's download point at another user's objects."""
    state = state_of(request)
    job = await state.store.get_job(job_id)
    if job is None:
        raise HttpProblem(404, "not_found", f"no job {job_id}")
    require_agent_for(principal, job.cluster)
    outside = foreign_keys(job.owner, job.id, body.keys)
    if outside:
        prefix = job_prefix(job.owner, job.id)
        raise HttpProblem(
            422,
            "invalid_request",
            f"invalid request: keys: {len(outside)} key(s) are not under the job's prefix {prefix}",
            [{"field": "keys", "message": f"not under {prefix}: {outside[0]!r}"}],
        )
    if state.objects is not None:
        absent = await run_in_threadpool(_absent, state.objects, body.keys)
        if absent:
            # an agent whose object store is not porter's (a submitter on a laptop with the default
            # file:// store): listing its keys would hand users links that answer NoSuchKey
            raise HttpProblem(
                422,
                "invalid_request",
                f"invalid request: keys: {len(absent)} key(s) are not in porter's object store; the "
                "agent writes its artifacts where porter cannot read them (submitter.object_store "
                "must be porter.object_store, reachable from the agent)",
                [{"field": "keys", "message": f"not in porter's object store: {absent[0]!r}"}],
            )
    return RecordedKeys(artifacts=await state.store.add_artifacts(job.id, body.keys))


def _absent(objects: ObjectStore, keys: list[str]) -> list[str]:
    """The keys porter's object store does not hold (one listing call per key, at most 1 result)."""
    return [key for key in keys if objects.list(key, limit=1) != [key]]
