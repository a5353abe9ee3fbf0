"""Stopping a Kubeflow run stops its HPC job (issue 13 item 6).

Kubernetes stops a step's pod with SIGTERM. The `cloudhpc_job` component's body runs here as its
own process (the function KFP's executor calls, with the same arguments), following a long batch
job on the testbed's SLURM through porter and the agent (real processes). Once SLURM runs the job,
the step gets SIGTERM: SLURM must have cancelled the job within 5 s, the cloudhpc job must end
`cancelled`, and the step must exit non-zero. A retried step (same run and task ids) finds the
same job instead of submitting another.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudhpc.domain.states import JobState
from tests.e2e.harness import Deployment, running, slurm_jobs_named
from tests.testbed import Testbed

CANCELLED_WITHIN = 5.0
"""Seconds from SIGTERM to SLURM no longer running the job (issue 13 item 6)."""

STEP = """
import json, sys
from cloudhpc.pipelines.components import cloudhpc_job
cloudhpc_job.python_func(
    spec=json.loads(sys.argv[1]), porter_url=sys.argv[2], pipeline_job_id="run-1", task_id=sys.argv[3]
)
"""


@pytest.fixture
def deployment(tmp_path: Path, testbed: Testbed) -> Iterator[Deployment]:
    with running(Deployment(tmp_path / "deploy", testbed, f"sqlite:///{tmp_path / 'state.db'}")) as dep:
        yield dep


def start_step(dep: Deployment, spec: dict[str, object], task_id: str, log: Path) -> subprocess.Popen[bytes]:
    env = dep.process_env()
    env["CLOUDHPC_TOKEN"] = dep.user_token  # as the pipelines fill it from a Secret
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-c", STEP, json.dumps(spec), dep.url, task_id],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def slurm_state(slurm_job_id: str) -> str:
    """squeue's state of the job, or "" once it has left the queue (locally, as root)."""
    out = subprocess.run(
        ["squeue", "-h", "-j", slurm_job_id, "-o", "%T"], capture_output=True, text=True, check=False
    )
    return out.stdout.strip()


def sacct_state(slurm_job_id: str) -> str:
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-j", slurm_job_id, "--format=State"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


@pytest.mark.timeout(240)
def test_sigterm_to_the_step_cancels_its_slurm_job(deployment: Deployment, tmp_path: Path) -> None:
    name = f"sigterm-{tmp_path.name}"[:60]
    spec = {"name": name, "cluster": "testbed", "script": "echo started\nsleep 600\n"}
    log = tmp_path / "step.log"
    step = start_step(deployment, spec, "task-1", log)
    try:
        with deployment.client() as client:
            deadline = time.monotonic() + 120
            job = None
            while job is None or job.state != JobState.RUNNING or not job.slurm_job_id:
                assert step.poll() is None, log.read_text()
                assert time.monotonic() < deadline, f"the job never ran: {job}"
                found = list(client.list(name=name))
                job = client.get(found[0].id) if found else None
                time.sleep(0.2)
            slurm_id = job.slurm_job_id
            assert slurm_state(slurm_id) == "RUNNING"

            step.send_signal(signal.SIGTERM)
            terminated = time.monotonic()
            while slurm_state(slurm_id) in ("RUNNING", "COMPLETING"):
                assert time.monotonic() - terminated < CANCELLED_WITHIN, (
                    f"SLURM job {slurm_id} still {slurm_state(slurm_id)} {CANCELLED_WITHIN} s after SIGTERM"
                )
                time.sleep(0.05)
            stopped = time.monotonic() - terminated
            print(f"SLURM job {slurm_id} left RUNNING {stopped:.2f} s after SIGTERM to the step")

            assert step.wait(timeout=30) != 0, log.read_text()
            output = log.read_text()
            assert "the step was terminated; cancel requested" in output, output
            assert "StepTerminated" in output, output
            final = client.wait(job, timeout=30)
            assert final.state == JobState.CANCELLED, final
            assert sacct_state(slurm_id).startswith("CANCELLED"), sacct_state(slurm_id)

        # The step retried (same run and task ids) re-attaches: the same job, no second submission.
        retry_log = tmp_path / "retry.log"
        retry = start_step(deployment, spec, "task-1", retry_log)
        assert retry.wait(timeout=60) != 0  # the job it finds ended cancelled: the step fails
        assert f"job {job.id}" in retry_log.read_text(), retry_log.read_text()
        assert slurm_jobs_named(f"chpc-{job.id}") == [slurm_id]
    finally:
        if step.poll() is None:
            step.kill()
            step.wait()
