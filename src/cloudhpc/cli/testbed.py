"""`cloudhpc testbed up|down|status`: the project's `scripts/testbed.sh`, run from the checkout it lives in.

The testbed script is part of the source tree, not of the installed package (it installs Debian
packages as root and is meant for developers and CI), so the command looks for the checkout: the
directory given by `--repo`, else the current directory or one of its parents, else the checkout an
editable install points at. The script's own output (its progress lines) passes through unchanged and
its exit code becomes ours.
"""

from __future__ import annotations

import subprocess
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from cloudhpc.exceptions import ConfigError

__all__ = ["find_testbed_script", "run_testbed"]

SCRIPT = Path("scripts") / "testbed.sh"


class Action(StrEnum):
    up = "up"
    down = "down"
    status = "status"
    purge = "purge"


def _candidates(start: Path) -> list[Path]:
    here = Path(__file__).resolve()
    return [start, *start.parents, *here.parents]


def find_testbed_script(repo: Path | None = None, start: Path | None = None) -> Path:
    """The checkout's `scripts/testbed.sh`; a ConfigError that says where it looked otherwise."""
    if repo is not None:
        script = repo / SCRIPT
        if script.is_file():
            return script
        raise ConfigError(f"--repo: {repo} holds no {SCRIPT}; give the root of a cloudhpc checkout")
    for directory in _candidates((start or Path.cwd()).resolve()):
        script = directory / SCRIPT
        if script.is_file() and (directory / "pyproject.toml").is_file():
            return script
    raise ConfigError(
        f"no {SCRIPT} found from {start or Path.cwd()} upwards nor beside the installed package: "
        "run this inside a cloudhpc checkout (git clone), or pass --repo DIR"
    )


def run_testbed(
    action: Annotated[
        Action,
        typer.Argument(help="up (install and start), down (stop), status, purge (stop and wipe its data)"),
    ],
    repo: Annotated[Path | None, typer.Option("--repo", help="root of the cloudhpc checkout")] = None,
) -> None:
    """Bring the testbed up (installs and starts SLURM, sshd, S3, PostgreSQL, MLflow, Prometheus on
    loopback; needs root on Debian 12), stop it, or show what runs. docs/testbed.md explains it."""
    script = find_testbed_script(repo)
    completed = subprocess.run(["bash", str(script), action.value], cwd=script.parent.parent, check=False)
    raise typer.Exit(completed.returncode)
