"""Builds porter's FastAPI application from settings: store, notifier, routes, error table, metrics."""

from __future__ import annotations

import gc
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloudhpc import __version__
from cloudhpc.config import Settings
from cloudhpc.metrics.porter import PorterMetrics
from cloudhpc.porter import (
    routes_agent,
    routes_agent_objects,
    routes_agent_queries,
    routes_artifacts,
    routes_bridges,
    routes_clusters,
    routes_estimate,
    routes_files,
    routes_jobs,
    routes_sessions,
    routes_uploads,
    web,
)
from cloudhpc.porter.auth import read_scrape_token, require_scraper
from cloudhpc.porter.bridges import bridge_reconciler
from cloudhpc.porter.errors import error_body, install_error_handlers
from cloudhpc.porter.limits import RequestSizeLimit
from cloudhpc.porter.mailbox import mailbox_relay, porter_mailbox_keys
from cloudhpc.porter.openapi import ERROR_RESPONSES
from cloudhpc.porter.retention import retention
from cloudhpc.porter.state import PorterState, change_listener
from cloudhpc.storage import ObjectStore
from cloudhpc.storage.artifacts import open_porter_object_store
from cloudhpc.store import AsyncStore, Store

__all__ = ["create_app"]


class _RequestTimer:
    """Observes each request's time to its first response byte, by route template.

    Plain ASGI rather than `@app.middleware("http")`: Starlette's BaseHTTPMiddleware runs every
    request through an extra task and memory streams, which cost about as much as the whole
    `GET /jobs/{id}` route (bench/api.py).
    """

    def __init__(self, app: ASGIApp, metrics: PorterMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                template = getattr(scope.get("route"), "path", "unmatched")
                self.metrics.observe_request(
                    template, scope["method"], message["status"], time.perf_counter() - started
                )
            await send(message)

        await self.app(scope, receive, timed_send)


_GC_THRESHOLDS = (20_000, 20, 10)
_heap_settled = False


def _settle_heap() -> None:
    """Move everything alive after start-up out of the garbage collector's reach, once per process.

    Measured with bench/api.py (`gc.callbacks` in porter): the modules, routes, pydantic and
    SQLAlchemy structures alive after start-up were rescanned by every full collection, 20 of them
    in one run of up to 180 ms each, and young collections ran every 700 allocations (a few
    requests); each one stops the event loop and every worker thread, and they made most of the
    GET tail. Frozen objects are never scanned; the larger young-generation threshold makes the
    remaining collections rarer without growing any one of them much.
    """
    global _heap_settled
    if _heap_settled:
        return
    _heap_settled = True
    gc.collect()
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLDS)


def create_app(
    settings: Settings, *, store: Store | None = None, object_store: ObjectStore | None = None
) -> FastAPI:
    """The porter application. A store passed in is used as is (tests, `serve all`); otherwise one is
    opened from `settings.porter.database` and migrated at startup. The object store (artifacts)
    is `settings.porter.object_store` unless one is passed in."""
    own_store = store is None
    the_store = store or Store(settings.porter.database)
    db = AsyncStore(the_store)
    objects = object_store or open_porter_object_store(settings)
    mailbox_keys = porter_mailbox_keys(settings)  # a ConfigError before anything starts
    scrape_token = read_scrape_token(settings.porter.metrics.token_file)  # likewise

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if own_store:
            await db.migrate()
        _settle_heap()
        async with (
            change_listener(app.state.porter, the_store),
            mailbox_relay(
                settings,
                the_store,
                app.state.porter.notifier,
                keys=mailbox_keys,
                metrics=metrics,
            ),
            retention(settings, the_store, objects),
            bridge_reconciler(settings, the_store, app.state.porter.notifier),
        ):
            yield
        if own_store:
            the_store.close()

    app = FastAPI(
        title="cloudhpc porter",
        version=__version__,
        lifespan=lifespan,
        description="Submit and follow SLURM and Ray jobs. Every /api/v1 route needs a bearer token.",
        responses=ERROR_RESPONSES,
    )
    app.state.porter = PorterState(settings=settings, store=db, objects=objects)
    install_error_handlers(app)
    app.include_router(routes_jobs.router)
    app.include_router(routes_clusters.router)
    app.include_router(routes_agent.router)
    app.include_router(routes_agent_queries.router)
    app.include_router(routes_files.router)
    app.include_router(routes_estimate.router)
    app.include_router(routes_sessions.router)
    app.include_router(routes_artifacts.router)
    app.include_router(routes_artifacts.agent_router)
    app.include_router(routes_agent_objects.router)
    app.include_router(routes_bridges.router)
    app.include_router(routes_uploads.router)
    app.include_router(web.router)

    metrics = PorterMetrics(
        the_store,
        clusters=settings.clusters,
        recent_window=settings.porter.metrics.recent_window,
        max_recent_jobs=settings.porter.metrics.max_recent_jobs,
        bridges=the_store.bridge_readiness,
    )
    app.state.metrics = metrics
    app.state.scrape_token = scrape_token

    # inside the timer, so refused bodies are counted as 413s too
    app.add_middleware(
        RequestSizeLimit,
        limit=settings.porter.max_request_bytes,
        own_limits=[
            (
                "PUT",
                routes_agent_objects.ARTIFACT_UPLOAD_PATH,
                routes_agent_objects.MAX_ARTIFACT_BYTES,
                "an artifact",
            ),
            ("POST", routes_uploads.UPLOAD_PATH, routes_uploads.MAX_UPLOAD_BYTES, "an upload"),
        ],
    )
    app.add_middleware(_RequestTimer, metrics=metrics)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        if await db.ping():
            return Response('{"status":"ready"}', media_type="application/json")
        body: Any = error_body("not_ready", "the job store does not answer")
        return Response(json.dumps(body), status_code=503, media_type="application/json")

    @app.get("/metrics", include_in_schema=False, dependencies=[Depends(require_scraper)])
    async def metrics_endpoint() -> Response:
        payload = await run_in_threadpool(metrics.render)
        return Response(payload, media_type=CONTENT_TYPE_LATEST)

    return app
