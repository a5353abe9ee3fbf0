"""Bearer tokens: created, verified, listed and revoked; only their SHA-256 is ever stored."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import select, update

from cloudhpc.store.engine import Database, map_db_errors, utcnow
from cloudhpc.store.models import TokenRow

__all__ = ["ROLES", "TOKEN_PREFIX", "Principal", "TokenInfo", "TokenRepository"]

TOKEN_PREFIX: Final = "chpc_"  # noqa: S105 (a prefix, not a secret)
ROLES: Final = ("user", "agent", "admin")


@dataclass(frozen=True)
class Principal:
    """Who a bearer token speaks for. Agents act only on `clusters`; users only on their jobs."""

    user: str
    role: str
    clusters: tuple[str, ...]
    token_id: int


@dataclass(frozen=True)
class TokenInfo:
    """A token as an administrator may list it: everything but the secret."""

    id: int
    user: str
    role: str
    clusters: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _to_token_info(row: TokenRow) -> TokenInfo:
    return TokenInfo(
        id=row.id,
        user=row.user_name,
        role=row.role,
        clusters=tuple(json.loads(row.clusters)),
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


class TokenRepository(Database):
    """The tokens porter authenticates requests with."""

    @map_db_errors
    def create_token(self, user: str, role: str, clusters: Sequence[str] | None = None) -> str:
        """Create a bearer token and return its plaintext, the only time it is ever visible.

        Only the SHA-256 is stored: tokens are 256 random bits, so a plain hash is enough (no
        salt or slow hash needed) and lookup by hash needs no constant-time comparison.
        """
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        if not user:
            raise ValueError("a token needs a user name")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._write() as session:
            session.add(
                TokenRow(
                    user_name=user,
                    role=role,
                    clusters=json.dumps(sorted(set(clusters or ()))),
                    token_hash=_hash_token(token),
                    created_at=utcnow(),
                )
            )
        return token

    @map_db_errors
    def verify_token(self, token: str) -> Principal | None:
        """The principal of a valid, unrevoked token; None for anything else."""
        if not token.startswith(TOKEN_PREFIX):
            return None
        with self._read() as session:
            row = session.scalars(
                select(TokenRow).where(
                    TokenRow.token_hash == _hash_token(token), TokenRow.revoked_at.is_(None)
                )
            ).one_or_none()
            if row is None:
                return None
            return Principal(
                user=row.user_name, role=row.role, clusters=tuple(json.loads(row.clusters)), token_id=row.id
            )

    @map_db_errors
    def revoke_token(self, token: str) -> bool:
        """Revoke a token given its plaintext. False when it is unknown or already revoked."""
        return self._revoke(TokenRow.token_hash == _hash_token(token))

    @map_db_errors
    def revoke_token_id(self, token_id: int) -> bool:
        """Revoke a token by the id `list_tokens` shows. False when unknown or already revoked."""
        return self._revoke(TokenRow.id == token_id)

    def _revoke(self, condition: Any) -> bool:
        with self._write() as session:
            result = session.execute(
                update(TokenRow)
                .where(condition, TokenRow.revoked_at.is_(None))
                .values(revoked_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            return bool(getattr(result, "rowcount", 0))

    @map_db_errors
    def cluster_owners(self) -> dict[str, frozenset[str]]:
        """Per cluster, the users of the unrevoked agent tokens bound to it: the cluster's owners.

        An agent token's user names the person whose HPC account the submitter uses, so `tokens
        create --user alice --role agent --cluster mahti` makes alice the owner of mahti (porter's
        cluster access rules, docs/security.md). Revoking the token ends that ownership."""
        owners: dict[str, set[str]] = {}
        with self._read() as session:
            rows = session.execute(
                select(TokenRow.user_name, TokenRow.clusters).where(
                    TokenRow.role == "agent", TokenRow.revoked_at.is_(None)
                )
            )
            for user, clusters in rows:
                for cluster in json.loads(clusters):
                    owners.setdefault(cluster, set()).add(user)
        return {cluster: frozenset(users) for cluster, users in owners.items()}

    @map_db_errors
    def list_tokens(self, user: str | None = None) -> list[TokenInfo]:
        with self._read() as session:
            query = select(TokenRow).order_by(TokenRow.id)
            if user is not None:
                query = query.where(TokenRow.user_name == user)
            return [_to_token_info(row) for row in session.scalars(query)]
