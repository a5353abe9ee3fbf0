"""cloudhpc: run SLURM batch jobs, Ray clusters and Ray jobs from a cloud MLOps platform.

The SDK a notebook or a pipeline step needs is here::

    import cloudhpc

    with cloudhpc.Client("http://127.0.0.1:5555", token="...") as client:
        job = client.submit(cloudhpc.JobSpec(name="hello", cluster="local", script="echo hi"))
        print(client.wait(job).state)

The names are loaded on first use (PEP 562), not when `cloudhpc` is imported: every process that
imports a submodule also runs this file, and some of them must start fast and light (the local
backend's job supervisor, `python -m cloudhpc.hpc.local_supervisor`, uses the standard library only).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from cloudhpc.client import ApiError, AsyncClient, Client, LogChunk, default_client
    from cloudhpc.domain.jobs import (
        Bridge,
        Environment,
        Job,
        JobKind,
        JobSpec,
        JobSummary,
        RaySpec,
        Resources,
    )
    from cloudhpc.domain.states import JobState
    from cloudhpc.exceptions import CloudHPCError, ConfigError
    from cloudhpc.executor import Executor
    from cloudhpc.sessions import AsyncRaySession, RaySession, async_ray_session, ray_session

_HOMES = {
    "cloudhpc.client": ("ApiError", "AsyncClient", "Client", "LogChunk", "default_client"),
    "cloudhpc.domain.jobs": (
        "Bridge",
        "Environment",
        "Job",
        "JobKind",
        "JobSpec",
        "JobSummary",
        "RaySpec",
        "Resources",
    ),
    "cloudhpc.domain.states": ("JobState",),
    "cloudhpc.exceptions": ("CloudHPCError", "ConfigError"),
    "cloudhpc.executor": ("Executor",),
    "cloudhpc.sessions": ("AsyncRaySession", "RaySession", "async_ray_session", "ray_session"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "ApiError",
    "AsyncClient",
    "AsyncRaySession",
    "Bridge",
    "Client",
    "CloudHPCError",
    "ConfigError",
    "Environment",
    "Executor",
    "Job",
    "JobKind",
    "JobSpec",
    "JobState",
    "JobSummary",
    "LogChunk",
    "RaySession",
    "RaySpec",
    "Resources",
    "__version__",
    "async_ray_session",
    "default_client",
    "ray_session",
]


def __getattr__(name: str) -> Any:
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'cloudhpc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
