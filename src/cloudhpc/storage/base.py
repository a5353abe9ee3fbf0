"""The object-store interface every backend implements, and the key rules they all enforce.

Keys look like relative POSIX paths (`jobs/alice/<id>/output.log`). Both backends apply the same
rules, so code that works against the local directory cannot store a key that S3 would accept but
the directory backend would turn into a path outside its root (or the other way round).
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from cloudhpc.exceptions import StorageError

__all__ = ["MAX_KEY_BYTES", "MULTIPART_THRESHOLD", "ObjectStore", "check_key", "check_prefix"]

MAX_KEY_BYTES = 1024
"""S3's limit on key length (in UTF-8 bytes)."""

MULTIPART_THRESHOLD = 8 << 20
"""Files larger than this are uploaded in parts (S3 needs parts of at least 5 MiB)."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ObjectStore(Protocol):
    """Blobs by key. Methods block (boto3 is synchronous): call them from a thread in async code.

    Writes are whole-object and atomic: a reader sees the old object, the new one, or none, never
    a part. `list` returns keys in lexicographic (UTF-8 byte) order, which the S3 mailbox relies on
    to read time-ordered keys with a cursor.
    """

    def put(self, key: str, data: bytes, *, content_type: str | None = None) -> None: ...

    def get(self, key: str) -> bytes:
        """The object's bytes; `ObjectNotFound` when there is none."""
        ...

    def list(
        self, prefix: str = "", *, start_after: str | None = None, limit: int = 1000
    ) -> builtins.list[str]:
        """Up to `limit` keys starting with `prefix` and sorting after `start_after`, in order."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing key is not an error (as in S3)."""
        ...

    def iter_bytes(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The object's bytes in chunks, without holding it whole in memory; `ObjectNotFound` (raised
        before the first chunk) when there is none."""
        ...

    def upload_file(self, key: str, path: Path, *, content_type: str | None = None) -> None:
        """Store a local file, in parts above `MULTIPART_THRESHOLD`, without reading it into memory."""
        ...

    def url(self, key: str, expires: int = 3600) -> str:
        """Where a client can download the object: a presigned https URL, or a `file://` URL."""
        ...


def check_key(key: str) -> str:
    """Refuse keys that could name something outside the store's root, or that S3 would mangle."""
    if not isinstance(key, str) or not key:
        raise StorageError("an object key must be a non-empty string")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise StorageError(f"object key is longer than {MAX_KEY_BYTES} bytes: {key[:80]!r}...")
    if _CONTROL.search(key) or "\\" in key:
        raise StorageError(f"object key {key!r} holds a control character or a backslash")
    if key.startswith("/"):
        raise StorageError(f"object key {key!r} must be relative (no leading `/`)")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise StorageError(f"object key {key!r} has an empty, `.` or `..` path segment")
    return key


def check_prefix(prefix: str) -> str:
    """A listing prefix: empty, or a valid key followed by `/` and the start of a last segment."""
    if not prefix:
        return prefix
    if _CONTROL.search(prefix) or "\\" in prefix:
        raise StorageError(f"listing prefix {prefix!r} holds a control character or a backslash")
    head, slash, _tail = prefix.rpartition("/")
    if slash:
        if not head:
            raise StorageError(f"listing prefix {prefix!r} must be relative (no leading `/`)")
        check_key(head)
    return prefix
