"""Warm Ray sessions: one Ray cluster on SLURM that several notebook cells and pipeline steps reuse.

    import cloudhpc

    with cloudhpc.ray_session(cluster="mahti", name="dev", nodes=1, idle_timeout=600) as session:
        job = session.submit("python train.py", files={"train.py": code})   # a cloudhpc ray-job
        print(session.client.wait(job).state)
        # or Ray's own client, through the bridge:
        # JobSubmissionClient(session.address).submit_job(entrypoint="python -c 'import ray; ...'")

A session is a `ray-cluster` job with `ray.idle_timeout` and its dashboard exposed. Opening one
re-attaches to the caller's active session of that name on that cluster when there is one (another
cell, another step, another process) and submits a new one otherwise; then it waits for the
dashboard's bridge, so `address` answers. `session.submit` sends a `ray-job` naming the session
(`ray.session`): the agent runs it on the session's Ray, and the job carries its state, output and
exit status like any job, in seconds instead of a SLURM allocation's start.

Leaving the `with` block does not end the session (`keep=True`, the default): the next cell or step
reuses it, and it ends itself once no Ray job has run for `idle_timeout` seconds (nothing idle is
billed until the time limit). `keep=False`, or `close()`, cancels it on leaving: what a pipeline's
last step (or an exit handler) does, so that a run's end also ends its session.
"""

from __future__ import annotations

from collections.abc import Coroutine, Generator, Mapping
from dataclasses import dataclass, field, fields
from types import TracebackType
from typing import Any, TypedDict, Unpack
from uuid import UUID

from cloudhpc.client import AsyncClient, Client
from cloudhpc.domain.jobs import Job, JobKind

__all__ = [
    "AsyncRaySession",
    "RayJobOptions",
    "RaySession",
    "RaySessionOptions",
    "async_ray_session",
    "ray_session",
    "session_spec",
]

DEFAULT_IDLE_TIMEOUT = 600
"""Seconds without a Ray job before a session ends itself, when the caller names none."""


def session_spec(
    *,
    cluster: str,
    name: str,
    nodes: int = 1,
    idle_timeout: int = DEFAULT_IDLE_TIMEOUT,
    time: str = "01:00:00",
    head: Mapping[str, Any] | None = None,
    workers: Mapping[str, Any] | None = None,
    resources: Mapping[str, Any] | None = None,
    environment: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The `ray-cluster` spec of a session: `nodes` Ray nodes (the head and `nodes - 1` workers),
    its dashboard exposed (the agent submits ray-jobs through it), `idle_timeout`, and the SLURM
    `resources` (`time` unless they name one). `environment` must give Ray (`ray[default]`)."""
    if nodes < 1:
        raise ValueError(f"nodes: a session has at least one Ray node (the head), not {nodes}")
    ray: dict[str, Any] = {"expose": ["dashboard"], "idle_timeout": idle_timeout, "head": dict(head or {})}
    if nodes > 1:
        ray["workers"] = {**(workers or {}), "nodes": nodes - 1}
    return {
        "name": name,
        "cluster": cluster,
        "kind": JobKind.RAY_CLUSTER.value,
        "ray": ray,
        "resources": {"time": time, **(resources or {})},
        "environment": dict(environment or {}),
    }


class RayJobOptions(TypedDict, total=False):
    """What a session's `submit` (sync or async) and `job_spec` take after the entrypoint."""

    name: str | None
    """The ray-job's name (the session's name + `-job`)."""
    files: Mapping[str, str] | None
    """Files placed in the job's directory, by relative path."""
    env: Mapping[str, str] | None
    """Environment variables of the entrypoint."""


@dataclass
class _Session:
    """What the sync and async sessions share: the `ray-cluster` job, Ray's job-submission
    `address` through the bridge, and the specs of the ray-jobs that name it."""

    job: Job
    address: str
    reattached: bool
    """True when an active session of this name existed and was reused; False when this call
    submitted it."""
    keep: bool = True
    _owns_client: bool = field(default=False, repr=False)

    @property
    def job_id(self) -> UUID:
        return self.job.id

    def job_spec(self, entrypoint: str, **options: Unpack[RayJobOptions]) -> dict[str, Any]:
        """A `ray-job` spec that runs `entrypoint` on this session (`ray.session` is its id)."""
        files, env = options.get("files"), options.get("env")
        spec: dict[str, Any] = {
            "name": options.get("name") or f"{self.job.name}-job",
            "cluster": self.job.cluster,
            "kind": JobKind.RAY_JOB.value,
            "ray": {"session": str(self.job.id), "entrypoint": entrypoint},
        }
        if files:
            spec["files"] = dict(files)
        if env:
            spec["env"] = dict(env)
        return spec


@dataclass
class RaySession(_Session):
    """An open session: `job` (the `ray-cluster`), `address` (Ray's job-submission address through
    the bridge, for `ray.job_submission.JobSubmissionClient`) and `submit` for cloudhpc ray-jobs."""

    client: Client = field(kw_only=True)

    def submit(self, entrypoint: str, **options: Unpack[RayJobOptions]) -> Job:
        """Submit a ray-job on this session; `client.wait(job)` follows it to its end."""
        return self.client.submit(self.job_spec(entrypoint, **options))

    def close(self) -> Job:
        """End the session now (its SLURM job is cancelled; a ray-job still on it fails)."""
        try:
            return self.client.cancel(self.job)
        finally:
            self._release()

    def _release(self) -> None:
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> RaySession:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self.keep:
            self._release()
        else:
            self.close()


@dataclass
class AsyncRaySession(_Session):
    """`RaySession` for asyncio code (an `AsyncClient`): `await session.submit(...)`,
    `await session.close()`, `async with`."""

    client: AsyncClient = field(kw_only=True)

    async def submit(self, entrypoint: str, **options: Unpack[RayJobOptions]) -> Job:
        """Submit a ray-job on this session; `await client.wait(job)` follows it to its end."""
        return await self.client.submit(self.job_spec(entrypoint, **options))

    async def close(self) -> Job:
        """End the session now (its SLURM job is cancelled; a ray-job still on it fails)."""
        try:
            return await self.client.cancel(self.job)
        finally:
            await self._release()

    async def _release(self) -> None:
        if self._owns_client:
            await self.client.aclose()

    async def __aenter__(self) -> AsyncRaySession:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self.keep:
            await self._release()
        else:
            await self.close()


class _AsyncOpening:
    """What `async_ray_session` returns: awaited, the open session; in `async with`, the session
    for the block (left as `keep` says)."""

    def __init__(self, opening: Coroutine[Any, Any, AsyncRaySession]) -> None:
        self._opening = opening
        self._session: AsyncRaySession | None = None

    def __await__(self) -> Generator[Any, None, AsyncRaySession]:
        return self._opening.__await__()

    async def __aenter__(self) -> AsyncRaySession:
        self._session = await self._opening
        return self._session

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        assert self._session is not None
        await self._session.__aexit__(kind, error, trace)


class RaySessionOptions(TypedDict, total=False):
    """What `ray_session` and `async_ray_session` take after `cluster` and besides `client`: one
    definition for both, so that the sync and the async open can never drift apart. An option left
    out has the default `_OpenRequest.of` gives (`session_spec`'s for the spec's)."""

    name: str
    """The session's name ("ray-session"): an active session of the caller's with this name on the
    cluster is re-attached."""
    nodes: int
    """Ray nodes, the head included (1)."""
    idle_timeout: int
    """Seconds without a Ray job before the session ends itself (`DEFAULT_IDLE_TIMEOUT`)."""
    time: str
    """SLURM time limit ("01:00:00"), unless `resources` names one."""
    head: Mapping[str, Any] | None
    workers: Mapping[str, Any] | None
    resources: Mapping[str, Any] | None
    environment: Mapping[str, Any] | None
    url: str | None
    """porter's address, for the client made when none is given (`CLOUDHPC_URL`)."""
    token: str | None
    """The token of that client (`CLOUDHPC_TOKEN`)."""
    keep: bool
    """Leave the session running when the `with` block ends (True): see the module's docstring."""
    timeout: float
    """Seconds to wait for the dashboard (1800): SLURM's queue and Ray's start."""
    in_cluster: bool
    """Give the dashboard's Kubernetes Service address (from a pod) (False)."""


@dataclass(frozen=True, kw_only=True)
class _OpenRequest:
    """One open as both functions make it: the session's spec and how to ask porter for it."""

    spec: dict[str, Any]
    url: str | None = None
    token: str | None = None
    keep: bool = True
    timeout: float = 1800.0
    in_cluster: bool = False

    @classmethod
    def of(cls, cluster: str, options: RaySessionOptions) -> _OpenRequest:
        """`options` split into the spec's (`session_spec`) and the open's own (this class's)."""
        spec_options: dict[str, Any] = {"name": "ray-session", **options}
        opens = [f.name for f in fields(cls) if f.name != "spec"]
        own = {name: spec_options.pop(name) for name in opens if name in spec_options}
        return cls(spec=session_spec(cluster=cluster, **spec_options), **own)


def ray_session(
    cluster: str, *, client: Client | None = None, **options: Unpack[RaySessionOptions]
) -> RaySession:
    """Open (or re-attach to) the caller's session `name` on `cluster`, once its dashboard answers
    through the bridge (`timeout` covers the wait in SLURM's queue and Ray's start). porter decides
    in one transaction (`POST /api/v1/ray-sessions`): two opens of one name at the same moment, from
    two cells, steps or processes, make one session.

    `client` is used as given (and left open); without one, a `Client(url, token)` is made
    (`CLOUDHPC_URL`, `CLOUDHPC_TOKEN`) and closed with the session. `in_cluster=True` gives the
    Kubernetes Service address of the dashboard (from a pod). The size and environment arguments
    are used only when a session is started; a re-attached one keeps its own. `keep`: see the
    module's docstring. The options and their defaults: `RaySessionOptions`."""
    request = _OpenRequest.of(cluster, options)
    owns = client is None
    hpc = client if client is not None else Client(request.url, request.token)
    try:
        opened = hpc.open_ray_session(request.spec, timeout=request.timeout, in_cluster=request.in_cluster)
    except BaseException:
        if owns:
            hpc.close()
        raise
    return RaySession(opened.job, opened.address, opened.reattached, request.keep, owns, client=hpc)


def async_ray_session(
    cluster: str, *, client: AsyncClient | None = None, **options: Unpack[RaySessionOptions]
) -> _AsyncOpening:
    """`ray_session` for asyncio code, with an `AsyncClient` (the same arguments, the same open):

        async with cloudhpc.async_ray_session("mahti", name="dev", client=client) as session:
            job = await session.submit("python train.py", files={"train.py": code})

    or `session = await cloudhpc.async_ray_session(...)` (then `await session.close()` or leave it
    to its idle timeout)."""
    request = _OpenRequest.of(cluster, options)

    async def opening() -> AsyncRaySession:
        owns = client is None
        hpc = client if client is not None else AsyncClient(request.url, request.token)
        try:
            opened = await hpc.open_ray_session(
                request.spec, timeout=request.timeout, in_cluster=request.in_cluster
            )
        except BaseException:
            if owns:
                await hpc.aclose()
            raise
        return AsyncRaySession(opened.job, opened.address, opened.reattached, request.keep, owns, client=hpc)

    return _AsyncOpening(opening())
