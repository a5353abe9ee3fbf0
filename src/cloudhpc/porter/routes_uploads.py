"""Job inputs uploaded through porter: `POST /api/v1/uploads?name=NAME`, the raw bytes as the body.

A job's spec is a bounded JSON document (`porter.max_request_bytes`, `MAX_FILES_BYTES` of inline
files), so a large input (the 100 MB array a `cloudhpc.Executor` call takes) cannot travel in it.
A notebook or pipeline step holds a porter token, not object-store credentials, so it cannot put the
object in the store itself either. This route takes the body as a stream, spools it to a temporary
file (cut off at `MAX_UPLOAD_BYTES`, never held in memory), and stores it in porter's object store
under the caller's own prefix:

    users/<owner>/uploads/<random id>/<name>

It answers `{"url", "key", "size"}`; `url` is what the caller writes as a value of the job's
`files` (`{"data.pkl": url}`). From there the upload is an input like any other: porter checks at
submission that the URL is one of the submitter's own objects (`porter/inputs.py`), and the agent
fetches it when it stages the job (`submitter/files.py`, or through porter: `routes_agent_objects`).
Nobody else's job may name it, because the key is under the owner's prefix.

`DELETE /api/v1/uploads/{id}/{name}` removes one again (the Executor does once its job has ended: the
agent staged the input into the job directory long before). The key is made from the caller's own
prefix, so a caller can only ever delete its own uploads; an upload already gone is not an error.
"""

from __future__ import annotations

import logging
import re
import secrets
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from starlette.concurrency import run_in_threadpool

from cloudhpc.domain.api import Upload
from cloudhpc.porter.auth import UserPrincipal
from cloudhpc.porter.inputs import input_scope
from cloudhpc.porter.limits import spool_capped
from cloudhpc.porter.state import object_store, state_of

__all__ = ["MAX_UPLOAD_BYTES", "UPLOAD_PATH", "router"]

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1", tags=["uploads"])

MAX_UPLOAD_BYTES = 1 << 30
"""The largest input one upload may carry (1 GiB): larger data belongs in the object store itself."""
UPLOAD_PATH = r"^/api/v1/uploads$"
"""The route's path, for the app-wide body limit (`RequestSizeLimit`), which this route's own, larger
cap replaces."""
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_ID = re.compile(r"^[0-9a-f]{32}$")


@router.post(
    "/uploads",
    response_model=Upload,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def upload(
    request: Request,
    principal: UserPrincipal,
    name: Annotated[str, Query(pattern=_NAME.pattern, description="the object's file name")],
) -> Upload:
    """Store the body (raw bytes, at most `MAX_UPLOAD_BYTES`) as a new object under the caller's own
    prefix; answers `{"url", "key", "size"}`, `url` usable as a value of a job's `files`."""
    state = state_of(request)
    scope = input_scope(state.settings.porter.object_store)
    key = scope.upload_key(principal.user, secrets.token_hex(16), name)
    objects = object_store(state)
    with tempfile.TemporaryDirectory(prefix="cloudhpc-upload-") as tmp:
        path = Path(tmp) / "body"
        size = await spool_capped(request, path, MAX_UPLOAD_BYTES, "an upload")
        await run_in_threadpool(objects.upload_file, key, path, content_type="application/octet-stream")
    log.info("stored an upload of %d bytes for %s: %s", size, principal.user, key)
    return Upload(url=scope.url_for(key), key=key, size=size)


@router.delete("/uploads/{upload_id}/{name}", status_code=204)
async def delete_upload(
    request: Request,
    principal: UserPrincipal,
    upload_id: Annotated[str, PathParam(pattern=_ID.pattern, description="the upload's id, from its URL")],
    name: Annotated[str, PathParam(pattern=_NAME.pattern, description="the upload's file name")],
) -> Response:
    """Delete one of the caller's uploads (`users/<caller>/uploads/<id>/<name>`); 204 whether or not
    it still existed."""
    state = state_of(request)
    key = input_scope(state.settings.porter.object_store).upload_key(principal.user, upload_id, name)
    await run_in_threadpool(object_store(state).delete, key)
    log.info("deleted the upload %s of %s", key, principal.user)
    return Response(status_code=204)
