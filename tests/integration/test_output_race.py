"""A job's stored output is exactly its output file, whoever uploads it and whenever (issue 12, item 5).

The agent uploads a job's output from two places: the periodic collection (every second while the
job runs) and the end-of-job collection (when the poller sees the job end). Run together, both read
the file from the same offset; the second upload was sent at the offset the first one had just
moved to, so its bytes were stored twice. Here a reader that takes its time (as SFTP does) makes
the two collections overlap every time, with the real local backend and the real job store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast
from uuid import UUID

import pytest

from cloudhpc.config import ClusterConfig
from cloudhpc.domain.jobs import JobSpec
from cloudhpc.hpc.local import LocalBackend
from cloudhpc.store import Store
from cloudhpc.submitter.agent import Agent, _Tracked
from cloudhpc.submitter.channel import Channel

OUTPUT = b"hello, world!!\n"  # 15 bytes, as in the review's finding


class SlowReader(LocalBackend):
    """The local backend, with reads that return only after a delay (an SFTP round trip): the
    n-th read waits `delays[n]` (the last one for every later read)."""

    def __init__(self, cluster: str, *, workdir: Path, delays: list[float]) -> None:
        super().__init__(cluster, workdir=workdir)
        self.delays = delays

    async def read_output(self, job_id: UUID, *, offset: int = 0, length: int | None = None) -> bytes:
        data = await super().read_output(job_id, offset=offset, length=length)
        delay = self.delays.pop(0) if len(self.delays) > 1 else self.delays[0]
        await asyncio.sleep(delay)
        return data


class StoreChannel:
    """porter's end of the output upload without HTTP in between: `Store.append_output` itself."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def upload_output(self, job_id: UUID, offset: int, data: bytes) -> int:
        return await asyncio.to_thread(self.store.append_output, job_id, offset, data)


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as handle:
        handle.write(data)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    store.migrate()
    yield store
    store.close()


@dataclass
class Race:
    """An agent and a job whose output file (empty yet) it collects through a slow reader."""

    agent: Agent
    tracked: _Tracked
    output: Path


def race(store: Store, tmp_path: Path, delays: list[float]) -> Race:
    workdir = tmp_path / "work"
    backend = SlowReader("local", workdir=workdir, delays=delays)
    job, _created = store.create_job("alice", JobSpec(name="race", cluster="local", script="true\n"))
    output = Path(backend.paths(job.id).output)
    output.parent.mkdir(parents=True)
    output.touch()
    agent = Agent(
        "local",
        ClusterConfig(backend="local", workdir=str(workdir)),
        backend,
        cast(Channel, StoreChannel(store)),
        workdir=str(workdir),
    )
    return Race(agent, _Tracked(job=job, native_id=backend.native_id(job.id)), output)


async def test_two_collections_at_once_store_each_byte_once(store: Store, tmp_path: Path) -> None:
    # The first read is quick and its upload is done before the second (slow) read returns: the
    # second chunk, read at offset 0, must not be stored after the first.
    r = race(store, tmp_path, delays=[0.05, 0.5, 0.05])
    await asyncio.to_thread(r.output.write_bytes, OUTPUT)

    # the periodic collection and the end-of-job collection, as the output loop and the poller run them
    await asyncio.gather(r.agent._collect_output(r.tracked), r.agent._collect_output(r.tracked))

    assert store.read_output(r.tracked.job.id, 0, 1 << 20) == OUTPUT
    assert r.tracked.output_offset == len(OUTPUT)


async def test_output_written_between_collections_is_appended_in_order(store: Store, tmp_path: Path) -> None:
    """Overlapping collections while the file grows: the stored log is the file, in order."""
    r = race(store, tmp_path, delays=[0.01, 0.1, 0.03])
    expected = b""
    for line in range(20):
        chunk = f"line {line:02d}\n".encode()
        await asyncio.to_thread(append, r.output, chunk)
        expected += chunk
        await asyncio.gather(*(r.agent._collect_output(r.tracked) for _ in range(3)))
    assert store.read_output(r.tracked.job.id, 0, 1 << 20) == expected
