"""Retries with backoff, through tenacity: one policy for the calls to porter (the SDK `client`, the
agent's HTTP channel `submitter.channel` and its object transfers `submitter.porter_objects`) and
for the agent's waits on the scheduler's accounting (`submitter.agent`: a job's final records, the
record of a run that ended before a requeue).

Why a library: the hand-written loops it replaces each had its own doubling, cap and jitter, and
none logged what it waited for. tenacity gives the exponential backoff with jitter (so agents that
lost porter together do not come back in step), the attempt cap, the log line before each sleep,
and the same policy for blocking and asyncio code.

What is retried is the caller's decision (`retry_on`): only calls that are safe to send twice
(GET, a POST carrying an Idempotency-Key, the agent's offset-keyed uploads, sacct), and only for
errors that say "not now" (no connection, 502/503/504), never an answer that says "no". An answer
can say "not yet" too (sacct before slurmdbd settled a job's records): `RetryPolicy.until` asks
again until the answer is the awaited one, on its own schedule where "not yet" and "failed" call
for different pauses (`delays`, `not_yet_delays`).

The SSH layer's retries (`hpc/ssh/session.py`, `commands.py`) stay its own: whether a command may
run again depends on whether its channel opened, which no generic policy knows.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import tenacity

__all__ = ["NO_RETRY", "TRANSIENT_STATUSES", "RetryPolicy", "porter_unavailable"]

log = logging.getLogger(__name__)

TRANSIENT_STATUSES = frozenset({502, 503, 504})
"""Answers that mean "porter (or the proxy before it) cannot serve this now": a gateway without a
porter behind it, porter's store not answering (503), a proxy's timeout."""

_T = TypeVar("_T")


@dataclass(frozen=True)
class RetryPolicy:
    """`attempts` tries in all (1: no retry), waiting `initial` seconds after the first failure and
    doubling up to `maximum`, each wait with up to `initial` seconds of random jitter added; or,
    where the caller's timing is measured and must not drift, the explicit pauses of `delays`."""

    attempts: int = 5
    initial: float = 0.5
    maximum: float = 8.0
    delays: tuple[float, ...] = ()
    """Explicit pauses instead of the doubling: after the n-th failed attempt `delays[n-1]`, the
    last one again for the attempts beyond, no jitter. Empty: the doubling."""
    not_yet_delays: tuple[float, ...] = ()
    """The pauses (as `delays`) after an answer that is not yet the awaited one (`until`), where
    they differ from those after an error: slurmdbd settles a job's records within a second, so
    they are asked for again at once, while a failing sacct is given longer. Empty: as after an
    error."""
    level: int = logging.WARNING
    """How loud the line before each pause is: a porter call failing is a warning; waiting for
    accounting records to settle is the ordinary course of a job's end (INFO)."""

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts: at least 1 (the first try)")
        if any(delay < 0 for delay in (*self.delays, *self.not_yet_delays)):
            raise ValueError("RetryPolicy.delays, not_yet_delays: pauses of 0 s or more")

    def pause(self, attempt: int, *, failed: bool = True) -> float | None:
        """The explicit pause after attempt number `attempt` (1 for the first) that failed or
        answered "not yet" (`failed` False), or None where the doubling decides."""
        schedule = self.delays if failed or not self.not_yet_delays else self.not_yet_delays
        return schedule[min(attempt, len(schedule)) - 1] if schedule else None

    def _wait(self) -> Callable[[tenacity.RetryCallState], float]:
        doubling = tenacity.wait_exponential(
            multiplier=self.initial, max=self.maximum
        ) + tenacity.wait_random(0, self.initial)

        def wait(state: tenacity.RetryCallState) -> float:
            failed = state.outcome is None or state.outcome.failed
            explicit = self.pause(state.attempt_number, failed=failed)
            return doubling(state) if explicit is None else explicit

        return wait

    def _arguments(
        self, retry_on: Callable[[BaseException], bool], what: str, awaited: str | None = None
    ) -> dict[str, Any]:
        def say_retrying(state: tenacity.RetryCallState) -> None:
            """One line before each pause: which call failed and why (the error names porter's URL
            or the scheduler command, never a token), or what its answer does not show yet."""
            outcome = state.outcome
            wait = state.next_action.sleep if state.next_action else 0.0
            if outcome is not None and not outcome.failed:
                log.log(
                    self.level,
                    "%s: waiting for %s; asking again in %.1f s (attempt %d of %d)",
                    what,
                    awaited,
                    wait,
                    state.attempt_number + 1,
                    self.attempts,
                )
                return
            log.log(
                self.level,
                "%s failed (%s); retrying in %.1f s (attempt %d of %d)",
                what,
                outcome.exception() if outcome is not None else None,
                wait,
                state.attempt_number + 1,
                self.attempts,
            )

        return {
            "stop": tenacity.stop_after_attempt(self.attempts),
            "wait": self._wait(),
            "retry": tenacity.retry_if_exception(retry_on),
            "before_sleep": say_retrying,
            "reraise": True,  # the last error itself, not tenacity's RetryError around it
        }

    def blocking(self, retry_on: Callable[[BaseException], bool], what: str) -> tenacity.Retrying:
        """For `for attempt in policy.blocking(...): with attempt: ...` in blocking code; `what`
        (`GET /api/v1/...`) names the porter call in the log line before each wait."""
        return tenacity.Retrying(**self._arguments(retry_on, f"porter call {what}"))

    def asynchronous(self, retry_on: Callable[[BaseException], bool], what: str) -> tenacity.AsyncRetrying:
        """For `async for attempt in policy.asynchronous(...): with attempt: ...` in asyncio code."""
        return tenacity.AsyncRetrying(**self._arguments(retry_on, f"porter call {what}"))

    async def until(
        self,
        call: Callable[[], Awaitable[_T]],
        done: Callable[[_T], bool],
        *,
        retry_on: Callable[[BaseException], bool],
        what: str,
        awaited: str,
    ) -> _T:
        """`await call()` until its answer is `done`, and again after an error that `retry_on`
        accepts: for a question whose answer can say "not yet" (the scheduler's accounting lags
        the job). The line before each pause names `what` was asked and, for an answer, what is
        `awaited` and why. When the attempts are spent: the last answer, done or not (the caller
        decides whether to settle for it), or the last error, raised."""
        arguments = self._arguments(retry_on, what, awaited)
        arguments["retry"] = arguments["retry"] | tenacity.retry_if_result(lambda answer: not done(answer))
        # the last outcome itself: its answer, or its error raised by `result()`
        arguments["retry_error_callback"] = lambda state: state.outcome.result()
        answer: _T = await tenacity.AsyncRetrying(**arguments)(call)
        return answer


NO_RETRY = RetryPolicy(attempts=1)
"""For callers that do their own waiting (or tests that must see the first failure)."""


def porter_unavailable(exc: BaseException) -> bool:
    """For the agent's raw httpx calls, whose every request porter's agent protocol makes safe to
    repeat (reports carry sequence numbers, output goes by offset, artifacts by key): no
    connection, or a 5xx that the caller raised with `response.raise_for_status()`."""
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500
    return isinstance(exc, httpx.TransportError)
