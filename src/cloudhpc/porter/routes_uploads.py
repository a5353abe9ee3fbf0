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

An upload whose owner never deletes it (the SDK's process died) is deleted by porter's retention
sweep `porter.upload_retention_days` after it was made (`porter/retention.py`). To find those without
listing every user's prefix, porter keeps an index of its own: one empty object per upload,

    porter/uploads/<id>/<the upload's key>

written before the upload and deleted after it. An id begins with its creation time (8 hex digits of
Unix seconds, then 96 random bits), so the index lists oldest first and the sweep stops at the first
upload young enough to keep.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from starlette.concurrency import run_in_threadpool

from cloudhpc.domain.api import Upload
from cloudhpc.exceptions import CloudHPCError
from cloudhpc.porter.auth import UserPrincipal
from cloudhpc.porter.inputs import input_scope
from cloudhpc.porter.limits import spool_capped
from cloudhpc.porter.openapi import ErrorBody
from cloudhpc.porter.state import object_store, state_of
from cloudhpc.storage import ObjectStore
from cloudhpc.storage.base import check_key

__all__ = [
    "MAX_OPEN_UPLOADS",
    "MAX_UPLOAD_BYTES",
    "UPLOAD_INDEX",
    "UPLOAD_PATH",
    "IndexedUpload",
    "indexed_upload",
    "new_upload_id",
    "router",
    "upload_marker",
]

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1", tags=["uploads"])

MAX_UPLOAD_BYTES = 1 << 30
"""The largest input one upload may carry (1 GiB): larger data belongs in the object store itself."""
MAX_OPEN_UPLOADS = 8
"""Uploads one user may have in progress at once on one replica (429 beyond). Each is spooled to
porter's temporary directory, up to MAX_UPLOAD_BYTES: without a cap, one user's parallel uploads
took as much of that disk as she opened connections (tests/integration/test_review_uploads.py). The
SDK sends an upload refused so again after a pause (`client._retry_on`): nothing was stored."""
UPLOAD_PATH = r"^/api/v1/uploads$"
"""The route's path, for the app-wide body limit (`RequestSizeLimit`), which this route's own, larger
cap replaces."""
_NAME = re.compile(r"^[A-Za-z0-9._-]{0,127}[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")
"""A file name of letters, digits and `._-`, not only dots: `.` and `..` named no object (the key
check refused them later, as a 502 `storage_unavailable`); at most 128 characters (`max_length`)."""
_NAME_LENGTH = 128
_ID = re.compile(r"^[0-9a-f]{32}$")
UPLOAD_INDEX = "porter/uploads/"
"""porter's index of uploads (see the module's docstring); nobody else writes under it."""


def new_upload_id(now: float | None = None) -> str:
    """32 hex digits: the creation time in Unix seconds (8 digits, so ids sort by age) and 96
    random bits (the id stays unguessable, not that guessing it would give anything away: only
    its owner's key holds it)."""
    return f"{int(time.time() if now is None else now):08x}{secrets.token_hex(12)}"


def upload_marker(upload_id: str, key: str) -> str:
    """The index entry of the upload `key` of id `upload_id`."""
    return check_key(f"{UPLOAD_INDEX}{upload_id}/{key}")


@dataclass(frozen=True)
class IndexedUpload:
    """One entry of the index, read back: the upload's key and when it was made."""

    marker: str
    key: str
    created: datetime


def indexed_upload(marker: str) -> IndexedUpload | None:
    """The entry `marker` of the index, or None for a key that is not one (an upload made before
    the index, whose id holds no time, has no entry at all). An entry must name an upload of its
    own id (`users/<owner>/uploads/<id>/<name>`), so that an object someone else wrote under the
    index cannot make the sweep delete a job's artifacts or another prefix's objects."""
    upload_id, slash, key = marker.removeprefix(UPLOAD_INDEX).partition("/")
    if not marker.startswith(UPLOAD_INDEX) or not slash or not _ID.fullmatch(upload_id):
        return None
    owner, _, rest = key.removeprefix("users/").partition("/")
    if not key.startswith("users/") or not owner or not rest.startswith(f"uploads/{upload_id}/"):
        return None
    if "/" in rest.removeprefix(f"uploads/{upload_id}/") or rest.endswith("/"):
        return None
    return IndexedUpload(marker, key, datetime.fromtimestamp(int(upload_id[:8], 16), UTC))


def _store_indexed(objects: ObjectStore, upload_id: str, key: str, path: Path) -> None:
    """Write the index entry, then the upload; the entry is taken back when the upload fails, so a
    refused upload leaves nothing (a porter killed in between leaves an entry the sweep clears)."""
    marker = upload_marker(upload_id, key)
    objects.put(marker, b"", content_type="application/octet-stream")
    try:
        objects.upload_file(key, path, content_type="application/octet-stream")
    except BaseException:
        with contextlib.suppress(CloudHPCError):
            objects.delete(marker)
        raise


@router.post(
    "/uploads",
    response_model=Upload,
    responses={
        429: {"model": ErrorBody, "description": "the caller already has `MAX_OPEN_UPLOADS` in progress"}
    },
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
    name: Annotated[
        str, Query(pattern=_NAME.pattern, max_length=_NAME_LENGTH, description="the object's file name")
    ],
) -> Upload:
    """Store the body (raw bytes, at most `MAX_UPLOAD_BYTES`) as a new object under the caller's own
    prefix; answers `{"url", "key", "size"}`, `url` usable as a value of a job's `files`."""
    state = state_of(request)
    scope = input_scope(state.settings.porter.object_store)
    upload_id = new_upload_id()
    key = scope.upload_key(principal.user, upload_id, name)
    objects = object_store(state)
    with (
        state.user_slots.take("uploads", principal.user, MAX_OPEN_UPLOADS, "uploads"),
        tempfile.TemporaryDirectory(prefix="cloudhpc-upload-") as tmp,
    ):
        path = Path(tmp) / "body"
        # spooled first: a body refused for its size never reaches the store, index included
        size = await spool_capped(request, path, MAX_UPLOAD_BYTES, "an upload")
        await run_in_threadpool(_store_indexed, objects, upload_id, key, path)
    log.info("stored an upload of %d bytes for %s: %s", size, principal.user, key)
    return Upload(url=scope.url_for(key), key=key, size=size)


@router.delete("/uploads/{upload_id}/{name}", status_code=204)
async def delete_upload(
    request: Request,
    principal: UserPrincipal,
    upload_id: Annotated[str, PathParam(pattern=_ID.pattern, description="the upload's id, from its URL")],
    name: Annotated[
        str, PathParam(pattern=_NAME.pattern, max_length=_NAME_LENGTH, description="the upload's file name")
    ],
) -> Response:
    """Delete one of the caller's uploads (`users/<caller>/uploads/<id>/<name>`); 204 whether or not
    it still existed."""
    state = state_of(request)
    key = input_scope(state.settings.porter.object_store).upload_key(principal.user, upload_id, name)
    objects = object_store(state)
    await run_in_threadpool(objects.delete, key)
    await run_in_threadpool(objects.delete, upload_marker(upload_id, key))
    log.info("deleted the upload %s of %s", key, principal.user)
    return Response(status_code=204)
