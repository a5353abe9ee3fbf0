"""Objects through porter, for an agent that has no object store of its own.

A submitter on a laptop reaches porter and the login node, nothing else: porter's object store
(an S3 bucket inside the platform) is out of its reach. Without `submitter.object_store`, its
agent reads a job's input objects and writes the job's artifacts through these two routes instead:

    GET /api/v1/agent/jobs/{id}/inputs?url=URL       one of the job's `files` URLs, streamed out
    PUT /api/v1/agent/jobs/{id}/artifacts/{name}     one artifact, streamed in under jobs/<owner>/<id>/

Both are scoped like every agent route: an agent token, bound to the job's cluster. An input is
served only when the job's own spec names the URL in `files` and the URL passes the input rule
for the job's owner (`storage.inputs.InputScope`, against porter's store, as at submission): an
agent cannot read an object no job on its cluster was given, nor one its owner could not name. An
artifact's key is made here from the job's owner and id, so an agent cannot write outside the job's
prefix. Neither route holds an object in memory: inputs are streamed from the store, artifacts are
spooled to a temporary file as they arrive (cut off at `MAX_ARTIFACT_BYTES`) and uploaded from it
(in parts above the store's multipart threshold).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from cloudhpc.exceptions import HttpProblem, ObjectNotFound, StorageError
from cloudhpc.porter.auth import AgentPrincipal, agent_job
from cloudhpc.porter.inputs import input_scope
from cloudhpc.porter.limits import spool_capped
from cloudhpc.porter.state import object_store, state_of
from cloudhpc.storage.artifacts import artifact_key

__all__ = ["ARTIFACT_UPLOAD_PATH", "MAX_ARTIFACT_BYTES", "router"]

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1/agent", tags=["agent"])

MAX_ARTIFACT_BYTES = 1 << 30
"""The largest artifact an agent may upload through porter (a job's whole output log is one)."""
ARTIFACT_UPLOAD_PATH = r"^/api/v1/agent/jobs/[^/]+/artifacts/.+$"
"""The upload route's paths, for the app-wide body limit (`RequestSizeLimit`), which this route's
own, larger cap replaces."""
MAX_URL_CHARS = 4096


def _invalid(field: str, message: str) -> HttpProblem:
    return HttpProblem(
        422, "invalid_request", f"invalid request: {field}: {message}", [{"field": field, "message": message}]
    )


@router.get(
    "/jobs/{job_id}/inputs",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def get_input(
    job_id: UUID,
    request: Request,
    principal: AgentPrincipal,
    url: Annotated[str, Query(min_length=1, max_length=MAX_URL_CHARS)],
) -> StreamingResponse:
    """The bytes of the object `url` names, streamed: `url` must be one of the job's `files` values
    and one of the job owner's own objects in porter's store (`users/<owner>/`, `jobs/<owner>/`)."""
    state = state_of(request)
    job = await agent_job(state, job_id, principal)
    if url not in job.spec.files.values():
        raise _invalid("url", f"{url} is not one of the job's files")
    objects = object_store(state)
    try:
        key = input_scope(state.settings.porter.object_store).key_for(url, job.owner)
    except StorageError as exc:
        raise _invalid("url", str(exc)) from exc
    try:
        chunks = await run_in_threadpool(objects.iter_bytes, key)
    except ObjectNotFound as exc:
        raise HttpProblem(404, "not_found", f"{url}: no such object") from exc
    return StreamingResponse(iterate_in_threadpool(chunks), media_type="application/octet-stream")


@router.put(
    "/jobs/{job_id}/artifacts/{name:path}",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def put_artifact(
    job_id: UUID, name: str, request: Request, principal: AgentPrincipal
) -> dict[str, Any]:
    """Store the body (raw bytes, at most `MAX_ARTIFACT_BYTES`) as the job's artifact `name`, under
    `jobs/<owner>/<job id>/`; answers `{"key", "size"}`. The agent then reports the key
    (`POST /agent/jobs/{id}/artifacts`), as it does for artifacts it writes itself. Writing the same
    name again replaces the object."""
    state = state_of(request)
    job = await agent_job(state, job_id, principal)
    try:
        key = artifact_key(job.owner, job.id, name)
    except StorageError as exc:
        raise _invalid("name", str(exc)) from exc
    objects = object_store(state)
    content_type = request.headers.get("content-type") or None
    with tempfile.TemporaryDirectory(prefix="cloudhpc-artifact-") as tmp:
        path = Path(tmp) / "body"
        size = await spool_capped(request, path, MAX_ARTIFACT_BYTES, "an artifact")
        await run_in_threadpool(objects.upload_file, key, path, content_type=content_type)
    log.info("job %s: stored artifact %s (%d bytes) for the agent", job.id, name, size)
    return {"key": key, "size": size}
