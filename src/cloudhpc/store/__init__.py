"""The job store: SQLAlchemy models, one repository per aggregate, and their Alembic migrations.

This is the only package that runs SQL; everything else goes through `Store` (or `AsyncStore`, its
awaitable twin for porter's routes). The modules, each over the shared `engine.Database`:

- `jobs`: jobs as porter writes and reads them (create, list, cancel) and their transitions;
- `agents`: the agent protocol (agent slots, work leases, reconciliation, reports);
- `bridges`: bridge ports, allocated with their job and reconciled by porter;
- `tokens`: bearer tokens; `output`: stdout chunks, artifact keys, accounting documents;
- `metrics_view`: what the metrics exporter reads;
- `facade`: `Store`, the union of them all, and `AsyncStore`.
"""

from __future__ import annotations

from cloudhpc.store.bridges import BridgeRecord
from cloudhpc.store.engine import DEFAULT_URL, normalize_url
from cloudhpc.store.facade import AsyncStore, Store
from cloudhpc.store.jobs import Transition, decode_cursor
from cloudhpc.store.metrics_view import AccountingFacts, JobFacts
from cloudhpc.store.output import ExpiredArtifacts
from cloudhpc.store.tokens import ROLES, TOKEN_PREFIX, Principal, TokenInfo

__all__ = [
    "DEFAULT_URL",
    "ROLES",
    "TOKEN_PREFIX",
    "AccountingFacts",
    "AsyncStore",
    "BridgeRecord",
    "ExpiredArtifacts",
    "JobFacts",
    "Principal",
    "Store",
    "TokenInfo",
    "Transition",
    "decode_cursor",
    "normalize_url",
]
