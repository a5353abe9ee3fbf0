"""Batch job submissions as the agent hands them to a backend, for SLURM tests and benchmarks."""

from __future__ import annotations

from uuid import uuid4

from cloudhpc.config import SSHConfig
from cloudhpc.domain.jobs import JobSpec, Resources
from cloudhpc.hpc.backend import JobPaths, JobSubmission
from cloudhpc.hpc.jobscript import environment_file, render_batch_script
from tests.testbed import Testbed, load_testbed

__all__ = ["make_submission", "ssh_config", "testbed_ssh"]


def ssh_config(testbed: Testbed) -> SSHConfig:
    """SSH settings for the testbed's login node, with the host key pinned."""
    return SSHConfig(
        host=testbed.ssh_host,
        port=testbed.ssh_port,
        user=testbed.ssh_user,
        key_file=testbed.ssh_key,
        known_hosts=testbed.known_hosts,
    )


def testbed_ssh() -> tuple[Testbed, SSHConfig]:
    """The testbed and its SSH settings, for scripts that run outside pytest (bench/)."""
    testbed = load_testbed()
    return testbed, ssh_config(testbed)


def make_submission(
    workdir: str,
    script: str,
    *,
    resources: Resources | None = None,
    env: dict[str, str] | None = None,
    files: dict[str, str] | None = None,
    defaults: Resources | None = None,
) -> JobSubmission:
    """A batch job: the rendered wrapper plus the user's script and files, keyed by job-relative path.
    `defaults` are the cluster's, applied as the agent applies them (backends take complete resources)."""
    job_id = uuid4()
    spec = JobSpec(
        name="slurm-test",
        cluster="testbed",
        script=script,
        resources=resources or Resources(),
        env=env or {},
        files=files or {},
    )
    paths = JobPaths(workdir, job_id)
    staged = {path: content.encode() for path, content in spec.files.items()}
    staged[".cloudhpc/script"] = script.encode()
    secret_env = environment_file(spec.env)  # as the agent stages it (submitter/staging.py)
    staged |= secret_env
    return JobSubmission(
        job_id=job_id,
        spec=spec,
        resources=spec.resources.with_defaults(defaults) if defaults is not None else spec.resources,
        batch_script=render_batch_script(job_id=job_id, spec=spec, paths=paths),
        files=staged,
        modes=dict.fromkeys(secret_env, 0o600),
    )
