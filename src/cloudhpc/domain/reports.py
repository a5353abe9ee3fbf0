"""What an agent tells porter about a job: the observed half of the job record.

The submitter is the single writer of these facts (ARCHITECTURE §2). Reports can arrive late,
twice, or out of order (retries, the S3 mailbox, an agent restart), so each carries a sequence
number and porter applies a report only when its number is higher than the last one applied.
The agent must keep `seq` increasing across its own restarts (for example by deriving it from
the wall clock), since it keeps no state of its own.
"""

from __future__ import annotations

from uuid import UUID

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from cloudhpc.domain.arrays import MAX_ARRAY_TASKS, TaskObservation
from cloudhpc.domain.jobs import Job
from cloudhpc.domain.states import JobState

__all__ = ["JobReport", "Reconciliation"]


class JobReport(BaseModel):
    """One observation of one job. A field left `None` means "not known", never "clear it"."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: UUID
    seq: int = Field(ge=1, le=2**63 - 1, description="strictly increasing per job; stale reports are ignored")
    state: JobState
    # stored as text: NUL (which PostgreSQL refuses) is bad input, not a store failure
    slurm_job_id: str | None = Field(default=None, max_length=64, pattern=r"^[^\x00]*$")
    reason: str | None = Field(default=None, max_length=4096, pattern=r"^[^\x00]*$")
    exit_code: int | None = Field(default=None, ge=-(2**31), le=2**31 - 1)
    submitted_at: AwareDatetime | None = None
    started_at: AwareDatetime | None = None
    ended_at: AwareDatetime | None = None
    restarts: int | None = Field(
        default=None, ge=0, le=2**31 - 1, description="SLURM's restart count (requeues); never lowered"
    )
    tasks: list[TaskObservation] | None = Field(
        default=None, max_length=MAX_ARRAY_TASKS, description="an array's tasks (replace the stored ones)"
    )
    cancelled_tasks: list[int] | None = Field(
        default=None, max_length=MAX_ARRAY_TASKS, description="array tasks the agent has scancelled"
    )


class Reconciliation(BaseModel):
    """What a (re)started agent rebuilds its view from, as porter sees the cluster.

    `unaccounted` closes the one window a crash could otherwise leave open: a job whose end was
    reported but whose accounting had not reached porter yet when the agent stopped. `seq_floor`
    is the highest report number porter has applied for the cluster, so an agent on a machine
    whose clock is behind the previous agent's still sends reports porter will apply.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    jobs: list[Job] = Field(description="every non-terminal job of the cluster")
    unaccounted: list[Job] = Field(
        default_factory=list, description="jobs that ended recently in SLURM and have no accounting yet"
    )
    seq_floor: int = Field(
        default=0, ge=0, description="the highest report seq porter applied for the cluster"
    )
