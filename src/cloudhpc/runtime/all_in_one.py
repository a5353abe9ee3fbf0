"""`cloudhpc serve all`: porter and the agents in one process, the embedded default a new user
starts first. The agents talk to porter over HTTP on `porter.listen`, as a remote submitter would,
with the agent token this process makes for itself."""

from __future__ import annotations

import asyncio

from cloudhpc.config import Settings
from cloudhpc.porter.app import create_app
from cloudhpc.runtime.agents import open_agents, submitter_endpoint
from cloudhpc.runtime.porter import stop_porter
from cloudhpc.runtime.servers import bind, serving, until_signalled
from cloudhpc.runtime.tokens import ensure_tokens
from cloudhpc.storage.artifacts import ArtifactWriter, open_agent_object_store, open_porter_object_store
from cloudhpc.store import Store
from cloudhpc.submitter.channel import HttpChannel

__all__ = ["serve_all"]


async def serve_all(settings: Settings, *, ready: asyncio.Event | None = None) -> None:
    """Runs until SIGINT/SIGTERM; `ready` is set once porter answers and the agents run."""
    store = Store(settings.porter.database)
    try:
        store.migrate()
        _admin, agent_token = ensure_tokens(store, settings)
        objects = open_porter_object_store(settings)
        # One object store for both roles unless the agent has its own (submitter.object_store).
        agent_objects = (
            objects if settings.submitter.object_store is None else open_agent_object_store(settings)
        )
        app = create_app(settings, store=store, object_store=objects)
        sock = bind(settings.porter.listen, key="porter.listen")
        async with serving(app, sock, lifespan=True, before_stop=lambda: stop_porter(app)) as server:
            channel = HttpChannel(f"http://{settings.porter.listen}", agent_token)
            try:
                async with (
                    submitter_endpoint(settings, required=False) as (metrics, agents),
                    open_agents(
                        settings,
                        channel,
                        metrics=metrics,
                        artifacts=ArtifactWriter(agent_objects),
                        started=agents,
                    ),
                ):
                    if ready is not None:
                        ready.set()
                    await until_signalled(or_ended=server)
            finally:
                await channel.close()
    finally:
        store.close()
