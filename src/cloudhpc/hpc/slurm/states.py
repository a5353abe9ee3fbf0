"""SLURM's job states mapped onto ours, in one table.

squeue and sacct both report states through it; a state SLURM adds later is logged and treated as
"unknown, ask again" rather than guessed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from cloudhpc.domain.states import JobState

__all__ = ["SLURM_STATES", "map_state", "normalize_state"]

# The package logs under one name, the one it had as a single module.
logger = logging.getLogger(__package__)

SLURM_STATES: Mapping[str, JobState] = {
    "PENDING": JobState.QUEUED,
    "CONFIGURING": JobState.QUEUED,
    "REQUEUED": JobState.QUEUED,
    "REQUEUE_FED": JobState.QUEUED,
    "REQUEUE_HOLD": JobState.QUEUED,
    "RESV_DEL_HOLD": JobState.QUEUED,
    "SPECIAL_EXIT": JobState.QUEUED,
    "RUNNING": JobState.RUNNING,
    "COMPLETING": JobState.RUNNING,
    "SUSPENDED": JobState.RUNNING,
    "STOPPED": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING,
    "STAGE_OUT": JobState.RUNNING,
    "RESIZING": JobState.RUNNING,
    "COMPLETED": JobState.COMPLETED,
    "FAILED": JobState.FAILED,
    "OUT_OF_MEMORY": JobState.FAILED,
    "NODE_FAIL": JobState.FAILED,
    "BOOT_FAIL": JobState.FAILED,
    "DEADLINE": JobState.FAILED,
    "PREEMPTED": JobState.FAILED,
    "CANCELLED": JobState.CANCELLED,
    "REVOKED": JobState.CANCELLED,
    "TIMEOUT": JobState.TIMEOUT,
}
"""The one table from SLURM's job states to ours. States not listed are "unknown, ask again"."""


def normalize_state(raw: str) -> str:
    """`CANCELLED by 1001` -> `CANCELLED`; `CANCELLED+` (a cut cell) -> `CANCELLED`."""
    words = raw.strip().split()
    return words[0].rstrip("+").upper() if words else ""


def map_state(raw: str) -> JobState | None:
    """Our state for a SLURM state, or None (logged) when SLURM says something we do not know."""
    state = SLURM_STATES.get(normalize_state(raw))
    if state is None:
        logger.warning("unknown SLURM job state %r: treated as unknown, will ask again", raw)
    return state
