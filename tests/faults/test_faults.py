"""The short seeded fault run of `make test` (issue 12, item 7; docs/reliability.md).

30 jobs through porter on the topology (plain batch jobs, arrays of five tasks, and one Ray job whose
dashboard is exposed through a bridge) while each fault kind strikes once, at points the seed
chooses, the bridge job's tunnel dropped among them; then every job (every task of an array) must be
in SLURM exactly once, in the state SLURM gives, with its exact output, its accounting and its
artifacts, the bridge answering again after its tunnel was dropped, and no bridge port held.
`make faults` runs the long one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.driver import FAULT_KINDS, run
from tests.topology import Topology

SEED = 12
JOBS = 30


@pytest.mark.timeout(600)
def test_a_seeded_run_with_every_fault_loses_and_duplicates_nothing(
    topology: Topology, tmp_path: Path
) -> None:
    report = run(SEED, JOBS, per_kind=1, down_for=8, partition_for=5, bridges=1, root=tmp_path, timeout=540)
    print(report.table())
    assert sorted(kind for _, kind in report.injected) == sorted(FAULT_KINDS)
    assert [d.back_after is not None for d in report.drops] == [True], report.drops
    assert sum(o.planned.is_array for o in report.outcomes) >= 3
    assert report.problems == [], report.table()
