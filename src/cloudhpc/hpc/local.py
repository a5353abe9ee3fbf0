"""The local backend: the same interface as SLURM over SSH, with processes on this machine.

It is what `cloudhpc serve all` uses out of the box and what integration tests of everything above
the backend run on. It stages a job directory exactly as the SLURM backend does (`JobPaths`, the same
rendered batch script) and hands the job to a detached supervisor (`hpc/local_supervisor.py`) that
keeps the job's state in files under the job's control directory. Because the state lives on disk,
not in this object, a restarted agent (or a second `LocalBackend` on the same work directory) finds
and follows the same jobs, as it would find them again in SLURM.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shlex
import shutil
import signal
import stat as stat_mode
import sys
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from cloudhpc.domain.billing import PredictedStart
from cloudhpc.domain.job_files import FilesAnswer, OutputsReport
from cloudhpc.domain.jobs import Observation, Resources, parse_slurm_time
from cloudhpc.domain.paths import resolve_path
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import CommandTimeout, JobNotFound, RemoteFileError, SubmitRejected
from cloudhpc.hpc import job_files
from cloudhpc.hpc.backend import (
    AccountingRecord,
    CommandResult,
    Efficiency,
    FileTransfer,
    JobAccounting,
    JobPaths,
    JobSubmission,
    read_output_file,
)
from cloudhpc.hpc.job_files import FoundOutput, Stat, entry_type
from cloudhpc.hpc.local_supervisor import (
    CANCEL_FILE,
    REQUEST_FILE,
    STATE_FILE,
    SUPERVISOR_LOG,
    job_environment,
    now_iso,
    process_alive,
    read_json,
    write_json_atomic,
)

__all__ = [
    "NATIVE_PREFIX",
    "LocalBackend",
    "LocalRunner",
    "job_environment",
    "stage_job_directory",
]

NATIVE_PREFIX = "local-"
"""Native ids are `local-<job uuid>`: they map back to the job directory without any lookup."""

_LOST = "SUPERVISOR_LOST"


def _makedirs(path: Path, mode: int) -> None:
    """Like `mkdir -p -m`: every directory created gets `mode`, whatever the umask (existing ones are left)."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=mode)
        except FileExistsError:
            continue  # created meanwhile by someone else: theirs, leave it
        os.chmod(directory, mode)


class LocalRunner:
    """`CommandRunner` + `FileTransfer` on this machine, with the SSH runner's semantics.

    Commands run from an argument list (never a shell, unless a `prelude` asks for one, and then the
    arguments stay arguments), with `home` as working directory and relative paths resolved against
    it, as on a login node. Commands get the agent's environment minus secrets (`job_environment`):
    an environment build runs `pip install`, which may execute a package's setup code.
    """

    def __init__(
        self, *, home: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
    ) -> None:
        self._home = Path(home).expanduser().absolute() if home is not None else Path.home()
        self._env = dict(env) if env is not None else None

    @property
    def home_path(self) -> Path:
        return self._home

    def _path(self, path: str) -> Path:
        """Resolve like the SSH runner does over SFTP: absolute as is, `~`, `~/x` and `x` under home."""
        if not path:
            raise ValueError("a path must not be empty")
        return Path(resolve_path(path, str(self._home)))

    async def run(
        self,
        argv: Sequence[str],
        *,
        stdin: str | None = None,
        timeout: float | None = None,
        idempotent: bool = False,
        prelude: str = "",
    ) -> CommandResult:
        """Run `argv`; a signal death reports 128+signal, a missing program 127, as a shell would.

        `idempotent` is accepted for parity with the SSH runner (which may retry such commands
        after a reconnect); locally there is no connection to lose.
        """
        args = [str(a) for a in argv]
        if not args:
            raise ValueError("an empty command line")
        full = args
        if prelude.strip():
            # The prelude is the cluster's own shell text; the arguments reach `exec` as "$@".
            full = ["/bin/bash", "-c", prelude + "\n" + 'exec "$@"', "cloudhpc", *args]
        try:
            proc = await asyncio.create_subprocess_exec(
                *full,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=self._home,
                env=self._env if self._env is not None else job_environment(),
                start_new_session=True,
            )
        except (FileNotFoundError, PermissionError) as exc:
            return CommandResult(argv=tuple(args), exit_status=127, stdout="", stderr=f"{args[0]}: {exc}\n")
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(stdin.encode() if stdin is not None else None), timeout
            )
        except TimeoutError:
            await self._kill(proc)
            raise CommandTimeout(
                f"`{shlex.join(args[:3])}` did not finish within {timeout} s on this machine"
            ) from None
        except BaseException:
            await self._kill(proc)
            raise
        code = proc.returncode if proc.returncode is not None else -1
        if code < 0:
            code = 128 - code
        return CommandResult(
            argv=tuple(args),
            exit_status=code,
            stdout=out.decode("utf-8", errors="replace"),
            stderr=err.decode("utf-8", errors="replace"),
        )

    @staticmethod
    async def _kill(proc: asyncio.subprocess.Process) -> None:
        """Kill the command and everything it started (it leads its own session)."""
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    async def home(self) -> str:
        return str(self._home)

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        await asyncio.to_thread(self._write_file, self._path(path), data, mode)

    @staticmethod
    def _write_file(target: Path, data: bytes, mode: int) -> None:
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            _makedirs(target.parent, 0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, mode)  # the umask must not change what the caller asked for
            os.replace(tmp, target)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise RemoteFileError(f"cannot write {target}: {exc.strerror or exc}") from exc

    async def read_file(self, path: str, *, offset: int = 0, length: int | None = None) -> bytes:
        return await asyncio.to_thread(self._read_file, self._path(path), offset, length)

    @staticmethod
    def _read_file(target: Path, offset: int, length: int | None) -> bytes:
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must not be negative")
        try:
            # O_NONBLOCK: opening a FIFO a job put there (as its output or its result.pkl) must not
            # block until a writer comes; the fstat then refuses anything but a regular file
            fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as f:
                if not stat_mode.S_ISREG(os.fstat(fd).st_mode):
                    raise RemoteFileError(f"cannot read {target}: not a regular file")
                f.seek(offset)
                return f.read(-1 if length is None else length)
        except OSError as exc:
            raise RemoteFileError(f"cannot read {target}: {exc.strerror or exc}") from exc

    async def exists(self, path: str) -> bool:
        return self._path(path).exists()

    async def realpath(self, path: str) -> str | None:
        try:
            return await asyncio.to_thread(os.path.realpath, self._path(path), strict=True)
        except OSError:
            return None

    async def lstat(self, path: str) -> Stat | None:
        try:
            return _stat(os.lstat(self._path(path)))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RemoteFileError(f"cannot stat {path}: {exc.strerror or exc}") from exc

    async def listdir(self, path: str, *, limit: int | None = None) -> list[tuple[str, Stat]]:
        return await asyncio.to_thread(self._listdir, self._path(path), limit)

    @staticmethod
    def _listdir(directory: Path, limit: int | None) -> list[tuple[str, Stat]]:
        try:
            with os.scandir(directory) as entries:
                return [
                    (e.name, _stat(e.stat(follow_symlinks=False))) for e in itertools.islice(entries, limit)
                ]
        except OSError as exc:
            raise RemoteFileError(f"cannot list {directory}: {exc.strerror or exc}") from exc

    async def download(self, remote: str, local_path: str | os.PathLike[str]) -> int:
        """Copy a file of this machine to `local_path` (as the SSH runner's download does)."""
        source = self._path(remote)
        try:
            await asyncio.to_thread(shutil.copyfile, source, local_path)
            return (await asyncio.to_thread(os.stat, local_path)).st_size
        except OSError as exc:
            raise RemoteFileError(f"cannot copy {source}: {exc.strerror or exc}") from exc

    async def size(self, path: str) -> int | None:
        try:
            return self._path(path).stat().st_size
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RemoteFileError(f"cannot stat {path}: {exc.strerror or exc}") from exc

    async def makedirs(self, path: str, *, mode: int = 0o700) -> None:
        try:
            _makedirs(self._path(path), mode)
        except OSError as exc:
            raise RemoteFileError(f"cannot create directory {path}: {exc.strerror or exc}") from exc

    async def chmod(self, path: str, mode: int) -> None:
        try:
            os.chmod(self._path(path), mode)
        except OSError as exc:
            raise RemoteFileError(f"cannot set the mode of {path}: {exc.strerror or exc}") from exc

    async def close(self) -> None:
        """Nothing to release; present so a LocalRunner can stand wherever an SSH connection does."""


def _stat(result: os.stat_result) -> Stat:
    return Stat(type=entry_type(result.st_mode), size=result.st_size, mtime=result.st_mtime)


def _checked_relative(relative: str) -> str:
    """Defence in depth: JobSpec validated user paths, but nothing may leave the job directory."""
    parts = relative.split("/")
    if (
        not relative
        or relative.startswith("/")
        or "\x00" in relative
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise ValueError(f"job file path {relative!r} is not a plain relative path")
    return relative


async def stage_job_directory(transfer: FileTransfer, paths: JobPaths, submission: JobSubmission) -> None:
    """Lay out a job directory: the submission's files (relative to it), then the batch script.

    Same layout and modes as the SLURM backend: the directories 0700 (files and scripts may carry
    the user's own credentials, and the directory keeps them private), the batch script 0700.
    """
    if not submission.batch_script.strip():
        raise SubmitRejected(
            "nothing to submit",
            argv=["stage", paths.jobdir],
            exit_status=None,
            stderr="the batch script is empty",
        )
    await transfer.makedirs(paths.control, mode=0o700)
    await transfer.chmod(paths.jobdir, 0o700)  # also when it existed before, wider
    for relative, data in submission.files.items():
        mode = submission.modes.get(relative, 0o644)
        await transfer.write_file(paths.file(_checked_relative(relative)), data, mode=mode)
    await transfer.write_file(paths.batch_script, submission.batch_script.encode(), mode=0o700)


def _cores(resources: Resources) -> int:
    """Cores a job asked for; like seff, 1 when it named none."""
    return (resources.cpus_per_task or 1) * (resources.ntasks_per_node or 1) * (resources.nodes or 1)


def _time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) and value else None


class LocalBackend:
    """`JobBackend` running each job as a detached, supervised process group on this machine.

    `workdir` plays the cluster work directory: jobs live in `<workdir>/jobs/<id>/`. A relative
    `workdir` (and `~`) is resolved against the runner's home, the same rule as for a cluster's
    `workdir` over SSH, so one configuration key means one thing for both backends.

    A submission's resources are complete (the agent applied the cluster's `defaults`); only
    `time`, `cpus_per_task`/`ntasks_per_node`/`nodes` (cores, for efficiency) and `mem` (for memory
    efficiency) mean anything here, nothing is enforced but the time limit.
    `kill_grace` is SLURM's KillWait: seconds between SIGTERM and SIGKILL at the time limit or on
    cancel.
    """

    def __init__(
        self,
        cluster: str,
        *,
        workdir: str | Path,
        runner: LocalRunner | None = None,
        kill_grace: float = 10.0,
        launch_timeout: float = 30.0,
        python: str | None = None,
    ) -> None:
        self.cluster = cluster
        self.runner = runner if runner is not None else LocalRunner()
        self.workdir = resolve_path(str(workdir), str(self.runner.home_path))
        self._kill_grace = kill_grace
        self._launch_timeout = launch_timeout
        self._python = python or sys.executable

    def paths(self, job_id: UUID) -> JobPaths:
        return JobPaths(workdir=self.workdir, job_id=job_id)

    @staticmethod
    def native_id(job_id: UUID) -> str:
        return f"{NATIVE_PREFIX}{job_id}"

    @staticmethod
    def job_id_of(native_id: str) -> UUID | None:
        """The cloudhpc job id behind a native id, or None when it is not one of ours."""
        if not native_id.startswith(NATIVE_PREFIX):
            return None
        try:
            return UUID(native_id[len(NATIVE_PREFIX) :])
        except ValueError:
            return None

    def _control(self, job_id: UUID) -> Path:
        return Path(self.paths(job_id).control)

    async def submit(self, submission: JobSubmission) -> str:
        """Stage, then start the supervisor; returns once the job is findable. Submitting a job
        that was already started returns its native id and starts nothing."""
        if submission.spec.array is not None or submission.dependency is not None:
            raise SubmitRejected(
                "the local backend runs one process per job: job arrays and `after` need SLURM",
                argv=[],
                exit_status=0,
                stderr="",
            )
        paths = self.paths(submission.job_id)
        native = self.native_id(submission.job_id)
        control = Path(paths.control)
        if (control / STATE_FILE).exists():
            return native
        await stage_job_directory(self.runner, paths, submission)
        res = submission.resources
        limit = parse_slurm_time(res.time) if res.time else None
        write_json_atomic(
            control / REQUEST_FILE,
            {
                "version": 1,
                "native_id": native,
                "job_id": str(submission.job_id),
                "name": submission.spec.name,
                "submitted_at": now_iso(),
                "jobdir": paths.jobdir,
                "batch_script": paths.batch_script,
                "output": paths.output,
                "time_limit_seconds": limit,
                "kill_grace_seconds": self._kill_grace,
                "cpus": _cores(res),
                "mem_bytes": res.mem_bytes,
            },
        )
        await self._launch(control, paths)
        return native

    async def _launch(self, control: Path, paths: JobPaths) -> None:
        argv = [self._python, "-m", "cloudhpc.hpc.local_supervisor", str(control)]
        log = os.open(control / SUPERVISOR_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log,
                cwd=paths.jobdir,
                env=job_environment(),
                start_new_session=True,
            )
        finally:
            os.close(log)
        try:
            code = await asyncio.wait_for(proc.wait(), self._launch_timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            code = None
        if code != 0 or not (control / STATE_FILE).exists():
            tail = (control / SUPERVISOR_LOG).read_text(errors="replace")[-2000:]
            raise SubmitRejected(
                "the local supervisor did not start", argv=argv, exit_status=code, stderr=tail
            )

    async def estimate(
        self, submission: JobSubmission, partitions: Sequence[str | None]
    ) -> list[PredictedStart]:
        """No queue here: a job starts when it is submitted, whatever it names as its partition."""
        now = datetime.now(UTC)
        return [
            PredictedStart(partition=p, start=now, processors=os.cpu_count(), nodes="localhost")
            for p in partitions
        ]

    async def find(self, job_id: UUID) -> str | None:
        return self.native_id(job_id) if (self._control(job_id) / STATE_FILE).exists() else None

    def _state(self, native_id: str) -> dict[str, Any] | None:
        """The job's state, settled as failed (or cancelled) when its supervisor died unrecorded."""
        job_id = self.job_id_of(native_id)
        if job_id is None:
            return None
        control = self._control(job_id)
        state = read_json(control / STATE_FILE)
        if state is None or JobState(state["state"]).terminal:
            return state
        if process_alive(state.get("supervisor_pid"), state.get("supervisor_start")):
            return state
        # Re-read: the supervisor may have written its end state just before exiting.
        state = read_json(control / STATE_FILE) or state
        if JobState(state["state"]).terminal:
            return state
        if process_alive(state.get("pid"), state.get("pid_start")):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(state["pid"]), signal.SIGKILL)
        if (control / CANCEL_FILE).exists():
            state.update(state="cancelled", native_state="CANCELLED", reason=None)
        else:
            state.update(state="failed", native_state=_LOST, reason=_LOST)
        state["ended_at"] = now_iso()
        write_json_atomic(control / STATE_FILE, state)
        return state

    async def poll(self, native_ids: Sequence[str]) -> dict[str, Observation]:
        seen: dict[str, Observation] = {}
        for native in native_ids:
            state = self._state(native)
            if state is None:
                continue  # not (yet) known: "ask again", never "failed"
            seen[native] = Observation(
                state=JobState(state["state"]),
                native_state=state["native_state"],
                reason=state.get("reason"),
                exit_code=state.get("exit_code"),
                submitted_at=_time(state.get("submitted_at")),
                started_at=_time(state.get("started_at")),
                ended_at=_time(state.get("ended_at")),
            )
        return seen

    def _known_state(self, native_id: str) -> dict[str, Any]:
        state = self._state(native_id)
        if state is None:
            raise JobNotFound(f"no local job {native_id!r} under {self.workdir}")
        return state

    async def cancel(self, native_id: str) -> None:
        state = self._known_state(native_id)
        if JobState(state["state"]).terminal:
            return
        job_id = self.job_id_of(native_id)
        assert job_id is not None  # _known_state found it
        # The file first: it holds even if the signal below cannot be delivered.
        write_json_atomic(self._control(job_id) / CANCEL_FILE, {"requested_at": now_iso()})
        pid = state.get("supervisor_pid")
        if isinstance(pid, int) and process_alive(pid, state.get("supervisor_start")):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        else:
            self._state(native_id)  # settle it now: nobody else will

    async def accounting(self, native_id: str, *, job: UUID | None = None) -> JobAccounting:
        """One record, like sacct's allocation row; a running job reports elapsed time so far. The
        native id is made of the job's own id (`job_id_of`), so `job` changes nothing."""
        state = self._known_state(native_id)
        job_id = self.job_id_of(native_id)
        assert job_id is not None
        request = read_json(self._control(job_id) / REQUEST_FILE) or {}
        start, end = _time(state.get("started_at")), _time(state.get("ended_at"))
        elapsed = state.get("elapsed_seconds")
        if elapsed is None and start is not None:
            elapsed = ((end or datetime.now(start.tzinfo)) - start).total_seconds()
        limit = request.get("time_limit_seconds")
        record = AccountingRecord(
            job_id=native_id,
            step=None,
            name=str(request.get("name", "")),
            state=state["native_state"],
            exit_code=state.get("exit_code"),
            signal=state.get("signal"),
            submit=_time(state.get("submitted_at")),
            start=start,
            end=end,
            elapsed_seconds=round(elapsed) if elapsed is not None else None,
            total_cpu_seconds=state.get("cpu_seconds"),
            alloc_cpus=request.get("cpus"),
            nodes=1,
            node_list=state.get("hostname"),
            req_mem_bytes=request.get("mem_bytes"),
            max_rss_bytes=state.get("max_rss_bytes"),
            partition=None,
            account=None,
            timelimit_seconds=int(limit) if limit is not None else None,
            alloc_tres=None,
            billing=None,
        )
        # the supervisor writes the end state with the figures, in one write: final once ended
        return JobAccounting(native_id, [record], final=JobState(state["state"]).terminal)

    async def efficiency(self, accounting: JobAccounting) -> Efficiency:
        """seff's formulas on the supervisor's measurements (precise elapsed time, not rounded, so
        not `accounting`'s records): reading them costs no scheduler query."""
        native_id = accounting.native_id
        state = self._known_state(native_id)
        job_id = self.job_id_of(native_id)
        assert job_id is not None
        request = read_json(self._control(job_id) / REQUEST_FILE) or {}
        cores = int(request.get("cpus") or 1)
        elapsed = state.get("elapsed_seconds")
        cpu = state.get("cpu_seconds")
        rss = state.get("max_rss_bytes")
        mem = request.get("mem_bytes")
        walltime = elapsed * cores if elapsed is not None else None
        return Efficiency(
            state=state["native_state"],
            cpu_efficiency=cpu / walltime if cpu is not None and walltime else None,
            memory_efficiency=rss / mem if rss is not None and mem else None,
            cpu_utilized_seconds=cpu,
            core_walltime_seconds=walltime,
            memory_utilized_bytes=rss,
            memory_requested_bytes=mem,
            source="local",
        )

    async def read_output(
        self, job_id: UUID, *, offset: int = 0, length: int | None = None, task: int | None = None
    ) -> bytes:
        paths = self.paths(job_id)
        path = paths.output if task is None else paths.task_output(task)
        return await read_output_file(self.runner, path, offset=offset, length=length)

    async def read_file(
        self, job_id: UUID, relative_path: str, *, offset: int = 0, length: int | None = None
    ) -> bytes:
        path = self.paths(job_id).file(_checked_relative(relative_path))
        return await read_output_file(self.runner, path, offset=offset, length=length)

    async def browse(
        self, job_id: UUID, path: str, *, offset: int = 0, length: int | None = None
    ) -> FilesAnswer:
        jobdir = self.paths(job_id).jobdir
        return await job_files.browse(self.runner, jobdir, path, offset=offset, length=length)

    async def find_outputs(
        self, job_id: UUID, patterns: list[str], *, max_bytes: int, max_files: int
    ) -> tuple[list[FoundOutput], OutputsReport]:
        jobdir = self.paths(job_id).jobdir
        return await job_files.find_outputs(
            self.runner, jobdir, patterns, max_bytes=max_bytes, max_files=max_files
        )

    async def download(self, found: FoundOutput, local_path: str | os.PathLike[str]) -> int:
        return await self.runner.download(found.real, local_path)

    async def discard(self, job_id: UUID, relative_paths: Sequence[str]) -> None:
        paths = self.paths(job_id)
        for relative in relative_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(paths.file(_checked_relative(relative)))

    async def close(self) -> None:
        """Jobs keep running: they belong to their supervisors, not to this object."""
