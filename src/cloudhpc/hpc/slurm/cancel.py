"""scancel: cancelling a job, where "it had already ended" counts as done."""

from __future__ import annotations

import re
from dataclasses import dataclass

from cloudhpc.hpc.backend import CommandResult
from cloudhpc.hpc.slurm.commands import _require_ok
from cloudhpc.hpc.slurm.ids import check_native_id

__all__ = ["Scancel"]

# scancel on a job that already ended (22.05 says nothing and exits 0, older/newer versions complain).
_ALREADY_GONE = re.compile(r"already completing or completed|Invalid job id specified|Job/step already", re.I)


@dataclass(frozen=True)
class Scancel:
    native_id: str

    name = "scancel"

    def argv(self) -> list[str]:
        return ["scancel", check_native_id(self.native_id)]

    @staticmethod
    def parse(result: CommandResult) -> None:
        if result.ok or _ALREADY_GONE.search(result.stderr):
            return
        _require_ok(result, "scancel failed")
