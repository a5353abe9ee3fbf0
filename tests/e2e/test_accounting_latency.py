"""A job shorter than SLURM's gather interval has its accounting soon after its end, and final.

A 1 s batch job may never get a MaxRSS sample; the agent used to wait for one (~37 s) before it
sent the accounting. Now it sends it as soon as every step has ended, marked provisional while
slurmdbd has only its placeholder for the job's own row (`accounting_provisional`: slurmctld sends
that row from a thread that wakes every 5 s), and again once final (`accounting_final`). The final
figures are compared with what sacct answers when the test reads them: nothing the agent stored may
differ from SLURM's final answer; and the steps' figures of a provisional answer are already those.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudhpc.client import ApiError, Client
from cloudhpc.domain.jobs import Job
from cloudhpc.domain.states import JobState
from cloudhpc.hpc.backend import AccountingRecord, CommandResult
from cloudhpc.hpc.slurm import Sacct
from tests.e2e.harness import Deployment, running
from tests.testbed import Testbed

AVAILABLE_WITHIN = 10.0
"""Seconds from `jobs wait` returning `completed` to `GET .../accounting` answering."""
FINAL_WITHIN = 20.0
"""Seconds from then to the answer being final (slurmctld's 5 s thread, the agent's asks)."""

COMPARED = (
    "step",
    "name",
    "state",
    "exit_code",
    "elapsed_seconds",
    "max_rss_bytes",
    "total_cpu_seconds",
    "partition",
    "alloc_tres",
)


@pytest.fixture
def deployment(tmp_path: Path, testbed: Testbed) -> Iterator[Deployment]:
    with running(Deployment(tmp_path / "deploy", testbed, f"sqlite:///{tmp_path / 'state.db'}")) as dep:
        yield dep


def _accounting_when_available(
    client: Client, job: Job, timeout: float, *, final: bool = False
) -> dict[str, Any] | None:
    """The job's accounting once porter answers it (with `final`: once it is final)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            answer = client.accounting(job).model_dump(mode="json")
        except ApiError as exc:
            assert exc.status == 404, exc
        else:
            if answer["final"] or not final:
                return answer
        time.sleep(0.1)
    return None


def _sacct_now(slurm_job_id: str) -> list[AccountingRecord]:
    """sacct as the agent asks it, run locally (root) at the moment the test reads it."""
    argv = Sacct(jobs=[slurm_job_id]).argv()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    result = CommandResult(
        argv=tuple(argv), exit_status=proc.returncode, stdout=proc.stdout, stderr=proc.stderr
    )
    return [row.record for row in Sacct.parse(result)]


def test_short_job_accounting_is_available_soon_and_final(deployment: Deployment) -> None:
    with deployment.client() as client:
        job = client.submit({"name": "short", "cluster": "testbed", "script": "sleep 1\necho done\n"})
        final = client.wait(job, timeout=120)
        completed_at = time.monotonic()
        assert final.state == JobState.COMPLETED, final
        accounting = _accounting_when_available(client, final, timeout=AVAILABLE_WITHIN)
        latency = time.monotonic() - completed_at
        assert accounting is not None, f"accounting not available {AVAILABLE_WITHIN} s after the end"
        print(f"accounting available {latency:.2f} s after `completed`")

        assert final.slurm_job_id is not None
        settled = _accounting_when_available(client, final, timeout=FINAL_WITHIN, final=True)
        assert settled is not None, f"accounting not final {FINAL_WITHIN} s after it was available"
        stored = {r["step"]: {k: r[k] for k in COMPARED} for r in settled["records"]}
        now = {r.step: {k: getattr(r, k) for k in COMPARED} for r in _sacct_now(final.slurm_job_id)}
        assert stored == now
        assert set(stored) == {None, "batch"}
        assert stored[None]["name"] == f"chpc-{final.id}"  # not slurmdbd's placeholder `allocation`
        if not accounting["final"]:  # the first answer came before the job's own row
            print("the first answer was provisional")
            first = {r["step"]: {k: r[k] for k in COMPARED} for r in accounting["records"]}
            assert first["batch"] == stored["batch"]  # a provisional answer has its steps, final already
