"""`RetryPolicy.until`: a question asked again while its answer says "not yet", not only after an
error, each on its own explicit schedule (the agent's waits on slurmdbd, `submitter/agent.py`)."""

from __future__ import annotations

import logging

import pytest

from cloudhpc.exceptions import AccountingUnavailable
from cloudhpc.retries import RetryPolicy


class Answers:
    """A question whose answers (or errors) come in a given order; the last one repeats."""

    def __init__(self, *outcomes: str | Exception) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0

    async def __call__(self) -> str:
        outcome = self.outcomes[min(self.calls, len(self.outcomes) - 1)]
        self.calls += 1
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def _unavailable(exc: BaseException) -> bool:
    return isinstance(exc, AccountingUnavailable)


def _error(text: str) -> AccountingUnavailable:
    return AccountingUnavailable(text, argv=["sacct"], exit_status=1, stderr="")


POLICY = RetryPolicy(attempts=5, delays=(0.03, 0.02), not_yet_delays=(0.0, 0.01), level=logging.INFO)


async def until(policy: RetryPolicy, answers: Answers) -> str:
    return await policy.until(
        answers,
        lambda answer: answer == "final",
        retry_on=_unavailable,
        what="job 1: accounting",
        awaited="final records",
    )


async def test_an_answer_that_says_not_yet_is_asked_again_on_its_own_schedule(
    caplog: pytest.LogCaptureFixture,
) -> None:
    answers = Answers("placeholder", _error("slurmdbd down"), "running step", "final")
    with caplog.at_level(logging.INFO, logger="cloudhpc.retries"):
        assert await until(POLICY, answers) == "final"
    assert answers.calls == 4
    # the pause after the n-th attempt: a "not yet" answer's schedule, or an error's
    assert [r.args[2] for r in caplog.records if r.args] == [0.0, 0.02, 0.01]  # type: ignore[index]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "job 1: accounting: waiting for final records; asking again in 0.0 s (attempt 2 of 5)"
    assert lines[1].startswith("job 1: accounting failed (slurmdbd down")


async def test_the_last_answer_is_returned_when_the_attempts_are_spent() -> None:
    """The caller settles for it or not (the agent stores a job's records as they are)."""
    answers = Answers("placeholder", "running step")
    assert await until(RetryPolicy(attempts=3, delays=(0.0,)), answers) == "running step"
    assert answers.calls == 3


async def test_the_last_error_is_raised_when_the_attempts_are_spent() -> None:
    answers = Answers("placeholder", _error("slurmdbd down"))
    with pytest.raises(AccountingUnavailable, match="slurmdbd down"):
        await until(RetryPolicy(attempts=3, delays=(0.0,)), answers)
    assert answers.calls == 3


async def test_an_error_not_retried_is_raised_at_once() -> None:
    answers = Answers(ValueError("no"), "final")
    with pytest.raises(ValueError, match="no"):
        await until(POLICY, answers)
    assert answers.calls == 1


def test_an_explicit_schedule_repeats_its_last_pause() -> None:
    """The agent's accounting: 0.5 s six times after an answer not final yet, then 5 s; after an
    error 2, 4, 6, 8 and then 10 s (bench/accounting.py times the early asks)."""
    policy = RetryPolicy(attempts=13, delays=(2.0, 4.0, 6.0, 8.0, 10.0), not_yet_delays=(0.5,) * 6 + (5.0,))
    assert [policy.pause(n, failed=False) for n in range(1, 13)] == [0.5] * 6 + [5.0] * 6
    assert [policy.pause(n) for n in range(1, 13)] == [2.0, 4.0, 6.0, 8.0] + [10.0] * 8
    assert RetryPolicy().pause(1) is None  # the doubling, with jitter


def test_negative_pauses_are_refused() -> None:
    with pytest.raises(ValueError, match="delays"):
        RetryPolicy(delays=(-1.0,))
