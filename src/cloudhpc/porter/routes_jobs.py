"""The user API: submit, list, read, wait for, cancel jobs, and read their logs and accounting.

A job that belongs to someone else answers 404, exactly like a job that does not exist, so ids
cannot be probed.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import AfterValidator
from starlette.concurrency import run_in_threadpool

from cloudhpc.bridges.allocation import plan_bridges
from cloudhpc.config import ClusterConfig
from cloudhpc.domain.api import Accounting, JobPage, TaskPage
from cloudhpc.domain.arrays import MAX_ARRAY_INDEX, array_indices
from cloudhpc.domain.billing import AUTO_PARTITION, allowed_partitions
from cloudhpc.domain.bridges import BridgePlan
from cloudhpc.domain.directives import apply_directives
from cloudhpc.domain.jobs import NAME_PATTERN, Job, JobSpec
from cloudhpc.domain.redaction import redacted_job
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import BridgesNotConfigured, HttpProblem
from cloudhpc.porter.access import require_cluster
from cloudhpc.porter.auth import UserPrincipal
from cloudhpc.porter.inputs import check_inputs, input_scope
from cloudhpc.porter.routes_artifacts import missing_task_output
from cloudhpc.porter.state import PorterState, cluster_key, job_key, object_store, state_of
from cloudhpc.storage.artifacts import artifact_key, output_name
from cloudhpc.store import Principal, decode_cursor

__all__ = ["check_spec", "router"]

router = APIRouter(prefix="/api/v1", tags=["jobs"])

MAX_WAIT_SECONDS = 60.0
LOG_CHUNK = 1 << 20
MAX_OFFSET = 2**63 - 1
"""Byte offsets are SQL BIGINTs; past the output's end a read is simply empty."""


def _visible(job: Job | None, principal: Principal) -> Job:
    if job is None or (principal.role != "admin" and job.owner != principal.user):
        raise HttpProblem(404, "not_found", "no such job (or it is not yours)")
    return job


async def _owned_job(state: PorterState, job_id: UUID, principal: Principal) -> Job:
    return _visible(await state.store.get_job(job_id), principal)


def _job_response(job: Job) -> Response:
    """The job as JSON, serialised once: a returned model would be validated again against the
    route's response_model (which stays for the OpenAPI schema), a third of a GET's CPU."""
    return Response(redacted_job(job).model_dump_json(by_alias=True), media_type="application/json")


def _invalid(problems: list[tuple[str, str]]) -> HttpProblem:
    field, message = problems[0]
    return HttpProblem(
        422,
        "invalid_request",
        f"invalid request: {field}: {message}",
        [{"field": f, "message": m} for f, m in problems],
    )


def _checked_resources(spec: JobSpec, cluster: ClusterConfig | None) -> JobSpec:
    """The spec with its script's #SBATCH directives merged in (what is stored and shown), checked
    against the cluster's limits when this porter has the cluster's configuration (`serve all`, or
    a porter configured with its clusters; the agent checks again before sbatch either way)."""
    try:
        spec = apply_directives(spec)
    except ValueError as exc:
        raise _invalid([("script", str(exc))]) from exc
    if cluster is not None:
        resources = spec.resources.with_defaults(cluster.defaults.as_resources())
        problems = cluster.limits.problems(resources)
        if resources.partition == AUTO_PARTITION and not allowed_partitions(cluster.limits, cluster.billing):
            problems.append(
                (
                    "resources.partition",
                    "`auto` needs the partitions jobs may use in the cluster's configuration "
                    "(clusters.<name>.limits.partitions or billing.partitions)",
                )
            )
        if problems:
            raise _invalid(problems)
    return spec


async def _check_after(state: PorterState, spec: JobSpec, principal: Principal) -> None:
    """Every job of `after` is the submitter's own and on the same cluster (a SLURM dependency
    names a job of the same slurmctld): a 422 naming the entry otherwise, with the same words for
    a job that does not exist and one of somebody else, as `GET /jobs/{id}` has."""
    problems: list[tuple[str, str]] = []
    for i, dep in enumerate(spec.after):
        other = await state.store.get_job(dep.job)
        if other is None or other.owner != principal.user:
            problems.append((f"after[{i}].job", f"no job {dep.job} of yours"))
        elif other.cluster != spec.cluster:
            problems.append(
                (f"after[{i}].job", f"job {dep.job} runs on cluster {other.cluster}, not {spec.cluster}")
            )
    if problems:
        raise _invalid(problems)


async def check_spec(
    state: PorterState, principal: Principal, spec: JobSpec
) -> tuple[JobSpec, BridgePlan | None]:
    """Every check of a submission, shared by `POST /jobs` and `POST /jobs:estimate` (which must
    refuse what a submission would): the cluster (404), the resources against its limits, `after`,
    the input URLs and the bridges (422); the spec with its directives merged, and its bridges."""
    await require_cluster(state, principal, spec.cluster)  # 404: unknown, or not the user's to use
    spec = _checked_resources(spec, state.settings.clusters.get(spec.cluster))
    await _check_after(state, spec, principal)
    check_inputs(spec, principal.user, input_scope(state.settings.porter.object_store))
    try:
        return spec, plan_bridges(spec, state.settings.porter.bridge)
    except BridgesNotConfigured as exc:
        raise HttpProblem(
            422, "invalid_request", f"invalid request: ray: {exc}", [{"field": "ray", "message": str(exc)}]
        ) from exc


@router.post("/jobs", status_code=201, response_model=Job)
async def submit_job(
    spec: JobSpec,
    request: Request,
    response: Response,
    principal: UserPrincipal,
    idempotency_key: Annotated[str | None, Header(max_length=128)] = None,
) -> Job:
    state = state_of(request)
    spec, bridges = await check_spec(state, principal, spec)
    job, created = await state.store.create_job(
        principal.user, spec, idempotency_key=idempotency_key, bridges=bridges
    )
    if created:
        state.notifier.notify(cluster_key(job.cluster))
    else:
        response.status_code = 200
    return redacted_job(job)


def _valid_cursor(cursor: str | None) -> str | None:
    """Checked with the query, so a bad cursor is a 422 naming `cursor` before the store is asked."""
    if cursor is not None:
        decode_cursor(cursor)
    return cursor


@router.get("/jobs", response_model=JobPage)
async def list_jobs(
    request: Request,
    principal: UserPrincipal,
    state_filter: Annotated[JobState | None, Query(alias="state")] = None,
    cluster: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
    name: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=256), AfterValidator(_valid_cursor)] = None,
) -> Response:
    """Your jobs (every job for an admin), newest first, as summaries: `GET /jobs/{id}` has the spec."""
    state = state_of(request)
    owner = None if principal.role == "admin" else principal.user
    jobs, next_cursor = await state.store.list_jobs(
        owner=owner, state=state_filter, cluster=cluster, name=name, limit=limit, cursor=cursor
    )
    page = JobPage(jobs=jobs, next_cursor=next_cursor)
    return Response(page.model_dump_json(by_alias=True), media_type="application/json")


@router.get("/jobs/{job_id}", response_model=Job)
async def get_job(
    job_id: UUID,
    request: Request,
    principal: UserPrincipal,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_SECONDS)] = 0,
    since_state: Annotated[JobState | None, Query()] = None,
) -> Response:
    """With `wait`, answer as soon as the state differs from `since_state` (default: the current one)."""
    state = state_of(request)
    job = await _owned_job(state, job_id, principal)
    if wait <= 0:
        return _job_response(job)
    baseline = since_state or job.state
    job = await state.long_poll(
        job_key(job_id),
        wait,
        lambda: _owned_job(state, job_id, principal),
        lambda seen: seen.state != baseline or seen.state.terminal,
    )
    return _job_response(job)


@router.post("/jobs/{job_id}/cancel", response_model=Job)
async def cancel_job(job_id: UUID, request: Request, principal: UserPrincipal) -> Job:
    state = state_of(request)
    job = await _owned_job(state, job_id, principal)
    job = await state.store.request_cancel(job.id, principal.user)
    state.notifier.notify(job_key(job_id))
    state.notifier.notify(cluster_key(job.cluster))
    return redacted_job(job)


@router.get("/jobs/{job_id}/tasks", response_model=TaskPage)
async def job_tasks(
    job_id: UUID,
    request: Request,
    principal: UserPrincipal,
    cursor: Annotated[str | None, Query(pattern=r"^[0-9]{1,6}$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> TaskPage:
    """The tasks of an array job from index `cursor` on: state, SLURM state, reason, exit code
    and times of each. 404 for a job that is not an array; an empty page before its first poll."""
    state = state_of(request)
    job = await _owned_job(state, job_id, principal)
    if job.spec.array is None:
        raise HttpProblem(404, "not_found", f"job {job.id} is not an array job (it has no tasks)")
    tasks = await state.store.job_tasks(job.id) or []
    start = int(cursor) if cursor is not None else 0
    rest = [t for t in tasks if t.index >= start]
    page, more = rest[:limit], rest[limit:]
    return TaskPage(tasks=page, next_cursor=str(more[0].index) if more else None)


@router.post("/jobs/{job_id}/tasks/{index}/cancel", response_model=Job)
async def cancel_task(
    job_id: UUID,
    index: Annotated[int, Path(ge=0, le=MAX_ARRAY_INDEX)],
    request: Request,
    principal: UserPrincipal,
) -> Job:
    """Cancel one task of an array job (the others go on; `POST /jobs/{id}/cancel` cancels them
    all). 404 for a job that is not an array or an index that is not one of its tasks."""
    state = state_of(request)
    job = await _owned_job(state, job_id, principal)
    if job.spec.array is None or index not in array_indices(job.spec.array):
        raise HttpProblem(404, "not_found", f"job {job.id} has no array task {index}")
    job = await state.store.request_task_cancel(job.id, index)
    state.notifier.notify(job_key(job_id))
    state.notifier.notify(cluster_key(job.cluster))
    return redacted_job(job)


_LOG_HEADERS = {
    "X-Next-Offset": {"description": "where the next read continues", "schema": {"type": "integer"}},
    "X-Complete": {
        "description": "true once the job has ended and every byte has been delivered",
        "schema": {"type": "string", "enum": ["true", "false"]},
    },
}


@router.get(
    "/jobs/{job_id}/logs",
    response_class=Response,
    responses={
        200: {
            "description": "the output's bytes from `offset` (with `follow`, streamed until complete)",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "headers": _LOG_HEADERS,
        }
    },
)
async def job_logs(
    job_id: UUID,
    request: Request,
    principal: UserPrincipal,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    follow: bool = False,
    limit: Annotated[int, Query(ge=1, le=LOG_CHUNK)] = LOG_CHUNK,
    task: Annotated[int | None, Query(ge=0, le=MAX_ARRAY_INDEX)] = None,
) -> Response:
    """The job's output as bytes from `offset`. The `X-Next-Offset` header says where to continue and
    `X-Complete` whether the job has ended and every byte has been delivered. With `follow`, the
    response streams until then. With `task`, one task's output of an array job, stored when the
    task ended, while the array's other tasks may still run (`follow` has nothing to wait for)."""
    state = state_of(request)
    job = await _owned_job(state, job_id, principal)
    if task is not None:
        return await _task_log(state, job, task, offset, limit)
    if not follow:
        data = await state.store.read_output(job_id, offset, limit)
        next_offset = offset + len(data)
        size = await state.store.output_size(job_id)
        complete = job.state.terminal and next_offset >= size
        headers = {"X-Next-Offset": str(next_offset), "X-Complete": "true" if complete else "false"}
        return Response(content=data, media_type="application/octet-stream", headers=headers)

    async def stream() -> AsyncIterator[bytes]:
        position = offset
        while True:
            read_at = time.monotonic()
            data = await state.store.read_output(job_id, position, LOG_CHUNK)
            if data:
                position += len(data)
                yield data
                continue
            current = await state.store.get_job(job_id)
            if current is None or current.state.terminal:
                # the agent uploads the last chunk before it reports the end: one more read drains it
                tail = await state.store.read_output(job_id, position, LOG_CHUNK)
                if tail:
                    position += len(tail)
                    yield tail
                    continue
                return
            if state.stopping or await request.is_disconnected():
                return  # the client's `follow` resumes from its offset against the next porter
            await state.notifier.wait(job_key(job_id), state.recheck_interval, since=read_at)

    return StreamingResponse(stream(), media_type="application/octet-stream")


async def _task_log(state: PorterState, job: Job, task: int, offset: int, limit: int) -> Response:
    """One array task's output from its artifact (`tasks/<index>/output.log`), as `job_logs` answers."""
    if job.spec.array is None or task not in array_indices(job.spec.array):
        raise HttpProblem(404, "not_found", f"job {job.id} has no array task {task}")
    key = artifact_key(job.owner, job.id, output_name(task))
    if key not in job.artifacts:
        raise missing_task_output(job, task)
    objects = object_store(state)

    def read() -> bytes:
        """`limit` bytes from `offset`, reading the object in chunks (never whole past them)."""
        out, position = bytearray(), 0
        for chunk in objects.iter_bytes(key):
            start = max(0, offset - position)
            position += len(chunk)
            if start < len(chunk):
                out += chunk[start : start + limit - len(out)]
            if len(out) >= limit:
                break
        return bytes(out)

    data = await run_in_threadpool(read)
    headers = {
        "X-Next-Offset": str(offset + len(data)),
        "X-Complete": "true" if len(data) < limit else "false",
    }
    return Response(content=data, media_type="application/octet-stream", headers=headers)


@router.get("/jobs/{job_id}/accounting", response_model=Accounting, response_model_exclude_unset=True)
async def job_accounting(job_id: UUID, request: Request, principal: UserPrincipal) -> dict[str, Any]:
    """The sacct rows and efficiency the agent stored when the job ended: its document as it was
    sent (checked against `Accounting` then; a field it did not send is not added as null)."""
    state = state_of(request)
    job = await _owned_job(state, job_id, principal)
    record = await state.store.get_accounting(job.id)
    if record is None:
        raise HttpProblem(
            404,
            "not_available",
            f"no accounting for job {job.id} yet (state {job.state.value}); it is collected when the job ends",
        )
    return record
