"""A cancel stops the job's environment build (issue 12): the job ends `cancelled` at once and the
build on the cluster is killed, instead of running to its end (pip can take many minutes) before
the cancel is even looked at.

`cloudhpc serve all` on the `local` backend, with a cluster prelude that hangs inside environment
builds only (the build script sets `$stage`, a job script does not), so the build is caught while
it runs, every time.
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path

import pytest

from cloudhpc.domain.states import JobState
from tests.e2e.embedded import serve_all


def hanging_build_prelude(pidfile: Path) -> str:
    return f'if [ -n "${{stage:-}}" ]; then echo $BASHPID > {shlex.quote(str(pidfile))}; exec sleep 300; fi'


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for_pid(pidfile: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while not (pidfile.exists() and pidfile.read_text().strip()):
        assert time.monotonic() < deadline, "the environment build never started"
        time.sleep(0.1)
    return int(pidfile.read_text())


@pytest.mark.timeout(120)
def test_a_cancel_stops_the_environment_build_and_ends_the_job_cancelled(tmp_path: Path) -> None:
    pidfile = tmp_path / "build.pid"
    cluster = {
        "backend": "local",
        "workdir": str(tmp_path / "work"),
        "prelude": hanging_build_prelude(pidfile),
    }
    with serve_all(tmp_path, {"local": cluster}) as embedded, embedded.client() as client:
        job = client.submit(
            {"name": "env", "cluster": "local", "script": "echo ran\n", "environment": {"packages": ["six"]}}
        )
        build = wait_for_pid(pidfile, timeout=60)
        assert running(build)
        assert client.get(job).state == JobState.PREPARING
        client.cancel(job)
        asked = time.monotonic()
        final = client.wait(job, timeout=30)
        took = time.monotonic() - asked
        assert final.state == JobState.CANCELLED, (final.state, final.reason, embedded.log()[-3000:])
        assert took < 10, f"the cancel took {took:.1f} s"
        assert final.slurm_job_id is None  # never submitted
        assert "prepared" in (final.reason or "")
        deadline = time.monotonic() + 10
        while running(build):
            assert time.monotonic() < deadline, f"the build (pid {build}) still runs after the cancel"
            time.sleep(0.1)
