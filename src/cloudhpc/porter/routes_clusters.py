"""Clusters and the caller: `GET /clusters` (the clusters the caller may use, with their agent's
liveness) and `GET /me` (who the token speaks for and where its job inputs may be).

Which clusters a user may use is `porter/access.py`; a cluster the caller may not use is not listed,
exactly as if it did not exist.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from cloudhpc.domain.api import ClusterInfo, ClusterList, Me
from cloudhpc.porter.access import usable_clusters
from cloudhpc.porter.auth import UserPrincipal
from cloudhpc.porter.inputs import input_scope
from cloudhpc.porter.state import state_of

__all__ = ["router"]

router = APIRouter(prefix="/api/v1", tags=["clusters"])

AGENT_ONLINE_SECONDS = 90
"""An agent heard from within this many seconds is `agent_online`."""


@router.get("/clusters", response_model=ClusterList)
async def list_clusters(request: Request, principal: UserPrincipal) -> ClusterList:
    state = state_of(request)
    seen = await state.store.agents()
    now = time.time()
    out = []
    for name in await usable_clusters(state, principal, state.cluster_names(seen)):
        cfg = state.settings.clusters.get(name)
        last = seen.get(name)
        out.append(
            ClusterInfo(
                name=name,
                backend=cfg.backend if cfg else None,
                agent_last_seen=last,
                agent_online=last is not None and now - last.timestamp() < AGENT_ONLINE_SECONDS,
            )
        )
    return ClusterList(clusters=out)


@router.get("/me", response_model=Me)
async def whoami(request: Request, principal: UserPrincipal) -> Me:
    """The caller's user name and role, and the URL prefixes its jobs' `files` may name (a pipeline
    step stores a job's inputs there before it submits the job)."""
    state = state_of(request)
    return Me(
        user=principal.user,
        role=principal.role,
        inputs=input_scope(state.settings.porter.object_store).owner_urls(principal.user),
    )
