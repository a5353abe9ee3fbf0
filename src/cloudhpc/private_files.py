"""Files and directories that only their owner may read: the embedded store's `state.db`, the local
object store (every user's job files and logs) and the token files under `.cloudhpc/`.

Modes are set explicitly (`chmod` after creation), not left to the process umask: the usual umask
022 made them 0644 files in 0755 directories, readable by every account on the machine (issue 12).
A directory that exists already keeps the mode its owner gave it.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["PRIVATE_DIR_MODE", "PRIVATE_FILE_MODE", "make_private_dirs", "open_private_file"]

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def make_private_dirs(path: str | os.PathLike[str]) -> Path:
    """`mkdir -p` where every directory created is 0700; returns the path.

    Safe against a concurrent creator: a directory that appears meanwhile is used as it is."""
    target = Path(path)
    missing: list[Path] = []
    for directory in (target, *target.parents):
        if directory.is_dir():
            break
        missing.append(directory)
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:
            if not directory.is_dir():
                raise
            continue
        os.chmod(directory, PRIVATE_DIR_MODE)
    return target


def open_private_file(path: str | os.PathLike[str], flags: int) -> int:
    """`os.open(path, flags | O_CREAT)`, the file made 0600 whatever the umask (an existing one
    too: every file opened through here is cloudhpc's own); a file descriptor."""
    fd = os.open(path, flags | os.O_CREAT, PRIVATE_FILE_MODE)
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd
