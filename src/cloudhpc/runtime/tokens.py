"""The tokens `serve all` makes for itself on first start: an admin token for the user and an
agent token for its own submitter, kept in 0600 files (in a 0700 `.cloudhpc/` when it makes it)
and reused while the store accepts them."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cloudhpc.config import Settings
from cloudhpc.private_files import make_private_dirs, open_private_file
from cloudhpc.store import Store

__all__ = ["ensure_tokens"]

log = logging.getLogger(__name__)


def _write_secret(path: Path, value: str) -> None:
    make_private_dirs(path.parent)
    with os.fdopen(open_private_file(path, os.O_WRONLY | os.O_TRUNC), "w") as handle:
        handle.write(value + "\n")


def ensure_tokens(store: Store, settings: Settings, state_dir: Path = Path(".cloudhpc")) -> tuple[str, str]:
    """First start of `serve all`: create an admin and an agent token and keep them in files (0600).
    Later starts reuse them, as long as the store still accepts them."""
    admin_file = state_dir / "admin-token"
    agent_file = settings.submitter.token_file
    tokens: list[str] = []
    for path, role, clusters in (
        (admin_file, "admin", None),
        (agent_file, "agent", sorted(settings.clusters)),
    ):
        token = path.read_text().strip() if path.exists() else ""
        principal = store.verify_token(token) if token else None
        if principal is None or (clusters is not None and sorted(principal.clusters or []) != clusters):
            token = store.create_token("admin" if role == "admin" else "agent", role, clusters)
            _write_secret(path, token)
            log.info("created the %s token in %s", role, path)
        tokens.append(token)
    return tokens[0], tokens[1]
