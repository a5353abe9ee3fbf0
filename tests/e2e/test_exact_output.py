"""Every stored log is the job's output file, byte for byte, when many jobs end at once (issue 12,
item 5).

The review found 2 of 101 finished jobs whose log in the API differed from their output file: the
agent's periodic output collection and its end-of-job collection raced, and a 15-byte output was
stored twice. Here many short jobs wait at a barrier and then all print and end together, so both
collections run for many jobs at the same moment; afterwards every log read through the API is
compared with the output file the job wrote. On the `local` backend (`cloudhpc serve all`, 200
jobs) and on the SLURM testbed over SSH (porter and the submitter as processes, 30 jobs).
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cloudhpc.client import Client
from cloudhpc.config import SSHConfig
from cloudhpc.domain.jobs import Job
from cloudhpc.domain.paths import JobPaths
from cloudhpc.domain.states import JobState
from cloudhpc.hpc.ssh import SSHConnection
from tests.e2e.embedded import Embedded, serve_all
from tests.e2e.harness import Deployment, running
from tests.integration.stores import sqlite_url
from tests.jobs import stored_log
from tests.testbed import Testbed

LOCAL_JOBS = 200
SLURM_JOBS = 30


def barrier_script(go: str, index: int) -> str:
    """Wait for the file `go` to appear, then print a line every 0.1 s for a second and end.

    The wait is `read -t` on a pipe nobody writes, a sleep without starting a process, so 200
    waiting jobs cost no CPU. After it every job prints at once, so the periodic collection has
    new output for every job in each pass and is still at it when the jobs end together and the
    end-of-job collection starts for each.
    """
    return (
        "mkfifo .tick && exec 3<>.tick && rm -f .tick\n"
        f'while [ ! -e "{go}" ]; do read -t 0.2 -u 3 _ || true; done\n'
        f"for line in 1 2 3 4 5 6 7 8 9 10; do printf 'job-%04d line %d\\n' {index} $line; "
        "read -t 0.1 -u 3 _ || true; done\n"
        f"printf 'job-%04d-done\\n' {index}\n"
    )


def wait_until_started(client: Client, jobs: list[Job], timeout: float) -> int:
    """Wait until every job that the cluster has room for runs: none is still pending or being
    prepared, and the number running has not grown for two seconds (the rest wait in SLURM's queue
    for a free CPU). Returns how many run."""
    deadline = time.monotonic() + timeout
    ids = {job.id for job in jobs}
    last, stable_since = -1, time.monotonic()
    while True:
        assert time.monotonic() < deadline, f"only {last} of {len(jobs)} job(s) started"
        states = [j.state for j in client.list(limit=500) if j.id in ids]
        running = states.count(JobState.RUNNING)
        if running != last:
            last, stable_since = running, time.monotonic()
        settled = JobState.PENDING not in states and JobState.PREPARING not in states
        if running == len(jobs) or (settled and running and time.monotonic() - stable_since > 2):
            return running
        time.sleep(0.5)


def wait_completed(client: Client, jobs: list[Job], timeout: float) -> list[Job]:
    deadline = time.monotonic() + timeout
    final = [client.wait(job, timeout=max(1.0, deadline - time.monotonic())) for job in jobs]
    for job in final:
        assert job.state == JobState.COMPLETED, (job.id, job.state, job.reason)
    return final


def mismatches(client: Client, jobs: list[Job], files: dict[str, bytes]) -> list[str]:
    """Jobs whose stored log is not their output file, described."""
    found = []
    for job in jobs:
        stored = stored_log(client, job)
        if stored != files[str(job.id)]:
            found.append(f"{job.id}: stored {stored!r}, file {files[str(job.id)]!r}")
    return found


# ---- local backend: `cloudhpc serve all` -------------------------------------------------------


@pytest.fixture
def local(tmp_path: Path) -> Iterator[tuple[Embedded, Path]]:
    """`serve all` with the `local` cluster working in `tmp_path/work`."""
    workdir = tmp_path / "work"
    with serve_all(tmp_path, {"local": {"backend": "local", "workdir": str(workdir)}}) as embedded:
        yield embedded, workdir


@pytest.mark.timeout(120)
def test_200_local_jobs_ending_together_have_exact_logs(local: tuple[Embedded, Path], tmp_path: Path) -> None:
    embedded, workdir = local
    go = tmp_path / "go"
    started = time.monotonic()
    with embedded.client() as client:
        with ThreadPoolExecutor(8) as pool:  # porter takes submissions in parallel: so do users
            jobs = list(
                pool.map(
                    lambda i: client.submit(
                        {"name": f"exact-{i}", "cluster": "local", "script": barrier_script(str(go), i)}
                    ),
                    range(LOCAL_JOBS),
                )
            )
        submitted = time.monotonic()
        try:
            together = wait_until_started(client, jobs, timeout=60)
        finally:
            go.touch()  # whatever happened, no job waits for ever
        released = time.monotonic()
        wait_completed(client, jobs, timeout=60)
        ended = time.monotonic()
        files = {str(job.id): Path(JobPaths(str(workdir), job.id).output).read_bytes() for job in jobs}
        bad = mismatches(client, jobs, files)
    took = time.monotonic() - started
    print(
        f"submitted in {submitted - started:.1f} s, started in {released - submitted:.1f} s, "
        f"ended in {ended - released:.1f} s"
    )
    print(f"{LOCAL_JOBS} local jobs ({together} ending together): {len(bad)} log(s) differ; {took:.1f} s")
    assert not bad, "\n".join(bad[:10])


# ---- SLURM testbed over SSH ----------------------------------------------------------------------


def on_login_node(ssh: SSHConfig, *argv: str) -> str:
    """Run a command on the testbed's login node over SSH; its stdout."""

    async def run() -> str:
        async with SSHConnection(ssh, cluster="testbed") as conn:
            result = await conn.run(list(argv))
        assert result.exit_status == 0, result.stderr
        return result.stdout

    return asyncio.run(run())


def output_file(ssh: SSHConfig, path: str) -> bytes:
    """A job's output file read with `base64` over SSH, not through the agent's reader."""
    return base64.b64decode(on_login_node(ssh, "base64", "-w0", path))


@pytest.mark.timeout(240)
def test_slurm_jobs_ending_together_have_exact_logs(
    tmp_path: Path, testbed: Testbed, testbed_ssh: SSHConfig
) -> None:
    go = f"/home/hpcuser/.cloudhpc-exact-output-go-{tmp_path.name}"
    started = time.monotonic()
    with (
        sqlite_url(tmp_path) as database,
        running(Deployment(tmp_path / "deploy", testbed, database)) as dep,
        dep.client() as client,
    ):
        jobs = [
            client.submit(
                {
                    "name": f"exact-{i}",
                    "cluster": "testbed",
                    "script": barrier_script(go, i),
                    "resources": {"time": "00:03:00", "cpus_per_task": 1, "mem": "64M"},
                }
            )
            for i in range(SLURM_JOBS)
        ]
        try:
            together = wait_until_started(client, jobs, timeout=120)
            on_login_node(testbed_ssh, "touch", go)
            wait_completed(client, jobs, timeout=120)
            workdir = "/home/hpcuser/.cloudhpc"
            files = {str(job.id): output_file(testbed_ssh, JobPaths(workdir, job.id).output) for job in jobs}
            bad = mismatches(client, jobs, files)
        finally:
            on_login_node(testbed_ssh, "touch", go)  # whatever happened, no job waits for ever
            for job in jobs:
                if not client.get(job).state.terminal:
                    client.cancel(job)
            on_login_node(testbed_ssh, "rm", "-f", go)
    took = time.monotonic() - started
    print(f"{SLURM_JOBS} SLURM jobs ({together} ending together): {len(bad)} log(s) differ; {took:.1f} s")
    assert not bad, "\n".join(bad[:10])
