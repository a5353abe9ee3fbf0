"""The embedded default's files are readable by their owner only, whatever the umask (issue 12).

`serve all` keeps everything under `.cloudhpc/`: the SQLite job store (every job's spec and
environment values), the local object store (every user's job files and logs) and the admin and
agent tokens. The review found them 0644 in 0755 directories. Here each part writes its files for
real, under the usual umask and under none at all, and every file and directory is checked.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudhpc.config import Settings, SubmitterConfig
from cloudhpc.domain.jobs import JobSpec
from cloudhpc.runtime.tokens import ensure_tokens
from cloudhpc.storage.local import LocalObjectStore
from cloudhpc.store import Store


@pytest.fixture(params=[0o022, 0o000], ids=["umask-022", "umask-000"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, str]:
    """Every path under `root` (and `root`) with its permission bits, for the readable failure."""
    return {
        str(p.relative_to(root.parent)): oct(stat.S_IMODE(p.stat().st_mode)) for p in [root, *root.rglob("*")]
    }


@pytest.mark.usefixtures("umask")
def test_the_embedded_store_objects_and_tokens_are_private(tmp_path: Path) -> None:
    state = tmp_path / ".cloudhpc"
    store = Store(f"sqlite:///{state / 'state.db'}")
    try:
        store.migrate()
        job, _created = store.create_job("alice", JobSpec(name="x", cluster="local", script="true\n"))
        store.append_output(job.id, 0, b"secret output\n")
        objects = LocalObjectStore(state / "objects")
        objects.put(f"jobs/alice/{job.id}/spec.json", b"{}")
        log = tmp_path / "output.log"
        log.write_bytes(b"secret output\n")
        objects.upload_file(f"jobs/alice/{job.id}/output.log", log)
        settings = Settings(submitter=SubmitterConfig(token_file=state / "agent-token"))
        ensure_tokens(store, settings, state_dir=state)
        found = modes(state)  # while the store is open: its WAL and shared-memory files exist
        for name in ("state.db", "state.db-wal", "state.db-shm", "admin-token", "agent-token"):
            assert f".cloudhpc/{name}" in found, found
        assert all(mode == "0o600" for name, mode in found.items() if name.startswith(".cloudhpc/state.db"))
    finally:
        store.close()

    assert f".cloudhpc/objects/jobs/alice/{job.id}/output.log" in found
    for path in [state, *state.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        expected = 0o700 if path.is_dir() else 0o600
        assert mode == expected, (str(path.relative_to(tmp_path)), oct(mode), found)


def test_an_existing_directory_keeps_its_mode(tmp_path: Path) -> None:
    """The store makes private what it creates; a directory its owner made (and chose a mode for)
    is left as it is."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    objects = LocalObjectStore(shared)
    objects.put("a/b", b"x")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755
    assert stat.S_IMODE((shared / "a").stat().st_mode) == 0o700
    assert stat.S_IMODE((shared / "a" / "b").stat().st_mode) == 0o600
