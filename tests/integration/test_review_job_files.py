"""Security review (#13's new surfaces): a job directory that a hostile or careless job shaped, read
by the cluster side of files queries and `outputs` through the local runner on this machine's file
system (the same `DirectoryAccess` calls the SFTP runner answers)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from cloudhpc.hpc import job_files
from cloudhpc.hpc.local import LocalRunner


def _nested(root: Path, depth: int) -> Path:
    """`root/a/a/.../a` `depth` levels deep, made level by level (a path that long cannot be named
    in one system call); returns the path of the deepest directory."""
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


def test_outputs_of_a_tree_deeper_than_the_stack(tmp_path: Path) -> None:
    """A job that made 1,500 nested directories made `**` collection raise RecursionError (no
    `outputs.json`, the agent's finishing task failed); now the walk stops at MAX_WALK_DEPTH, collects
    what is above it and says what it left out."""
    jobdir = tmp_path / "job"
    (jobdir / "results").mkdir(parents=True)
    (jobdir / "results" / "top.txt").write_text("top\n")
    _nested(jobdir, 1500)
    found, report = asyncio.run(
        job_files.find_outputs(LocalRunner(), str(jobdir), ["**/*.txt"], max_bytes=1 << 20, max_files=10)
    )
    assert [f.relative for f in found] == ["results/top.txt"]
    assert any(f"{job_files.MAX_WALK_DEPTH} levels deep" in s.reason for s in report.skipped), report
