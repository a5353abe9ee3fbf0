"""Retries with backoff for calls to porter, through tenacity: one policy for the SDK (`client`), the
agent's HTTP channel (`submitter.channel`) and its object transfers (`submitter.porter_objects`).

Why a library: the three hand-written loops it replaces each had its own doubling, cap and jitter,
and none logged what it waited for. tenacity gives the exponential backoff with jitter (so agents
that lost porter together do not come back in step), the attempt cap, the log line before each
sleep, and the same policy for blocking and asyncio code.

What is retried is the caller's decision (`retry_on`): only calls that are safe to send twice
(GET, a POST carrying an Idempotency-Key, the agent's offset-keyed uploads), and only for errors
that say "not now" (no connection, 502/503/504), never an answer that says "no".

The SSH layer's retries (`hpc/ssh/session.py`, `commands.py`) stay its own: whether a command may
run again depends on whether its channel opened, which no generic policy knows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import tenacity

__all__ = ["NO_RETRY", "TRANSIENT_STATUSES", "RetryPolicy", "porter_unavailable"]

log = logging.getLogger(__name__)

TRANSIENT_STATUSES = frozenset({502, 503, 504})
"""Answers that mean "porter (or the proxy before it) cannot serve this now": a gateway without a
porter behind it, porter's store not answering (503), a proxy's timeout."""


@dataclass(frozen=True)
class RetryPolicy:
    """`attempts` tries in all (1: no retry), waiting `initial` seconds after the first failure and
    doubling up to `maximum`, each wait with up to `initial` seconds of random jitter added."""

    attempts: int = 5
    initial: float = 0.5
    maximum: float = 8.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts: at least 1 (the first try)")

    def _arguments(self, retry_on: Callable[[BaseException], bool], what: str) -> dict[str, Any]:
        def say_retrying(state: tenacity.RetryCallState) -> None:
            """One line before each wait: which call failed and why (the error names porter's URL,
            never a token)."""
            error = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            log.warning(
                "porter call %s failed (%s); retrying in %.1f s (attempt %d of %d)",
                what,
                error,
                wait,
                state.attempt_number + 1,
                self.attempts,
            )

        return {
            "stop": tenacity.stop_after_attempt(self.attempts),
            "wait": tenacity.wait_exponential(multiplier=self.initial, max=self.maximum)
            + tenacity.wait_random(0, self.initial),
            "retry": tenacity.retry_if_exception(retry_on),
            "before_sleep": say_retrying,
            "reraise": True,  # the last error itself, not tenacity's RetryError around it
        }

    def blocking(self, retry_on: Callable[[BaseException], bool], what: str) -> tenacity.Retrying:
        """For `for attempt in policy.blocking(...): with attempt: ...` in blocking code; `what`
        (`GET /api/v1/...`) names the call in the log line before each wait."""
        return tenacity.Retrying(**self._arguments(retry_on, what))

    def asynchronous(self, retry_on: Callable[[BaseException], bool], what: str) -> tenacity.AsyncRetrying:
        """For `async for attempt in policy.asynchronous(...): with attempt: ...` in asyncio code."""
        return tenacity.AsyncRetrying(**self._arguments(retry_on, what))


NO_RETRY = RetryPolicy(attempts=1)
"""For callers that do their own waiting (or tests that must see the first failure)."""


def porter_unavailable(exc: BaseException) -> bool:
    """For the agent's raw httpx calls, whose every request porter's agent protocol makes safe to
    repeat (reports carry sequence numbers, output goes by offset, artifacts by key): no
    connection, or a 5xx that the caller raised with `response.raise_for_status()`."""
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500
    return isinstance(exc, httpx.TransportError)
