"""What every SLURM command object shares.

Each command is a small frozen dataclass with a `name`, `argv()` (an argument list, never a shell
string: the connection quotes it once) and `parse(result)` (pure, so tests run on outputs recorded
from a real cluster). `SlurmBackend` runs any object of this shape.

Timestamps are requested as epoch seconds (`SLURM_TIME_FORMAT=%s`, honoured by squeue and sacct)
so that the cluster's local time zone never leaks into our tz-aware UTC datetimes.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

from cloudhpc.exceptions import SchedulerCommandError
from cloudhpc.hpc.backend import CommandResult

_EPOCH_TIMES = ("env", "SLURM_TIME_FORMAT=%s")
"""argv prefix making squeue and sacct print timestamps as epoch seconds (checked on 22.05)."""


_T_co = TypeVar("_T_co", covariant=True)


class _Command(Protocol[_T_co]):
    @property
    def name(self) -> str: ...

    def argv(self) -> list[str]: ...

    def parse(self, result: CommandResult) -> _T_co: ...


def _require_ok(
    result: CommandResult, message: str, error: type[SchedulerCommandError] = SchedulerCommandError
) -> None:
    """Raise `error(message)` with the command's evidence (argv, exit status, stderr) when it failed."""
    if not result.ok:
        raise error(message, argv=result.argv, exit_status=result.exit_status, stderr=result.stderr)
