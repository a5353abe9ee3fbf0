"""Run one cloudhpc job to its end through porter, the way a pipeline step needs it.

The original's train step polled a status object every 5 s, printed nothing of the job while it
ran, returned `('none', 'none')` on any failure and let the next step decide, and its Kubeflow
client treated a run in state `Error` as a success. Here a step is as loud as the job: every state
change and every line of the job's output appears in the step's log as it happens, and a job that
does not end `completed` raises `JobFailed`, so the step (and the run) fails.

Nothing here imports Kubeflow: the KFP components, the demo and notebooks all call `run_job`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cloudhpc.client import ApiError, Client
from cloudhpc.domain.jobs import Job, JobSpec
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import JobFailed

__all__ = ["JobOutcome", "job_timings", "run_job"]

Say = Callable[[str], None]


@dataclass
class JobOutcome:
    """What a step returns about its job: the record, accounting, artifacts and where time went."""

    job: Job
    accounting: dict[str, Any] | None
    artifacts: list[dict[str, Any]]
    timings: dict[str, float] = field(default_factory=dict)
    log_tail: list[str] = field(default_factory=list)

    @property
    def job_id(self) -> str:
        return str(self.job.id)

    def artifact_urls(self) -> dict[str, str]:
        return {a["name"]: a["url"] for a in self.artifacts}

    def raise_for_state(self) -> None:
        """`JobFailed` unless the job completed."""
        if self.job.state != JobState.COMPLETED:
            raise JobFailed(
                f"job {self.job.id} ended {_describe(self.job)}; the last lines of its output are above",
                job_id=str(self.job.id),
                state=self.job.state.value,
                reason=self.job.reason,
            )


def _seconds(later: datetime | None, earlier: datetime | None) -> float | None:
    if later is None or earlier is None:
        return None
    return max(0.0, (later - earlier).total_seconds())


def job_timings(job: Job) -> dict[str, float]:
    """Where a job's time went, from its record (SLURM's submit/start/end, porter's accept time).

    `staging` is accept -> sbatch: the agent picking the job up, the cached environment (a check, or
    a build the first time), staging files over SFTP and sbatch itself.
    """
    out: dict[str, float] = {}
    for name, value in (
        ("staging", _seconds(job.submitted_at, job.created_at)),
        ("queue_wait", _seconds(job.started_at, job.submitted_at)),
        ("run", _seconds(job.ended_at, job.started_at)),
        ("accept_to_end", _seconds(job.ended_at, job.created_at)),
    ):
        if value is not None:
            out[name] = value
    return out


def _describe(job: Job) -> str:
    parts = [job.state.value]
    if job.slurm_job_id:
        parts.append(f"native id {job.slurm_job_id}")
    if job.exit_code is not None:
        parts.append(f"exit code {job.exit_code}")
    if job.reason:
        parts.append(f"reason: {job.reason}")
    return ", ".join(parts)


class _LogFollower(threading.Thread):
    """Copies the job's output into the step's log, line by line, while the job runs."""

    def __init__(self, client: Client, job_id: str, say: Say, prefix: str, keep: int = 40) -> None:
        super().__init__(name=f"logs-{job_id}", daemon=True)
        self._client = client
        self._job_id = job_id
        self._say = say
        self._prefix = prefix
        self._keep = keep
        self.tail: list[str] = []
        self.error: BaseException | None = None

    def _emit(self, line: str) -> None:
        self._say(f"{self._prefix}{line}")
        self.tail.append(line)
        del self.tail[: -self._keep]

    def run(self) -> None:
        pending = b""
        try:
            for chunk in self._client.follow_logs(self._job_id):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    self._emit(raw.decode(errors="replace"))
            if pending:
                self._emit(pending.decode(errors="replace"))
        except BaseException as exc:  # reported by the caller; the job's outcome does not depend on it
            self.error = exc


def _with_retry(fetch: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    """Accounting and artifacts are collected after the end: 404 means "not yet" for a while."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fetch()
        except ApiError as exc:
            if exc.status != 404 or time.monotonic() >= deadline:
                return None
        time.sleep(interval)


def run_job(
    client: Client,
    spec: JobSpec | Mapping[str, Any],
    *,
    say: Say = print,
    timeout: float | None = None,
    idempotency_key: str | None = None,
    collect_timeout: float = 60.0,
    wanted_artifacts: tuple[str, ...] = ("output.log", "sacct.json"),
    on_submitted: Callable[[Job], None] | None = None,
    check: bool = True,
) -> JobOutcome:
    """Submit `spec`, stream its state and output through `say`, and return once it has ended and
        its accounting and artifacts are in (or `collect_timeout` passed). Raises `JobFailed` when the
        job ends in any state but `completed` (unless `check` is false: then the caller decides, after
    recording what it needs), or does not end within `timeout` (it is cancelled then).

        `idempotency_key` (for example the Kubeflow run and task ids) makes a retried step find its job
        instead of submitting a second one.
    """
    started = time.monotonic()
    job = client.submit(spec, idempotency_key=idempotency_key)
    say(
        f"[cloudhpc] job {job.id} ({job.spec.kind.value} `{job.spec.name}`) accepted on cluster {job.cluster}"
    )
    if on_submitted is not None:
        on_submitted(job)
    follower = _LogFollower(client, str(job.id), say, prefix="[job] ")
    follower.start()
    last: list[JobState] = []

    def changed(current: Job) -> None:
        if not last or last[-1] != current.state:
            last.append(current.state)
            say(f"[cloudhpc] job {current.id}: {_describe(current)}")

    final = client.wait(job, timeout=timeout, on_change=changed, poll=10.0)
    ended_seen = time.monotonic()
    if not final.state.terminal:
        client.cancel(final)
        say(f"[cloudhpc] job {final.id}: still {final.state.value} after {timeout:.0f} s; cancel requested")
        follower.join(timeout=5)
        raise JobFailed(
            f"job {final.id} did not end within {timeout:.0f} s (last state {final.state.value}); it was cancelled",
            job_id=str(final.id),
            state=final.state.value,
            reason="timeout in the pipeline step",
        )
    follower.join(timeout=collect_timeout)
    if follower.error is not None:
        say(f"[cloudhpc] (the output stream broke: {follower.error}; the full output is in the artifacts)")

    accounting = _with_retry(lambda: client.accounting(final), collect_timeout)
    artifacts: list[dict[str, Any]] = []
    deadline = time.monotonic() + collect_timeout
    while True:
        try:
            artifacts = client.artifacts(final)
        except ApiError as exc:
            if exc.status != 404:
                say(f"[cloudhpc] artifacts not available: {exc}")
                break
        names = {a["name"] for a in artifacts}
        if all(w in names for w in wanted_artifacts) or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    collected = time.monotonic()

    timings = job_timings(final)
    timings["collection"] = collected - ended_seen
    timings["step_total"] = collected - started
    outcome = JobOutcome(
        job=final, accounting=accounting, artifacts=artifacts, timings=timings, log_tail=follower.tail
    )
    say(
        f"[cloudhpc] job {final.id} ended {final.state.value}; "
        + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
    )
    if check:
        outcome.raise_for_state()
    return outcome
