"""Ray on SLURM with bridges, end to end: porter and the submitter as processes, SLURM on the testbed,
real Ray in a cached environment built for hpcuser, the testbed's sshd as the bridge VM.

At most two Ray clusters run at once (a Ray head takes about 800 MB and the machine has 2 cores).
The first test builds the Ray environment when it is not cached yet (a download of Ray from PyPI),
hence its longer timeout; every later job reuses it.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from cloudhpc.client import ApiError
from cloudhpc.config import SSHConfig
from cloudhpc.domain.jobs import Job, JobSpec, Observation, Resources
from cloudhpc.domain.states import JobState
from cloudhpc.hpc.backend import CommandResult, JobPaths, JobSubmission
from cloudhpc.hpc.envs import EnvironmentCache
from cloudhpc.hpc.jobscript import render_batch_script
from cloudhpc.hpc.slurm import SlurmBackend
from cloudhpc.hpc.ssh import SSHConnection
from cloudhpc.ray.script import render_ray_job
from cloudhpc.store import Store
from tests.e2e.harness import Deployment, bridged_deployment, running
from tests.e2e.ray_jobs import ray_spec
from tests.testbed import Testbed

FIRST_START = 900.0
"""Seconds for the first cluster: may include building the Ray environment (pip install ray)."""


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, testbed: Testbed) -> Iterator[Deployment]:
    # artifacts, and `files` given as s3:// URLs, under s3://<bucket>/ray-e2e
    dep = bridged_deployment(tmp_path_factory.mktemp("ray"), testbed, "ray-e2e")
    with running(dep):
        yield dep


def hpc(ssh: SSHConfig, *argv: str) -> CommandResult:
    """Run a command as hpcuser on the login node, over SSH like everything else."""

    async def run() -> CommandResult:
        conn = SSHConnection(ssh, cluster="testbed")
        try:
            return await conn.run(list(argv), timeout=30)
        finally:
            await conn.close()

    return asyncio.run(run())


def job_dir(ssh: SSHConfig, job: Job) -> str:
    home = hpc(ssh, "printenv", "HOME").stdout.strip()
    return f"{home}/.cloudhpc/jobs/{job.id}"


def ports_env(ssh: SSHConfig, job: Job) -> dict[str, str]:
    text = hpc(ssh, "cat", f"{job_dir(ssh, job)}/.cloudhpc/ray/ports.env").stdout
    return dict(line.split("=", 1) for line in text.split())


def answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/version", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_for(what: str, check: Any, timeout: float, step: float = 0.2) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout}s"
        time.sleep(step)
    return time.monotonic() - started


@pytest.mark.timeout(FIRST_START + 300)
def test_two_ray_clusters_bridges_job_submission_tunnel_restart_and_cancel(
    deployment: Deployment, testbed_ssh: SSHConfig
) -> None:
    with deployment.client() as client:
        a = client.submit(ray_spec("ray-a", "ray-cluster", expose=["dashboard", "client"]))
        b = client.submit(ray_spec("ray-b", "ray-cluster", expose=["dashboard"]))
        assert {x.name for x in a.bridges} == {"dashboard", "client"}
        ports = [x.bridge_port for x in [*a.bridges, *b.bridges]]
        assert len(set(ports)) == 3, "a port held by a live job is never handed out twice"

        url_a = client.ray_dashboard_url(a, timeout=FIRST_START)
        url_b = client.ray_dashboard_url(b, timeout=120)
        assert url_a != url_b
        assert client.get(a).state == JobState.RUNNING
        bridges_a = client.wait_bridges(a, timeout=60)
        assert all(x.ready for x in bridges_a)
        assert {x.url.split(":")[0] for x in bridges_a if x.url} == {"http", "ray"}

        # Two Ray clusters on one node: their own ports, temporary directories and sessions.
        env_a, env_b = ports_env(testbed_ssh, a), ports_env(testbed_ssh, b)
        for key in ("RAY_GCS_PORT", "RAY_DASHBOARD_PORT", "RAY_CLIENT_PORT", "RAY_TMPDIR"):
            assert env_a[key] != env_b[key], key
        session_a = httpx.get(f"{url_a}/api/version").json()["session_name"]
        session_b = httpx.get(f"{url_b}/api/version").json()["session_name"]
        assert session_a != session_b

        # A real JobSubmissionClient through the bridge, as a notebook or a pipeline pod would.
        jobs = JobSubmissionClient(url_a)
        submission = jobs.submit_job(
            entrypoint="python -c \"import ray; ray.init(); print('answer', ray.get(ray.remote(lambda: 6 * 7).remote()))\""
        )
        wait_for("the Ray job", lambda: jobs.get_job_status(submission).is_terminal(), 180, step=0.5)
        assert jobs.get_job_status(submission) == JobStatus.SUCCEEDED, jobs.get_job_logs(submission)
        assert "answer 42" in jobs.get_job_logs(submission)

        # The tunnel's ssh killed mid-job: the restart loop brings the bridge back within 10 s.
        pid_file = f"{job_dir(testbed_ssh, a)}/.cloudhpc/ray/tunnel.pid"
        old_pid = hpc(testbed_ssh, "cat", pid_file).stdout.strip()
        assert old_pid.isdigit()
        assert hpc(testbed_ssh, "kill", "-9", old_pid).ok
        killed = time.monotonic()
        wait_for(
            "a new tunnel", lambda: hpc(testbed_ssh, "cat", pid_file).stdout.strip() not in ("", old_pid), 10
        )
        wait_for("the dashboard through the new tunnel", lambda: answers(url_a), 10)
        assert time.monotonic() - killed <= 10
        assert "bridge tunnel to" in client.logs(a).data.decode()

        # Cancel: the SLURM jobs end, the ports are free again, the bridges are gone.
        key_file = f"{job_dir(testbed_ssh, a)}/.cloudhpc/bridge_key"
        client.cancel(a)
        client.cancel(b)
        final = [client.wait(j, timeout=60) for j in (a, b)]
        assert [j.state for j in final] == [JobState.CANCELLED, JobState.CANCELLED]
        assert client.bridges(a) == []
        assert client.bridges(b) == []
        store = Store(deployment.database)
        try:
            wait_for("ports released", lambda: store.bridge_records() == [], 10)
        finally:
            store.close()
        wait_for("bridge ports closed", lambda: not any(port_open(p) for p in ports), 10)
        for job in final:
            sacct = hpc(testbed_ssh, "sacct", "-X", "-n", "-P", "-j", str(job.slurm_job_id), "--format=State")
            assert sacct.stdout.strip().startswith("CANCELLED"), sacct.stdout
        assert not hpc(testbed_ssh, "test", "-e", key_file).ok, "the bridge key outlived its job"
        processes = hpc(testbed_ssh, "ps", "-eo", "args").stdout
        assert env_a["RAY_TMPDIR"] not in processes
        assert env_b["RAY_TMPDIR"] not in processes
        assert not hpc(testbed_ssh, "test", "-e", env_a["RAY_TMPDIR"]).ok


IMPORT_CHECK = """\
import os, urllib.error, urllib.request
import ray

address = os.environ["CLOUDHPC_IMPORT_S3"]
try:
    body = urllib.request.urlopen(f"http://{address}/", timeout=10).read()
except urllib.error.HTTPError as exc:  # anonymous: the S3 server answers AccessDenied
    body = exc.read()
print("s3 answered through", address, b"AccessDenied" in body)
ray.init()
print("ray says", ray.get(ray.remote(lambda: 6 * 7).remote()))
"""


@pytest.mark.timeout(FIRST_START + 300)
def test_ray_jobs_end_with_their_entrypoint_and_import_a_cloud_service(
    deployment: Deployment, testbed: Testbed
) -> None:
    s3_port = int(testbed.s3_endpoint.rsplit(":", 1)[1])
    with deployment.client() as client:
        # a job's inputs must lie under its owner's own prefix, which porter names
        own = next(u for u in client.me().inputs if u.startswith("s3://"))
        key = f"{own.removeprefix(f's3://{testbed.s3_bucket}/').rstrip('/')}/{uuid.uuid4()}/import_check.py"
        testbed.s3_client().put_object(Bucket=testbed.s3_bucket, Key=key, Body=IMPORT_CHECK.encode())
        ok = client.submit(
            {
                **ray_spec(
                    "ray-ok",
                    "ray-job",
                    entrypoint="python import_check.py",
                    **{"import": [{"name": "s3", "host": "127.0.0.1", "port": s3_port}]},
                ),
                "files": {"import_check.py": f"s3://{testbed.s3_bucket}/{key}"},
            }
        )
        bad = client.submit(
            ray_spec(
                "ray-bad", "ray-job", entrypoint="python -c 'import ray; ray.init(); print(\"ran\")'\nexit 3"
            )
        )
        done_ok, done_bad = (client.wait(j, timeout=FIRST_START) for j in (ok, bad))
        log_ok = client.logs(done_ok).data.decode()
        assert done_ok.state == JobState.COMPLETED, log_ok[-3000:]
        assert done_ok.exit_code == 0
        assert "s3 answered through 127.0.0.1:" in log_ok
        assert "True" in log_ok.split("s3 answered", 1)[1]
        assert "ray says 42" in log_ok
        assert done_bad.state == JobState.FAILED, client.logs(done_bad).data.decode()[-3000:]
        assert done_bad.exit_code == 3
        assert "ran" in client.logs(done_bad).data.decode()
        # ended by themselves: well within the 10-minute time limit, never cancelled
        for job in (done_ok, done_bad):
            assert job.started_at
            assert job.ended_at
            assert (job.ended_at - job.started_at).total_seconds() < 120
            assert job.bridges == []


def test_job_spec_errors_are_reported_before_anything_runs(deployment: Deployment) -> None:
    with deployment.client() as client:
        bad = ray_spec("ray-x", "ray-cluster", entrypoint="python x.py")
        with pytest.raises(ApiError, match="entrypoint"):
            client.submit(bad)
        with pytest.raises(ApiError, match=r"ray\.head"):
            client.submit(ray_spec("ray-x", "ray-cluster", head={"time": "10"}))


def test_workers_started_by_srun_join_the_head(testbed_ssh: SSHConfig, testbed: Testbed) -> None:
    """The worker path (srun + ray_worker.sh + readiness for every node) on the one-node testbed:
    the worker runs beside the head (`colocate_workers`), the rest is the multi-node script."""
    job_id = uuid.uuid4()
    spec = JobSpec.model_validate(
        ray_spec(
            "ray-workers",
            "ray-job",
            entrypoint="python -c \"import ray; ray.init(); print('alive nodes', sum(n['Alive'] for n in ray.nodes()))\"",
            workers={"nodes": 1, "cpus_per_task": 1},
        )
    )

    async def run() -> tuple[Observation, str]:
        conn = SSHConnection(testbed_ssh, cluster="testbed")
        try:
            backend = SlurmBackend(
                "testbed",
                conn,
                workdir="~/.cloudhpc",
            )
            workdir = await backend.workdir()
            activation = await EnvironmentCache(conn, workdir=workdir).ensure(spec.environment)
            paths = JobPaths(workdir, job_id)
            # the cluster's defaults, applied as the agent applies them
            resources = spec.resources.model_copy(update={"cpus_per_task": 2}).with_defaults(
                Resources(partition=testbed.partition)
            )
            ray_job = render_ray_job(
                job_id=job_id,
                spec=spec,
                paths=paths,
                resources=resources,
                bridges=[],
                tunnel=None,
                colocate_workers=True,
            )
            script = render_batch_script(
                job_id=job_id, spec=spec, paths=paths, activation=activation, body=ray_job.body
            )
            native = await backend.submit(
                JobSubmission(
                    job_id=job_id,
                    spec=spec,
                    resources=ray_job.resources,
                    batch_script=script,
                    files=ray_job.files,
                    modes=ray_job.modes,
                )
            )
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                seen = (await backend.poll([native])).get(native)
                if seen is not None and seen.state.terminal:
                    return seen, (await backend.read_output(job_id)).decode()
                await asyncio.sleep(1)
            raise AssertionError("the job did not end")
        finally:
            await conn.close()

    observation, output = asyncio.run(run())
    assert observation.state == JobState.COMPLETED, output[-3000:]
    assert "Ray cluster ready: 2 node(s)" in output
    assert "alive nodes 2" in output
    assert "Ray worker on" in output
