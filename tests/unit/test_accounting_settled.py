"""The agent stores accounting only once SLURM's figures are final (recordings from the testbed)."""

from __future__ import annotations

import pytest

from cloudhpc.hpc.slurm import Sacct
from cloudhpc.submitter.agent import _accounting_settled
from tests.recordings import load_recording


@pytest.mark.parametrize(
    ("recording", "settled"),
    [
        ("sacct_just_ended", False),  # placeholders for ~1 s after the end: no MaxRSS on the batch step
        ("sacct_completed", True),
        ("sacct_failed", True),
        ("sacct_multistep", True),
    ],
)
def test_accounting_is_settled_only_with_final_figures(recording: str, settled: bool) -> None:
    rows = Sacct.parse(load_recording(recording))
    assert _accounting_settled([row.record for row in rows]) is settled


def test_no_rows_is_not_settled() -> None:
    assert not _accounting_settled([])
