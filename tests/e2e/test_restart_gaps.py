"""What a restarted submitter must repair, with real processes on the testbed.

Each test builds, in porter's database, the exact state a crash or a clock change leaves behind,
then starts the submitter and checks that the job's facts come out right:

- the submitter stopped after reporting a job's end and before its accounting reached porter:
  the restarted one collects the accounting from sacct;
- the previous submitter's clock was ahead (another machine, or a clock set back since): its
  successor's reports must still be applied, or the job would stay `running` for ever;
- a second submitter for the same cluster (a misconfiguration, or a restart while the old process
  still runs) must not act beside the first, since it could submit a job the first is preparing,
  and must take over once the first is gone.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from cloudhpc.client import ApiError
from cloudhpc.domain.states import JobState
from tests.e2e.harness import Deployment, final_accounting, free_port, running, slurm_jobs_named
from tests.testbed import Testbed


@pytest.fixture
def deployment(tmp_path: Path, testbed: Testbed) -> Iterator[Deployment]:
    with running(Deployment(tmp_path / "deploy", testbed, f"sqlite:///{tmp_path / 'state.db'}")) as dep:
        yield dep


def _sql(deployment: Deployment, statement: str, **params: object) -> None:
    engine = create_engine(deployment.database)
    try:
        with engine.begin() as conn:
            conn.execute(text(statement), params)
    finally:
        engine.dispose()


def test_accounting_lost_in_a_crash_is_collected_after_the_restart(deployment: Deployment) -> None:
    with deployment.client() as client:
        job = client.wait(
            client.submit({"name": "acct-gap", "cluster": "testbed", "script": "echo counted"}), timeout=90
        )
        assert job.state == JobState.COMPLETED
        first = final_accounting(client, job.id).model_dump(mode="json")
        deployment.kill("submitter", signal.SIGKILL)
        # the state a crash between the end report and the accounting upload leaves
        _sql(deployment, "DELETE FROM job_accounting WHERE job_id = :id", id=str(job.id))
        with pytest.raises(ApiError) as missing:
            client.accounting(job.id)
        assert missing.value.status == 404
        deployment.start("submitter")
        again = final_accounting(client, job.id).model_dump(mode="json")
    assert again["slurm_job_id"] == first["slurm_job_id"] == job.slurm_job_id
    assert [r["job_id"] for r in again["records"]] == [r["job_id"] for r in first["records"]]
    assert "reconciled 0 active job(s), 1 ended without accounting" in deployment.log("submitter")


def test_reports_apply_after_a_restart_on_a_clock_that_is_behind(deployment: Deployment) -> None:
    with deployment.client() as client:
        job = client.submit({"name": "clock", "cluster": "testbed", "script": "sleep 6; echo done"})
        deadline = time.monotonic() + 60
        while (job := client.get(job.id, wait=5, since_state=job.state)).state != JobState.RUNNING:
            assert not job.state.terminal, job
            assert time.monotonic() < deadline, job
        deployment.kill("submitter", signal.SIGKILL)
        # the previous agent numbered its reports from a clock one day ahead of this machine's
        ahead = time.time_ns() + 86_400 * 10**9
        _sql(deployment, "UPDATE jobs SET observed_seq = :seq WHERE id = :id", seq=ahead, id=str(job.id))
        deployment.start("submitter")
        final = client.wait(job.id, timeout=60)
    assert final.state == JobState.COMPLETED, deployment.log("porter")[-3000:]
    assert final.exit_code == 0
    assert "stale report" not in deployment.log("porter")


def test_a_second_submitter_waits_while_the_first_serves_and_takes_over_when_it_dies(
    deployment: Deployment, tmp_path: Path
) -> None:
    deadline = time.monotonic() + 60
    while "reconciled" not in deployment.log("submitter"):  # the first one serves the cluster
        assert time.monotonic() < deadline, deployment.log("submitter")[-3000:]
        time.sleep(0.2)
    second_log = (tmp_path / "second-submitter.log").open("ab")
    env = {**deployment.process_env(), "CLOUDHPC_SUBMITTER__LISTEN": f"127.0.0.1:{free_port()}"}
    second = subprocess.Popen(
        [sys.executable, "-m", "cloudhpc", "serve", "submitter", "--log-level", "INFO"],
        cwd=deployment.root,
        env=env,
        stdout=second_log,
        stderr=second_log,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while "served by another submitter" not in (text := (tmp_path / "second-submitter.log").read_text()):
            assert second.poll() is None, text[-3000:]
            assert time.monotonic() < deadline, text[-3000:]
            time.sleep(0.5)
        with deployment.client() as client:
            jobs = [
                client.submit({"name": f"one{i}", "cluster": "testbed", "script": "echo one"})
                for i in range(4)
            ]
            for job in jobs:
                assert client.wait(job, timeout=90).state == JobState.COMPLETED
            deployment.kill("submitter", signal.SIGKILL)
            later = client.submit({"name": "taken-over", "cluster": "testbed", "script": "echo two"})
            final = client.wait(later, timeout=90)  # only the second submitter is left to run it
            assert final.state == JobState.COMPLETED
            for job in [*jobs, final]:
                # each job in SLURM exactly once, though two agents were reconciling the cluster
                assert slurm_jobs_named(f"chpc-{job.id}") == [client.get(job.id).slurm_job_id]
    finally:
        second.terminate()
        second.wait(timeout=30)
        second_log.close()


def test_porter_stopping_answers_its_long_polls_instead_of_cutting_them(
    tmp_path: Path, testbed: Testbed
) -> None:
    dep = Deployment(tmp_path / "deploy", testbed, f"sqlite:///{tmp_path / 'state.db'}")
    dep.start("porter")  # no submitter: the job stays pending
    agent = {"Authorization": f"Bearer {(dep.root / 'agent-token').read_text().strip()}"}
    try:
        with dep.client() as client:
            job = client.submit({"name": "waited-on", "cluster": "testbed", "script": "true"})
        work = httpx.get(
            f"{dep.url}/api/v1/agent/work", params={"cluster": "testbed", "agent": "t"}, headers=agent
        )
        assert [j["id"] for j in work.json()["jobs"]] == [str(job.id)]  # leased now: the next poll waits

        def long_poll(path: str, **params: object) -> tuple[httpx.Response, float]:
            headers = agent if "agent" in path else {"Authorization": f"Bearer {dep.user_token}"}
            started = time.monotonic()
            response = httpx.get(f"{dep.url}{path}", params=params, headers=headers, timeout=60)
            return response, time.monotonic() - started

        with ThreadPoolExecutor(2) as pool:
            user = pool.submit(long_poll, f"/api/v1/jobs/{job.id}", wait=30)
            work_poll = pool.submit(long_poll, "/api/v1/agent/work", cluster="testbed", agent="t", wait=30)
            time.sleep(1.5)  # both are waiting inside porter now
            dep.processes["porter"].send_signal(signal.SIGTERM)
            (got, user_s), (more, agent_s) = user.result(), work_poll.result()
        assert got.status_code == 200, got.text
        assert got.json()["state"] == "pending"
        assert more.status_code == 200, more.text
        assert more.json() == {"jobs": []}
        assert user_s < 5
        assert agent_s < 5
        assert dep.processes["porter"].wait(timeout=30) == 0
        assert "Traceback" not in dep.log("porter")
    finally:
        dep.stop()
