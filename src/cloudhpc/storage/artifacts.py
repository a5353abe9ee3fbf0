"""Job artifacts in the object store: the key layout (a contract) and the writer the agent uses.

Every job keeps its files under one prefix, so that a user, a retention sweep or an S3 lifecycle
rule can find them without asking porter:

    jobs/<owner>/<job id>/spec.json         the spec as submitted, `env` values redacted
    jobs/<owner>/<job id>/job.sh            the batch script cloudhpc rendered and gave to sbatch
    jobs/<owner>/<job id>/files/<path>      the spec's files, as staged in the job directory
    jobs/<owner>/<job id>/output.log        the job's output (stdout + stderr), copied when it ends
    jobs/<owner>/<job id>/sacct.json        sacct's records of the job, typed
    jobs/<owner>/<job id>/efficiency.json   seff's figures (computed with seff's formulas without seff)
    jobs/<owner>/<job id>/error.txt         only for a job refused before SLURM ran it: why
    jobs/<owner>/<job id>/outputs/<path>    the files the spec's `outputs` patterns matched, as they
                                            were when it ended (`%`, `\\` and control characters
                                            in names as `%XX`)
    jobs/<owner>/<job id>/outputs.json      which of them were collected, which not and why

    jobs/<owner>/<job id>/result.pkl        a `python` job's outcome (`tasks/<i>/result.pkl` per task)

JSON and text only, but for one: the original kept pickles, which cannot be read by other tools or
versions and run code when loaded. A `python` job's `result.pkl` is the exception: the outcome of
the owner's own pickled call (`cloudhpc.Executor`), which only the owner's SDK loads, in the Python
version that pickled the call; porter and the agent never unpickle it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from uuid import UUID

from cloudhpc.config import Settings
from cloudhpc.domain.job_files import OutputsReport, output_artifact_name
from cloudhpc.domain.jobs import Job
from cloudhpc.domain.redaction import redacted_spec
from cloudhpc.exceptions import StorageError
from cloudhpc.storage import ObjectStore, open_object_store
from cloudhpc.storage.base import check_key
from cloudhpc.storage.inputs import owner_segment

__all__ = [
    "ARTIFACT_ROOT",
    "ArtifactWriter",
    "artifact_key",
    "delete_job_artifacts",
    "foreign_keys",
    "is_job_artifact",
    "job_prefix",
    "open_agent_object_store",
    "open_porter_object_store",
    "result_name",
]

ARTIFACT_ROOT = "jobs/"
_JSON = "application/json"
_TEXT = "text/plain; charset=utf-8"
OUTPUTS_REPORT = "outputs.json"


def job_prefix(owner: str, job_id: UUID) -> str:
    """`jobs/<owner>/<job id>/`: every artifact of the job starts with it."""
    return check_key(f"{ARTIFACT_ROOT}{owner_segment(owner)}/{job_id}") + "/"


def output_name(task: int | None = None) -> str:
    """The artifact name of a job's output, or of one array task's."""
    return "output.log" if task is None else f"tasks/{int(task)}/output.log"


def result_name(task: int | None = None) -> str:
    """The artifact name of a `python` job's outcome, or of one array task's."""
    return "result.pkl" if task is None else f"tasks/{int(task)}/result.pkl"


def artifact_key(owner: str, job_id: UUID, name: str) -> str:
    """The key of one artifact; `name` may hold `/` (`files/conf/a.yaml`) but never `..`."""
    return check_key(job_prefix(owner, job_id) + name)


def is_job_artifact(prefix: str, key: str) -> bool:
    """Whether `key` names an object below the job prefix `prefix` (`job_prefix`), and only there.

    Starting with the prefix is not enough: `jobs/alice/<id>/../../bob/x` does, and climbs out of
    it; an empty, `.` or `..` segment, a backslash or a control character is never an artifact."""
    if not key.startswith(prefix) or key == prefix:
        return False
    try:
        check_key(key)
    except StorageError:
        return False
    return True


def foreign_keys(owner: str, job_id: UUID, keys: list[str]) -> list[str]:
    """The keys that are not artifacts of this job: porter refuses to record them, so an agent
    cannot make a user's download point at another user's objects, nor break the job's listing."""
    prefix = job_prefix(owner, job_id)
    return [key for key in keys if not is_job_artifact(prefix, key)]


def _dump(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


class ArtifactWriter:
    """Writes one job's artifacts and returns their keys, for the agent to report to porter.

    Blocking (object stores are): the agent calls it from a thread. Each method writes whole
    objects, so writing the same artifact twice (a retried end of job) just replaces it.
    """

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects

    def __repr__(self) -> str:
        return f"ArtifactWriter({self.objects!r})"

    def _put(self, job: Job, name: str, data: bytes, content_type: str) -> str:
        key = artifact_key(job.owner, job.id, name)
        self.objects.put(key, data, content_type=content_type)
        return key

    def _put_file(self, job: Job, name: str, path: Path, content_type: str) -> str:
        """One artifact from a local file; large files go up in parts (`upload_file`)."""
        key = artifact_key(job.owner, job.id, name)
        self.objects.upload_file(key, path, content_type=content_type)
        return key

    def save_submission(self, job: Job, *, batch_script: str | None) -> list[str]:
        """What the job was asked to run: the spec, the rendered script (when there is one) and
        the spec's files. Written at submission, so a job that never runs still has them."""
        spec = redacted_spec(job.spec).model_dump(mode="json", by_alias=True)  # env values are secrets
        keys = [self._put(job, "spec.json", _dump(spec), _JSON)]
        if batch_script is not None:
            keys.append(self._put(job, "job.sh", batch_script.encode(), "text/x-shellscript"))
        for path, content in sorted(job.spec.files.items()):
            keys.append(self._put(job, f"files/{path}", content.encode(), "application/octet-stream"))
        return keys

    def save_error(self, job: Job, message: str) -> list[str]:
        return [self._put(job, "error.txt", (message.rstrip("\n") + "\n").encode(), _TEXT)]

    def save_output(self, job: Job, path: Path, *, task: int | None = None) -> list[str]:
        """The job's output (of array task `task`: `tasks/<index>/output.log`) from a local copy;
        large logs go up in parts (`upload_file`)."""
        return [self._put_file(job, output_name(task), path, _TEXT)]

    def save_result(self, job: Job, path: Path, *, task: int | None = None) -> list[str]:
        """A `python` job's outcome (of array task `task`) from a local copy (`result_name`)."""
        return [self._put_file(job, result_name(task), path, "application/octet-stream")]

    def save_output_file(self, job: Job, relative: str, path: Path) -> list[str]:
        """One file an `outputs` pattern matched (`relative` to the job directory), from a local
        copy, as `outputs/<relative>` (`output_artifact_name`: a newline or `%` in a name is
        percent-encoded, the rest kept as is)."""
        return [self._put_file(job, output_artifact_name(relative), path, "application/octet-stream")]

    def save_outputs_report(self, job: Job, report: OutputsReport) -> list[str]:
        """`outputs.json`: what the job's `outputs` collected, and what was left out and why."""
        return [self._put(job, OUTPUTS_REPORT, _dump(report.model_dump(mode="json")), _JSON)]

    def save_accounting(self, job: Job, record: Mapping[str, Any]) -> list[str]:
        """The accounting document the agent sent porter, split as the layout says; a provisional
        one (`"final": false`: SLURM had not recorded the job's own row yet) says so in `sacct.json`
        until the final one replaces it."""
        sacct: dict[str, Any] = {
            "slurm_job_id": record.get("slurm_job_id"),
            "records": record.get("records", []),
        }
        if record.get("final") is False:
            sacct["final"] = False
        keys = [self._put(job, "sacct.json", _dump(sacct), _JSON)]
        if record.get("efficiency") is not None:
            keys.append(self._put(job, "efficiency.json", _dump(record["efficiency"]), _JSON))
        return keys


def delete_job_artifacts(objects: ObjectStore, owner: str, job_id: UUID, keys: list[str]) -> int:
    """Delete the recorded keys and anything else under the job's prefix (an artifact written but
    never reported, because the agent stopped in between). Returns how many objects were deleted."""
    prefix = job_prefix(owner, job_id)
    found = set(keys)
    while True:
        page = objects.list(prefix, limit=1000)
        found.update(page)
        for key in page:
            objects.delete(key)
        if len(page) < 1000:
            break
    for key in found:
        if is_job_artifact(prefix, key):
            objects.delete(key)
    return len(found)


def open_porter_object_store(settings: Settings) -> ObjectStore:
    return open_object_store(
        settings.porter.object_store,
        endpoint_url=settings.porter.s3_endpoint_url,
        region=settings.porter.s3_region,
    )


def open_agent_object_store(settings: Settings) -> ObjectStore:
    """Where the agent writes artifacts: `submitter.object_store`, else porter's (one config file
    shared by both roles, or `serve all`). Credentials come from the environment of the agent's own
    process (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE), never from porter."""
    sub = settings.submitter
    if sub.object_store is None:
        return open_porter_object_store(settings)
    return open_object_store(sub.object_store, endpoint_url=sub.s3_endpoint_url, region=sub.s3_region)
