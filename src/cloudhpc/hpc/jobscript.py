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
from uuid import UUID

from cloudhpc.domain.jobs import JobSpec
from cloudhpc.hpc.backend import JobPaths

__all__ = ["ENV_FILE", "environment_file", "render_batch_script", "run_user_script_lines"]

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
    lines += list(body)
    return "\n".join(lines) + "\n"
