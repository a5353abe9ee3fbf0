"""Run one cloudhpc job to its end through porter, the way a pipeline step needs it.

The original's train step polled a status object every 5 s, printed nothing of the job while it
ran, returned `('none', 'none')` on any failure and let the next step decide, and its Kubeflow
client treated a run in state `Error` as a success. Here a step is as loud as the job: every state
change and every line of the job's output appears in the step's log as it happens, and a job that
does not end `completed` raises `JobFailed`, so the step (and the run) fails.

A step that is stopped stops its job: Kubernetes sends a pod SIGTERM when its Kubeflow run is
terminated (and when the pod is evicted), and inside `stop_job_on_sigterm()` that signal cancels
the job being followed before the step exits, so a stopped run does not leave an HPC job running
and billing. The KFP components run their bodies inside it.

Nothing here imports Kubeflow: the KFP components, the demo and notebooks all call `run_job`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import FrameType
from typing import Any

from cloudhpc.client import ApiError, Client
from cloudhpc.domain.job_files import OUTPUTS_PREFIX
from cloudhpc.domain.jobs import Job, JobSpec
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import JobFailed, StepTerminated

__all__ = ["JobOutcome", "job_timings", "run_job", "stop_job_on_sigterm"]

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

    def output_urls(self) -> dict[str, str]:
        """The job's collected `outputs` (artifacts `outputs/<path>`): its path in the job directory
        (`output_artifact_name` undone) to the download URL."""
        return {
            urllib.parse.unquote(a["name"].removeprefix(OUTPUTS_PREFIX)): a["url"]
            for a in self.artifacts
            if a["name"].startswith(OUTPUTS_PREFIX)
        }

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


class _Termination:
    """SIGTERM turned into `StepTerminated` in the main thread, except while deferred.

    Deferred around the calls that must not be cut in half: the submit (its answer names the job
    to cancel) and the cancel itself. A signal that arrives then is only recorded; `check` raises
    it once the caller can act on it (after the submit: by cancelling the job it returned).
    """

    def __init__(self) -> None:
        self.received = False
        self.depth = 0

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = True
        if not self.depth:
            raise StepTerminated(f"the step received signal {signal.Signals(signum).name}")

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def check(self) -> None:
        if self.received:
            raise StepTerminated("the step received SIGTERM")


_termination: _Termination | None = None
"""Set inside `stop_job_on_sigterm()`; None elsewhere (then nothing is deferred or raised)."""


@contextlib.contextmanager
def stop_job_on_sigterm() -> Iterator[None]:
    """Inside the block, SIGTERM raises `StepTerminated` in the main thread; `run_job` catches it
    while it follows its job, cancels the job and re-raises, so the step exits non-zero.

    Kubernetes stops a pod with SIGTERM (Kubeflow run terminated, pod evicted) and kills it
    `terminationGracePeriodSeconds` (30 s by default) later: the cancel is one request, well within.
    Only the main thread can install a signal handler; elsewhere the block changes nothing.
    """
    global _termination
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    termination = _Termination()
    previous = signal.signal(signal.SIGTERM, termination.handle)
    _termination = termination
    try:
        yield
    finally:
        _termination = None
        signal.signal(signal.SIGTERM, previous)


def _deferred_termination() -> contextlib.AbstractContextManager[None]:
    return _termination.deferred() if _termination is not None else contextlib.nullcontext()


def _cancel(client: Client, job: Job, say: Say, why: str, settle: float = 0.0) -> Job:
    """Ask porter to cancel `job` (the agent runs scancel) and, for up to `settle` s, wait for it to
    end so the step's log shows the outcome. Never raises an `ApiError`: the caller's error wins."""
    with _deferred_termination():
        try:
            current = client.cancel(job)
            say(f"[cloudhpc] job {job.id}: {why}; cancel requested")
            if settle > 0 and not current.state.terminal:
                current = client.wait(current, timeout=settle, poll=settle)
            if current.state.terminal:
                say(f"[cloudhpc] job {job.id}: {_describe(current)}")
            return current
        except ApiError as exc:
            say(f"[cloudhpc] job {job.id}: {why}; the cancel request failed: {exc}")
            return job


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

    Inside `stop_job_on_sigterm()`, SIGTERM cancels the job and raises `StepTerminated`.
    """
    started = time.monotonic()
    with _deferred_termination():
        job = client.submit(spec, idempotency_key=idempotency_key)
    try:
        if _termination is not None:
            _termination.check()  # a SIGTERM during the submit: cancel the job it created
        return _follow(
            client,
            job,
            started=started,
            say=say,
            timeout=timeout,
            collect_timeout=collect_timeout,
            wanted_artifacts=wanted_artifacts,
            on_submitted=on_submitted,
            check=check,
        )
    except StepTerminated:
        _cancel(client, job, say, "the step was terminated", settle=10.0)
        raise


def _follow(
    client: Client,
    job: Job,
    *,
    started: float,
    say: Say,
    timeout: float | None,
    collect_timeout: float,
    wanted_artifacts: tuple[str, ...],
    on_submitted: Callable[[Job], None] | None,
    check: bool,
) -> JobOutcome:
    """`run_job` after the submit: follow `job` to its end and collect what it left."""
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
        _cancel(client, final, say, f"still {final.state.value} after {timeout:.0f} s")
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

    if final.spec.ray is not None and final.spec.ray.session is not None:
        # a ray-job on a warm session is a Ray job, not a SLURM job: no sacct record, no artifacts
        collect_timeout, wanted_artifacts = 0.0, ()
    # the outcome travels as JSON (KFP outputs, MLflow params): plain documents, not the SDK's models
    record = _with_retry(lambda: client.accounting(final), collect_timeout)
    accounting = None if record is None else record.model_dump(mode="json")
    artifacts: list[dict[str, Any]] = []
    deadline = time.monotonic() + collect_timeout
    while True:
        try:
            artifacts = [a.model_dump(mode="json") for a in client.artifacts(final)]
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
