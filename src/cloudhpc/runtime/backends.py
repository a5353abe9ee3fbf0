"""The backend factory: a cluster's configuration to the `JobBackend` and environment cache its
agent drives (`local`: processes on this machine; `slurm`: one multiplexed SSH connection)."""

from __future__ import annotations

import os
from contextlib import AsyncExitStack
from pathlib import Path

from cloudhpc.config import ClusterConfig
from cloudhpc.domain.paths import resolve_path
from cloudhpc.hpc.backend import JobBackend
from cloudhpc.hpc.envs import EnvironmentCache
from cloudhpc.hpc.local import LocalBackend, LocalRunner
from cloudhpc.hpc.slurm import SlurmBackend
from cloudhpc.hpc.ssh import SSHConnection
from cloudhpc.metrics.agent import AgentMetrics

__all__ = ["open_backend"]


async def open_backend(
    name: str, cluster: ClusterConfig, stack: AsyncExitStack, metrics: AgentMetrics | None = None
) -> tuple[JobBackend, EnvironmentCache, str]:
    """The backend, environment cache and resolved work directory of cluster `name`; the SSH
    connection (if any) is closed by `stack`."""
    if cluster.backend == "local":
        # a local path in the configuration reads like any other: relative to the current directory
        workdir = resolve_path(cluster.workdir, str(Path.home()), relative_to=os.getcwd())
        runner = LocalRunner()
        backend: JobBackend = LocalBackend(name, workdir=workdir, runner=runner)
        envs = EnvironmentCache(runner, workdir=workdir, prelude=cluster.prelude, pip=cluster.pip)
        return backend, envs, workdir
    assert cluster.ssh is not None  # enforced by ClusterConfig
    conn = SSHConnection(
        cluster.ssh, cluster=name, on_command=metrics.observe_command if metrics is not None else None
    )
    if metrics is not None:
        metrics.watch_connection(name, conn)
    stack.push_async_callback(conn.close)
    workdir = resolve_path(cluster.workdir, await conn.home())
    backend = SlurmBackend(name, conn, workdir=workdir, prelude=cluster.prelude)
    return backend, EnvironmentCache(conn, workdir=workdir, prelude=cluster.prelude, pip=cluster.pip), workdir
