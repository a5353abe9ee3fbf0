"""`cloudhpc serve porter`: the control plane alone (its store and object store from settings)."""

from __future__ import annotations

from fastapi import FastAPI

from cloudhpc.config import Settings
from cloudhpc.porter.app import create_app
from cloudhpc.runtime.servers import bind, serving, until_signalled

__all__ = ["serve_porter", "stop_porter"]


def stop_porter(app: FastAPI) -> None:
    """Long-polls first: they are woken to answer at once, and the server waits 2 s for them."""
    app.state.porter.stop()


async def serve_porter(settings: Settings) -> None:
    app = create_app(settings)
    sock = bind(settings.porter.listen, key="porter.listen")
    async with serving(app, sock, lifespan=True, before_stop=lambda: stop_porter(app)) as server:
        await until_signalled(or_ended=server)
