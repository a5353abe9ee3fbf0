"""#13 item 5, preemption, on the testbed's SLURM with porter and the submitter as processes: a job
of the `urgent` partition (a higher PriorityTier on the same node, scripts/testbed.sh) preempts two
running jobs of the default partition (`PreemptMode=REQUEUE`), and cloudhpc follows each as the same
job to its end:

- a `checkpoint` job gets its `--signal` at the preemption (`preempt_send_user_signal`), saves its
  step on it, is requeued by its wrapper, and its second run resumes from that step: `completed`
  with `restarts` 1;
- a job without `checkpoint` is requeued by SLURM once the partition's `GraceTime` is over (its run
  `PREEMPTED` in accounting) and runs again from the start: `completed` with `restarts` 1, never
  `failed` or lost, its reason saying `Preempted; requeued (restart 1): PENDING` while it waits.

The urgent job asks for more memory than is left beside the two, and for less than is left without
them, so it needs both preempted and no job of anyone else (the testbed is shared): SLURM preempts
the fewest jobs that make room (cons_tres tries the candidates again with the last one it needed
first). Timings (slurm.conf): a requeued job may start again `cred_expire + 1` = 31 s after its
requeue; the job without a checkpoint is requeued once its 15 s grace is over, at the scheduler's
next try for the urgent job. The checkpointed job saves its step on the signal only, so the test
fails if SLURM does not send it (seen once, right after slurmctld started: docs/hpc-site.md).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest

from cloudhpc.client import Client
from cloudhpc.domain.jobs import Job
from cloudhpc.domain.states import JobState
from tests.e2e.harness import submit
from tests.jobs import stored_log
from tests.testbed import read_env_file

pytestmark = pytest.mark.timeout(300)

TIMEOUT = 200.0
STEPS = 12
"""Seconds of work of the checkpointed job: the urgent job comes after 3 of them."""

CHECKPOINTED = f"""\
#!/bin/bash
f="$CLOUDHPC_CHECKPOINT_DIR/step"
i=$(cat "$f" 2>/dev/null || echo 0)
echo "run $CLOUDHPC_RESTART_COUNT from $i"
# the checkpoint is written on the warning only: a run that was not warned resumes from 0
trap 'echo "$i" > "$f.tmp" && mv "$f.tmp" "$f"; echo "checkpointed at $i"; exit 75' USR1
while [ "$i" -lt {STEPS} ]; do
  sleep 1 & wait $!   # `wait` returns at once when the trap runs
  i=$((i + 1))
  echo "step $i"
done
echo "done at $i"
"""

PLAIN = """\
#!/bin/bash
echo "run ${SLURM_RESTART_COUNT:-0}"
if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then echo "working"; sleep 300; fi
echo "done"
"""
"""No checkpoint: its first run works until SLURM ends it, the next one ends at once."""


def node_memory_mb() -> int:
    """The node's memory as SLURM schedules it (RealMemory, MB): the jobs' sizes are shares of it."""
    out = subprocess.run(
        ["sinfo", "--noheader", "--format=%m", "--partition=" + read_env_file()["TESTBED_SLURM_PARTITION"]],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return int(out[0].rstrip("+"))


def urgent_partition() -> str:
    env = read_env_file()
    if "TESTBED_SLURM_URGENT_PARTITION" not in env:
        pytest.fail("the testbed predates its urgent partition: run `scripts/testbed.sh up`", pytrace=False)
    return env["TESTBED_SLURM_URGENT_PARTITION"]


def wait_for_log(client: Client, job: Job, text: bytes, deadline: float) -> None:
    while text not in stored_log(client, job):
        current = client.get(job)
        assert not current.state.terminal, (current.state, current.reason, stored_log(client, job))
        assert time.monotonic() < deadline, (job.name, current.state, stored_log(client, job))
        time.sleep(0.3)


@pytest.fixture(scope="module")
def preempted(client: Client) -> Iterator[dict[str, list[Job]]]:
    """Both default-partition jobs running, then the urgent job; each job's states as porter
    answered them (one entry per change of state, restarts or reason) until all three ended. A job
    still active when the fixture fails is cancelled: a waiting urgent job holds the node for every
    other default-partition job (the testbed is shared)."""
    jobs: dict[str, Job] = {}
    try:
        yield watch_preemption(client, jobs)
    finally:
        for job in jobs.values():
            if not client.get(job).state.terminal:
                client.cancel(job)


def watch_preemption(client: Client, jobs: dict[str, Job]) -> dict[str, list[Job]]:
    """The scenario of `preempted`; `jobs` gets each job as it is submitted."""
    memory = node_memory_mb()
    low = f"{memory * 40 // 100}M"
    jobs["checkpointed"] = submit(
        client,
        "preempt-ckpt",
        CHECKPOINTED,
        resources={"time": "5", "mem": low},
        checkpoint={"warn_before": 60, "signal": "USR1", "max_restarts": 2},
    )
    jobs["plain"] = submit(client, "preempt-plain", PLAIN, resources={"time": "5", "mem": low})
    deadline = time.monotonic() + TIMEOUT
    wait_for_log(client, jobs["checkpointed"], b"step 3\n", deadline)
    wait_for_log(client, jobs["plain"], b"working\n", deadline)
    jobs["urgent"] = submit(
        client,
        "preempt-urgent",
        "#!/bin/bash\necho urgent\nsleep 2\n",
        resources={"time": "1", "mem": f"{memory * 85 // 100}M", "partition": urgent_partition()},
    )
    seen: dict[str, list[Job]] = {name: [] for name in jobs}
    ended: set[str] = set()
    while len(ended) < len(jobs):
        assert time.monotonic() < deadline, {
            n: [(j.state, j.restarts, j.reason) for j in s] for n, s in seen.items()
        }
        for name, job in jobs.items():
            if name in ended:
                continue
            current = client.get(job)
            last = seen[name][-1] if seen[name] else None
            if last is None or (last.state, last.restarts, last.reason) != (
                current.state,
                current.restarts,
                current.reason,
            ):
                seen[name].append(current)
            if current.state.terminal:
                ended.add(name)
        time.sleep(0.5)
    return seen


def test_checkpointed_job_resumes_after_preemption(client: Client, preempted: dict[str, list[Job]]) -> None:
    seen = preempted["checkpointed"]
    ended = seen[-1]
    assert ended.state == JobState.COMPLETED, [(j.state, j.restarts, j.reason) for j in seen]
    assert ended.restarts == 1
    # its wrapper requeued it on the preemption's signal: its run ended `REQUEUED` in accounting,
    # as an operator's requeue would, long before its time-limit warning could have come
    assert ended.reason == "Requeued (restart 1 of 2): COMPLETED"
    # while preempted and waiting to run again it stayed `running`, the reason saying why
    assert any(
        j.state == JobState.RUNNING and j.restarts == 1 and j.reason == "Requeued (restart 1 of 2): PENDING"
        for j in seen
    ), [(j.state, j.restarts, j.reason) for j in seen]
    assert not any("Time limit warning" in (j.reason or "") for j in seen)
    assert all(j.state in (JobState.QUEUED, JobState.RUNNING, JobState.COMPLETED) for j in seen)
    log = stored_log(client, ended).decode()
    lines = log.splitlines()
    saved = next(line for line in lines if line.startswith("checkpointed at "))
    step = int(saved.removeprefix("checkpointed at "))
    assert 3 <= step < STEPS, log
    assert "run 0 from 0" in lines
    assert f"run 1 from {step}" in lines, log
    assert "requeued" in log  # the wrapper's own note
    # the second run did only the rest
    assert lines[-1] == f"done at {STEPS}"
    assert [line for line in lines if line.startswith("step ")] == [f"step {n}" for n in range(1, STEPS + 1)]


def test_plain_job_is_followed_through_slurms_requeue(
    client: Client, preempted: dict[str, list[Job]]
) -> None:
    seen = preempted["plain"]
    ended = seen[-1]
    assert ended.state == JobState.COMPLETED, [(j.state, j.restarts, j.reason) for j in seen]
    assert ended.restarts == 1
    # SLURM requeued it at the end of its grace time: its run ended `PREEMPTED` in accounting, and
    # the agent's one sacct after the restart makes the reason say so while it waits to run again
    assert ended.reason == "Preempted; requeued (restart 1): COMPLETED"
    assert any(
        j.state == JobState.RUNNING and j.reason == "Preempted; requeued (restart 1): PENDING" for j in seen
    ), [(j.state, j.restarts, j.reason) for j in seen]
    assert all(j.state in (JobState.QUEUED, JobState.RUNNING, JobState.COMPLETED) for j in seen)
    log = stored_log(client, ended).decode().splitlines()
    assert log[:2] == ["run 0", "working"]
    assert "run 1" in log
    assert log[-1] == "done"


def test_urgent_job_ran(preempted: dict[str, list[Job]]) -> None:
    ended = preempted["urgent"][-1]
    assert ended.state == JobState.COMPLETED, ended
    assert ended.restarts == 0
