"""The submitter's own HTTP endpoint (`submitter.listen`, default 127.0.0.1:5556): `/healthz` and
`/metrics`, for the platform's probes and Prometheus.

The agent never needs an inbound connection for its work; this port only answers questions about
the agent itself, and serves the same in `serve submitter` and `serve all`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST

from cloudhpc import __version__
from cloudhpc.exceptions import ConfigError
from cloudhpc.metrics.agent import AgentMetrics
from cloudhpc.submitter.agent import Agent

__all__ = ["create_submitter_app", "serve_endpoint"]

log = logging.getLogger(__name__)


def create_submitter_app(agents: Callable[[], Sequence[Agent]], metrics: AgentMetrics) -> FastAPI:
    """`agents()` returns the running agents (empty while they start: `/healthz` answers 503)."""
    app = FastAPI(title="cloudhpc submitter", version=__version__, openapi_url=None)

    @app.get("/healthz")
    async def healthz(response: Response) -> dict[str, object]:
        current = list(agents())
        clusters = {agent.cluster: "ok" if agent.healthy else "failing" for agent in current}
        if not current:
            status = "starting"
        elif all(value == "ok" for value in clusters.values()):
            status = "ok"
        else:
            status = "failing"
        if status != "ok":
            response.status_code = 503
        return {"status": status, "clusters": clusters}

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


class _QuietServer(uvicorn.Server):
    """No signal handling of its own: the process's handler stops everything together."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.setblocking(False)
    return sock


@asynccontextmanager
async def serve_endpoint(app: FastAPI, listen: str, *, required: bool) -> AsyncIterator[None]:
    """Serve `app` on `listen` (HOST:PORT) while the block runs.

    The socket is bound here, before the server starts, so that a busy port is reported as such:
    fatal when `required` (`serve submitter`), a warning otherwise (`serve all` must start even
    when another process holds 5556; its porter port still works).
    """
    host, _, port = listen.rpartition(":")
    try:
        sock = _bind(host.strip("[]"), int(port))
    except OSError as exc:
        message = f"submitter.listen: cannot listen on {listen}: {exc.strerror or exc}"
        if required:
            raise ConfigError(message + " (choose a free port)") from exc
        log.warning("%s; the submitter's /healthz and /metrics are off", message)
        yield
        return
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
    server = _QuietServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="submitter-endpoint")
    try:
        yield
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await task
        sock.close()
