"""Who may use which cluster.

A cluster is one HPC identity: every job on it runs under the account whose key its submitter holds,
in that account's files. So a cluster is used only by its owners (the users of the agent tokens bound
to it: `cloudhpc tokens create --user alice --role agent --cluster mahti`), by the users and groups
listed in `porter.access.clusters.<name>`, and by admins. Anyone else is told the cluster does not
exist (404, like a job that is not theirs), in `GET /clusters` and in `POST /jobs`.
"""

from __future__ import annotations

from collections.abc import Mapping

from cloudhpc.config import AccessConfig
from cloudhpc.exceptions import HttpProblem
from cloudhpc.porter.state import PorterState
from cloudhpc.store import Principal

__all__ = ["EVERYONE", "may_use", "require_cluster", "usable_clusters"]

EVERYONE = "*"
"""In `porter.access.clusters.<name>.users`: every user of porter may use the cluster."""


def may_use(
    principal: Principal, cluster: str, owners: Mapping[str, frozenset[str]], access: AccessConfig
) -> bool:
    """True when `principal` may see and submit to `cluster`."""
    if principal.role == "admin" or principal.user in owners.get(cluster, frozenset()):
        return True
    rule = access.clusters.get(cluster)
    if rule is None:
        return False
    if EVERYONE in rule.users or principal.user in rule.users:
        return True
    return any(principal.user in access.groups.get(group, []) for group in rule.groups)


async def usable_clusters(state: PorterState, principal: Principal, names: list[str]) -> list[str]:
    """The clusters of `names` that `principal` may use, in order."""
    owners = await state.store.cluster_owners()
    return [n for n in names if may_use(principal, n, owners, state.settings.porter.access)]


async def require_cluster(state: PorterState, principal: Principal, cluster: str) -> None:
    """404 naming `cluster` when it is unknown or not the principal's to use: the two answers are the
    same on purpose, so cluster names cannot be probed.

    A configured cluster that the principal may use without its owners (an admin, or the
    `porter.access` rules allow it) needs nothing from the store: every `POST /jobs` asks, and the
    two reads (agents seen, clusters' owners) were two worker-thread hops and round trips each
    (#12: POST on PostgreSQL). Owners only ever add to who may use a cluster, so the answer is the
    one the full check below gives; everything else, and every 404 with its list, takes that."""
    if cluster in state.settings.clusters and may_use(principal, cluster, {}, state.settings.porter.access):
        return
    known = await state.known_clusters()
    usable = await usable_clusters(state, principal, known)
    if cluster not in usable:
        raise HttpProblem(
            404,
            "not_found",
            f"cluster {cluster!r}: no such cluster, or not one you may use; yours: {', '.join(usable) or 'none'}",
            [{"field": "cluster", "message": "no such cluster, or not one you may use"}],
        )
