"""Bearer-token authentication and the role rules of the API.

Tokens are looked up by their SHA-256 in the store, so porter never holds a plaintext token beyond
the request; a verified token is remembered (by its hash) for a few seconds (`TokenCache`), so a
revocation takes effect within that time. Roles: `user` acts on its own jobs, `agent` only on the
agent routes of the clusters it is bound to, `admin` on everything.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Annotated
from uuid import UUID

from fastapi import Depends, Request

from cloudhpc.domain.jobs import Job
from cloudhpc.exceptions import ConfigError, HttpProblem
from cloudhpc.porter.state import PorterState, state_of
from cloudhpc.store import Principal

__all__ = [
    "AgentPrincipal",
    "ScrapeToken",
    "UserPrincipal",
    "agent_job",
    "authenticate",
    "principal_for_token",
    "read_scrape_token",
    "require_agent_for",
    "require_scraper",
    "require_user",
]


async def authenticate(request: Request) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HttpProblem(
            401,
            "unauthorized",
            "missing bearer token: send `Authorization: Bearer <token>` "
            "(create one with `cloudhpc tokens create --user NAME`)",
        )
    principal = await principal_for_token(state_of(request), token.strip())
    if principal is None:
        raise HttpProblem(401, "unauthorized", "invalid or revoked token")
    return principal


async def principal_for_token(state: PorterState, token: str) -> Principal | None:
    """Who `token` speaks for (None: unknown or revoked), through the few-seconds cache: shared by
    the bearer header and the web view's cookie, so both see a revocation at the same time."""
    key = state.tokens.key(token)
    known, principal = state.tokens.get(key)
    if not known:
        principal = await state.store.verify_token(token)
        state.tokens.put(key, principal)
    return principal


log = logging.getLogger(__name__)

MIN_SCRAPE_TOKEN_CHARS = 16


def _read_token(path: Path) -> str:
    """The one token in `path`; a `ConfigError` naming `porter.metrics.token_file` when it is
    unreadable or too short to be a secret (the message never quotes the file)."""
    setting = "porter.metrics.token_file"
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not text"
        raise ConfigError(f"{setting}: cannot read {path} ({reason})") from None
    if len(token) < MIN_SCRAPE_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ConfigError(
            f"{setting}: {path} must hold one token of at least {MIN_SCRAPE_TOKEN_CHARS} characters "
            "without spaces (e.g. `openssl rand -hex 32`)"
        )
    return token


class ScrapeToken:
    """The token of `porter.metrics.token_file`: read when the app is built (a `ConfigError` then
    stops porter), and again whenever the file changes, so a rotated Secret (Kubernetes updates a
    mounted Secret in place, Prometheus re-reads its `credentials_file` at every scrape) is taken
    without a restart. A file that becomes unreadable or invalid keeps the last good token, with
    a warning (the token itself is never logged)."""

    def __init__(self, path: Path) -> None:
        self.path = path.expanduser()
        self._stamp = self._stat()
        self._token = _read_token(self.path)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def matches(self, given: str) -> bool:
        stamp = self._stat()
        if stamp is not None and stamp != self._stamp:
            try:
                self._token = _read_token(self.path)
            except ConfigError as exc:
                log.warning("%s; keeping the previous scrape token", exc)
            self._stamp = stamp
        return hmac.compare_digest(given.encode(), self._token.encode())


def read_scrape_token(path: Path | None) -> ScrapeToken | None:
    """`porter.metrics.token_file` as a `ScrapeToken`; None when unset: then only admin tokens may
    scrape."""
    return None if path is None else ScrapeToken(path)


async def require_scraper(request: Request) -> None:
    """`/metrics` carries user data (owners, job names): Prometheus sends the scrape token
    (`porter.metrics.token_file`), an operator may use an admin token; anything else is refused.
    The scrape token is compared in constant time and never reaches the store or a log."""
    expected: ScrapeToken | None = request.app.state.scrape_token
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    given = token if scheme.lower() == "bearer" else ""
    if expected is not None and given and expected.matches(given):
        return
    principal = await authenticate(request)  # 401 without a token or with an unknown one
    if principal.role != "admin":
        raise HttpProblem(
            403, "forbidden", "/metrics needs the scrape token (porter.metrics.token_file) or an admin token"
        )


async def require_user(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
    """User routes: people and admins. Agent tokens are for the agent protocol only."""
    if principal.role not in ("user", "admin"):
        raise HttpProblem(403, "forbidden", f"a {principal.role} token cannot use the user API")
    return principal


async def require_agent(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
    if principal.role not in ("agent", "admin"):
        raise HttpProblem(403, "forbidden", "the agent API needs an agent token")
    return principal


def require_agent_for(principal: Principal, cluster: str) -> None:
    """An agent acts only for the clusters its token is bound to."""
    if principal.role == "admin":
        return
    if cluster not in (principal.clusters or []):
        raise HttpProblem(403, "forbidden", f"this agent token is not bound to cluster {cluster!r}")


async def agent_job(state: PorterState, job_id: UUID, principal: Principal) -> Job:
    """The job `job_id`, for an agent bound to its cluster: 404 when there is no such job."""
    job = await state.store.get_job(job_id)
    if job is None:
        raise HttpProblem(404, "not_found", f"no job {job_id}")
    require_agent_for(principal, job.cluster)
    return job


UserPrincipal = Annotated[Principal, Depends(require_user)]
AgentPrincipal = Annotated[Principal, Depends(require_agent)]
