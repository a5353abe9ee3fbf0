from __future__ import annotations

import itertools

import pytest

from cloudhpc.domain.states import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    JobState,
    can_transition,
    check_transition,
)
from cloudhpc.exceptions import InvalidTransition

S = JobState

LEGAL = {
    (S.PENDING, S.PREPARING),
    (S.PENDING, S.QUEUED),
    (S.PENDING, S.RUNNING),
    (S.PENDING, S.CANCELLED),
    (S.PENDING, S.FAILED),
    (S.PREPARING, S.QUEUED),
    (S.PREPARING, S.RUNNING),
    (S.QUEUED, S.RUNNING),
    *((a, b) for a in (S.PREPARING, S.QUEUED, S.RUNNING) for b in TERMINAL_STATES),
}


@pytest.mark.parametrize(("current", "target"), list(itertools.product(JobState, JobState)))
def test_transition_table(current: JobState, target: JobState) -> None:
    assert can_transition(current, target) == ((current, target) in LEGAL)


def test_terminal_states_are_final() -> None:
    for state in TERMINAL_STATES:
        assert state.terminal
        assert not any(can_transition(state, other) for other in JobState)


def test_active_and_terminal_partition_all_states() -> None:
    assert set(JobState) == ACTIVE_STATES | TERMINAL_STATES
    assert not ACTIVE_STATES & TERMINAL_STATES


def test_check_transition_names_both_states() -> None:
    with pytest.raises(InvalidTransition, match="'completed' to 'running'"):
        check_transition(S.COMPLETED, S.RUNNING)
    check_transition(S.QUEUED, S.RUNNING)


def test_state_values_are_the_api_contract() -> None:
    assert [s.value for s in JobState] == [
        "pending",
        "preparing",
        "queued",
        "running",
        "completed",
        "failed",
        "cancelled",
        "timeout",
    ]
