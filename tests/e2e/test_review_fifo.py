"""Security review (#13's new surfaces), end to end on the SLURM testbed: a job that turns one of the
files the agent reads (its output, a python job's `.cloudhpc/result.pkl`) into a FIFO must not stop
the agent from serving the cluster's other jobs. porter and the submitter run as processes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudhpc.domain.states import JobState
from tests.e2e.harness import Deployment, running
from tests.jobs import stored_log
from tests.testbed import Testbed

HOLD = 45
"""Seconds the trap job keeps its FIFO; then it opens it once itself, releasing a blocked reader."""

TRAP = f"""\
rm -f .cloudhpc/output.log
mkfifo .cloudhpc/output.log
sleep {HOLD}
exec 3<>.cloudhpc/output.log   # a FIFO opened read-write never blocks: any blocked reader returns
exec 3>&-
rm -f .cloudhpc/output.log
"""


@pytest.fixture
def deployment(tmp_path: Path, testbed: Testbed) -> Iterator[Deployment]:
    dep = Deployment(tmp_path / "deploy", testbed, f"sqlite:///{tmp_path / 'state.db'}")
    with running(dep):
        yield dep


def test_a_fifo_in_one_job_does_not_stop_the_clusters_other_jobs(deployment: Deployment) -> None:
    """The trap job replaces its output file by a FIFO; the agent's next read of it used to block
    sftp-server in open(), and with it every SFTP call of the cluster, so the next job could not be
    staged until the trap released it. Now that read is refused, and the other job runs, ends and
    has its output while the trap still holds its FIFO."""
    with deployment.client() as client:
        trap = client.submit({"name": "trap", "cluster": "testbed", "script": TRAP})
        deadline = time.monotonic() + 60
        while client.get(trap).state != JobState.RUNNING:
            assert time.monotonic() < deadline, client.get(trap)
            time.sleep(0.5)
        time.sleep(5)  # the agent's output collection has met the FIFO by now
        started = time.monotonic()
        other = client.submit({"name": "other", "cluster": "testbed", "script": "echo hello\n"})
        ended = client.wait(other, timeout=HOLD)
        assert ended.state == JobState.COMPLETED, ended
        deadline = time.monotonic() + 20
        while stored_log(client, other) != b"hello\n":
            assert time.monotonic() < deadline, stored_log(client, other)
            time.sleep(0.5)
        assert client.get(trap).state == JobState.RUNNING, "the trap released its FIFO before"
        assert time.monotonic() - started < HOLD - 5
        client.cancel(trap)
