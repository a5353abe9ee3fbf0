"""Python functions on a cluster, with submitit's habits: `cloudhpc.Executor`.

    ex = cloudhpc.Executor(cluster="mahti")
    ex.update_parameters(time="00:10:00", cpus_per_task=4)
    job = ex.submit(sum, [1, 2, 3])
    job.result()                                  # 6
    jobs = ex.map_array(math.sqrt, [1, 4, 9])     # one SLURM array, one future per item

Each call becomes a job of kind `python` (`domain/jobs.PythonCall`). The function and its arguments
are pickled with cloudpickle and uploaded to porter's object store under the caller's own prefix
(`POST /api/v1/uploads`: the spec itself is bounded, a 100 MB argument is not), named in the job's
`files`, and staged by the agent like any input. On the cluster a small runner
(`hpc/python_runner.py`) loads the call in the job's cached environment, runs it, and writes the
outcome, which the agent stores as the job's `result.pkl` artifact; the SDK downloads it and either
returns the value or raises the remote exception with the remote traceback as its `__cause__` (as
`concurrent.futures.ProcessPoolExecutor` does).

The environment is derived from the caller: the caller's Python minor version, cloudpickle at the
caller's version, and whatever `environment` the parameters add (modules, packages). A different
minor version is refused before anything is sent (`PythonVersionMismatch`): pickled functions do
not load across minor versions. Everything a notebook needs is a porter URL and token; it never
holds an SSH key or object-store credentials.

Each job is a `concurrent.futures.Future`, completed by one watcher thread per executor, so
`concurrent.futures.as_completed` and `wait` work on them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import pickle
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from cloudhpc.client import Client
from cloudhpc.domain.jobs import Environment, Job, JobKind, JobSpec, PythonCall, Resources
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import NoResult, PythonVersionMismatch, RemoteCallError

__all__ = ["CALL_FILE", "Executor", "PythonJob", "caller_python", "derive_environment", "rebuild_exception"]

log = logging.getLogger(__name__)

CALL_FILE = "cloudhpc-call.pkl"
"""The job-relative path of the pickled call (a `files` entry naming the upload)."""
RESULT_WAIT = 120.0
"""How long after its end a job that ran may take to show its `result.pkl` (the agent stores it
with the output log, after the poller saw the end) before the future fails with `NoResult`."""
LONG_POLL = 2.0
"""Seconds of porter's long-poll on the one job still running (it answers at the job's change); short,
so that a job submitted meanwhile is not left unwatched for long."""
SWEEP_PER_JOB = 0.05
"""With several jobs pending, a sweep (one GET each) every 0.05 s per job (0.2 s at least)."""
OUTPUT_GRACE = 10.0
"""The agent stores the outcome and the output log together when a job ends: once the log is there,
an outcome still missing after this long was never written (the job was killed: time limit, memory)."""
_RESULT_FORMAT = 1
_VERSION = re.compile(r"^3\.[0-9]{1,2}$")
_SPEC_FIELDS = frozenset({"name", "environment", "env", "files"})


def _cloudpickle() -> Any:
    """cloudpickle, imported when a call is pickled: the light install does not have it."""
    try:
        import cloudpickle
    except ModuleNotFoundError as exc:  # the light install (tests/integration/test_light_install.py)
        raise ModuleNotFoundError(
            "cloudhpc.Executor pickles functions with cloudpickle: pip install 'cloudhpc[executor]'"
        ) from exc
    return cloudpickle


def caller_python() -> str:
    """This process's Python minor version, `3.X`: the one the job's environment must run."""
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


def derive_environment(
    environment: Environment | dict[str, Any] | None, cloudpickle_version: str
) -> Environment:
    """The job's environment: the caller's Python minor version unless `python` names a module
    (then the runner checks the version on the cluster), cloudpickle at the caller's version
    unless the packages pin it already, and the rest as given. A `python` that is another minor
    version is a `PythonVersionMismatch`, raised before anything is sent."""
    given = Environment.model_validate(environment or {})
    mine = caller_python()
    python = given.python or mine
    if _VERSION.match(python) and python != mine:
        raise PythonVersionMismatch(
            f"environment.python is {python} but this Python is {mine}: a function pickled by Python "
            f"{mine} does not load in {python}; leave environment.python unset or set it to {mine}"
        )
    packages = list(given.packages)
    if not any(re.match(r"^cloudpickle\b", p.strip(), re.IGNORECASE) for p in packages):
        packages.append(f"cloudpickle=={cloudpickle_version}")
    return Environment(modules=given.modules, python=python, packages=packages)


class PythonJob(concurrent.futures.Future[Any]):
    """One function call on the cluster, as a `concurrent.futures.Future`: `result(timeout)`,
    `exception(timeout)`, `done()`, `cancel()`, `add_done_callback`; `job_id` is the cloudhpc job's
    id and `task` the array index (None for a single call)."""

    def __init__(self, executor: Executor, job: Job, task: int | None = None) -> None:
        super().__init__()
        self._executor = executor
        self.job_id = str(job.id)
        self.task = task
        self._call_url = job.spec.files[CALL_FILE]

    def __repr__(self) -> str:
        where = self.job_id if self.task is None else f"{self.job_id}[{self.task}]"
        return f"<PythonJob {where} {self._state.lower()}>"

    def cancel(self) -> bool:
        """Cancel the job (the array task) in porter, and this future; False once it is done."""
        if self.done():
            return False
        client = self._executor.client
        with contextlib.suppress(Exception):  # an ended job: the future still ends cancelled
            if self.task is None:
                client.cancel(self.job_id)
                self._executor._delete_upload(self._call_url)  # nothing will run the call now
            else:
                client.cancel_task(self.job_id, self.task)
        return super().cancel()

    def job(self) -> Job:
        """The job's record as porter has it now (state, reason, SLURM id)."""
        return self._executor.client.get(self.job_id)

    def output(self) -> str:
        """What the function printed (the job's, or the array task's, stored output)."""
        data = self._executor.client.download_artifact(self.job_id, _output_name(self.task))
        return data.decode(errors="replace")


class Executor:
    """Runs Python functions as jobs of kind `python` on `cluster` (see the module's docstring).

    `folder`, when given, receives a copy of each outcome and output (`<folder>/<job id>/`), as
    submitit keeps its folder. `client` defaults to `Client()` (CLOUDHPC_URL, CLOUDHPC_TOKEN)."""

    def __init__(
        self,
        cluster: str,
        folder: str | Path | None = None,
        client: Client | None = None,
        *,
        poll_interval: float = 0.2,
    ) -> None:
        self.cluster = cluster
        self.folder = Path(folder) if folder is not None else None
        self.client = client or Client()
        self.poll_interval = poll_interval
        self._name = "python"
        self._resources: dict[str, Any] = {}
        self._environment: dict[str, Any] = {}
        self._env: dict[str, str] = {}
        self._pending: list[PythonJob] = []
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"Executor(cluster={self.cluster!r}, client={self.client!r})"

    def update_parameters(self, **fields: Any) -> None:
        """Set job fields for the next submissions: any field of `resources` (`time`, `partition`,
        `cpus_per_task`, `mem`, `gpus`...), `name`, `environment` (modules, python, packages) and
        `env`. An unknown field is a ValueError naming it, before anything is sent."""
        resources = {k: v for k, v in fields.items() if k not in _SPEC_FIELDS}
        unknown = sorted(resources.keys() - Resources.model_fields.keys())
        if unknown or "files" in fields:
            known = ", ".join(sorted({*Resources.model_fields, "name", "environment", "env"}))
            raise ValueError(f"unknown job field(s) {', '.join(unknown) or 'files'}; the fields are {known}")
        Resources.model_validate(self._resources | resources)  # a bad value fails here, naming it
        self._resources |= resources
        if "name" in fields:
            self._name = fields["name"]
        if "environment" in fields:
            env = fields["environment"]
            self._environment = env.model_dump() if isinstance(env, Environment) else dict(env or {})
        if "env" in fields:
            self._env = dict(fields["env"])

    # ---- submission ---------------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> PythonJob:
        """Run `fn(*args, **kwargs)` as one job; returns its future at once."""
        job = self._submit_call((fn, args, kwargs), array=None)
        return self._track([PythonJob(self, job)])[0]

    def map_array(self, fn: Callable[..., Any], *iterables: Iterable[Any]) -> list[PythonJob]:
        """`fn` over the items (several iterables zip, as `map` does) as ONE job array, one task and
        one future per item, in the items' order. The call is uploaded once, with every item."""
        items: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
            (tuple(a), {}) for a in zip(*iterables, strict=False)
        ]
        if not items:
            return []
        job = self._submit_call((fn, items), array=f"0-{len(items) - 1}")
        return self._track([PythonJob(self, job, task=i) for i in range(len(items))])

    def _submit_call(self, call: tuple[Any, ...], *, array: str | None) -> Job:
        cloudpickle = _cloudpickle()
        environment = derive_environment(self._environment, cloudpickle.__version__)
        spec = self._spec(environment, "file:///placeholder", array)  # a bad field fails before the upload
        url = self.client.upload(cloudpickle.dumps(call), name=CALL_FILE)
        spec = self._spec(environment, url, array)
        return self.client.submit(spec)

    def _spec(self, environment: Environment, url: str, array: str | None) -> JobSpec:
        return JobSpec.model_validate(
            {
                "name": self._name,
                "cluster": self.cluster,
                "kind": JobKind.PYTHON,
                "python": PythonCall(call=CALL_FILE, version=caller_python()),
                "resources": self._resources,
                "environment": environment,
                "files": {CALL_FILE: url},
                "env": self._env,
                "array": array,
            }
        )

    # ---- completion ---------------------------------------------------------------------------

    def _track(self, futures: list[PythonJob]) -> list[PythonJob]:
        with self._lock:
            self._pending.extend(futures)
            if self._watcher is None or not self._watcher.is_alive():
                self._watcher = threading.Thread(target=self._watch, name="cloudhpc-executor", daemon=True)
                self._watcher.start()
        return futures

    def _watch(self) -> None:
        """Follow the pending jobs until each future is done; a job that ended is resolved from its
        `result.pkl` artifact(s). While one job runs, porter's long-poll (`GET /jobs/{id}?wait=`)
        answers at its next change; several are polled in sweeps, spaced by their number so that
        many futures do not flood porter."""
        ended_at: dict[str, float] = {}
        while True:
            with self._lock:
                pending = [f for f in self._pending if not f.done()]
                self._pending = pending
                if not pending:
                    self._watcher = None
                    return
            by_job: dict[str, list[PythonJob]] = {}
            for future in pending:
                by_job.setdefault(future.job_id, []).append(future)
            long_polled = False
            for job_id, futures in by_job.items():
                try:
                    wait = LONG_POLL if len(by_job) == 1 and job_id not in ended_at else 0
                    job = self.client.get(job_id, wait=wait)
                    long_polled = wait > 0
                    if not job.state.terminal:
                        continue
                    first_seen = ended_at.setdefault(job_id, time.monotonic())
                    self._resolve(job, futures, waited=time.monotonic() - first_seen)
                except Exception as exc:  # porter unreachable for a moment: try again next sweep
                    if time.monotonic() - ended_at.get(job_id, time.monotonic()) > RESULT_WAIT:
                        for future in futures:
                            _finish(future, exc=exc)
            if not long_polled:
                time.sleep(max(self.poll_interval, SWEEP_PER_JOB * len(by_job)))

    def _resolve(self, job: Job, futures: Sequence[PythonJob], *, waited: float) -> None:
        """Complete the futures of an ended job whose outcomes are stored; leave the others for the
        next sweep, until `RESULT_WAIT` has passed (then `NoResult`). Once every future of the job
        has its outcome, the job's upload is deleted first (the agent staged the call into the job
        directory before sbatch), so a caller woken by its future finds it gone."""
        stored = {item.name for item in self.client.artifacts(job.id)}
        never_ran = job.started_at is None
        settle: list[Callable[[], object]] = []
        for future in futures:
            name = "result.pkl" if future.task is None else f"tasks/{future.task}/result.pkl"
            if name in stored:
                data = self.client.download_artifact(job.id, name)
                settle.append(functools.partial(self._complete, future, data))
            elif job.state == JobState.CANCELLED:
                settle.append(functools.partial(super(PythonJob, future).cancel))
            elif (
                never_ran
                or waited > RESULT_WAIT
                or (_output_name(future.task) in stored and waited > OUTPUT_GRACE)
            ):
                reason = f": {job.reason}" if job.reason else ""
                error = NoResult(
                    f"job {job.id} ended {job.state.value}{reason} without running the function to its "
                    "end (see `cloudhpc jobs logs` for its output)",
                    job_id=str(job.id),
                    state=job.state.value,
                    reason=job.reason,
                )
                settle.append(functools.partial(_finish, future, exc=error))
        if len(settle) == len(futures):
            self._delete_upload(futures[0]._call_url)
        for step in settle:
            step()

    def _delete_upload(self, url: str) -> None:
        """Best effort: an upload left behind costs storage, never a result."""
        try:
            self.client.delete_upload(url)
        except Exception as exc:
            log.info("could not delete the upload %s (%s)", url, exc)

    def _complete(self, future: PythonJob, data: bytes) -> None:
        """Set the future from a stored outcome (`hpc/python_runner.py` documents its shape)."""
        if self.folder is not None:
            where = self.folder / future.job_id
            where.mkdir(parents=True, exist_ok=True)
            (where / ("result.pkl" if future.task is None else f"result-{future.task}.pkl")).write_bytes(data)
        try:
            outcome = pickle.loads(data)  # noqa: S301 -- the caller's own job's outcome, from porter
            if outcome.get("format") != _RESULT_FORMAT:
                raise ValueError(f"unknown outcome format {outcome.get('format')!r}")
            if outcome["ok"]:
                _finish(future, value=pickle.loads(outcome["value"]))  # noqa: S301
                return
            _finish(future, exc=rebuild_exception(outcome, future.job_id))
        except Exception as exc:
            _finish(future, exc=exc)


def rebuild_exception(outcome: dict[str, Any], job_id: str) -> BaseException:
    """The remote exception with its traceback as `__cause__` (a `RemoteCallError`), or the
    `RemoteCallError` itself when the exception cannot be rebuilt here."""
    remote = RemoteCallError(
        f"{outcome['type']} raised in job {job_id}: {outcome['message']}",
        type_name=outcome["type"],
        remote_traceback=outcome["traceback"],
    )
    if outcome.get("exception") is None:
        return remote
    try:
        exc: BaseException = pickle.loads(outcome["exception"])  # noqa: S301
    except Exception:  # its class is not importable here
        return remote
    exc.__cause__ = remote
    return exc


def _output_name(task: int | None) -> str:
    """The artifact name of the job's output (`storage.artifacts.output_name`, which the light
    install cannot import)."""
    return "output.log" if task is None else f"tasks/{task}/output.log"


def _finish(future: PythonJob, *, value: Any = None, exc: BaseException | None = None) -> None:
    """Set a future's outcome once (a cancel may have won the race)."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)
