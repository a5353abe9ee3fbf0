"""What a new job asks of the bridge VM: one port per port the job exposes.

`bridges/allocation.py` builds a `BridgePlan` from a job spec and porter's `porter.bridge` settings;
the store allocates it in the job's own transaction. The spec's side of the same idea is
`domain.jobs.ExposedPort` (a port the user names); a `PlannedBridge` is what porter makes of it
(the name, the job's port, and how a client addresses the bridge).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BridgePlan", "PlannedBridge"]


@dataclass(frozen=True)
class PlannedBridge:
    """One bridge to allocate: the job's port `remote_port` under `name`; `scheme` makes its URL."""

    name: str
    remote_port: int
    scheme: str | None = None

    def url(self, host: str, port: int) -> str:
        """How a client reaches the bridge once it holds `port` on `host`: `scheme://host:port`, or a
        bare `host:port` for a port without a scheme; an IPv6 host goes in brackets."""
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return f"{self.scheme}://{address}" if self.scheme else address


@dataclass(frozen=True)
class BridgePlan:
    """The bridge ports a new job needs on one bridge VM, from porter's `porter.bridge` settings."""

    host: str
    port_range: tuple[int, int]
    exposed: tuple[PlannedBridge, ...]
