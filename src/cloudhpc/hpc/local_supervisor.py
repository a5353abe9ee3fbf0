"""The detached process that runs one job of the local backend and records its life on disk.

`LocalBackend.submit` starts `python -m cloudhpc.hpc.local_supervisor <control dir>`; this process
plays the part slurmd plays for a SLURM job: it starts `bash <batch script>` in a process group of
its own, appends its output to the job's output file, enforces the time limit, turns a SIGTERM into
a cancellation, and writes what happened to small JSON files in the job's control directory. The
agent only reads those files, so it can be restarted (or several backends can look at the same
work directory) without losing a job.

The process forks once: the parent (the "launcher") records the child's pid in the state file and
exits, so the agent's `submit` returns only once the job is findable, and the supervisor is never a
child of the agent (no zombies, no tie to the agent's lifetime). The child waits on a pipe until the
launcher has written the state file, so the two never write it at the same time.

Only the standard library is imported here: this module starts for every job and must start fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = [
    "CANCEL_FILE",
    "REQUEST_FILE",
    "STATE_FILE",
    "SUPERVISOR_LOG",
    "job_environment",
    "main",
    "now_iso",
    "process_alive",
    "process_start_ticks",
    "read_json",
    "write_json_atomic",
]

REQUEST_FILE = "local-request.json"
"""Written once by the backend before launch: what to run and under which limits."""
STATE_FILE = "local-state.json"
"""The job's lifecycle; written by the launcher (queued), then by the supervisor (running, end)."""
CANCEL_FILE = "local-cancel.json"
"""Written by the backend when a cancel is requested: survives a signal that could not be delivered."""
SUPERVISOR_LOG = "supervisor.log"
"""The supervisor's own stderr (tracebacks, if it ever crashes), kept apart from the job's output."""

_SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "PASSPHRASE", "KEY")
_RESERVED_PREFIXES = ("CLOUDHPC_", "AWS_")
_POLL_SECONDS = 0.05

_stop_requested = False


def job_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The agent's environment minus everything that may hold a credential.

    A local job runs user code as the agent's own account, on the machine that holds the agent's
    porter token, the SSH key passphrase and cloud credentials. A SLURM job never sees the agent's
    environment at all (it gets the login node's), so passing these on would give local jobs a
    power that the same job on a cluster does not have. Names containing TOKEN, SECRET, PASSWORD,
    PASSPHRASE or KEY (any case) go, and so do all CLOUDHPC_* (the agent's configuration; the batch
    script sets the job's own CLOUDHPC_JOB_* variables) and AWS_* variables.
    """
    source = os.environ if environ is None else environ
    kept: dict[str, str] = {}
    for name, value in source.items():
        upper = name.upper()
        if any(word in upper for word in _SECRET_WORDS) or upper.startswith(_RESERVED_PREFIXES):
            continue
        kept[name] = value
    return kept


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def read_json(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when the file does not exist (or is not an object)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    return data if isinstance(data, dict) else None


def write_json_atomic(path: str | os.PathLike[str], data: Mapping[str, Any]) -> None:
    """Write to a temporary name and rename, so a reader sees the old or the new file, never half."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of `/proc/<pid>/stat` after the command name (field 3 onwards); None when the
    process is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    return stat[stat.rfind(")") + 2 :].split()


def process_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell it from a reused pid."""
    fields = _stat_fields(pid)
    try:
        return int(fields[19]) if fields is not None else None
    except (IndexError, ValueError):
        return None


def _process_state(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def process_alive(pid: int | None, start_ticks: int | None = None) -> bool:
    """True when `pid` runs and is the process recorded (same start time), not a zombie."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    if _process_state(pid) in ("Z", "X"):
        return False
    if start_ticks is not None:
        current = process_start_ticks(pid)
        if current is not None and current != start_ticks:
            return False
    return True


def _on_stop(signum: int, frame: FrameType | None) -> None:
    global _stop_requested
    _stop_requested = True


def _on_hangup(signum: int, frame: FrameType | None) -> None:
    """Detached from any terminal, a hangup means nothing to the job."""


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _limit_reached(limit: float | None, started: float) -> bool:
    return limit is not None and limit > 0 and time.monotonic() - started >= limit


def _supervise(control: Path, request: dict[str, Any]) -> int:
    """Run the job to its end and record it. Returns the supervisor's own exit status."""
    state_path = control / STATE_FILE
    state = read_json(state_path) or {}
    state.update(native_id=request["native_id"], job_id=request["job_id"], hostname=socket.gethostname())

    def record(**changes: Any) -> None:
        state.update(changes)
        write_json_atomic(state_path, state)

    if _stop_requested or (control / CANCEL_FILE).exists():
        record(state="cancelled", native_state="CANCELLED", reason=None, ended_at=now_iso())
        return 0

    output = os.open(request["output"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        child = subprocess.Popen(
            ["/bin/bash", request["batch_script"]],
            cwd=request["jobdir"],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=job_environment(),
            start_new_session=True,
        )
    except OSError as exc:
        os.write(output, f"cloudhpc: could not start the job: {exc}\n".encode())
        record(state="failed", native_state="FAILED", reason="LAUNCH_FAILED", ended_at=now_iso())
        return 1
    finally:
        os.close(output)
    started = time.monotonic()
    record(
        state="running",
        native_state="RUNNING",
        pid=child.pid,
        pid_start=process_start_ticks(child.pid),
        started_at=now_iso(),
    )

    limit = request.get("time_limit_seconds")
    grace = float(request.get("kill_grace_seconds") or 10.0)
    ending: str | None = None
    kill_at: float | None = None
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        if ending is None:
            if _stop_requested or (control / CANCEL_FILE).exists():
                ending = "cancelled"
            elif _limit_reached(limit, started):
                ending = "timeout"
            if ending is not None:
                _killpg(child.pid, signal.SIGTERM)
                kill_at = time.monotonic() + grace
        elif kill_at is not None and time.monotonic() >= kill_at:
            _killpg(child.pid, signal.SIGKILL)
            kill_at = None
        time.sleep(_POLL_SECONDS)
    elapsed = time.monotonic() - started
    # Like SLURM, the end of the batch script ends the job: stragglers in its group go too.
    _killpg(child.pid, signal.SIGKILL)
    child.returncode = status  # the Popen object must not try to reap it again

    exit_code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    term_signal = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    if ending == "cancelled":
        outcome = {"state": "cancelled", "native_state": "CANCELLED", "reason": None}
    elif ending == "timeout":
        outcome = {"state": "timeout", "native_state": "TIMEOUT", "reason": "TIMEOUT"}
    elif exit_code == 0:
        outcome = {"state": "completed", "native_state": "COMPLETED", "reason": None}
    else:
        outcome = {"state": "failed", "native_state": "FAILED", "reason": "FAILED"}
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    rss_unit = 1 if sys.platform == "darwin" else 1024
    record(
        **outcome,
        exit_code=exit_code,
        signal=term_signal,
        ended_at=now_iso(),
        elapsed_seconds=elapsed,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        max_rss_bytes=usage.ru_maxrss * rss_unit,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m cloudhpc.hpc.local_supervisor <job control directory>", file=sys.stderr)
        return 2
    control = Path(args[0])
    request = read_json(control / REQUEST_FILE)
    if request is None:
        print(f"cloudhpc: {control / REQUEST_FILE} is missing or not a JSON object", file=sys.stderr)
        return 2
    # Installed before the fork so that the child never has a moment without them.
    signal.signal(signal.SIGTERM, _on_stop)
    signal.signal(signal.SIGINT, _on_stop)
    # A handler, not SIG_IGN: an ignored signal stays ignored across exec, in the job too.
    signal.signal(signal.SIGHUP, _on_hangup)

    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(write_end)
        while os.read(read_end, 1):
            pass
        os.close(read_end)
        if read_json(control / STATE_FILE) is None:
            return 1  # the launcher failed to record us: nobody could find this job
        return _supervise(control, request)

    os.close(read_end)
    try:
        write_json_atomic(
            control / STATE_FILE,
            {
                "version": 1,
                "native_id": request["native_id"],
                "job_id": request["job_id"],
                "state": "queued",
                "native_state": "PENDING",
                "reason": None,
                "submitted_at": request.get("submitted_at") or now_iso(),
                "supervisor_pid": child,
                "supervisor_start": process_start_ticks(child),
            },
        )
    except BaseException:
        os.kill(child, signal.SIGKILL)
        raise
    finally:
        os.close(write_end)
    return 0


if __name__ == "__main__":
    sys.exit(main())
