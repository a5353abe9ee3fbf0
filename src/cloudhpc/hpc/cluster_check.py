"""Can this machine reach each configured cluster and talk to its scheduler? (`cloudhpc clusters check`)

One SSH connection per cluster, opened and closed again, and a harmless `sinfo --version`: the same
path the agent takes, so a failure here names what the agent would trip on (host key, key file,
prelude). Each result is `{"cluster", "ok", "detail"}`, printed by the CLI as a line or as JSON.
"""

from __future__ import annotations

import time
from typing import Any

from cloudhpc.config import Settings
from cloudhpc.exceptions import CloudHPCError
from cloudhpc.hpc.ssh import SSHConnection

__all__ = ["check_clusters"]


async def check_clusters(settings: Settings, only: str | None = None) -> list[dict[str, Any]]:
    """One result per configured cluster (or only `only`); never raises for a cluster that fails."""
    results: list[dict[str, Any]] = []
    for name, cluster in settings.clusters.items():
        if only is not None and name != only:
            continue
        if cluster.backend == "local" or cluster.ssh is None:
            results.append(
                {"cluster": name, "ok": True, "detail": "local backend (runs jobs on this machine)"}
            )
            continue
        started = time.perf_counter()
        conn = SSHConnection(cluster.ssh, cluster=name)
        try:
            result = await conn.run(["sinfo", "--version"], prelude=cluster.prelude, idempotent=True)
            elapsed = time.perf_counter() - started
            if result.ok:
                detail = (
                    f"{result.stdout.strip()} via {cluster.ssh.user}@{cluster.ssh.host} in {elapsed:.2f}s"
                )
                results.append({"cluster": name, "ok": True, "detail": detail})
            else:
                detail = (
                    f"sinfo failed ({result.exit_status}): {result.stderr.strip()[:200]}; check `prelude`"
                )
                results.append({"cluster": name, "ok": False, "detail": detail})
        except CloudHPCError as exc:
            results.append({"cluster": name, "ok": False, "detail": f"{type(exc).__name__}: {exc}"})
        finally:
            await conn.close()
    if only is not None and not results:
        results.append({"cluster": only, "ok": False, "detail": "not in the configuration"})
    return results
