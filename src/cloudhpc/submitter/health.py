"""The submitter's own HTTP endpoint (`submitter.listen`, default 127.0.0.1:5556): `/healthz` and
`/metrics`, for the platform's probes and Prometheus.

The agent never needs an inbound connection for its work; this port only answers questions about
the agent itself, and serves the same in `serve submitter` and `serve all` (started by
`cloudhpc.runtime.agents.submitter_endpoint`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST

from cloudhpc import __version__
from cloudhpc.metrics.agent import AgentMetrics
from cloudhpc.submitter.agent import Agent

__all__ = ["create_submitter_app"]


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
