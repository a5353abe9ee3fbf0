"""Job arrays and dependencies between cloudhpc jobs: the spec's syntax, and the rules that turn
what SLURM says about many tasks into one job state.

Pure: no SLURM command and no store here. The array syntax is sbatch's `--array` (SLURM 22.05):
comma-separated indices, ranges `a-b` and stepped ranges `a-b:s`, then an optional `%N` limit of
tasks running at once. Checked here so that a bad value is a 422 naming `array`, never a job that
sbatch refuses after it was accepted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime
from enum import StrEnum
from typing import Annotated
from uuid import UUID

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from cloudhpc.domain.states import JobState

__all__ = [
    "DEPENDENCY_NEVER_SATISFIED",
    "MAX_ARRAY_INDEX",
    "MAX_ARRAY_TASKS",
    "ArraySpec",
    "Dependency",
    "DependencyOn",
    "TaskObservation",
    "array_indices",
    "check_array",
    "dependency_option",
    "derive_array_state",
]

MAX_ARRAY_INDEX = 100_000
"""Highest index accepted (SLURM's MaxArraySize may be lower: sbatch then refuses, a 422-free path)."""
MAX_ARRAY_TASKS = 10_000
"""Most tasks one array may have: every task is a row of `GET /jobs/{id}/tasks`."""

DEPENDENCY_NEVER_SATISFIED = "DependencyNeverSatisfied"
"""squeue's reason for a job whose dependency cannot be met any more; cloudhpc then ends the job."""

_ITEM = re.compile(r"^(?P<a>[0-9]{1,6})(?:-(?P<b>[0-9]{1,6})(?::(?P<s>[0-9]{1,6}))?)?$")


def array_indices(value: str) -> list[int]:
    """The task indices of an `--array` value, sorted and unique; ValueError saying what is wrong."""
    body, pct, throttle = value.partition("%")
    if pct and not (throttle.isdigit() and 1 <= int(throttle) <= MAX_ARRAY_TASKS):
        raise ValueError(f"array {value!r}: the limit after % must be a number from 1 to {MAX_ARRAY_TASKS}")
    indices: set[int] = set()
    items = body.split(",")
    if len(value) > 1024 or len(items) > 1000:
        raise ValueError(f"array {value!r} is too long")
    for item in items:
        match = _ITEM.match(item)
        if match is None:
            raise ValueError(
                f"array {value!r}: {item!r} is not an index, a range a-b or a stepped range a-b:s "
                "(e.g. 0-99%10, 1,3,5-7, 0-20:5)"
            )
        first = int(match["a"])
        last = int(match["b"]) if match["b"] is not None else first
        step = int(match["s"]) if match["s"] is not None else 1
        if last < first or step < 1:
            raise ValueError(f"array {value!r}: {item!r} must go upwards with a positive step")
        if last > MAX_ARRAY_INDEX:
            raise ValueError(f"array {value!r}: indices go up to {MAX_ARRAY_INDEX}")
        if (last - first) // step + 1 + len(indices) > MAX_ARRAY_TASKS:
            raise ValueError(f"array {value!r} has more than {MAX_ARRAY_TASKS} tasks")
        indices.update(range(first, last + 1, step))
    return sorted(indices)


def check_array(value: str | None) -> str | None:
    if value is not None:
        array_indices(value)
    return value


ArraySpec = Annotated[str, AfterValidator(check_array)]
"""An sbatch `--array` value, validated."""


class DependencyOn(StrEnum):
    """When the dependent may start: after its dependency ended well, in any way, or badly."""

    OK = "ok"
    ANY = "any"
    NOTOK = "notok"


_SLURM_TYPE = {DependencyOn.OK: "afterok", DependencyOn.ANY: "afterany", DependencyOn.NOTOK: "afternotok"}


class Dependency(BaseModel):
    """One entry of a spec's `after`: another job of the same owner on the same cluster."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job: UUID = Field(description="the cloudhpc id of the job waited for")
    on: DependencyOn = DependencyOn.OK


def dependency_option(resolved: Iterable[tuple[Dependency, str]]) -> str | None:
    """sbatch's `--dependency` value for (dependency, its SLURM id) pairs: `afterok:12:13,afterany:14`
    (`,` is SLURM's "all of them"). None when nothing is left to wait for."""
    by_type: dict[str, list[str]] = {}
    for dep, native in resolved:
        by_type.setdefault(_SLURM_TYPE[dep.on], []).append(native)
    if not by_type:
        return None
    return ",".join(f"{kind}:{':'.join(ids)}" for kind, ids in by_type.items())


class TaskObservation(BaseModel):
    """One task of an array as the scheduler last reported it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int = Field(ge=0, le=MAX_ARRAY_INDEX)
    state: JobState
    native_state: str = Field(max_length=64)
    reason: str | None = Field(default=None, max_length=1024)
    exit_code: int | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None


_FAILURE_ORDER = (JobState.FAILED, JobState.TIMEOUT, JobState.CANCELLED)


def derive_array_state(tasks: Iterable[JobState]) -> JobState:
    """The state of an array job from its tasks' states:

    - queued while no task has started (all pending);
    - running from the first task's start until every task ended (a job never goes back to
      queued: states only move forward, even while later tasks wait for the `%` limit);
    - once every task ended: completed when all completed, otherwise the first of failed,
      timeout, cancelled that some task has (one failed task makes the array failed).
    """
    states = list(tasks)
    if not states:
        return JobState.QUEUED
    if all(s == JobState.QUEUED for s in states):
        return JobState.QUEUED
    if not all(s.terminal for s in states):
        return JobState.RUNNING
    for bad in _FAILURE_ORDER:
        if bad in states:
            return bad
    return JobState.COMPLETED
