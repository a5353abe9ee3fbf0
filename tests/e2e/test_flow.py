"""Whole flows: porter -> agent -> SLURM over SSH (the testbed) -> back, with real processes.

Covers SQLite and PostgreSQL job stores, crash safety (`kill -9` of porter and of the agent while
jobs are submitted: every job ends up in SLURM exactly once and in the right state) and an agent
that is offline for a while.
"""

from __future__ import annotations

import random
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudhpc.client import ApiError, Client
from cloudhpc.domain.jobs import Job
from cloudhpc.domain.states import JobState
from tests.e2e.harness import Deployment, final_accounting, running, slurm_jobs_named
from tests.integration.stores import StoreUrlFactory, store_urls
from tests.testbed import Testbed

MARKER_DIR = Path("/tmp")


def batch(name: str, script: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "cluster": "testbed", "script": script, **extra}


def wait_all(client: Client, jobs: list[Job], timeout: float) -> list[Job]:
    deadline = time.monotonic() + timeout
    final: list[Job] = []
    for job in jobs:
        remaining = max(1.0, deadline - time.monotonic())
        final.append(client.wait(job, timeout=remaining))
    return final


@pytest.fixture(params=store_urls(), ids=["sqlite", "postgres"])
def deployment(request: pytest.FixtureRequest, tmp_path: Path, testbed: Testbed) -> Iterator[Deployment]:
    with request.param(tmp_path) as url, running(Deployment(tmp_path / "deploy", testbed, url)) as dep:
        yield dep


def test_batch_jobs_complete_fail_and_cancel(deployment: Deployment) -> None:
    marker = MARKER_DIR / f"pwned-{uuid.uuid4().hex}"
    hostile = f"$(touch {marker}); `touch {marker}`; echo owned > {marker}"
    with deployment.client() as client:
        ok = client.submit(
            batch(
                "hello",
                'echo "value=$HOSTILE"\ncat "data dir/input.txt"\nsrun hostname >/dev/null\necho done\n',
                env={"HOSTILE": hostile},
                files={"data dir/input.txt": "file content\n"},
                resources={"time": "00:02:00"},
            )
        )
        bad = client.submit(batch("fails", "echo about to fail\nexit 3\n"))
        slow = client.submit(batch("sleeper", "echo started\nsleep 300\n"))
        while client.get(slow).state != JobState.RUNNING:
            time.sleep(0.2)
        cancelled = client.cancel(slow)
        assert cancelled.cancel_requested
        ok_final, bad_final, slow_final = wait_all(client, [ok, bad, slow], timeout=120)

        assert ok_final.state == JobState.COMPLETED, deployment.log("submitter")[-3000:]
        assert ok_final.exit_code == 0
        assert ok_final.slurm_job_id
        assert ok_final.submitted_at is not None
        assert ok_final.started_at is not None
        assert ok_final.ended_at is not None
        logs = client.logs(ok_final)
        assert logs.complete
        text = logs.data.decode()
        assert f"value={hostile}" in text
        assert "file content" in text
        assert text.rstrip().endswith("done")
        assert not marker.exists()

        assert bad_final.state == JobState.FAILED
        assert bad_final.exit_code == 3
        assert b"about to fail" in client.logs(bad_final).data

        assert slow_final.state == JobState.CANCELLED

        accounting = final_accounting(client, ok_final)
        assert accounting.slurm_job_id == ok_final.slurm_job_id
        states = {r.step: r.state for r in accounting.records}
        assert states[None] == "COMPLETED"
        assert "batch" in states
        assert accounting.efficiency is not None
        assert accounting.efficiency.state == "COMPLETED"
        assert slurm_jobs_named(f"chpc-{ok_final.id}") == [ok_final.slurm_job_id]


def test_agent_offline_then_back(deployment: Deployment) -> None:
    deployment.kill("submitter", signal.SIGTERM)
    with deployment.client() as client:
        jobs = [client.submit(batch(f"offline{i}", f"echo offline {i}")) for i in range(3)]
        time.sleep(2)
        assert {client.get(j).state for j in jobs} == {JobState.PENDING}
        deployment.start("submitter")
        final = wait_all(client, jobs, timeout=90)
    assert [j.state for j in final] == [JobState.COMPLETED] * 3


@pytest.mark.parametrize("seed", [7])
def test_kill_9_of_porter_and_agent_loses_nothing_and_duplicates_nothing(
    tmp_path: Path, testbed: Testbed, seed: int
) -> None:
    rng = random.Random(seed)
    with store_urls()[0](tmp_path) as url:
        dep = Deployment(tmp_path / "deploy", testbed, url)
        dep.start("porter")
        dep.start("submitter")
        submitted: list[Job] = []
        expect: dict[uuid.UUID, JobState] = {}
        try:
            for i in range(20):
                fail = i % 5 == 4
                spec = batch(
                    f"chaos{i}", f"echo chaos {i}\nsleep {rng.uniform(0, 2):.1f}\nexit {3 if fail else 0}"
                )
                key = f"chaos-{seed}-{i}"
                while True:  # a client retries with the same idempotency key while porter is down
                    try:
                        with dep.client() as client:
                            job = client.submit(spec, idempotency_key=key)
                        break
                    except ApiError as exc:
                        assert exc.status == 0, exc
                        time.sleep(0.2)
                submitted.append(job)
                expect[job.id] = JobState.FAILED if fail else JobState.COMPLETED
                if rng.random() < 0.3:
                    victim = rng.choice(["porter", "submitter"])
                    time.sleep(rng.uniform(0, 0.5))
                    dep.kill(victim)  # SIGKILL: no cleanup runs
                    time.sleep(rng.uniform(0, 1.0))
                    dep.start(victim)
            with dep.client() as client:
                final = wait_all(client, submitted, timeout=240)
            assert len({j.id for j in submitted}) == 20
            for job in final:
                assert job.state == expect[job.id], (job, dep.log("submitter")[-3000:])
                assert slurm_jobs_named(f"chpc-{job.id}") == [job.slurm_job_id], job
        finally:
            dep.stop()


@pytest.mark.parametrize("store_url", store_urls(), ids=["sqlite", "postgres"])
def test_s3_mailbox_channel_end_to_end(tmp_path: Path, testbed: Testbed, store_url: StoreUrlFactory) -> None:
    """The agent never talks to porter: everything goes through the testbed's S3 server."""
    mailbox = f"s3://{testbed.s3_bucket}/e2e-{uuid.uuid4().hex[:8]}"
    with store_url(tmp_path) as url:
        dep = Deployment(tmp_path / "deploy", testbed, url, channel="s3", mailbox=mailbox)
        dep.start("porter")
        dep.start("submitter")
        try:
            with dep.client() as client:
                ok = client.submit(batch("via-s3", "echo through the mailbox"))
                bad = client.submit(batch("via-s3-fail", "exit 4"))
                ok_final, bad_final = wait_all(client, [ok, bad], timeout=120)
                assert ok_final.state == JobState.COMPLETED, dep.log("submitter")[-3000:]
                assert b"through the mailbox" in client.logs(ok_final).data
                assert (bad_final.state, bad_final.exit_code) == (JobState.FAILED, 4)
                assert slurm_jobs_named(f"chpc-{ok_final.id}") == [ok_final.slurm_job_id]
        finally:
            dep.stop()
