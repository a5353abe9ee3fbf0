"""Job `env` values as only the job itself may see them.

`env` values are often secrets (API keys, tokens). The agent needs them to stage the job; nobody
else does: what porter answers users (`GET /jobs/{id}`, submit, cancel) and what is stored as the
job's artifacts (`spec.json`) keep each name with its value replaced by `REDACTED`, so the names
still say what the job was given.
"""

from __future__ import annotations

from cloudhpc.domain.jobs import Job, JobSpec

__all__ = ["REDACTED", "redacted_job", "redacted_spec"]

REDACTED = "<redacted>"


def redacted_spec(spec: JobSpec) -> JobSpec:
    """`spec` with every `env` value replaced by `REDACTED` (names kept)."""
    if not spec.env:
        return spec
    return spec.model_copy(update={"env": dict.fromkeys(spec.env, REDACTED)})


def redacted_job(job: Job) -> Job:
    """`job` with its spec's `env` values replaced by `REDACTED`."""
    if not job.spec.env:
        return job
    return job.model_copy(update={"spec": redacted_spec(job.spec)})
