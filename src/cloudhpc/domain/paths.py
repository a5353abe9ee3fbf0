"""Where cloudhpc's files live on a cluster: the work directory resolved once, and one job's paths.

A cluster's `workdir` may be written `~/x`, `~` or relative (`x`, under the home directory, where an
SSH session starts). sbatch's `--chdir` and `--output`, the staged files and the environment cache
must not depend on a shell's expansion, so the work directory is made absolute before any path is
built from it, by `resolve_path` and nothing else; the runners (SSH and local) read the paths they
are given by the same rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

__all__ = ["JobPaths", "resolve_path"]


def resolve_path(path: str, home: str, *, relative_to: str | None = None) -> str:
    """`path` as an absolute path without a trailing slash: `~` and `~/x` under `home`, a relative
    path under `relative_to` when given (a local backend's configuration, read like any local
    path from the current directory), else under `home` (a cluster, where an SSH session starts)."""
    if not path.startswith("/"):
        if path == "~" or path.startswith("~/"):
            base, rest = home, path[1:].lstrip("/")
        else:
            base, rest = (relative_to if relative_to is not None else home), path
        base = base.rstrip("/")
        path = f"{base}/{rest}" if rest else base
    return path.rstrip("/") or "/"


@dataclass(frozen=True)
class JobPaths:
    """Where one job lives on the cluster: `<workdir>/jobs/<id>/`, cloudhpc's own files under
    `.cloudhpc/`. `workdir` is absolute (`resolve_path`)."""

    workdir: str
    job_id: UUID

    @property
    def jobdir(self) -> str:
        return f"{self.workdir.rstrip('/')}/jobs/{self.job_id}"

    @property
    def control(self) -> str:
        return f"{self.jobdir}/.cloudhpc"

    @property
    def batch_script(self) -> str:
        return f"{self.control}/job.sh"

    @property
    def user_script(self) -> str:
        return f"{self.control}/script"

    @property
    def output(self) -> str:
        return f"{self.control}/output.log"

    def task_output(self, index: int) -> str:
        """The output of one task of an array job (each task writes its own file)."""
        return f"{self.control}/output-{int(index)}.log"

    @property
    def task_output_pattern(self) -> str:
        """sbatch's `--output` for an array job: `%a` is the task index."""
        return f"{self.control}/output-%a.log"

    def file(self, relative: str) -> str:
        """Absolute path of a user file; `relative` was validated by JobSpec (no `..`, not absolute)."""
        return f"{self.jobdir}/{relative}"
