"""#13 items 3 and 4 end to end on the testbed's SLURM, porter and the submitter as processes:
a job array with per-task states, exit codes and outputs, one task cancelled; a chain of three
jobs with `after` (the later ones submitted before the first reached SLURM); a job waiting on one
that fails ends with `DependencyNeverSatisfied` instead of staying queued; 422s for bad values."""

from __future__ import annotations

import itertools
import json
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cloudhpc.cli.main import app
from cloudhpc.client import ApiError, Client
from cloudhpc.domain.states import JobState
from cloudhpc.store import Store
from tests.e2e.harness import Deployment, final_accounting, submit

TIMEOUT = 120.0


def cli(deployment: Deployment, *args: str) -> str:
    """`cloudhpc <args>` in-process against the deployment's porter, as alice; its stdout."""
    env = {"CLOUDHPC_URL": deployment.url, "CLOUDHPC_TOKEN": deployment.user_token, "CLOUDHPC_CONFIG": None}
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exit_code == 0, (args, result.output)
    return result.stdout


def scontrol(native_id: str) -> str:
    """SLURM's own view of a job (as root, locally)."""
    return subprocess.run(
        ["scontrol", "show", "job", native_id], capture_output=True, text=True, check=False
    ).stdout


def test_array_tasks_states_outputs_and_one_cancelled(client: Client, deployment: Deployment) -> None:
    # task 3 fails, task 5 sleeps until it is cancelled; the others print and end at once
    script = (
        "#!/bin/bash\n#SBATCH --array=0-5%6\n"
        'echo "task $SLURM_ARRAY_TASK_ID of $SLURM_ARRAY_JOB_ID"\n'
        '[ "$SLURM_ARRAY_TASK_ID" = 3 ] && exit 7\n'
        '[ "$SLURM_ARRAY_TASK_ID" = 5 ] && sleep 300\n'
        "exit 0\n"
    )
    job = submit(client, "array", script, resources={"time": "5"})
    assert job.spec.array == "0-5%6"  # the directive, merged into the spec
    deadline = time.monotonic() + TIMEOUT
    while True:
        assert time.monotonic() < deadline, client.get(job)
        current = client.get(job)
        tasks = client.tasks(job) if current.slurm_job_id else []
        running = [t.index for t in tasks if t.state == JobState.RUNNING]
        if 5 in running:
            break
        time.sleep(0.5)
    assert "ArrayTaskThrottle=6" in scontrol(current.slurm_job_id or "")
    assert client.get(job).state == JobState.RUNNING
    assert "cancel of task 5 requested" in cli(deployment, "jobs", "cancel", str(job.id), "--task", "5")
    with pytest.raises(ApiError) as missing:
        client.cancel_task(job, 9)
    assert missing.value.status == 404
    ended = client.wait(job, timeout=TIMEOUT)
    # the array's state: one failed task makes it failed; the reason names the first one
    assert ended.state == JobState.FAILED, (
        ended.reason,
        [(t.index, t.state.value, t.native_state, t.exit_code) for t in client.tasks(job)],
    )
    assert ended.reason is not None
    assert ended.reason.startswith("task 3:"), ended.reason
    tasks = client.tasks(job)
    assert [t.index for t in tasks] == [0, 1, 2, 3, 4, 5]
    shown = json.loads(cli(deployment, "jobs", "tasks", str(job.id), "-o", "json"))
    assert [(t["index"], t["state"], t["exit_code"]) for t in shown] == [
        (t.index, t.state.value, t.exit_code) for t in tasks
    ]
    by_index = {t.index: t for t in tasks}
    assert {i: by_index[i].state for i in by_index} == {
        0: JobState.COMPLETED,
        1: JobState.COMPLETED,
        2: JobState.COMPLETED,
        3: JobState.FAILED,
        4: JobState.COMPLETED,
        5: JobState.CANCELLED,
    }
    assert by_index[3].exit_code == 7
    assert by_index[0].exit_code == 0
    assert ended.exit_code == 7
    # each task's own output, stored when the array ended
    deadline = time.monotonic() + 30
    while not all(f"tasks/{i}/output.log" in [a.name for a in client.artifacts(job)] for i in range(6)):
        assert time.monotonic() < deadline, client.artifacts(job)
        time.sleep(0.5)
    for i in range(6):
        output = client.task_output(job, i)
        assert output.startswith(f"task {i} of {ended.slurm_job_id}\n".encode()), (i, output)
        assert (b"CANCELLED" in output) == (i == 5), output  # slurmstepd's word in the one cancelled
    assert cli(deployment, "jobs", "logs", str(job.id), "--task", "3") == f"task 3 of {ended.slurm_job_id}\n"
    # the accounting of every task (sacct's rows of the array)
    record = final_accounting(client, job)
    allocations = {r.job_id: r for r in record.records if r.step is None}
    assert set(allocations) == {f"{ended.slurm_job_id}_{i}" for i in range(6)}
    assert allocations[f"{ended.slurm_job_id}_3"].exit_code == 7
    # the same through GET /logs?task=N, from an offset
    logs = client.request("GET", f"/api/v1/jobs/{job.id}/logs", params={"task": 3, "offset": 5})
    assert logs.content == f"3 of {ended.slurm_job_id}\n".encode()
    assert logs.headers["X-Complete"] == "true"
    for bad in ({"task": 9}, {"task": -1}):
        assert client._http.get(f"/api/v1/jobs/{job.id}/logs", params=bad).status_code in (404, 422)
    # two pages of tasks, by cursor
    page = client.request("GET", f"/api/v1/jobs/{job.id}/tasks", params={"limit": 4}).json()
    assert [t["index"] for t in page["tasks"]] == [0, 1, 2, 3]
    assert page["next_cursor"] == "4"


def test_a_task_output_is_readable_while_the_array_runs(client: Client, deployment: Deployment) -> None:
    """A task that ended has its output stored then, not when the slowest task of the array ends."""
    script = 'echo "task $SLURM_ARRAY_TASK_ID"\n[ "$SLURM_ARRAY_TASK_ID" = 1 ] && sleep 300\nexit 0\n'
    job = submit(client, "array-early", script, array="0-1", resources={"time": "10"})
    deadline = time.monotonic() + TIMEOUT
    while "tasks/0/output.log" not in [a.name for a in client.artifacts(job)]:
        assert time.monotonic() < deadline, (client.get(job), client.artifacts(job))
        time.sleep(0.5)
    assert client.get(job).state == JobState.RUNNING  # task 1 still sleeps
    assert client.task_output(job, 0) == b"task 0\n"
    logs = client.request("GET", f"/api/v1/jobs/{job.id}/logs", params={"task": 0})
    assert logs.content == b"task 0\n"
    not_yet = client._http.get(f"/api/v1/jobs/{job.id}/logs", params={"task": 1})
    assert not_yet.status_code == 404
    assert "stored when the task ends" in not_yet.text
    client.cancel(job)
    ended = client.wait(job, timeout=TIMEOUT)
    assert ended.state == JobState.CANCELLED
    deadline = time.monotonic() + 30
    while "tasks/1/output.log" not in [a.name for a in client.artifacts(job)]:
        assert time.monotonic() < deadline, client.artifacts(job)
        time.sleep(0.5)
    assert client.task_output(job, 1).startswith(b"task 1\n")
    assert client.task_output(job, 0) == b"task 0\n"


def test_chain_of_three_with_afterok(client: Client, deployment: Deployment, tmp_path: Path) -> None:
    # all three submitted at once: the second and third wait in `pending` for SLURM ids
    first = submit(client, "first", "sleep 2; echo one > chain.txt", resources={"time": "2"})
    second = submit(client, "second", "echo two", after=[{"job": str(first.id), "on": "ok"}])
    script = tmp_path / "third.sh"
    script.write_text("echo three\n")
    third_id = cli(
        deployment,
        *("jobs", "submit", "--name", "third", "--cluster", "testbed", "--script", str(script)),
        *("--after", str(second.id)),
    ).strip()
    third = client.get(third_id)
    assert third.spec.after[0].job == second.id
    assert client.get(third).state == JobState.PENDING
    seen_dependency: dict[str, str] = {}
    deadline = time.monotonic() + TIMEOUT
    while len(seen_dependency) < 2:
        assert time.monotonic() < deadline, [client.get(j) for j in (first, second, third)]
        for dependent, on in ((second, first), (third, second)):
            now = client.get(dependent)
            if now.slurm_job_id and str(dependent.id) not in seen_dependency:
                before = client.get(on)
                assert before.slurm_job_id is not None  # never submitted before the other had an id
                shown = scontrol(now.slurm_job_id)
                if shown:  # SLURM still holds it: its dependency names the other's SLURM id
                    assert f"afterok:{before.slurm_job_id}" in shown, shown
                seen_dependency[str(dependent.id)] = now.slurm_job_id
        time.sleep(0.3)
    ends = [client.wait(j, timeout=TIMEOUT) for j in (first, second, third)]
    assert [e.state for e in ends] == [JobState.COMPLETED] * 3
    for before, after in itertools.pairwise(ends):  # each started after the one before ended
        assert before.ended_at is not None
        assert after.started_at is not None
        assert after.started_at >= before.ended_at


def test_dependency_on_a_failing_job_ends_with_the_reason(client: Client) -> None:
    failing = submit(client, "fails", "sleep 2; exit 3", resources={"time": "2"})
    waiting = submit(client, "waits", "echo never", after=[{"job": str(failing.id), "on": "ok"}])
    on_failure = submit(client, "cleanup", "echo cleanup", after=[{"job": str(failing.id), "on": "notok"}])
    ended = client.wait(waiting, timeout=TIMEOUT)
    assert client.get(failing).state == JobState.FAILED
    assert ended.state == JobState.FAILED, ended
    assert ended.reason is not None
    assert "DependencyNeverSatisfied" in ended.reason, ended.reason
    assert "cancelled instead of left queued" in ended.reason  # SLURM's reason, seen in squeue
    assert b"never" not in client.logs(waiting).data  # it never ran
    assert client.wait(on_failure, timeout=TIMEOUT).state == JobState.COMPLETED
    # waiting on a job that has already failed: porter ends it without submitting it
    late = submit(client, "late", "echo late", after=[{"job": str(failing.id)}])
    late = client.wait(late, timeout=TIMEOUT)
    assert late.state == JobState.FAILED, late
    assert late.slurm_job_id is None
    assert late.reason == (
        f"DependencyNeverSatisfied: job {failing.id} ended failed, and this job was to run after it ended ok"
    )


def test_bad_values_are_422s_naming_the_field(client: Client, deployment: Deployment) -> None:
    for bad in ("0-", "9-1", "0-9%0", "x", "0-20:0", "0-200000"):
        with pytest.raises(ApiError) as refused:
            client.request(
                "POST", "/api/v1/jobs", json={"name": "a", "cluster": "testbed", "script": "x", "array": bad}
            )
        assert refused.value.status == 422
        assert "array" in str(refused.value.details), bad
    for after in (
        [{"job": "not-a-uuid"}],
        [{"job": "8c0b2a6e-0000-4000-8000-000000000000", "on": "sometimes"}],
        [{"job": "8c0b2a6e-0000-4000-8000-000000000000"}],  # no such job of alice's
    ):
        with pytest.raises(ApiError) as refused:
            client.request(
                "POST",
                "/api/v1/jobs",
                json={"name": "a", "cluster": "testbed", "script": "x", "after": after},
            )
        assert refused.value.status == 422
        assert "after" in str(refused.value.details), after
    # another user's job is not one to wait for, and answers as a job that does not exist
    store = Store(deployment.database)
    try:
        bob_token = store.create_token("bob", "user")
        store.create_token("bob", "agent", ["testbed"])  # bob may use the cluster too
    finally:
        store.close()
    with Client(deployment.url, bob_token) as bob:
        bobs = submit(bob, "bobs", "sleep 1")
    with pytest.raises(ApiError) as refused:
        submit(client, "a", "x", after=[{"job": str(bobs.id)}])
    assert refused.value.status == 422
    assert refused.value.details == [{"field": "after[0].job", "message": f"no job {bobs.id} of yours"}]
    with pytest.raises(ApiError) as refused:
        submit(client, "a", "#!/bin/bash\n#SBATCH --dependency=afterok:1\nx")
    assert refused.value.status == 422
    assert "--dependency" in refused.value.message
