"""The one-host testbed's `FirstJobId` (scripts/testbed-lib.sh `first_job_id`): chosen from the clock
once for a fresh slurmctld state directory and kept in it, so a warm `up` writes the same slurm.conf
(SLURM is not restarted) and a fresh controller does not hand out the ids earlier runs' records in
the shared accounting database already have."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

LIB = Path(__file__).resolve().parents[2] / "scripts" / "testbed-lib.sh"
MAX_JOB_ID = 67043328
"""SLURM's default MaxJobId."""


def first_job_id(state: Path) -> int:
    proc = subprocess.run(
        ["bash", "-c", 'TB_NAME=unit; source "$1"; first_job_id "$2"', "first_job_id", str(LIB), str(state)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(proc.stdout)


def test_chosen_once_from_the_clock_and_kept(tmp_path: Path) -> None:
    before = int(time.time())
    chosen = first_job_id(tmp_path)
    after = int(time.time())
    assert chosen in {t % 66_000_000 + 1000 for t in range(before, after + 1)}
    assert 1000 <= chosen < MAX_JOB_ID - 1_000_000  # room for a run's ids below MaxJobId
    assert (tmp_path / "cloudhpc-first-job-id").read_text().strip() == str(chosen)
    time.sleep(1.1)
    assert first_job_id(tmp_path) == chosen  # a warm `up`: the same slurm.conf


def test_a_wiped_state_gets_a_later_one(tmp_path: Path) -> None:
    first = first_job_id(tmp_path)
    (tmp_path / "cloudhpc-first-job-id").unlink()  # what `purge` or a cluster rename does to the state
    time.sleep(1.1)
    assert first_job_id(tmp_path) != first


def test_a_damaged_file_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "cloudhpc-first-job-id").write_text("not a number\n")
    assert 1000 <= first_job_id(tmp_path) < MAX_JOB_ID
