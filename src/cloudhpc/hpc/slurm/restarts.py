"""squeue's restart count: how many times SLURM ran a job again (requeue, preemption).

Not in the `%`-codes of the squeue that polls every job (`queue.py`), only in `--Format`; asked
separately, and only when the agent saw a job start over, so the poll's cost stays one squeue.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cloudhpc.hpc.backend import CommandResult
from cloudhpc.hpc.slurm.commands import _require_ok
from cloudhpc.hpc.slurm.ids import check_native_id
from cloudhpc.hpc.slurm.tables import parse_table

__all__ = ["SqueueRestarts"]


@dataclass(frozen=True)
class SqueueRestarts:
    """`squeue --Format=JobID,RestartCnt` for some jobs: {native id: restart count}."""

    jobs: Sequence[str]

    name = "squeue"

    def argv(self) -> list[str]:
        if not self.jobs:
            raise ValueError("squeue needs job ids: cloudhpc never lists the whole queue")
        return [
            "squeue",
            "--states=all",
            "--jobs=" + ",".join(check_native_id(j) for j in self.jobs),
            # `name:|`: no padding, `|` after the cell (the last one has nothing after it)
            "--Format=JobID:|,RestartCnt:",
        ]

    @staticmethod
    def parse(result: CommandResult) -> dict[str, int]:
        if not result.ok:
            if "Invalid job id specified" in result.stderr:
                return {}
            _require_ok(result, "squeue (restart counts) failed")
        rows = parse_table(result.stdout, expected=["JOBID", "RESTART_COUNT"])
        return {
            row["JOBID"].strip(): int(row["RESTART_COUNT"])
            for row in rows
            if row["RESTART_COUNT"].strip().isdigit()
        }
