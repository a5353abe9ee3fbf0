"""Directory trees deeper than Python's recursion limit, for tests of code that walks job directories.

pytest removes old sessions' temporary directories with the recursive `shutil.rmtree`, which raises
RecursionError on such a tree, and pytest then exits 1 in every later session on that machine (CI's
stop 19: all tests passed, the run failed). So a test removes the tree it made itself (`remove`), and
the session removes the ones earlier sessions left behind (killed mid-test, or from before this
module existed: `remove_left_behind`)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

TEST_DIR_PATTERN = "test_outputs_of_a_tree_deeper_*"
"""The temporary directories of the one test that makes such a tree (tests/integration/test_review_job_files.py)."""


def make(root: Path, depth: int) -> Path:
    """`root/a/a/.../a/deep.txt`, `depth` directories deep, made level by level (a path that long
    cannot be named in one system call); returns `root`."""
    fd = os.open(root, os.O_RDONLY)
    try:
        for _ in range(depth):
            os.mkdir("a", dir_fd=fd)
            below = os.open("a", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = below
        os.close(os.open("deep.txt", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd))
    finally:
        os.close(fd)
    return root


def remove(path: Path) -> None:
    """Remove `path` and everything under it, at any depth: GNU `rm` walks without recursion."""
    subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], check=True)


def remove_left_behind(pytest_root: Path) -> list[Path]:
    """Remove the deep trees earlier sessions left in pytest's temporary root (`pytest-of-<user>`:
    numbered session directories and the `garbage-*` ones pytest failed to delete); returns them."""
    found = sorted(pytest_root.glob(f"*/{TEST_DIR_PATTERN}"))
    for path in found:
        remove(path)
    return found
