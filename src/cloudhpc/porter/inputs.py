"""Job inputs at submit time: a `files` URL must name one of the submitting user's own objects.

The rule is `storage.inputs.InputScope`, against porter's object store (`porter.object_store`); the
agent applies it again when it fetches. Refused here, a bad URL is a 422 naming `files.<path>`
before anything is stored, instead of a job that fails later on the cluster.
"""

from __future__ import annotations

import functools

from cloudhpc.domain.jobs import JobSpec, is_object_url
from cloudhpc.exceptions import HttpProblem, StorageError
from cloudhpc.storage.inputs import InputScope

__all__ = ["check_inputs", "input_scope"]


@functools.lru_cache(maxsize=8)
def input_scope(store_url: str) -> InputScope:
    """porter's object store as an input scope, parsed once (a relative `file://` directory is
    resolved against porter's working directory, as the store itself is)."""
    return InputScope.from_store_url(store_url)


def check_inputs(spec: JobSpec, owner: str, scope: InputScope) -> None:
    """Raise a 422 naming every `files` entry whose URL is not one of `owner`'s objects."""
    details: list[dict[str, str]] = []
    for path, value in sorted(spec.files.items()):
        if not is_object_url(value):
            continue
        try:
            scope.key_for(value, owner)
        except StorageError as exc:
            details.append({"field": f"files.{path}", "message": str(exc)})
    if details:
        summary = "; ".join(f"{d['field']}: {d['message']}" for d in details)
        raise HttpProblem(422, "invalid_request", f"invalid request: {summary}", details)
