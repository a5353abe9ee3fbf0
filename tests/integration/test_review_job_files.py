"""Security review (#13's new surfaces): a job directory that a hostile or careless job shaped, read
by the cluster side of files queries and `outputs` through the local runner on this machine's file
system (the same `DirectoryAccess` calls the SFTP runner answers)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from pathlib import Path

import pytest

from cloudhpc.config import SSHConfig
from cloudhpc.exceptions import RemoteFileError
from cloudhpc.hpc import job_files
from cloudhpc.hpc.local import LocalRunner
from cloudhpc.hpc.ssh import SSHConnection
from tests import deep_tree

FIFO_WAIT = 10.0
"""Seconds a read of a FIFO may take before the test calls it blocked."""


def test_outputs_of_a_tree_deeper_than_the_stack(tmp_path: Path) -> None:
    """A job that made 1,500 nested directories made `**` collection raise RecursionError (no
    `outputs.json`, the agent's finishing task failed); now the walk stops at MAX_WALK_DEPTH, collects
    what is above it and says what it left out."""
    jobdir = tmp_path / "job"
    (jobdir / "results").mkdir(parents=True)
    (jobdir / "results" / "top.txt").write_text("top\n")
    deep_tree.make(jobdir, 1500)
    try:
        found, report = asyncio.run(
            job_files.find_outputs(LocalRunner(), str(jobdir), ["**/*.txt"], max_bytes=1 << 20, max_files=10)
        )
    finally:
        deep_tree.remove(jobdir / "a")
    assert [f.relative for f in found] == ["results/top.txt"]
    assert any(f"{job_files.MAX_WALK_DEPTH} levels deep" in s.reason for s in report.skipped), report


def _release(fifo: Path) -> None:
    """Open the FIFO for writing once, so a read blocked in open() (the defect) returns."""
    with contextlib.suppress(OSError):  # ENXIO: nobody is reading it, nothing is blocked
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


async def test_local_read_of_a_fifo_is_refused_not_blocked(tmp_path: Path) -> None:
    """A python job that replaced its `.cloudhpc/result.pkl` (or its output) by a FIFO blocked the
    agent's read of it for good (a thread of the agent stuck in open()); now it is refused."""
    fifo = tmp_path / "result.pkl"
    os.mkfifo(fifo)
    try:
        with pytest.raises(RemoteFileError, match="not a regular file"):
            await asyncio.wait_for(LocalRunner().read_file(str(fifo), length=10), FIFO_WAIT)
    finally:
        _release(fifo)


@pytest.mark.testbed
async def test_sftp_read_of_a_fifo_is_refused_and_sftp_goes_on(testbed_ssh: SSHConfig) -> None:
    """Over SSH the same FIFO blocked sftp-server in open(), and with it every later SFTP call of the
    cluster (staging, outputs, files queries of every user on it); now it is refused after a stat and
    the next read answers at once."""
    async with SSHConnection(testbed_ssh, cluster="testbed") as conn:
        home = await conn.home()
        scratch = f"{home}/.cloudhpc-test/{uuid.uuid4()}"
        await conn.makedirs(scratch)
        fifo, plain = f"{scratch}/result.pkl", f"{scratch}/plain.txt"
        try:
            assert (await conn.run(["mkfifo", fifo])).ok
            await conn.write_file(plain, b"plain\n")
            with pytest.raises(RemoteFileError, match="not a regular file"):
                await asyncio.wait_for(conn.read_file(fifo, length=10), FIFO_WAIT)
            assert await asyncio.wait_for(conn.read_file(plain), FIFO_WAIT) == b"plain\n"
        finally:
            # a blocked sftp-server (the defect) is released by a writer; then the directory goes
            await conn.run(["timeout", "2", "sh", "-c", 'exec 3>"$1"', "sh", fifo])
            assert (await conn.run(["rm", "-rf", "--", scratch])).ok


class _CountingRunner(LocalRunner):
    """The local runner, remembering how many entries each listing returned to the agent."""

    def __init__(self) -> None:
        super().__init__()
        self.listed: list[int] = []

    async def listdir(self, path: str, *, limit: int | None = None) -> list[tuple[str, job_files.Stat]]:
        entries = await super().listdir(path, limit=limit)
        self.listed.append(len(entries))
        return entries


def _many_files(directory: Path, count: int) -> None:
    directory.mkdir(parents=True)
    for i in range(count):
        os.close(os.open(directory / f"f{i:05d}.txt", os.O_WRONLY | os.O_CREAT, 0o600))


def test_a_huge_directory_is_not_read_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A files query of a directory read every entry into the agent before keeping 1,000 (200,000
    files: 120 MB and 5.5 s per request), and output collection read a whole directory before
    checking MAX_WALK_ENTRIES. Both now stop reading at their bound (made small here) and say so."""
    monkeypatch.setattr(job_files, "MAX_LISTING_SCAN", 100)
    monkeypatch.setattr(job_files, "MAX_LISTING", 10)
    monkeypatch.setattr(job_files, "MAX_WALK_ENTRIES", 50)
    jobdir = tmp_path / "job"
    _many_files(jobdir / "big", 300)
    runner = _CountingRunner()
    answer = asyncio.run(job_files.browse(runner, str(jobdir), "big"))
    assert answer.truncated
    assert len(answer.entries or []) == 10
    assert max(runner.listed) <= 101, runner.listed
    runner.listed.clear()
    found, report = asyncio.run(
        job_files.find_outputs(runner, str(jobdir), ["big/*.txt"], max_bytes=1 << 20, max_files=1000)
    )
    assert max(runner.listed) <= 51, runner.listed
    assert len(found) <= 50
    assert any("stopped after 50" in s.reason for s in report.skipped), report


@pytest.mark.testbed
async def test_sftp_listing_stops_at_its_limit(testbed_ssh: SSHConfig) -> None:
    """Over SFTP the listing is read batch by batch and stops at the limit (the directory handle
    closed, the next SFTP call answered)."""
    async with SSHConnection(testbed_ssh, cluster="testbed") as conn:
        home = await conn.home()
        scratch = f"{home}/.cloudhpc-test/{uuid.uuid4()}"
        await conn.makedirs(scratch)
        try:
            made = await conn.run(["sh", "-c", 'cd "$1" && seq 1 600 | xargs touch', "sh", scratch])
            assert made.ok, made.stderr
            assert len(await conn.listdir(scratch, limit=150)) == 150
            assert len(await conn.listdir(scratch)) == 600
            await conn.write_file(f"{scratch}/after", b"ok")
            assert await asyncio.wait_for(conn.read_file(f"{scratch}/after"), FIFO_WAIT) == b"ok"
        finally:
            assert (await conn.run(["rm", "-rf", "--", scratch])).ok


def test_a_read_far_past_the_end_is_empty_not_an_error(tmp_path: Path) -> None:
    """`offset` may be up to 2**63-1 (porter checks that much): the local runner's seek there failed
    (EINVAL), the agent answered 502 `cluster_error` for a valid request. Now: no content, `eof`."""
    (tmp_path / "a.txt").write_text("hi\n")
    for offset in (3, 10**18, 2**63 - 1):
        answer = asyncio.run(
            job_files.browse(LocalRunner(), str(tmp_path), "a.txt", offset=offset, length=10)
        )
        assert answer.content == ""
        assert answer.eof
        assert answer.offset == offset
