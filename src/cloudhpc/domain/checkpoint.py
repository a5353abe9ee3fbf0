"""Checkpoint and requeue: a job asks to be warned before its time limit and run again.

Pure: the spec's syntax and the rules; the sbatch flags are built in `hpc/slurm/submit.py` and the
wrapper's trap in `hpc/jobscript.py`. SLURM sends the warning signal `warn_before` seconds before the
time limit (`--signal=B:<SIG>@<secs>`, to the batch shell, which forwards it to the user's program);
the job is marked requeueable (`--requeue`) and its output opened for appending (`--open-mode=append`)
so that every run adds to the one log the agent collects by offset.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from cloudhpc.domain.signals import SIGNALS, UNTRAPPABLE

__all__ = [
    "CHECKPOINT_DIR",
    "MAX_RESTARTS",
    "MAX_WARN_SECONDS",
    "PREEMPTED",
    "REQUEUED",
    "TIME_LIMIT_WARNING",
    "CheckpointSpec",
    "parse_seconds",
    "requeue_cause",
    "requeue_reason",
    "restarts_exceeded",
]

CHECKPOINT_DIR = "checkpoints"
"""Job-relative directory given to the job as `CLOUDHPC_CHECKPOINT_DIR`: inside the job directory,
which a requeue keeps (it is the same SLURM job, and cloudhpc deletes nothing of it between runs)."""

MAX_RESTARTS = 100
"""Most runs after the first one a job may ask for."""
MAX_WARN_SECONDS = 65535
"""SLURM's limit for the seconds of `--signal=...@<secs>` (a 16-bit field)."""

REQUEUED = "Requeued"
"""The first word of a job's `reason` while SLURM runs it again (a restart): the state stays
`running` (states only move forward), the reason and `restarts` say what happened."""

PREEMPTED = "Preempted"
"""What ended the run before a restart, where accounting says so: the run ended `PREEMPTED` (SLURM
requeued it at the end of its preemption's grace time)..."""
TIME_LIMIT_WARNING = "Time limit warning"
"""...or a `checkpoint` job's run ended `REQUEUED` (its wrapper's `scontrol requeue`) when its time
limit was near enough for the warning to have been sent (`requeue_cause`)."""

SIGNAL_CHECK_SECONDS = 30
"""SLURM checks time limits about every 30 s and sends `--signal` once `warn_before` plus this or
less is left: a time-limit warning never comes earlier into a run."""

_DURATION = re.compile(r"^(?:(?P<m>[0-9]{1,4})m)?(?:(?P<s>[0-9]{1,5})s?)?$")
_TRAPPABLE = sorted(SIGNALS - UNTRAPPABLE)


def parse_seconds(value: str | int) -> int:
    """Seconds in `warn_before`: a number of seconds (`90`, `"90"`, `"90s"`), minutes (`"2m"`) or
    both (`"1m30s"`)."""
    if isinstance(value, bool):
        raise ValueError("give seconds as a number or a string such as 30s, 2m or 1m30s")
    if isinstance(value, int):
        return value
    match = _DURATION.match(value.strip())
    if match is None or not value.strip() or (match["m"] is None and match["s"] is None):
        raise ValueError(f"{value!r} is not a duration; use seconds (90, 90s), minutes (2m) or 1m30s")
    return int(match["m"] or 0) * 60 + int(match["s"] or 0)


def _seconds(value: Any) -> Any:
    return parse_seconds(value) if isinstance(value, str | int) else value


def _signal_name(value: Any) -> Any:
    return value.strip().upper().removeprefix("SIG") if isinstance(value, str) else value


class CheckpointSpec(BaseModel):
    """`checkpoint` of a job spec: warn the job `warn_before` seconds before its time limit with
    `signal`, then run it again from its checkpoint, at most `max_restarts` times."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    warn_before: Annotated[int, BeforeValidator(_seconds)] = Field(
        default=60,
        ge=1,
        le=MAX_WARN_SECONDS,
        description='seconds before the time limit the signal is sent: 90, "90s", "2m", "1m30s"; '
        "SLURM checks time limits about every 30 s, so the signal may come up to that much earlier",
    )
    signal: Annotated[str, BeforeValidator(_signal_name)] = Field(
        default="USR1", description="the warning signal, forwarded to the job's program: USR1, TERM, ..."
    )
    max_restarts: int = Field(
        default=1, ge=0, le=MAX_RESTARTS, description="runs after the first one, at most"
    )

    @field_validator("signal")
    @classmethod
    def _trappable(cls, value: str) -> str:
        if value in UNTRAPPABLE:
            raise ValueError(f"SIG{value} cannot be caught, so the job could not save a checkpoint")
        if value not in _TRAPPABLE:
            raise ValueError(f"unknown signal {value!r}; use one of {', '.join(_TRAPPABLE)}")
        return value

    def slurm_signal(self) -> str:
        """The `--signal` value: to the batch shell only (`B:`), which forwards it."""
        return f"B:{self.signal}@{self.warn_before}"

    def check_time_limit(self, seconds: int) -> None:
        """The warning must come after the job started: refuse a `warn_before` not below the limit."""
        if self.warn_before >= seconds:
            raise ValueError(
                f"checkpoint.warn_before ({self.warn_before} s) must be shorter than the time limit "
                f"({seconds} s)"
            )


def requeue_cause(
    run_state: str, elapsed_seconds: int | None, time_limit_seconds: int | None, warn_before: int | None
) -> str | None:
    """What ended a run that SLURM queued again, from that run's accounting record (its state as
    sacct prints it, how long it ran, its time limit) and the job's `checkpoint.warn_before` (None
    without checkpoint): `PREEMPTED` or `TIME_LIMIT_WARNING`, or None where accounting cannot say
    (an operator's `scontrol requeue`, a node failure): the reason then keeps its plain wording.

    A `checkpoint` job that its wrapper requeued on the signal SLURM sends at a preemption ends its
    run `REQUEUED` too, as does an operator's requeue: only a run that ended after its time-limit
    warning could have come (`SIGNAL_CHECK_SECONDS`) is taken for one."""
    words = run_state.split()
    state = words[0].rstrip("+").upper() if words else ""
    if state == "PREEMPTED":
        return PREEMPTED
    if (
        state == "REQUEUED"
        and warn_before is not None
        and elapsed_seconds is not None
        and time_limit_seconds is not None
        and elapsed_seconds + warn_before + SIGNAL_CHECK_SECONDS >= time_limit_seconds
    ):
        return TIME_LIMIT_WARNING
    return None


def requeue_reason(
    restarts: int,
    max_restarts: int | None,
    native_state: str,
    slurm_reason: str | None = None,
    *,
    cause: str | None = None,
) -> str | None:
    """The `reason` of a job SLURM ran again (`restarts` > 0) or a checkpointed job (`max_restarts`
    set) that ran out of restarts; None otherwise (its own reason stands):

    - while it runs or waits again: `Requeued (restart 1 of 2): PENDING`; once accounting said what
      ended the run before (`cause`, from `requeue_cause`): `Preempted; requeued (restart 1 of 2):
      PENDING`, `Time limit warning; requeued (restart 1 of 2): RUNNING`;
    - ended by its time limit with no restart left: `checkpoint.max_restarts (2) reached: TIMEOUT`;
    - ended otherwise: `Requeued (restart 2 of 2): COMPLETED` (or with the cause as above; SLURM's
      reason appended when it has one: `...: FAILED NODE_FAIL`).
    """
    if max_restarts is not None and restarts >= max_restarts and native_state == "TIMEOUT":
        return f"checkpoint.max_restarts ({max_restarts}) reached: TIMEOUT"
    if restarts <= 0:
        return None
    of = f" of {max_restarts}" if max_restarts is not None else ""
    tail = f" {slurm_reason}" if slurm_reason and slurm_reason != native_state else ""
    head = f"{cause}; {REQUEUED.lower()}" if cause else REQUEUED
    return f"{head} (restart {restarts}{of}): {native_state}{tail}"


def restarts_exceeded(
    restarts: int, max_restarts: int, native_state: str, slurm_reason: str | None = None
) -> str | None:
    """Why a checkpointed job that SLURM queued again more often than `max_restarts` allows must be
    ended, or None while it is within them. The wrapper stops requeueing at `max_restarts`, but SLURM
    requeues a `--requeue` job by itself too (an operator's `scontrol requeue`, a preemption with
    PreemptMode=REQUEUE, a node failure with JobRequeue=1): the agent cancels such a run before it
    starts (it waits out SLURM's requeue hold) and reports the job `failed` with this reason."""
    if restarts <= max_restarts:
        return None
    tail = f" {slurm_reason}" if slurm_reason and slurm_reason != native_state else ""
    return (
        f"checkpoint.max_restarts ({max_restarts}) reached: SLURM queued it again "
        f"(restart {restarts}: {native_state}{tail}); cancelled"
    )
