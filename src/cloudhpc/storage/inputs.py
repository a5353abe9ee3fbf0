"""Which object-store URLs a job may name as input files: only its owner's own objects.

A job's `files` may name an object instead of holding the content (`s3://BUCKET/KEY`,
`file:///PATH`). The object store holds every user's artifacts (`jobs/<owner>/...`), and the agent's
credentials reach more than one user's data, so an input URL is accepted only when it names an object
of the object store under one of the submitting user's own prefixes:

    users/<owner>/...   what the user put there (datasets, code, a pipeline step's outputs)
    jobs/<owner>/...    the user's own job artifacts (a finished job's files or output)

`<owner>` is written as `storage.artifacts` writes it (`owner_segment`). porter checks this when a
job is submitted (422 naming `files.<path>`) and the agent checks it again when it fetches, from the
job's owner in the work item, through its own object store (never a bucket or directory the URL
picks). Pure: parsing only, no I/O beyond resolving a local path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from cloudhpc.exceptions import StorageError
from cloudhpc.storage.base import check_key

__all__ = ["INPUT_ROOTS", "InputScope", "owner_segment"]

_URL_SAFE = "/@+:"
"""Left as they are in an input URL (with letters, digits and `_.-~`): an e-mail user name reads as
itself; `%` (which `_key` decodes), spaces, `?` and `#` are encoded."""

INPUT_ROOTS = ("users/", "jobs/")
"""The top-level prefixes under which each user has a prefix of its own."""


def owner_segment(owner: str) -> str:
    """The owner as one key segment. User names are free text: anything that could split the key or
    name a parent (`/`, `..`, control characters) is percent-encoded; distinct owners stay distinct."""
    segment = quote(owner, safe="@+-_.")
    return segment.replace(".", "%2E") if segment in (".", "..") else segment


@dataclass(frozen=True)
class InputScope:
    """The object store that job inputs must come from, and the rule for one owner.

    `store_url` is the store's configuration URL (`file://DIR` or `s3://BUCKET[/PREFIX]`)."""

    store_url: str
    root: Path | None = None
    """A local store's resolved directory; None for S3."""
    bucket: str = ""
    prefix: str = ""
    """An S3 store's key prefix, `""` or ending in `/`."""

    @classmethod
    def from_store_url(cls, url: str) -> InputScope:
        if url.startswith("file://"):
            path = unquote(url[len("file://") :])
            if not path:
                raise StorageError(f"object store URL {url!r} names no directory")
            return cls(url, root=Path(path).expanduser().resolve())
        if url.startswith("s3://"):
            parts = urlsplit(url)
            if not parts.netloc:
                raise StorageError(f"object store URL {url!r} must look like s3://BUCKET[/PREFIX]")
            prefix = parts.path.strip("/")
            return cls(url, bucket=parts.netloc, prefix=f"{prefix}/" if prefix else "")
        raise StorageError(f"object store URL {url!r} must start with file:// or s3://")

    def owner_prefixes(self, owner: str) -> tuple[str, ...]:
        """The keys (relative to the store) under which `owner`'s inputs may be."""
        segment = owner_segment(owner)
        return tuple(f"{root}{segment}/" for root in INPUT_ROOTS)

    def owner_urls(self, owner: str) -> list[str]:
        """The same prefixes as URLs a user can write in `files` (what `GET /api/v1/me` shows)."""
        return [self.url_for(p) for p in self.owner_prefixes(owner)]

    def url_for(self, key: str) -> str:
        """The URL a job's `files` names the object `key` of this store by (an upload's reference).
        Percent-encoded, as `_key` decodes it: the key of an owner whose name holds a space, `:` or
        `%` (`bob%20smith`, from `owner_segment`) must come back as that key, not as `bob smith`."""
        if self.root is not None:
            return f"file://{quote(f'{self.root}/{key}', safe=_URL_SAFE)}"
        return f"s3://{self.bucket}/{quote(self.prefix + key, safe=_URL_SAFE)}"

    def upload_key(self, owner: str, upload_id: str, name: str) -> str:
        """Where `POST /api/v1/uploads` keeps an upload: `users/<owner>/uploads/<id>/<name>`, inside
        the owner's own prefix, so a job of that owner may name it and nobody else's may."""
        return check_key(f"{self.owner_prefixes(owner)[0]}uploads/{upload_id}/{name}")

    def holds(self, url: str) -> bool:
        """Whether `url` names an object inside this store at all (whoever's it is)."""
        return self._key(url) is not None

    def key_for(self, url: str, owner: str) -> str:
        """The store key `url` names, when it is one of `owner`'s objects; else a StorageError that
        says where the user's inputs may be."""
        key = self._key(url)
        if key is not None and any(key.startswith(p) and key != p for p in self.owner_prefixes(owner)):
            return key
        raise StorageError(
            f"{url}: a job may read only its owner's own objects: "
            f"{' or '.join(u + '...' for u in self.owner_urls(owner))}"
        )

    def _key(self, url: str) -> str | None:
        """The key `url` names inside this store, or None when it names something outside it."""
        if url.startswith("file://") and self.root is not None:
            raw = unquote(url[len("file://") :])
            if not raw.startswith("/"):
                return None  # relative to whose directory? only absolute paths are meaningful
            # Resolved, so that a symlink or `..` cannot lead out of the user's prefix.
            path = Path(raw).resolve()
            if not path.is_relative_to(self.root) or path == self.root:
                return None
            return _checked(path.relative_to(self.root).as_posix())
        if url.startswith("s3://") and self.root is None:
            parts = urlsplit(url)
            key = unquote(parts.path.lstrip("/"))
            if (
                parts.netloc != self.bucket
                or parts.query
                or parts.fragment
                or not key.startswith(self.prefix)
            ):
                return None
            return _checked(key[len(self.prefix) :])
        return None


def _checked(key: str) -> str | None:
    try:
        return check_key(key)
    except StorageError:
        return None
