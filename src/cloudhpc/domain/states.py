"""Job states and the only place where allowed transitions are defined.

States only move forward (pending -> preparing -> queued -> running -> terminal). An observer may
skip steps it never saw: a job that starts and ends between two polls goes straight from `queued`
to `completed`. Cancellation is possible from every non-terminal state. Terminal states are final,
which is what makes replayed or reordered reports harmless.
"""

from __future__ import annotations

from enum import StrEnum

from cloudhpc.exceptions import InvalidTransition

__all__ = [
    "ACTIVE_STATES",
    "TERMINAL_STATES",
    "JobState",
    "can_transition",
    "check_transition",
]


class JobState(StrEnum):
    PENDING = "pending"
    PREPARING = "preparing"
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES: frozenset[JobState] = frozenset(
    {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.TIMEOUT}
)
ACTIVE_STATES: frozenset[JobState] = frozenset(set(JobState) - TERMINAL_STATES)

_RANK = {
    JobState.PENDING: 0,
    JobState.PREPARING: 1,
    JobState.QUEUED: 2,
    JobState.RUNNING: 3,
}

# A job that no agent has touched cannot have run, so it can only be cancelled or fail (for
# example: its cluster was removed from the configuration). Every other end needs SLURM's word.
_FROM_PENDING_TERMINAL = frozenset({JobState.CANCELLED, JobState.FAILED})


def can_transition(current: JobState, target: JobState) -> bool:
    """True when `current -> target` is a legal move (a no-op move is not a transition)."""
    if current.terminal or current == target:
        return False
    if target.terminal:
        return current != JobState.PENDING or target in _FROM_PENDING_TERMINAL
    return _RANK[target] > _RANK[current]


def check_transition(current: JobState, target: JobState) -> None:
    """Raise `InvalidTransition` unless `current -> target` is legal."""
    if not can_transition(current, target):
        raise InvalidTransition(f"a job cannot go from {current.value!r} to {target.value!r}")
