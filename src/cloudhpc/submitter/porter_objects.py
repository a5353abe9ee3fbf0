"""Job inputs and artifacts through porter, for an agent with no object store of its own.

A submitter next to the HPC key reaches porter and the login node only; porter's object store (an
S3 bucket inside the platform) is out of its reach. With `submitter.object_store` unset and the
HTTP channel, the agent therefore reads a job's `files` URLs and writes the job's artifacts through
porter's agent routes (`porter/routes_agent_objects.py`), with its agent token:

- `PorterFileFetcher.fetch_for(url, job)`: `GET /api/v1/agent/jobs/{id}/inputs?url=...`. porter
  applies the input rule (the job's own `files`, the owner's own objects of its store); a refusal
  or a missing object is a `StorageError` naming the URL with porter's reason, which fails the job
  at staging; porter unreachable is a `ChannelError`, which leaves the job to be retried.
- `PorterArtifactWriter`: an `ArtifactWriter` whose objects go up with
  `PUT /api/v1/agent/jobs/{id}/artifacts/{name}`, streamed (the output log from its file, in
  chunks); porter answers the key it stored, which the agent reports as it reports its own.

Blocking, like the object stores they stand in for: the agent calls them from a thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from cloudhpc.domain.jobs import Job
from cloudhpc.exceptions import ChannelError, ObjectNotFound, StorageError
from cloudhpc.retries import RetryPolicy, porter_unavailable
from cloudhpc.storage.artifacts import ArtifactWriter

__all__ = ["PorterArtifactWriter", "PorterFileFetcher", "PorterObjects"]

UPLOAD_CHUNK = 1 << 20


class PorterObjects:
    """The HTTP client both share: porter's URL and the agent token, retries on transient errors."""

    def __init__(self, url: str, token: str, *, attempts: int = 5, timeout: float = 60.0) -> None:
        self._http = httpx.Client(
            base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {token}"}, timeout=timeout
        )
        self._retries = RetryPolicy(attempts=attempts, initial=0.2, maximum=5.0)

    def __repr__(self) -> str:
        return f"PorterObjects({str(self._http.base_url)!r})"

    def close(self) -> None:
        self._http.close()

    def call(
        self,
        method: str,
        path: str,
        consume: Callable[[httpx.Response], Any],
        *,
        what: str,
        params: dict[str, str] | None = None,
        content: Callable[[], Iterator[bytes]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """`consume(response)` of a 2xx answer, read as a stream. A 4xx is a `StorageError` with
        porter's message (404: `ObjectNotFound`); transport errors and 5xx are retried, then a
        `ChannelError`. `content` makes a fresh body for each attempt."""

        def once() -> Any:
            with self._http.stream(
                method, path, params=params, content=content() if content else None, headers=headers
            ) as response:
                if response.status_code < 400:
                    return consume(response)
                response.read()
                if response.status_code >= 500:
                    response.raise_for_status()  # retried
                message = _porter_message(response)
                if response.status_code == 404:
                    raise ObjectNotFound(f"{what}: {message}")
                raise StorageError(f"{what}: porter refused it ({response.status_code}): {message}")

        try:
            for attempt in self._retries.blocking(porter_unavailable, f"{method} {path}"):
                with attempt:
                    return once()
        except httpx.TransportError as exc:
            raise ChannelError(f"porter unreachable at {self._http.base_url}: {exc}") from exc
        except httpx.HTTPStatusError as exc:
            raise ChannelError(f"porter failed {method} {path}: {exc.response.status_code}") from exc
        raise AssertionError("unreachable")  # pragma: no cover: tenacity re-raises the last error


def _porter_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        return str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:300]


class PorterFileFetcher:
    """Reads a job's input objects through porter (which checks them for the job's owner)."""

    def __init__(self, porter: PorterObjects) -> None:
        self._porter = porter

    def __repr__(self) -> str:
        return f"PorterFileFetcher({self._porter!r})"

    def fetch_for(self, url: str, job: Job) -> bytes:
        def read(response: httpx.Response) -> bytes:
            data = bytearray()
            for chunk in response.iter_bytes():
                data.extend(chunk)
            return bytes(data)

        result: bytes = self._porter.call(
            "GET", f"/api/v1/agent/jobs/{job.id}/inputs", read, what=url, params={"url": url}
        )
        return result


class PorterArtifactWriter(ArtifactWriter):
    """`ArtifactWriter` through porter: the same artifacts and names, stored by porter under the
    job's prefix (`jobs/<owner>/<job id>/`); the keys returned are the ones porter stored."""

    def __init__(self, porter: PorterObjects) -> None:
        self._porter = porter

    def __repr__(self) -> str:
        return f"PorterArtifactWriter({self._porter!r})"

    def _upload(self, job: Job, name: str, body: Callable[[], Iterator[bytes]], content_type: str) -> str:
        def key_of(response: httpx.Response) -> str:
            response.read()
            return str(response.json()["key"])

        key: str = self._porter.call(
            "PUT",
            f"/api/v1/agent/jobs/{job.id}/artifacts/{quote(name)}",
            key_of,
            what=f"artifact {name} of job {job.id}",
            content=body,
            headers={"content-type": content_type},
        )
        return key

    def _put(self, job: Job, name: str, data: bytes, content_type: str) -> str:
        return self._upload(job, name, lambda: iter([data]), content_type)

    def _put_file(self, job: Job, name: str, path: Path, content_type: str) -> str:
        """An artifact from its local copy (the output log, a python job's result), in chunks:
        never read whole."""

        def chunks() -> Iterator[bytes]:
            with path.open("rb") as handle:
                while chunk := handle.read(UPLOAD_CHUNK):
                    yield chunk

        return self._upload(job, name, chunks, content_type)
