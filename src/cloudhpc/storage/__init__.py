"""Object storage: one interface (`ObjectStore`), a local-directory backend and an S3 backend.

`open_object_store("file://.cloudhpc/objects")` or `open_object_store("s3://bucket/prefix")` picks
the backend from a configuration URL.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from cloudhpc.exceptions import ConfigError
from cloudhpc.storage.base import MULTIPART_THRESHOLD, ObjectStore, check_key, check_prefix
from cloudhpc.storage.local import LocalObjectStore

__all__ = [
    "MULTIPART_THRESHOLD",
    "LocalObjectStore",
    "ObjectStore",
    "check_key",
    "check_prefix",
    "open_object_store",
]


def open_object_store(url: str, *, endpoint_url: str | None = None, region: str | None = None) -> ObjectStore:
    """The store a configuration URL names: `file://DIR` (relative or absolute) or `s3://BUCKET[/PREFIX]`.

    S3 credentials are not part of the URL: they come from boto3's standard chain
    (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, `~/.aws/credentials`).
    """
    if url.startswith("file://"):
        # `file://.cloudhpc/objects` is relative, `file:///srv/objects` absolute: take the rest as is.
        path = unquote(url[len("file://") :])
        if not path:
            raise ConfigError(f"object store URL {url!r} names no directory")
        return LocalObjectStore(path)
    if url.startswith("s3://"):
        parts = urlsplit(url)
        if not parts.netloc or parts.query or parts.fragment or "@" in parts.netloc:
            raise ConfigError(
                f"object store URL {url!r} must look like s3://BUCKET or s3://BUCKET/PREFIX "
                "(credentials go in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, never in the URL)"
            )
        # Imported here so that processes using only the local store never load boto3 (slow).
        from cloudhpc.storage.s3 import S3ObjectStore

        return S3ObjectStore(parts.netloc, parts.path.strip("/"), endpoint_url=endpoint_url, region=region)
    raise ConfigError(f"object store URL {url!r} must start with file:// or s3://")
