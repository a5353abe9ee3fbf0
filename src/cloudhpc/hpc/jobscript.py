"""Renders the batch script that wraps a user's job.

The wrapper is the only script handed to the scheduler. User input reaches it only as values passed
through `shlex.quote` (environment values) or as separate files written over SFTP (the user's script,
the user's files), so nothing a user sends is ever interpreted by a shell it did not write itself.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from uuid import UUID

from cloudhpc.domain.jobs import JobSpec
from cloudhpc.hpc.backend import JobPaths

__all__ = ["render_batch_script", "run_user_script_lines"]


def _exports(env: Mapping[str, str]) -> list[str]:
    return [f"export {name}={shlex.quote(value)}" for name, value in env.items()]


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
        *_exports(spec.env),
    ]
    if prelude.strip():
        lines += ["# cluster prelude (from the cluster configuration)", prelude.rstrip("\n")]
    if activation:
        lines += ["# cached Python environment", *activation]
    if body is None:
        body = run_user_script_lines(paths, spec.script or "")
    lines += list(body)
    return "\n".join(lines) + "\n"
