"""squeue: the state of many jobs in one call, while slurmctld still knows them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cloudhpc.domain.arrays import DEPENDENCY_NEVER_SATISFIED, TaskObservation
from cloudhpc.domain.jobs import Observation
from cloudhpc.domain.states import JobState
from cloudhpc.hpc.backend import CommandResult
from cloudhpc.hpc.slurm.commands import _EPOCH_TIMES, _require_ok
from cloudhpc.hpc.slurm.ids import check_native_id
from cloudhpc.hpc.slurm.states import map_state, normalize_state
from cloudhpc.hpc.slurm.tables import parse_table
from cloudhpc.hpc.slurm.values import _empty, parse_timestamp

__all__ = ["SQUEUE_FIELDS", "Squeue", "SqueueRow"]


SQUEUE_FIELDS: tuple[tuple[str, str], ...] = (
    ("JOBID", "%i"),
    ("NAME", "%j"),
    ("STATE", "%T"),
    ("REASON", "%r"),
    ("SUBMIT_TIME", "%V"),
    ("START_TIME", "%S"),
    ("END_TIME", "%e"),
    ("COMMENT", "%k"),
)
"""(header squeue prints, format code). Comment is last: free text may hold the delimiter."""


@dataclass(frozen=True)
class SqueueRow:
    job_id: str
    name: str
    native_state: str
    reason: str | None
    submitted_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None
    comment: str | None

    def observation(self) -> Observation | None:
        """What this row says, or None when the state is unknown to us. squeue prints estimates for
        the start of pending jobs and the end of running ones: only facts are kept."""
        state = map_state(self.native_state)
        if state is None:
            return None
        return Observation(
            state=state,
            native_state=self.native_state,
            reason=self._reason(state),
            submitted_at=self.submitted_at,
            started_at=self.started_at if state not in (JobState.QUEUED,) else None,
            ended_at=self.ended_at if state.terminal else None,
        )

    def _reason(self, state: JobState) -> str | None:
        """The failure's SLURM state, or the one pending reason cloudhpc acts on: a dependency that
        can never be met (the agent then ends the job instead of leaving it queued forever)."""
        if state == JobState.FAILED:
            return self.native_state
        if state == JobState.QUEUED and self.reason == DEPENDENCY_NEVER_SATISFIED:
            return DEPENDENCY_NEVER_SATISFIED
        return None

    def task_observation(self, index: int) -> TaskObservation | None:
        """Task `index` of an array as this row shows it (a pending row stands for many tasks)."""
        observation = self.observation()
        if observation is None:
            return None
        return TaskObservation(
            index=index,
            state=observation.state,
            native_state=self.native_state,
            reason=observation.reason or self.reason,
            started_at=observation.started_at,
            ended_at=observation.ended_at,
        )


@dataclass(frozen=True)
class Squeue:
    """One squeue call for many jobs (explicit `--jobs` list) or for one derived job name."""

    jobs: Sequence[str] = ()
    job_name: str | None = None

    name = "squeue"

    def argv(self) -> list[str]:
        argv = [*_EPOCH_TIMES, "squeue", "--states=all"]
        if self.jobs:
            argv.append("--jobs=" + ",".join(check_native_id(j) for j in self.jobs))
        if self.job_name is not None:
            argv.append(f"--name={self.job_name}")
        if not self.jobs and self.job_name is None:
            raise ValueError("squeue needs job ids or a job name: cloudhpc never lists the whole queue")
        argv.append("--format=" + "|".join(code for _, code in SQUEUE_FIELDS))
        return argv

    @staticmethod
    def parse(result: CommandResult) -> list[SqueueRow]:
        if not result.ok:
            # 22.05 answers a single unknown id with an error instead of an empty table.
            if "Invalid job id specified" in result.stderr:
                return []
            _require_ok(result, "squeue failed")
        rows = parse_table(result.stdout, expected=[header for header, _ in SQUEUE_FIELDS])
        return [
            SqueueRow(
                job_id=row["JOBID"],
                name=row["NAME"],
                native_state=normalize_state(row["STATE"]),
                reason=None if _empty(row["REASON"]) else row["REASON"],
                submitted_at=parse_timestamp(row["SUBMIT_TIME"]),
                started_at=parse_timestamp(row["START_TIME"]),
                ended_at=parse_timestamp(row["END_TIME"]),
                comment=None if _empty(row["COMMENT"]) else row["COMMENT"],
            )
            for row in rows
        ]
