"""#13 item 5 on the testbed's SLURM, porter and the submitter as processes: a job whose work
outlasts its time limit is warned, saves its counter, is requeued and finishes on its second run
with the result of an uninterrupted run; an operator's `scontrol requeue` is followed the same way;
a job with no restart left ends by its time limit with the reason saying so.

SLURM 22.05 details these timings rest on (the testbed's slurm.conf): slurmctld checks time limits
every 30 s and sends `--signal` once `warn_before + 30 s` or less is left, so with a 1-minute limit
and `warn_before: 30` the warning comes 0 to 30 s into a run; a requeued job may start again only
`cred_expire + 1` s later (120 s by default; 31 s on the testbed) and the scheduler picks it up
within 30 s more. The jobs are submitted together (module fixture) and one watcher follows them all
from their submission, requeuing the operator's jobs as soon as they wait, so those waits overlap:
each test then reads what the watcher saw of its own job (the module takes about as long as its
slowest job, not the sum of the three requeues).
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from cloudhpc.client import Client
from cloudhpc.domain.jobs import Job
from cloudhpc.domain.states import JobState
from tests.e2e.harness import Deployment, scrape_token_file, submit
from tests.jobs import stored_log

pytestmark = pytest.mark.timeout(600)

TIMEOUT = 420.0
STEPS = 45
"""Seconds of work: more than a first run gets before its warning (at most 30 s), less than a whole
1-minute run (so the second run finishes: max_restarts 1 does not warn it)."""

COUNTER = f"""\
#!/bin/bash
f="$CLOUDHPC_CHECKPOINT_DIR/counter"
i=$(cat "$f" 2>/dev/null || echo 0)
echo "run ${{CLOUDHPC_RESTART_COUNT:-none}} from $i"
while [ "$i" -lt {STEPS} ]; do
  sleep 1
  i=$((i + 1))
  echo "$i" > "$f.tmp" && mv "$f.tmp" "$f"
  echo "step $i"
done
echo "result $((i * (i + 1) / 2))"
"""
"""A counter checkpointed after every step; without CLOUDHPC_CHECKPOINT_DIR (an uninterrupted job)
it counts in a file of its own directory."""


OPERATOR = """\
#!/bin/bash
echo "run ${RESTARTS:-0}"
if [ "${RESTARTS:-0}" = 0 ]; then echo "waiting for the operator"; sleep 600; fi
echo "done"
"""
"""Waits on its first run (until an operator requeues it), ends at once on the next."""


@pytest.fixture(scope="module")
def jobs(client: Client) -> dict[str, Job]:
    """Every job of the module, submitted at once so their SLURM waits overlap."""
    warned = {"warn_before": "30s", "signal": "USR1", "max_restarts": 1}
    return {
        "timelimit": submit(client, "ckpt-limit", COUNTER, resources={"time": "1"}, checkpoint=warned),
        "uninterrupted": submit(
            client, "ckpt-whole", COUNTER.replace("$CLOUDHPC_CHECKPOINT_DIR", "."), resources={"time": "5"}
        ),
        "operator": submit(
            client,
            "ckpt-operator",
            OPERATOR.replace("RESTARTS", "CLOUDHPC_RESTART_COUNT"),
            resources={"time": "15"},
            checkpoint={"warn_before": 60, "max_restarts": 1},
        ),
        "operator-plain": submit(
            client,
            "plain-operator",
            OPERATOR.replace("RESTARTS", "SLURM_RESTART_COUNT"),
            resources={"time": "15"},
        ),
        "exhausted": submit(
            client,
            "ckpt-none-left",
            "#!/bin/bash\necho start\nsleep 300\n",
            resources={"time": "1"},
            checkpoint={"warn_before": 30, "max_restarts": 0},
        ),
    }


OPERATOR_JOBS = ("operator", "operator-plain")
"""The jobs an operator requeues (`scontrol requeue`) once their first run waits for it."""


@dataclass
class Watcher:
    """Follows every job of the module in one thread from its submission: each job's states as
    porter answered them (one entry per change of reason), and `scontrol requeue` of each operator
    job as soon as its first run says it waits. One thread rather than one test after another, so
    the three requeue holds run at the same time."""

    client: Client
    jobs: dict[str, Job]
    seen: dict[str, list[Job]] = field(default_factory=dict)
    ended: dict[str, Job] = field(default_factory=dict)
    requeued: dict[str, str] = field(default_factory=dict)
    """Operator job -> the SLURM job ID it requeued."""
    error: BaseException | None = None
    changed: threading.Condition = field(default_factory=threading.Condition)
    stopping: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        try:
            deadline = time.monotonic() + TIMEOUT
            while not self.stopping.is_set() and len(self.ended) < len(self.jobs):
                for name, job in self.jobs.items():
                    if name not in self.ended:
                        self.look(name, job)
                assert time.monotonic() < deadline, {
                    n: (j[-1].state, j[-1].reason) for n, j in self.seen.items()
                }
                self.stopping.wait(0.5)
        except BaseException as exc:  # handed to the test that waits (a thread's own is lost)
            self.error = exc
        finally:
            with self.changed:
                self.stopping.set()
                self.changed.notify_all()

    def look(self, name: str, job: Job) -> None:
        current = self.client.get(job)
        seen = self.seen.setdefault(name, [])
        if not seen or seen[-1].reason != current.reason:
            seen.append(current)
        if (
            name in OPERATOR_JOBS
            and name not in self.requeued
            and b"waiting for the operator\n" in stored_log(self.client, job)
        ):
            native = self.client.get(job).slurm_job_id
            assert native is not None
            subprocess.run(["scontrol", "requeue", native], check=True)
            self.requeued[name] = native
        if current.state.terminal:
            with self.changed:
                self.ended[name] = current
                self.changed.notify_all()

    def wait_end(self, name: str) -> Job:
        """The job once terminal, as the watcher saw it; the watcher's failure if it failed."""
        with self.changed:
            self.changed.wait_for(lambda: name in self.ended or self.stopping.is_set(), timeout=TIMEOUT + 30)
        if self.error is not None:
            raise self.error
        assert name in self.ended, (name, self.seen.get(name))
        return self.ended[name]


@pytest.fixture(scope="module")
def watcher(deployment: Deployment, jobs: dict[str, Job]) -> Iterator[Watcher]:
    with deployment.client() as client:
        watch = Watcher(client, jobs)
        thread = threading.Thread(target=watch.run, name="requeue-watcher", daemon=True)
        thread.start()
        try:
            yield watch
        finally:
            watch.stopping.set()
            thread.join(timeout=30)


def log_on_cluster(job: Job) -> bytes:
    """The output file SLURM wrote (the testbed's HPC account is local)."""
    return (
        Path("~hpcuser").expanduser() / ".cloudhpc/jobs" / str(job.id) / ".cloudhpc/output.log"
    ).read_bytes()


def test_time_limit_requeue_finishes_like_an_uninterrupted_run(client: Client, watcher: Watcher) -> None:
    ended = watcher.wait_end("timelimit")
    whole = watcher.wait_end("uninterrupted")
    seen = watcher.seen["timelimit"]
    assert whole.state == JobState.COMPLETED
    assert whole.restarts == 0
    assert ended.state == JobState.COMPLETED, ended
    assert ended.restarts == 1
    # its run ended REQUEUED (the wrapper's) inside its warning window: a time-limit warning
    assert ended.reason == "Time limit warning; requeued (restart 1 of 1): COMPLETED"
    # while SLURM ran it again the job stayed `running`, with the reason saying why (`Requeued` until
    # the agent's sacct said what ended the run)
    requeued = [j for j in seen if j.reason and "equeued (restart 1 of 1)" in j.reason]
    assert requeued, [(j.state, j.reason) for j in seen]
    assert all(j.state == JobState.RUNNING for j in requeued[:-1])
    log = stored_log(client, ended)
    # the agent lost and repeated nothing: what porter serves is the file SLURM appended to
    assert log == log_on_cluster(ended)
    text = log.decode()
    assert text.startswith("run 0 from 0\n")
    assert "run 1 from " in text
    assert "requeued" in text
    steps = [int(line.split()[1]) for line in text.splitlines() if line.startswith("step ")]
    assert sorted(set(steps)) == list(range(1, STEPS + 1))
    result = [line for line in text.splitlines() if line.startswith("result ")]
    assert result == [
        line for line in stored_log(client, whole).decode().splitlines() if line.startswith("result ")
    ]
    assert result == [f"result {STEPS * (STEPS + 1) // 2}"]


@pytest.mark.parametrize(
    ("name", "reason"),
    [("operator", "Requeued (restart 1 of 1)"), ("operator-plain", "Requeued (restart 1)")],
)
def test_operator_requeue_is_followed(client: Client, watcher: Watcher, name: str, reason: str) -> None:
    """`scontrol requeue` from outside (the watcher's, once the first run waits), of a job with
    `checkpoint` and of one without."""
    ended = watcher.wait_end(name)
    assert name in watcher.requeued, watcher.seen[name]
    seen = watcher.seen[name]
    assert any(
        j.state == JobState.RUNNING
        and j.restarts == 1
        and j.reason in (f"{reason}: PENDING", f"{reason}: REQUEUED")
        for j in seen
    ), [(j.state, j.restarts, j.reason) for j in seen]
    assert ended.state == JobState.COMPLETED
    assert ended.restarts == 1
    assert ended.reason == f"{reason}: COMPLETED"
    log = stored_log(client, ended)
    # both runs, once each: SLURM appended the second run to the first (--open-mode=append)
    assert log == log_on_cluster(ended)
    text = log.decode()
    assert text.startswith("run 0\nwaiting for the operator\n")
    assert text.endswith("run 1\ndone\n")
    assert text.count("run 0\n") == 1


def test_no_restart_left_ends_by_the_time_limit(client: Client, watcher: Watcher) -> None:
    ended = watcher.wait_end("exhausted")
    assert ended.state == JobState.TIMEOUT
    assert ended.restarts == 0
    assert ended.reason == "checkpoint.max_restarts (0) reached: TIMEOUT"
    assert "max_restarts (0) reached: not requeued" in stored_log(client, ended).decode()


@pytest.mark.parametrize(
    ("checkpoint", "resources", "field"),
    [
        ({"warn_before": "soon"}, {"time": "5"}, "checkpoint.warn_before"),
        ({"signal": "KILL"}, {"time": "5"}, "checkpoint.signal"),
        ({"max_restarts": -1}, {"time": "5"}, "checkpoint.max_restarts"),
        ({"warn_before": 30}, {}, "checkpoint"),
    ],
)
def test_bad_checkpoint_is_422_naming_the_field(
    deployment: Deployment, checkpoint: dict[str, object], resources: dict[str, object], field: str
) -> None:
    body = {
        "name": "bad",
        "cluster": "testbed",
        "script": "true",
        "resources": resources,
        "checkpoint": checkpoint,
    }
    answer = httpx.post(
        f"{deployment.url}/api/v1/jobs",
        json=body,
        headers={"Authorization": f"Bearer {deployment.user_token}"},
    )
    assert answer.status_code == 422, answer.text
    assert field in answer.text


def test_metrics_count_the_restarts(deployment: Deployment, watcher: Watcher) -> None:
    """porter's /metrics: every restart of the module's jobs (one each for the time-limit job and
    the two an operator requeued), whatever their state now."""
    total = sum(watcher.wait_end(name).restarts for name in watcher.jobs)
    assert total == 3
    token = scrape_token_file(deployment.testbed.prometheus_targets).read_text().strip()
    body = httpx.get(f"{deployment.url}/metrics", headers={"Authorization": f"Bearer {token}"}).text
    assert 'cloudhpc_job_restarts_total{cluster="testbed"} 3\n' in body, [
        line for line in body.splitlines() if "restarts" in line
    ]
