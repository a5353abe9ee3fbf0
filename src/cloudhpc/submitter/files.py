"""A job's `files` given as object-store URLs, fetched by the agent before staging.

The agent's credentials (its S3 keys, its directory) reach every user's objects, so a URL is read
only when it names one of the job owner's own objects in the agent's object store
(`storage.inputs.InputScope`: `users/<owner>/...` or `jobs/<owner>/...`). porter refuses other URLs
when the job is submitted; this is the second check, against a work item that did not come from
porter's checks (a forged mailbox message, an older porter). The object is read through the store
(`submitter.object_store`, else `porter.object_store`), never from a bucket or path the URL picks,
so a job spec is never a way to read the submitter's own files (its SSH key) or another bucket.
"""

from __future__ import annotations

from cloudhpc.config import Settings
from cloudhpc.domain.jobs import Job
from cloudhpc.exceptions import ObjectNotFound, StorageError
from cloudhpc.storage import ObjectStore
from cloudhpc.storage.artifacts import open_agent_object_store
from cloudhpc.storage.inputs import InputScope

__all__ = ["FileFetcher", "agent_store_url"]


def agent_store_url(settings: Settings) -> str:
    """The URL of the store the agent reads inputs from and writes artifacts to."""
    return settings.submitter.object_store or settings.porter.object_store


class FileFetcher:
    """Reads a job's input objects from one store, for the job's owner only."""

    def __init__(self, objects: ObjectStore, scope: InputScope) -> None:
        self._objects = objects
        self.scope = scope

    def __repr__(self) -> str:
        return f"FileFetcher({self.scope.store_url!r})"

    @classmethod
    def from_settings(cls, settings: Settings) -> FileFetcher:
        return cls(open_agent_object_store(settings), InputScope.from_store_url(agent_store_url(settings)))

    def fetch(self, url: str, owner: str) -> bytes:
        """The object's bytes (blocking). A StorageError names the URL: one that is not `owner`'s
        (with where the owner's inputs may be), or one that names no object."""
        if not self.scope.holds(url):
            # porter accepted the URL against its own store: this agent's store is another one
            raise StorageError(
                f"{url}: not in this submitter's object store ({self.scope.store_url}), which is not "
                "porter's: set submitter.object_store to porter.object_store (reachable from here), or "
                "leave it unset to read inputs through porter"
            )
        key = self.scope.key_for(url, owner)
        try:
            return self._objects.get(key)
        except ObjectNotFound as exc:
            raise ObjectNotFound(f"{url}: no such object") from exc

    def fetch_for(self, url: str, job: Job) -> bytes:
        """`fetch` for the job's owner: what the agent calls (`PorterFileFetcher` has the same)."""
        return self.fetch(url, job.owner)
