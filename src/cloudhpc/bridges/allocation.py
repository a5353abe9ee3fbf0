"""What porter allocates for a new job: one port on the bridge VM per exposed port.

The allocation itself is a store transaction (`Store.create_job(bridges=...)`), so that a job and its
ports are created together and a port held by a live job is never handed out again. This module only
turns a job spec and the `porter.bridge` settings into that request.
"""

from __future__ import annotations

from cloudhpc.config import BridgeConfig
from cloudhpc.domain.bridges import BridgePlan, PlannedBridge
from cloudhpc.domain.jobs import JobSpec
from cloudhpc.exceptions import BridgesNotConfigured

__all__ = ["HTTP_PORTS", "URL_SCHEMES", "plan_bridges"]

URL_SCHEMES = {"dashboard": "http", "metrics": "http", "client": "ray"}
"""How a client addresses each well-known Ray port; other names get a bare `host:port`."""
HTTP_PORTS = frozenset({"dashboard", "metrics"})
"""Bridges whose far end speaks HTTP: porter's probe asks for a page, not only a connection."""


def plan_bridges(spec: JobSpec, config: BridgeConfig | None) -> BridgePlan | None:
    """The bridge ports a job needs, or None when it needs none; `BridgesNotConfigured` when it
    needs some and this porter has no bridge VM."""
    if spec.ray is None or not (spec.ray.expose or spec.ray.import_):
        return None
    if config is None:
        field = "ray.expose" if spec.ray.expose else "ray.import"
        raise BridgesNotConfigured(
            f"{field}: ray.expose and ray.import need a bridge VM, and this porter has none configured "
            "(porter.bridge; see docs/bridge-vm.md)"
        )
    exposed = tuple(PlannedBridge(e.name, e.port, URL_SCHEMES.get(e.name)) for e in spec.ray.expose)
    return BridgePlan(host=config.public_host, port_range=config.port_range, exposed=exposed)
