"""Renders the batch script that wraps a user's job.

The wrapper is the only script handed to the scheduler. User input reaches it only as values passed
through `shlex.quote` or as separate files written over SFTP (the user's script, the user's files),
so nothing a user sends is ever interpreted by a shell it did not write itself.

The job's `env` values may be secrets, and the wrapper is stored as the job's `job.sh` artifact and
stays in the job's directory: the values go into their own 0600 file (`ENV_FILE`, each value through
`shlex.quote`), which the wrapper sources and the agent deletes when the job ends.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from uuid import UUID

from cloudhpc.domain.jobs import JobSpec
from cloudhpc.hpc.backend import JobPaths
from cloudhpc.hpc.requeue import checkpoint_lines

__all__ = [
    "ENV_FILE",
    "PYTHON_RESULT",
    "PYTHON_RUNNER",
    "environment_file",
    "python_call_files",
    "python_result_path",
    "render_batch_script",
    "run_python_call_lines",
    "run_user_script_lines",
]

ENV_FILE = ".cloudhpc/env"
"""Job-relative path of the file with the job's `env` values (mode 0600, deleted at the job's end)."""


def environment_file(env: Mapping[str, str]) -> dict[str, bytes]:
    """The staged file that sets the job's `env` (none when it is empty), keyed by job-relative path:
    one `export NAME=<value quoted by shlex.quote>` per variable (names are checked by JobSpec)."""
    if not env:
        return {}
    return {
        ENV_FILE: "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items()).encode()
    }


def _source_environment(paths: JobPaths, env: Mapping[str, str]) -> list[str]:
    if not env:
        return []
    return [
        "# the job's env values: from a 0600 file, never in this script (deleted when the job ends)",
        f". {shlex.quote(paths.file(ENV_FILE))} || exit 97",
    ]


def run_user_script_lines(paths: JobPaths, script: str) -> list[str]:
    """Run the user's script: executed directly when it names its interpreter (#!), else by bash."""
    target = shlex.quote(paths.user_script)
    if script.startswith("#!"):
        return [f"chmod 700 {target}", f"exec {target}"]
    return [f"exec /bin/bash {target}"]


PYTHON_RUNNER = ".cloudhpc/python_runner.py"
"""Job-relative path of the runner of a `python` job (`hpc/python_runner.py`, shipped as a file)."""
PYTHON_RESULT = ".cloudhpc/result.pkl"
"""Job-relative path of a `python` job's outcome; an array task's is `python_result_path(index)`."""


def python_result_path(task: int | str | None = None) -> str:
    """Where the runner writes the outcome of the job, or of array task `task` (`"%a"`: the
    template the runner fills in from SLURM_ARRAY_TASK_ID), job-relative."""
    if task is None:
        return PYTHON_RESULT
    return f".cloudhpc/result-{task if task == '%a' else int(task)}.pkl"


def python_call_files() -> dict[str, bytes]:
    """The files a `python` job needs besides the user's: the runner, read from this package."""
    return {PYTHON_RUNNER: Path(__file__).with_name("python_runner.py").read_bytes()}


def run_python_call_lines(paths: JobPaths, spec: JobSpec) -> list[str]:
    """Run the pickled call of a `python` job with the environment's Python (activated before),
    writing its outcome where the agent collects it (`%a`: the array task's index, set by the
    runner from SLURM_ARRAY_TASK_ID)."""
    assert spec.python is not None  # enforced by JobSpec for kind python
    result = python_result_path(None if spec.array is None else "%a")
    argv = [PYTHON_RUNNER, spec.python.call, result, spec.python.version]
    return [
        "exec python " + " ".join(shlex.quote(paths.file(a)) for a in argv[:3]) + f" {shlex.quote(argv[3])}"
    ]


def render_batch_script(
    *,
    job_id: UUID,
    spec: JobSpec,
    paths: JobPaths,
    prelude: str = "",
    activation: Sequence[str] = (),
    body: Sequence[str] | None = None,
) -> str:
    """The wrapper script: working directory, environment, cluster prelude, environment activation,
    then `body` (by default: run the user's batch script). Scheduler directives are passed on the
    command line, not as #SBATCH lines, so the same script serves the SLURM and local backends."""
    lines = [
        "#!/bin/bash",
        f"# cloudhpc job {job_id} ({spec.name}); rendered by cloudhpc, do not edit",
        f"cd {shlex.quote(paths.jobdir)} || exit 97",
        f"export CLOUDHPC_JOB_ID={shlex.quote(str(job_id))}",
        f"export CLOUDHPC_JOB_NAME={shlex.quote(spec.name)}",
        f"export CLOUDHPC_JOB_DIR={shlex.quote(paths.jobdir)}",
        *_source_environment(paths, spec.env),
    ]
    if prelude.strip():
        lines += ["# cluster prelude (from the cluster configuration)", prelude.rstrip("\n")]
    if activation:
        lines += ["# cached Python environment", *activation]
    if body is None:
        body = run_user_script_lines(paths, spec.script or "")
    if spec.checkpoint is not None and spec.ray is None:  # a Ray job's body traps it (ray/script.py)
        body = checkpoint_lines(paths, spec.checkpoint, body)
    lines += list(body)
    return "\n".join(lines) + "\n"
