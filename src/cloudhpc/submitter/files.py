"""A job's `files` given as object-store URLs, fetched by the agent before staging.

`s3://BUCKET/KEY` is read with the agent's S3 settings (endpoint, region, and credentials from the
standard AWS variables). `file://PATH` is read only inside the object store directories this agent
is configured with: a job spec must never be a way to read the submitter's own files (its SSH key).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

from cloudhpc.config import Settings
from cloudhpc.exceptions import ObjectNotFound, StorageError
from cloudhpc.storage import open_object_store

__all__ = ["FileFetcher"]


class FileFetcher:
    def __init__(
        self,
        *,
        s3_endpoint_url: str | None = None,
        s3_region: str | None = None,
        local_roots: Sequence[Path] = (),
    ) -> None:
        self._endpoint = s3_endpoint_url
        self._region = s3_region
        self._roots = [root.expanduser().resolve() for root in local_roots]

    @classmethod
    def from_settings(cls, settings: Settings) -> FileFetcher:
        roots = [
            Path(unquote(url[len("file://") :]))
            for url in (settings.porter.object_store, settings.submitter.object_store)
            if url and url.startswith("file://")
        ]
        return cls(
            s3_endpoint_url=settings.submitter.s3_endpoint_url or settings.porter.s3_endpoint_url,
            s3_region=settings.submitter.s3_region or settings.porter.s3_region,
            local_roots=roots,
        )

    def fetch(self, url: str) -> bytes:
        """The object's bytes (blocking). Raises StorageError with the URL named."""
        if url.startswith("s3://"):
            parts = urlsplit(url)
            key = unquote(parts.path.lstrip("/"))
            if not parts.netloc or not key:
                raise StorageError(f"{url!r} must look like s3://BUCKET/KEY")
            store = open_object_store(
                f"s3://{parts.netloc}", endpoint_url=self._endpoint, region=self._region
            )
            try:
                return store.get(key)
            except ObjectNotFound as exc:
                raise ObjectNotFound(f"{url}: no such object") from exc
        if url.startswith("file://"):
            path = Path(unquote(url[len("file://") :])).expanduser().resolve()
            if not any(path.is_relative_to(root) for root in self._roots):
                raise StorageError(
                    f"{url}: file:// URLs are read only inside this agent's object store directory "
                    f"({', '.join(map(str, self._roots)) or 'none configured'})"
                )
            try:
                return path.read_bytes()
            except OSError as exc:
                raise ObjectNotFound(f"{url}: {exc.strerror or exc}") from exc
        raise StorageError(f"{url!r} is neither an s3:// nor a file:// URL")
