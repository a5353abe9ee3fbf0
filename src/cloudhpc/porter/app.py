"""Builds porter's FastAPI application from settings: store, notifier, routes, error table, metrics."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool

from cloudhpc import __version__
from cloudhpc.config import Settings
from cloudhpc.porter import routes_agent, routes_jobs
from cloudhpc.porter.errors import error_body, install_error_handlers
from cloudhpc.porter.mailbox import mailbox_relay
from cloudhpc.porter.state import PorterState
from cloudhpc.store import Store

__all__ = ["create_app"]


class _StoreCollector(Collector):
    """Job gauges computed from the store at scrape time, so they survive restarts and never drift."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def collect(self) -> Iterable[Metric]:
        jobs = GaugeMetricFamily("cloudhpc_jobs", "Jobs by cluster and state", labels=["cluster", "state"])
        for (cluster, state), count in sorted(self._store.count_by_state().items()):
            jobs.add_metric([cluster, state], count)
        yield jobs
        seen = GaugeMetricFamily(
            "cloudhpc_agent_last_seen_timestamp_seconds",
            "When each cluster's agent last called",
            labels=["cluster"],
        )
        for cluster, when in sorted(self._store.agents().items()):
            seen.add_metric([cluster], when.timestamp())
        yield seen


def create_app(settings: Settings, *, store: Store | None = None) -> FastAPI:
    """The porter application. A store passed in is used as is (tests, `serve all`); otherwise one is
    opened from `settings.porter.database` and migrated at startup."""
    own_store = store is None
    the_store = store or Store(settings.porter.database)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if own_store:
            await run_in_threadpool(the_store.migrate)
        async with mailbox_relay(settings, the_store, app.state.porter.notifier):
            yield
        if own_store:
            the_store.close()

    app = FastAPI(
        title="cloudhpc porter",
        version=__version__,
        lifespan=lifespan,
        description="Submit and follow SLURM and Ray jobs. Every /api/v1 route needs a bearer token.",
    )
    app.state.porter = PorterState(settings=settings, store=the_store)
    install_error_handlers(app)
    app.include_router(routes_jobs.router)
    app.include_router(routes_agent.router)

    registry = CollectorRegistry()
    registry.register(_StoreCollector(the_store))
    latency = Histogram(
        "cloudhpc_api_request_duration_seconds",
        "API latency by route template and status",
        ["route", "method", "status"],
        registry=registry,
    )

    @app.middleware("http")
    async def _time_requests(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        template = getattr(route, "path", "unmatched")
        latency.labels(template, request.method, str(response.status_code)).observe(
            time.perf_counter() - started
        )
        return response

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        if await run_in_threadpool(the_store.ping):
            return Response('{"status":"ready"}', media_type="application/json")
        body: Any = error_body("not_ready", "the job store does not answer")
        return Response(json.dumps(body), status_code=503, media_type="application/json")

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        payload = await run_in_threadpool(generate_latest, registry)
        return Response(payload, media_type=CONTENT_TYPE_LATEST)

    return app
