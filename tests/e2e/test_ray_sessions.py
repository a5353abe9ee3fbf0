"""Warm Ray sessions end to end: porter and the submitter as processes, SLURM and real Ray on the
testbed, the testbed's sshd as the bridge VM (docs/ray.md, "Warm sessions").

One session at a time, small (one Ray node of 1 CPU): Ray on the 2 shared cores is slow. The first
session may build the Ray environment when it is not cached yet, hence its long timeout.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from ray.job_submission import JobSubmissionClient

from cloudhpc.client import ApiError
from cloudhpc.config import SSHConfig
from cloudhpc.domain.states import JobState
from cloudhpc.sessions import ray_session
from tests.e2e.harness import Deployment, bridged_deployment, running
from tests.e2e.ray_jobs import NODE, RAY_ENV
from tests.e2e.test_ray import FIRST_START, hpc
from tests.testbed import Testbed

IDLE = 20
"""The session's idle timeout, seconds: short, so the test sees it end."""
JOB_END = 180.0
"""Seconds for one ray-job on the warm session (a Ray driver on the loaded 2-core machine)."""


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, testbed: Testbed) -> Iterator[Deployment]:
    dep = bridged_deployment(tmp_path_factory.mktemp("ray-sessions"), testbed, "ray-sessions-e2e")
    with running(dep):
        yield dep


def driver(tag: str) -> str:
    """An entrypoint that uses the session's Ray (`ray.init()` joins it through RAY_ADDRESS)."""
    return (
        f"python -c \"import ray; ray.init(); print('{tag}', ray.get(ray.remote(lambda: 6 * 7).remote()))\""
    )


@pytest.mark.timeout(FIRST_START + 600)
def test_a_session_serves_three_ray_jobs_stops_one_on_cancel_and_ends_itself_when_idle(
    deployment: Deployment, testbed_ssh: SSHConfig
) -> None:
    with deployment.client() as client:
        session = ray_session(
            "testbed",
            name="warm",
            idle_timeout=IDLE,
            time="00:10:00",
            head=NODE,
            environment=RAY_ENV,
            client=client,
            timeout=FIRST_START,
        )
        assert not session.reattached
        assert session.address.startswith("http://")
        assert client.get(session.job).state == JobState.RUNNING

        # another cell (or pipeline step) opening the same session re-attaches to it
        again = ray_session("testbed", name="warm", client=client, timeout=60)
        assert again.reattached
        assert again.job_id == session.job_id
        assert again.address == session.address

        # three consecutive ray-jobs on the one allocation: no SLURM job of their own
        finals = []
        for i in range(3):
            job = session.submit(driver(f"run-{i}"), name=f"warm-{i}")
            assert job.spec.ray is not None
            assert job.spec.ray.session == str(session.job_id)
            final = client.wait(job, timeout=JOB_END)
            text = client.logs(final).data.decode()
            assert final.state == JobState.COMPLETED, f"{final.reason}\n{text[-3000:]}"
            assert final.exit_code == 0
            assert f"run-{i} 42" in text
            assert final.slurm_job_id is None
            finals.append(final)
        assert client.get(session.job).state == JobState.RUNNING, "the session outlives its jobs"

        # files and env travel with the job; the entrypoint's exit status is the job's
        failing = session.submit(
            'cat data/in.txt; echo "value=$MY_VALUE"; exit 3',
            name="warm-fails",
            files={"data/in.txt": "hello from the package"},
            env={"MY_VALUE": "a b;c"},
        )
        failed = client.wait(failing, timeout=JOB_END)
        text = client.logs(failed).data.decode()
        assert failed.state == JobState.FAILED, text
        assert failed.exit_code == 3
        assert "hello from the package" in text
        assert "value=a b;c" in text

        # cancel stops the Ray job, not the session
        long = session.submit("echo started; sleep 300", name="warm-cancel")
        deadline = time.monotonic() + JOB_END
        while client.get(long).state != JobState.RUNNING:
            assert time.monotonic() < deadline, "the long ray-job never ran"
            time.sleep(0.5)
        client.cancel(long)
        cancelled = client.wait(long, timeout=60)
        assert cancelled.state == JobState.CANCELLED, cancelled
        assert client.get(session.job).state == JobState.RUNNING

        # no Ray job any more: the session ends itself after its idle timeout, completed
        last_end = time.monotonic()
        ended = client.wait(session.job, timeout=IDLE + 90)
        waited = time.monotonic() - last_end
        assert ended.state == JobState.COMPLETED, client.logs(ended).data.decode()[-3000:]
        assert IDLE - 2 <= waited <= IDLE + 60, waited
        assert "ending the session" in client.logs(ended).data.decode()
        sacct = hpc(testbed_ssh, "sacct", "-X", "-n", "-P", "-j", str(ended.slurm_job_id), "--format=State")
        assert sacct.stdout.strip().startswith("COMPLETED"), sacct.stdout
        assert client.bridges(ended) == []

        # a ray-job naming the ended session fails with the reason
        late = client.wait(session.submit(driver("late"), name="warm-late"), timeout=60)
        assert late.state == JobState.FAILED
        assert "does not exist or has ended" in (late.reason or ""), late.reason


def test_a_ray_job_naming_no_session_fails_with_the_reason(deployment: Deployment) -> None:
    with deployment.client() as client:
        job = client.submit(
            {
                "name": "orphan",
                "cluster": "testbed",
                "kind": "ray-job",
                "ray": {"session": "no-such-session", "entrypoint": "echo never"},
            }
        )
        final = client.wait(job, timeout=60)
        assert final.state == JobState.FAILED
        assert "ray.session 'no-such-session'" in (final.reason or ""), final.reason
        assert "does not exist or has ended" in (final.reason or "")
        assert final.slurm_job_id is None


def test_session_fields_on_a_session_job_are_a_422_naming_them(deployment: Deployment) -> None:
    with deployment.client() as client:
        with pytest.raises(ApiError, match="leave out resources") as refused:
            client.submit(
                {
                    "name": "x",
                    "cluster": "testbed",
                    "kind": "ray-job",
                    "ray": {"session": "warm", "entrypoint": "echo"},
                    "resources": {"time": "10"},
                }
            )
        assert refused.value.status == 422


@pytest.mark.timeout(FIRST_START + 300)
def test_a_restarted_agent_follows_the_ray_job_it_submitted_without_running_it_again(
    deployment: Deployment,
) -> None:
    with deployment.client() as client:
        session = ray_session(
            "testbed",
            name="warm-restart",
            idle_timeout=60,
            time="00:10:00",
            head=NODE,
            environment=RAY_ENV,
            client=client,
            timeout=FIRST_START,
            keep=False,
        )
        with session:
            job = session.submit("echo started; sleep 15; echo done", name="survives")
            deadline = time.monotonic() + JOB_END
            while client.get(job).state != JobState.RUNNING:
                assert time.monotonic() < deadline, "the ray-job never ran"
                time.sleep(0.3)
            deployment.kill("submitter")  # SIGKILL: nothing of the agent's memory survives
            deployment.start("submitter")
            final = client.wait(job, timeout=JOB_END)
            text = client.logs(final).data.decode()
            assert final.state == JobState.COMPLETED, f"{final.reason}\n{text}"
            assert text.count("started") == 1, text
            assert "done" in text
            ray_jobs = JobSubmissionClient(session.address).list_jobs()
            assert [j.submission_id for j in ray_jobs].count(str(job.id)) == 1, "submitted once"
        assert client.wait(session.job, timeout=60).state == JobState.CANCELLED, "keep=False ends it"


@pytest.mark.timeout(FIRST_START + 300)
def test_the_kfp_session_components_open_reattach_and_close_a_session(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipeline's open and close components, run as their Python functions are in a step's pod
    (the porter token from CLOUDHPC_TOKEN): a second open of the same name re-attaches to the same
    session, and the close (an ExitHandler's) cancels it."""
    from cloudhpc.pipelines.components import cloudhpc_ray_session_close, cloudhpc_ray_session_open

    monkeypatch.setenv("CLOUDHPC_TOKEN", deployment.user_token)
    opened = cloudhpc_ray_session_open.python_func(
        porter_url=deployment.url,
        cluster="testbed",
        name="kfp-run",
        idle_timeout=120,
        time_limit="00:10:00",
        hpc_job={"head": NODE, "environment": RAY_ENV},
        timeout_seconds=FIRST_START,
    )
    again = cloudhpc_ray_session_open.python_func(
        porter_url=deployment.url,
        cluster="testbed",
        name="kfp-run",
        hpc_job={"head": NODE, "environment": RAY_ENV},
        timeout_seconds=60,
    )
    assert again.session_id == opened.session_id
    assert opened.address.startswith("http://")
    with deployment.client() as client:
        assert client.get(opened.session_id).state == JobState.RUNNING
        cloudhpc_ray_session_close.python_func(porter_url=deployment.url, session_id=opened.session_id)
        assert client.wait(opened.session_id, timeout=60).state == JobState.CANCELLED
        # closing a session that has ended already leaves it as it is
        cloudhpc_ray_session_close.python_func(porter_url=deployment.url, session_id=opened.session_id)
        assert client.get(opened.session_id).state == JobState.CANCELLED
