"""`--topology` for the benchmarks: run them across the multi-host topology (docs/testbed.md) with
its link latency, instead of on the single-host testbed.

What a bench measures from the user's side (the submitter and its SSH connection) runs on `laptop`,
whose paths to the login node's sshd and to porter go through the delaying relay; porter runs on
`cloud` as deploy/kustomize renders it and the submitter on `laptop` as compose runs it
(tests/shipped.py), SLURM jobs run on `c1`/`c2`. The console (this process, the root namespace)
submits, as a pipeline step on the cloud would.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.shipped import CLUSTER, Platform, scratch_space, shipped_laptop, shipped_platform
from tests.testbed import load_testbed
from tests.topology import Topology, load_topology

from cloudhpc.client import Client

ON_LAPTOP = "CLOUDHPC_BENCH_ON_LAPTOP"


def run_on_laptop(script: str, argv: Sequence[str]) -> None:
    """Re-run this bench inside the laptop's network namespace (its packets meet the relay's delay and
        the firewall) unless it already runs there; returns only in the laptop's process, and the
    console's process exits with its status."""
    if os.environ.get(ON_LAPTOP) == "1":
        return
    topology = load_topology()
    cmd = topology.laptop.argv(sys.executable, str(Path(script).resolve()), *argv)
    sys.exit(subprocess.run(cmd, env={**os.environ, ON_LAPTOP: "1"}, check=False).returncode)


@dataclass(frozen=True)
class ShippedDeployment:
    """The shipped platform as the benches use the single-host harness's `Deployment`."""

    topology: Topology
    platform: Platform
    cluster: str = CLUSTER

    @property
    def url(self) -> str:
        return self.platform.url

    @property
    def user_token(self) -> str:
        return self.platform.user_token

    def client(self) -> Client:
        return Client(self.platform.url, self.platform.user_token)


@contextmanager
def shipped(root: Path) -> Iterator[ShippedDeployment]:
    """porter on cloud and the compose submitter on laptop, running until the block ends."""
    topology = load_topology()
    for part in ("platform", "laptop"):
        (root / part).mkdir()
    with (
        scratch_space(),
        shipped_platform(topology, root / "platform") as platform,
        shipped_laptop(topology, load_testbed(), platform, root / "laptop"),
    ):
        yield ShippedDeployment(topology, platform)


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max, rounded for the JSON line."""
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }
