"""The job store: SQLAlchemy models, the `Store` repository and its Alembic migrations.

This is the only package that runs SQL; everything else goes through `Store`.
"""

from __future__ import annotations

from cloudhpc.store.repository import (
    DEFAULT_URL,
    ROLES,
    TOKEN_PREFIX,
    AccountingFacts,
    BridgePlan,
    BridgeRecord,
    ExpiredArtifacts,
    ExposedPort,
    JobFacts,
    Principal,
    Store,
    TokenInfo,
    Transition,
    normalize_url,
)

__all__ = [
    "DEFAULT_URL",
    "ROLES",
    "TOKEN_PREFIX",
    "AccountingFacts",
    "BridgePlan",
    "BridgeRecord",
    "ExpiredArtifacts",
    "ExposedPort",
    "JobFacts",
    "Principal",
    "Store",
    "TokenInfo",
    "Transition",
    "normalize_url",
]
