"""Running the roles: porter alone, the submitter alone, or both in one process (`serve all`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from cloudhpc.config import ClusterConfig, Settings
from cloudhpc.exceptions import ConfigError
from cloudhpc.hpc.backend import JobBackend
from cloudhpc.hpc.envs import EnvironmentCache
from cloudhpc.hpc.local import LocalBackend, LocalRunner
from cloudhpc.hpc.slurm import SlurmBackend
from cloudhpc.hpc.ssh import SSHConnection
from cloudhpc.metrics.agent import AgentMetrics
from cloudhpc.porter.app import create_app
from cloudhpc.storage.artifacts import ArtifactWriter, open_agent_object_store, open_porter_object_store
from cloudhpc.store import Store
from cloudhpc.submitter.agent import Agent
from cloudhpc.submitter.channel import Channel, HttpChannel
from cloudhpc.submitter.files import FileFetcher
from cloudhpc.submitter.health import create_submitter_app, serve_endpoint
from cloudhpc.submitter.s3_channel import open_mailbox_channels

__all__ = ["ensure_tokens", "open_agents", "serve_all", "serve_porter", "serve_submitter", "split_listen"]

log = logging.getLogger(__name__)


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"listen address {listen!r} must look like HOST:PORT (e.g. 127.0.0.1:5555)")
    return host, int(port)


def _write_secret(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    path.chmod(0o600)


def ensure_tokens(store: Store, settings: Settings, state_dir: Path = Path(".cloudhpc")) -> tuple[str, str]:
    """First start of `serve all`: create an admin and an agent token and keep them in files (0600).
    Later starts reuse them, as long as the store still accepts them."""
    admin_file = state_dir / "admin-token"
    agent_file = settings.submitter.token_file
    tokens: list[str] = []
    for path, role, clusters in (
        (admin_file, "admin", None),
        (agent_file, "agent", sorted(settings.clusters)),
    ):
        token = path.read_text().strip() if path.exists() else ""
        principal = store.verify_token(token) if token else None
        if principal is None or (clusters is not None and sorted(principal.clusters or []) != clusters):
            token = store.create_token("admin" if role == "admin" else "agent", role, clusters)
            _write_secret(path, token)
            log.info("created the %s token in %s", role, path)
        tokens.append(token)
    return tokens[0], tokens[1]


def _local_path(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


async def _backend_for(
    name: str, cluster: ClusterConfig, stack: AsyncExitStack, metrics: AgentMetrics | None = None
) -> tuple[JobBackend, EnvironmentCache, str]:
    if cluster.backend == "local":
        workdir = _local_path(cluster.workdir)
        runner = LocalRunner()
        backend: JobBackend = LocalBackend(
            name, workdir=workdir, runner=runner, default_resources=cluster.defaults.as_resources()
        )
        return backend, EnvironmentCache(runner, workdir=workdir, prelude=cluster.prelude), workdir
    assert cluster.ssh is not None  # enforced by ClusterConfig
    conn = SSHConnection(
        cluster.ssh, cluster=name, on_command=metrics.observe_command if metrics is not None else None
    )
    if metrics is not None:
        metrics.watch_connection(name, conn)
    stack.push_async_callback(conn.close)
    home = await conn.home()
    workdir = cluster.workdir
    if workdir.startswith("~/") or workdir == "~":
        workdir = home.rstrip("/") + workdir[1:]
    elif not workdir.startswith("/"):
        workdir = f"{home.rstrip('/')}/{workdir}"
    backend = SlurmBackend(
        name,
        conn,
        workdir=workdir,
        prelude=cluster.prelude,
        default_resources=cluster.defaults.as_resources(),
    )
    return backend, EnvironmentCache(conn, workdir=workdir, prelude=cluster.prelude), workdir


@asynccontextmanager
async def open_agents(
    settings: Settings,
    channel: Channel | Mapping[str, Channel],
    *,
    metrics: AgentMetrics | None = None,
    artifacts: ArtifactWriter | None = None,
    started: list[Agent] | None = None,
) -> AsyncIterator[list[Agent]]:
    """One started agent per configured cluster; stopped and disconnected on exit. `channel` is
    shared by all clusters (http) or given per cluster (the S3 mailbox has one per cluster).
    Agents are appended to `started` as soon as each runs (the health endpoint reads it)."""
    async with AsyncExitStack() as stack:
        agents = started if started is not None else []
        for name, cluster in settings.clusters.items():
            backend, envs, workdir = await _backend_for(name, cluster, stack, metrics)
            stack.push_async_callback(backend.close)
            own = channel[name] if isinstance(channel, Mapping) else channel
            agent = Agent(
                name,
                cluster,
                backend,
                own,
                envs=envs,
                workdir=workdir,
                artifacts=artifacts,
                bridge=settings.porter.bridge,
                fetch_file=FileFetcher.from_settings(settings).fetch,
            )
            await agent.start()
            stack.push_async_callback(agent.stop)
            agents.append(agent)
        yield agents


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: the process's handler stops porter and agents together."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _server(app: FastAPI, listen: str) -> uvicorn.Server:
    host, port = split_listen(listen)
    # Long-polls (the agent's work poll, `?wait=`) must not hold a shutdown for their full timeout.
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", lifespan="on", timeout_graceful_shutdown=2
    )
    return _QuietServer(config)


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _stop_server(server: uvicorn.Server, app: FastAPI) -> None:
    """Long-polls first (they answer within a second), then the server (it waits 2 s for them)."""
    app.state.porter.stopping = True
    server.should_exit = True


async def serve_porter(settings: Settings) -> None:
    app = create_app(settings)
    server = _server(app, settings.porter.listen)
    task = asyncio.create_task(server.serve())
    await asyncio.wait([task, asyncio.create_task(_until_signalled())], return_when=asyncio.FIRST_COMPLETED)
    _stop_server(server, app)
    await task


@asynccontextmanager
async def _submitter_endpoint(
    settings: Settings, *, required: bool
) -> AsyncIterator[tuple[AgentMetrics, list[Agent]]]:
    """The submitter's `/healthz` and `/metrics` on `submitter.listen`, up before the agents
    start so that a slow start (porter or the cluster unreachable) is visible as `starting`."""
    metrics = AgentMetrics()
    agents: list[Agent] = []
    app = create_submitter_app(lambda: agents, metrics)
    async with serve_endpoint(app, settings.submitter.listen, required=required):
        yield metrics, agents


async def serve_submitter(settings: Settings) -> None:
    artifacts = ArtifactWriter(open_agent_object_store(settings))
    if settings.submitter.channel == "s3":
        # The bucket's credentials are the agent's identity here: no porter token is involved.
        channels = open_mailbox_channels(settings)
        try:
            async with (
                _submitter_endpoint(settings, required=True) as (metrics, agents),
                open_agents(settings, channels, metrics=metrics, artifacts=artifacts, started=agents),
            ):
                await _until_signalled()
        finally:
            for each in channels.values():
                await each.close()
        return
    token_file = settings.submitter.token_file
    if not token_file.exists():
        raise ConfigError(
            f"submitter.token_file: {token_file} does not exist; create an agent token on porter with "
            "`cloudhpc tokens create --user agent --role agent --cluster NAME` and save it there"
        )
    channel = HttpChannel(settings.submitter.porter_url, token_file.read_text().strip())
    try:
        async with (
            _submitter_endpoint(settings, required=True) as (metrics, agents),
            open_agents(settings, channel, metrics=metrics, artifacts=artifacts, started=agents),
        ):
            await _until_signalled()
    finally:
        await channel.close()


async def serve_all(settings: Settings, *, ready: asyncio.Event | None = None) -> None:
    """porter and the agents in one process: the embedded default a new user starts first."""
    store = Store(settings.porter.database)
    store.migrate()
    _admin, agent_token = ensure_tokens(store, settings)
    objects = open_porter_object_store(settings)
    # One object store for both roles unless the agent has its own (submitter.object_store).
    agent_objects = objects if settings.submitter.object_store is None else open_agent_object_store(settings)
    app = create_app(settings, store=store, object_store=objects)
    server = _server(app, settings.porter.listen)
    server_task = asyncio.create_task(server.serve())
    while not server.started:
        if server_task.done():
            await server_task
            raise ConfigError(f"porter could not listen on {settings.porter.listen}")
        await asyncio.sleep(0.05)
    host, port = split_listen(settings.porter.listen)
    channel = HttpChannel(f"http://{host}:{port}", agent_token)
    try:
        async with (
            _submitter_endpoint(settings, required=False) as (metrics, agents),
            open_agents(
                settings, channel, metrics=metrics, artifacts=ArtifactWriter(agent_objects), started=agents
            ),
        ):
            if ready is not None:
                ready.set()
            await asyncio.wait(
                [server_task, asyncio.create_task(_until_signalled())], return_when=asyncio.FIRST_COMPLETED
            )
    finally:
        _stop_server(server, app)
        await channel.close()
        with contextlib.suppress(Exception):
            await server_task
        store.close()
