"""Where a job's `after` stands: the SLURM ids to hand sbatch, or why it must wait, or why it
never can run.

A job waited for may not have reached SLURM yet (pending, being prepared): the dependent then stays
`pending` (porter does not offer it to the agent) until every job it waits for has a SLURM id or
has ended. A job that ended is judged here, from its state in the store, not by SLURM, which may
have forgotten it (MinJobAge): `on: ok` after a failure can never be met.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from sqlalchemy import select
from sqlalchemy.orm import Session

from cloudhpc.domain.arrays import DEPENDENCY_NEVER_SATISFIED, Dependency, DependencyOn, dependency_option
from cloudhpc.domain.jobs import Job
from cloudhpc.domain.states import JobState
from cloudhpc.store.models import JobRow

__all__ = ["DependencyPlan", "plan_dependencies", "with_dependency"]


@dataclass(frozen=True)
class DependencyPlan:
    option: str | None = None
    """sbatch's `--dependency` for the jobs still running or queued in SLURM; None: none left."""
    waiting: bool = False
    """Some job waited for has no SLURM id yet and has not ended."""
    never: str | None = None
    """Why the dependency can never be met (the job's reason), or None."""


def _met(dep: Dependency, state: JobState) -> bool:
    ended_well = state == JobState.COMPLETED
    return {DependencyOn.OK: ended_well, DependencyOn.ANY: True, DependencyOn.NOTOK: not ended_well}[dep.on]


def plan_dependencies(session: Session, job: Job) -> DependencyPlan:
    """The plan for `job.spec.after`, read in `session` (the caller's transaction)."""
    ids = [str(dep.job) for dep in job.spec.after]
    rows = {UUID(row.id): row for row in session.scalars(select(JobRow).where(JobRow.id.in_(ids)))}
    resolved: list[tuple[Dependency, str]] = []
    waiting = False
    for dep in job.spec.after:
        row = rows.get(dep.job)
        if row is None:  # deleted since: its outcome is unknown for good
            return DependencyPlan(never=f"{DEPENDENCY_NEVER_SATISFIED}: job {dep.job} no longer exists")
        state = JobState(row.state)
        if state.terminal:
            if not _met(dep, state):
                return DependencyPlan(
                    never=f"{DEPENDENCY_NEVER_SATISFIED}: job {dep.job} ended {state.value}, "
                    f"and this job was to run after it ended {dep.on.value}"
                )
            continue
        if row.slurm_job_id is None:
            waiting = True
        else:
            resolved.append((dep, row.slurm_job_id))
    return DependencyPlan(option=dependency_option(resolved), waiting=waiting)


def with_dependency(session: Session, job: Job) -> Job:
    """`job` with its `dependency` filled in while it has not reached SLURM (what it would be
    submitted with now); unchanged once submitted or ended, or without `after`."""
    if not job.spec.after or job.slurm_job_id is not None or job.state.terminal:
        return job
    return job.model_copy(update={"dependency": plan_dependencies(session, job).option})
