"""The one place where an argument list becomes remote shell text, and the label of a command."""

from __future__ import annotations

import posixpath
import shlex
from collections.abc import Sequence

__all__ = ["build_command_line", "command_name"]


def build_command_line(argv: Sequence[str], prelude: str = "") -> str:
    """The remote command line: the one place where an argument list becomes shell text.

    Every argument is quoted; `prelude` (trusted cluster configuration such as
    `source /appl/profile/zz-csc-env.sh`) is the only unquoted text and comes before it.
    """
    if isinstance(argv, str):
        raise TypeError("argv must be a sequence of arguments, not a string")
    if not argv:
        raise ValueError("argv must not be empty")
    for arg in argv:
        if not isinstance(arg, str):
            raise TypeError(f"every argument must be a str, got {type(arg).__name__}: {arg!r}")
        if "\0" in arg:
            # A NUL cannot travel in an SSH exec request; refusing beats silently truncating.
            raise ValueError(f"argument contains a NUL byte: {arg!r}")
    line = shlex.join(argv)
    return f"{prelude}\n{line}" if prelude else line


def command_name(argv: Sequence[str]) -> str:
    """The label used in logs and metrics: the basename of the program, looking through an `env`
    prefix (`env SLURM_TIME_FORMAT=%s squeue ...` is `squeue`), so metric labels stay meaningful."""
    words = list(argv)
    if words and posixpath.basename(words[0]) == "env":
        words = words[1:]
        while words and "=" in words[0] and not words[0].startswith("-"):
            words = words[1:]
    if not words:
        return "env" if argv else "?"
    return posixpath.basename(words[0]) or words[0]
