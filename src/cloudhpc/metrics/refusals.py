"""The S3 mailbox's refusal counters, one on each side: porter counts the agent's objects it
refused (`cloudhpc_mailbox_refused_objects_total`), the agent counts porter's snapshots
(`cloudhpc_mailbox_refused_snapshots_total`).

Every (cluster, reason) series exists from the start at 0, so that `increase()` and an alert on
it see the first refusal, rather than a series that appears already at 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter

from cloudhpc.metrics.catalog import spec

__all__ = ["RefusalCounter"]


class RefusalCounter:
    """`metric` (a catalog name) in `registry`; `for_clusters` gives what the mailbox calls with
    (cluster, reason) for each refused object."""

    def __init__(self, registry: CollectorRegistry, metric: str) -> None:
        self._counter = Counter(
            metric.removesuffix("_total"), spec(metric).help, ["cluster", "reason"], registry=registry
        )

    def for_clusters(self, clusters: Iterable[str], reasons: Iterable[str]) -> Callable[[str, str], None]:
        reasons = tuple(reasons)
        for cluster in clusters:
            for reason in reasons:
                self._counter.labels(cluster, reason)
        return lambda cluster, reason: self._counter.labels(cluster, reason).inc()
