"""The cluster side of job files (#13 item 8), on this machine's file system through the local
runner (the same `DirectoryAccess` calls the SFTP one answers; over SSH: tests/e2e/test_job_files.py):
what a files query refuses, and which files `outputs` collects within its bounds."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cloudhpc.domain.job_files import EntryType, FilesAnswer
from cloudhpc.exceptions import JobFileError
from cloudhpc.hpc import job_files
from cloudhpc.hpc.local import LocalRunner

T = TypeVar("T")


@pytest.fixture
def jobdir(tmp_path: Path) -> Path:
    """Two job directories side by side; the first one's is returned, full of traps."""
    jobs = tmp_path / "jobs"
    mine, other = jobs / "mine", jobs / "other"
    (mine / ".cloudhpc").mkdir(parents=True)
    (other / "results").mkdir(parents=True)
    (mine / ".cloudhpc" / "env").write_text("SECRET=1\n")
    (other / "results" / "theirs.csv").write_text("theirs\n")
    (mine / "results").mkdir()
    (mine / "results" / "a.csv").write_text("a" * 40)
    (mine / "results" / "b.csv").write_text("b" * 40)
    (mine / "results" / "c.csv").write_text("c" * 40)
    (mine / ".hidden.csv").write_text("h")
    (mine / "results" / "other.csv").symlink_to(other / "results" / "theirs.csv")
    (mine / "results" / "same.csv").symlink_to("a.csv")
    (mine / "results" / "secret.csv").symlink_to("../.cloudhpc/env")
    (mine / "loop").symlink_to(".")  # `**` must not follow it round and round
    (mine / "otherdir").symlink_to(other)
    os.mkfifo(mine / "pipe.csv")
    return mine


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def browse(jobdir: Path, path: str, **kw: int) -> FilesAnswer:
    return run(job_files.browse(LocalRunner(), str(jobdir), path, **kw))


def refused(jobdir: Path, path: str) -> JobFileError:
    with pytest.raises(JobFileError) as caught:
        browse(jobdir, path)
    return caught.value


def test_browse_lists_reads_and_refuses(jobdir: Path) -> None:
    top = browse(jobdir, "")
    names = {e.name: e.type for e in top.entries or []}
    assert ".cloudhpc" not in names
    assert names["pipe.csv"] == EntryType.OTHER
    assert names["loop"] == EntryType.SYMLINK
    part = browse(jobdir, "results/same.csv", offset=38, length=10)
    assert base64.b64decode(part.content or "") == b"aa"
    assert part.eof
    for path in ("results/other.csv", "otherdir", "otherdir/results", "results/secret.csv"):
        assert refused(jobdir, path).status == 403, path
    assert refused(jobdir, "pipe.csv").status == 422  # a FIFO would block the read forever
    assert refused(jobdir, "nothing").status == 404
    assert refused(jobdir.parent / "gone", "").status == 404


def test_outputs_within_their_bounds(jobdir: Path) -> None:
    patterns = ["results/*.csv", "**/*.csv", "*.csv", "none/*"]
    found, report = run(
        job_files.find_outputs(LocalRunner(), str(jobdir), patterns, max_bytes=100, max_files=10)
    )
    assert [f.relative for f in found] == ["results/a.csv", "results/b.csv"]
    assert report.collected == ["results/a.csv", "results/b.csv"]
    assert report.bytes == 80
    skipped = {s.path: s.reason for s in report.skipped}
    assert "over their limit of 100 bytes" in skipped["results/c.csv"]
    assert "over their limit of 100 bytes" in skipped["results/same.csv"]  # inside: taken, but no room
    assert "outside the job directory" in skipped["results/other.csv"]
    assert "outside the job directory" in skipped["results/secret.csv"]  # into .cloudhpc/
    assert "not a regular file" in skipped["pipe.csv"]
    assert ".hidden.csv" not in skipped  # `*` does not match a leading dot
    assert not any(p.startswith(("loop/", "otherdir/")) for p in skipped)  # directory links not followed
    assert report.unmatched == ["none/*"]

    found, report = run(
        job_files.find_outputs(LocalRunner(), str(jobdir), ["results/*.csv"], max_bytes=10**6, max_files=1)
    )
    assert [f.relative for f in found] == ["results/a.csv"]
    assert "over the limit of 1 files" in {s.path: s.reason for s in report.skipped}["results/b.csv"]


def test_a_walk_over_its_bound_stops_and_says_so(jobdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(20):
        (jobdir / "results" / f"many-{i:02d}.csv").write_text("x")
    (jobdir / "results" / "deeper").mkdir()
    (jobdir / "results" / "deeper" / "late.csv").write_text("x")
    monkeypatch.setattr(job_files, "MAX_WALK_ENTRIES", 12)
    found, report = run(
        job_files.find_outputs(LocalRunner(), str(jobdir), ["**/*.csv"], max_bytes=10**6, max_files=1000)
    )
    assert "the search stopped after 12 directory entries" in {s.path: s.reason for s in report.skipped}[""]
    assert "results/deeper/late.csv" not in [f.relative for f in found]  # not listed once stopped
