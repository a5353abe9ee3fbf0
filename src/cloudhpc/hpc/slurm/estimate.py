"""`sbatch --test-only`: when SLURM predicts a job would start on a partition, without submitting it.

The argv is the real submission's (`Sbatch.argv`, the one builder) with `--test-only` added and
the batch script read from stdin instead of the job directory, which does not exist yet: cloudhpc
puts every option on the command line, never in `#SBATCH` lines (`hpc/jobscript.py`), so a stub
script asks SLURM exactly what the submission will. sbatch answers on stderr, for example
(`tests/recordings/sbatch_test_only.txt`):

    sbatch: Job 14 to start at 1764956612 using 2 processors on nodes node1 in partition debug

with the time as epoch seconds (`SLURM_TIME_FORMAT=%s`, as for squeue and sacct), so the cluster's
time zone never leaks in.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from cloudhpc.domain.billing import PredictedStart
from cloudhpc.exceptions import ParseError
from cloudhpc.hpc.backend import CommandResult
from cloudhpc.hpc.slurm.commands import _EPOCH_TIMES, _require_ok
from cloudhpc.hpc.slurm.submit import _UNREACHABLE, Sbatch

__all__ = ["STUB_SCRIPT", "SbatchTestOnly", "parse_test_only"]

STUB_SCRIPT = "#!/bin/sh\ntrue\n"
"""What sbatch reads on stdin in place of the job's script: it holds no `#SBATCH` line, like the real one."""

_WILL_RUN = re.compile(
    r"Job (?P<id>[0-9]+) to start at (?P<start>\S+) using (?P<procs>[0-9]+) processors? "
    r"on nodes? (?P<nodes>\S+) in partition (?P<partition>\S+)"
)


def _start_time(text: str) -> datetime:
    if text.isdigit():
        return datetime.fromtimestamp(int(text), UTC)
    try:  # a site whose SLURM ignores SLURM_TIME_FORMAT here: ISO local time, read as UTC (TZ=UTC)
        return datetime.fromisoformat(text).replace(tzinfo=UTC)
    except ValueError as exc:
        raise ParseError(f"sbatch --test-only printed start time {text!r}; expected epoch seconds") from exc


def parse_test_only(result: CommandResult, partition: str | None) -> PredictedStart:
    """SLURM's prediction for `partition`, or its refusal as the prediction's `error` (a partition
    the job does not fit is an answer, not a failure); a controller that did not answer raises."""
    if not result.ok and _UNREACHABLE.search(result.stderr):
        _require_ok(result, "sbatch --test-only could not reach the SLURM controller")
    match = _WILL_RUN.search(result.stderr + "\n" + result.stdout)
    if not result.ok or match is None:
        lines = [ln.strip() for ln in result.stderr.splitlines() if ln.strip()]
        if result.ok:
            raise ParseError(
                f"sbatch --test-only printed {result.stderr!r}; expected `Job N to start at T using P "
                "processors on nodes X in partition Y`"
            )
        reason = lines[-1] if lines else f"sbatch --test-only exited {result.exit_status}"
        return PredictedStart(partition=partition, error=reason.removeprefix("sbatch: error: ")[:500])
    return PredictedStart(
        partition=match["partition"],
        start=_start_time(match["start"]),
        processors=int(match["procs"]),
        nodes=match["nodes"],
    )


@dataclass(frozen=True)
class SbatchTestOnly:
    """The submission `sbatch` of a job, asked with `--test-only` for one partition."""

    submission: Sbatch
    partition: str | None = None
    """The partition asked about (None: the job's own, or the cluster's default)."""

    name = "sbatch --test-only"
    stdin = STUB_SCRIPT

    def argv(self) -> list[str]:
        sbatch = self.submission
        if self.partition is not None:
            sbatch = dataclasses.replace(
                sbatch, resources=sbatch.resources.model_copy(update={"partition": self.partition})
            )
        real = sbatch.argv()
        if real[-1] != sbatch.paths.batch_script:  # the script argument is last: read from stdin instead
            raise ValueError(f"unexpected sbatch argv {real!r}: the script is not its last argument")
        return [*_EPOCH_TIMES, "TZ=UTC", real[0], "--test-only", *real[1:-1]]

    def parse(self, result: CommandResult) -> PredictedStart:
        return parse_test_only(result, self.partition)
