"""A job's directory on the cluster is private to the HPC account (mode 0700), whoever created it
first, and the bridge key staged into it is 0600 (issue 12, item 1). Real sshd + SLURM of the
testbed, and the local backend.

What this cannot give: other jobs of the same HPC account run as the same user and can read the
directory anyway; that is why a cluster is one HPC identity, used only by its users (docs/security.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from cloudhpc.config import SSHConfig
from cloudhpc.domain.jobs import Resources
from cloudhpc.domain.paths import JobPaths
from cloudhpc.hpc.backend import JobSubmission
from cloudhpc.hpc.local import LocalBackend
from cloudhpc.hpc.slurm.backend import SlurmBackend
from cloudhpc.hpc.ssh.connection import SSHConnection
from cloudhpc.ray.script import KEY_FILE
from tests.slurm_jobs import make_submission
from tests.testbed import Testbed, load_testbed

MODES_SCRIPT = 'stat -c "%a %n" "$PWD" .cloudhpc .cloudhpc/job.sh .cloudhpc/bridge_key data.txt\n'


def with_key(submission: JobSubmission) -> JobSubmission:
    """The submission as a job with bridges has it: the bridge key staged beside the job's files."""
    files = {**submission.files, KEY_FILE: b"not a real key\n"}
    return dataclasses.replace(submission, files=files, modes={KEY_FILE: 0o600})


def modes(output: bytes, jobdir: str) -> dict[str, str]:
    found = dict(reversed(line.split(" ", 1)) for line in output.decode().splitlines() if " " in line)
    return {("." if name == jobdir else name): mode for name, mode in found.items()}


EXPECTED = {
    ".": "700",
    ".cloudhpc": "700",
    ".cloudhpc/job.sh": "700",
    ".cloudhpc/bridge_key": "600",
    "data.txt": "644",
}


async def run_to_end(backend: SlurmBackend | LocalBackend, submission: JobSubmission) -> bytes:
    """Submit, follow the job to its end (at most a minute), and return its output."""
    native_id = await backend.submit(submission)
    for _ in range(240):
        observed = (await backend.poll([native_id])).get(native_id)
        if observed is not None and observed.state.terminal:
            return await backend.read_output(submission.job_id)
        await asyncio.sleep(0.25)
    raise AssertionError(f"job {native_id} did not end within a minute")


async def test_slurm_job_directory_is_private(testbed_ssh: SSHConfig, testbed: Testbed) -> None:
    conn = SSHConnection(testbed_ssh, cluster="testbed")
    backend = SlurmBackend("testbed", conn, workdir="~/.cloudhpc-test")
    try:
        submission = with_key(
            make_submission(
                await backend.workdir(),
                MODES_SCRIPT,
                files={"data.txt": "x"},
                defaults=Resources(partition=load_testbed().partition, time="00:05:00"),
            )
        )
        paths = JobPaths(await backend.workdir(), submission.job_id)
        # a directory left wide open (an older version, a hand-made one) is made private again
        await conn.run(["mkdir", "-p", "-m", "755", paths.jobdir])
        output = await run_to_end(backend, submission)
        assert modes(output, paths.jobdir) == EXPECTED, output
    finally:
        await backend.close()


async def test_local_job_directory_is_private(tmp_path: Path) -> None:
    backend = LocalBackend("local", workdir=str(tmp_path / "work"))
    try:
        submission = with_key(make_submission(str(tmp_path / "work"), MODES_SCRIPT, files={"data.txt": "x"}))
        paths = JobPaths(str(tmp_path / "work"), submission.job_id)
        await asyncio.to_thread(Path(paths.jobdir).mkdir, parents=True)
        await asyncio.to_thread(Path(paths.jobdir).chmod, 0o755)
        output = await run_to_end(backend, submission)
        assert modes(output, paths.jobdir) == EXPECTED, output
    finally:
        await backend.close()
