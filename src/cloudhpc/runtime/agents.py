"""The submitter side of a process: one started agent per configured cluster, and the agent's own
`/healthz` + `/metrics` endpoint on `submitter.listen`. Used by `serve submitter` and `serve all`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager

from cloudhpc.bridges.certificates import BridgeCA
from cloudhpc.config import Settings, check_job_bridge
from cloudhpc.domain.jobs import Job
from cloudhpc.exceptions import ConfigError
from cloudhpc.metrics.agent import AgentMetrics
from cloudhpc.runtime.backends import open_backend
from cloudhpc.runtime.servers import bind, serving
from cloudhpc.storage.artifacts import ArtifactWriter
from cloudhpc.submitter.agent import Agent
from cloudhpc.submitter.channel import Channel
from cloudhpc.submitter.files import FileFetcher
from cloudhpc.submitter.health import create_submitter_app

__all__ = ["open_agents", "submitter_endpoint"]

log = logging.getLogger(__name__)


@asynccontextmanager
async def open_agents(
    settings: Settings,
    channel: Channel | Mapping[str, Channel],
    *,
    metrics: AgentMetrics | None = None,
    artifacts: ArtifactWriter | None = None,
    fetch_file: Callable[[str, Job], bytes] | None = None,
    started: list[Agent] | None = None,
) -> AsyncIterator[list[Agent]]:
    """One started agent per configured cluster; stopped and disconnected on exit. `channel` is
    shared by all clusters (http) or given per cluster (the S3 mailbox has one per cluster).
    Inputs are read with `fetch_file` (default: from the agent's object store, `FileFetcher`).
    Agents are appended to `started` as soon as each runs (the health endpoint reads it)."""
    note = check_job_bridge(settings)  # a ConfigError naming the key when porter.bridge is unusable
    if note:
        log.warning("%s", note)
    bridge = settings.porter.bridge
    if bridge is not None and bridge.ca_key_file is not None:
        # an unusable bridge CA stops the submitter here, not each Ray job at staging
        ca = BridgeCA.from_file(bridge.ca_key_file)
        log.info("bridges: per-job certificates from the bridge CA %s", ca.fingerprint)
    fetch = fetch_file or FileFetcher.from_settings(settings).fetch_for
    async with AsyncExitStack() as stack:
        agents = started if started is not None else []
        for name, cluster in settings.clusters.items():
            backend, envs, workdir = await open_backend(name, cluster, stack, metrics)
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
                fetch_file=fetch,
            )
            await agent.start()
            stack.push_async_callback(agent.stop)
            agents.append(agent)
        yield agents


@asynccontextmanager
async def submitter_endpoint(
    settings: Settings, *, required: bool
) -> AsyncIterator[tuple[AgentMetrics, list[Agent]]]:
    """The submitter's `/healthz` and `/metrics` on `submitter.listen`, up before the agents
    start so that a slow start (porter or the cluster unreachable) is visible as `starting`.

    A busy port is fatal when `required` (`serve submitter`) and a warning otherwise: `serve all`
    must start even when another process holds 5556, since its porter port still works."""
    metrics = AgentMetrics()
    agents: list[Agent] = []
    app = create_submitter_app(lambda: agents, metrics)
    try:
        sock = bind(settings.submitter.listen, key="submitter.listen")
    except ConfigError as exc:
        if required:
            raise
        log.warning("%s; the submitter's /healthz and /metrics are off", exc)
        yield metrics, agents
        return
    async with serving(app, sock, lifespan=False):
        yield metrics, agents
