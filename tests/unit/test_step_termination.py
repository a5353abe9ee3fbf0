"""SIGTERM and `run_job` inside `stop_job_on_sigterm()`: the rules the testbed test cannot time.

The signal is sent to this process at chosen moments by a stand-in for the SDK client (porter is
not needed for these rules; `tests/e2e/test_step_sigterm.py` runs the real component against porter
and SLURM): half-way through the submit request, which must complete so that the job it created is
the one cancelled; and while the step waits for the job, which must stop the wait at once.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cloudhpc.domain.jobs import Job, JobSpec
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import StepTerminated
from cloudhpc.pipelines.runner import run_job, stop_job_on_sigterm
from tests.jobs import job_from

SPEC = JobSpec(name="long", cluster="c", script="sleep 600")


def sigterm_to_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


class Porter:
    """Answers like porter's SDK client; `on_submit`/`on_wait` run inside those calls."""

    def __init__(
        self, on_submit: Callable[[], None] = lambda: None, on_wait: Callable[[], None] = lambda: None
    ):
        self.job = job_from(SPEC)
        self.on_submit = on_submit
        self.on_wait = on_wait
        self.calls: list[str] = []

    def submit(self, spec: Any, *, idempotency_key: str | None = None) -> Job:
        self.on_submit()
        time.sleep(0.05)  # the answer is still on its way when the signal arrives
        self.calls.append("submit")
        return self.job

    def follow_logs(self, job: Any) -> Iterator[bytes]:
        return iter(())

    def wait(self, job: Any, *, timeout: float | None = None, **_: Any) -> Job:
        self.calls.append("wait")
        if self.job.state.terminal:
            return self.job
        self.on_wait()
        time.sleep(5)  # porter's long poll; the signal must cut it short
        self.calls.append("waited in full")
        return self.job

    def cancel(self, job: Any) -> Job:
        self.calls.append("cancel")
        self.job = self.job.model_copy(update={"state": JobState.CANCELLED, "cancel_requested": True})
        return self.job


def run(porter: Porter) -> list[str]:
    said: list[str] = []
    with stop_job_on_sigterm(), pytest.raises(StepTerminated):
        run_job(porter, SPEC, say=said.append, idempotency_key="kfp-run-task")  # type: ignore[arg-type]
    return said


def test_sigterm_during_the_submit_waits_for_its_answer_then_cancels_that_job() -> None:
    porter = Porter(on_submit=sigterm_to_self)
    said = run(porter)
    assert porter.calls[:2] == ["submit", "cancel"]
    assert "waited in full" not in porter.calls
    assert any("the step was terminated; cancel requested" in line for line in said), said
    assert any("cancelled" in line for line in said[-2:]), said


def test_sigterm_while_following_cancels_at_once() -> None:
    porter = Porter(on_wait=sigterm_to_self)
    started = time.monotonic()
    run(porter)
    assert time.monotonic() - started < 2
    assert porter.calls[:3] == ["submit", "wait", "cancel"]


def test_the_handler_is_put_back_after_the_block() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with stop_job_on_sigterm():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
