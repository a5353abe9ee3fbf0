"""The submitter's `/metrics`: what the agent does to the clusters (SLURM commands, SSH reconnects).

These figures exist only in the agent's process, so they are ordinary in-memory counters served on
the submitter's own port (`submitter.listen`, 5556), also in `serve all`: porter's `/metrics` never
repeats them, so a Prometheus scraping both ports counts every command once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from cloudhpc.metrics.catalog import spec
from cloudhpc.metrics.refusals import RefusalCounter

__all__ = ["SLURM_COMMANDS", "AgentMetrics", "Reconnecting"]

disable_created_metrics()  # type: ignore[no-untyped-call]

SLURM_COMMANDS = frozenset(
    {"sbatch", "squeue", "sacct", "scancel", "seff", "scontrol", "sinfo", "srun", "sacctmgr", "sstat"}
)
"""Commands counted as SLURM commands; anything else run over SSH (an environment build, a
directory check) is not a slurmctld/slurmdbd RPC and would only blur the rate panels."""

COMMAND_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Reconnecting(Protocol):
    """What the reconnect counter reads: `hpc.ssh.SSHConnection` has it."""

    @property
    def reconnects(self) -> int: ...


class _Reconnects(Collector):
    def __init__(self, owner: AgentMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "cloudhpc_ssh_reconnects", spec("cloudhpc_ssh_reconnects_total").help, labels=["cluster"]
        )
        for cluster, conn in sorted(self._owner.connections.items()):
            family.add_metric([cluster], conn.reconnects)
        yield family


class AgentMetrics:
    """One per submitter process; `observe_command` is the `on_command` hook of `SSHConnection`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.connections: dict[str, Reconnecting] = {}
        self._commands = Counter(
            "cloudhpc_slurm_commands",
            spec("cloudhpc_slurm_commands_total").help,
            ["cluster", "command", "outcome"],
            registry=self.registry,
        )
        self._duration = Histogram(
            "cloudhpc_slurm_command_duration_seconds",
            spec("cloudhpc_slurm_command_duration_seconds").help,
            ["cluster", "command"],
            buckets=COMMAND_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_Reconnects(self))
        self._refusals = RefusalCounter(self.registry, "cloudhpc_mailbox_refused_snapshots_total")

    def observe_command(self, cluster: str, command: str, outcome: str, seconds: float) -> None:
        if command not in SLURM_COMMANDS:
            return
        self._commands.labels(cluster, command, outcome).inc()
        self._duration.labels(cluster, command).observe(seconds)

    def watch_connection(self, cluster: str, conn: Reconnecting) -> None:
        self.connections[cluster] = conn

    def mailbox_refusals(self, clusters: Iterable[str], reasons: Iterable[str]) -> Callable[[str, str], None]:
        """The `on_refused` of the S3 mailbox channels of `clusters` (call once per process)."""
        return self._refusals.for_clusters(clusters, reasons)

    def render(self) -> bytes:
        return generate_latest(self.registry)
