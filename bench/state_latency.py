"""From a SLURM state change to the poller reporting it, at the fast poll interval (target: median <= 1.5 s).

Jobs print a timestamp when their script starts and just before it ends (`date +%s.%N`, the same
clock as ours: the testbed is this machine). So that changes fall at random points of the poll
interval (not right after the poke a submission gives), the measured jobs first wait in the queue
behind blocker jobs that fill the node and end at scattered times, and they sleep scattered,
fractional durations. The real Poller, running its own loop over the real
SlurmBackend with `slow_interval = fast_interval` (the interval it uses while jobs start and end),
stamps every observation as it is reported. Latency = report time - job's own timestamp, for the
start (-> running) and the end (-> completed). sacct's start/end (whole seconds) are printed too.

Run on the testbed machine: `python bench/state_latency.py`. Bench jobs are cancelled at the end.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from uuid import UUID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.*

from tests.slurm_jobs import make_submission, testbed_ssh

from cloudhpc.config import PollConfig
from cloudhpc.domain.jobs import Observation, Resources
from cloudhpc.domain.states import JobState
from cloudhpc.hpc.poller import Poller
from cloudhpc.hpc.slurm import SlurmBackend
from cloudhpc.hpc.ssh import SSHConnection

JOBS = 8
CPUS = 8  # the testbed node
FAST = PollConfig().fast_interval
CONFIG = PollConfig(fast_interval=FAST, slow_interval=FAST, max_commands_per_minute=120)
TARGET = 1.5


def script(seconds: float) -> str:
    return f"date +%s.%N\nsleep {seconds:.2f}\ndate +%s.%N\n"


async def main() -> None:
    testbed, config = testbed_ssh()
    seen: dict[UUID, dict[JobState, float]] = {}
    jobs: dict[UUID, str] = {}
    all_done = asyncio.Event()

    async def record(job_id: UUID, native_id: str, observation: Observation) -> None:
        seen.setdefault(job_id, {}).setdefault(observation.state, time.time())
        if len(jobs) == JOBS and all(any(s.terminal for s in seen.get(j, {})) for j in jobs):
            all_done.set()

    async with SSHConnection(config, cluster="testbed") as conn:
        backend = SlurmBackend(
            "testbed",
            conn,
            workdir="~/.cloudhpc-bench",
        )
        workdir = await backend.workdir()
        poller = Poller(backend, CONFIG, record)
        defaults = Resources(partition=testbed.partition, time="00:05:00")
        blockers = [
            make_submission(workdir, f"sleep {2 + 0.37 * i:.2f}\n", defaults=defaults) for i in range(CPUS)
        ]
        measured = [
            make_submission(workdir, script(2 + 0.29 * i + 0.13), defaults=defaults) for i in range(JOBS)
        ]
        blocker_ids = [await backend.submit(s) for s in blockers]
        poller.start()
        try:
            for submission in measured:
                jobs[submission.job_id] = await backend.submit(submission)
                poller.track(submission.job_id, jobs[submission.job_id])
            await asyncio.wait_for(all_done.wait(), 60)
        finally:
            await poller.stop()
            await asyncio.gather(*(backend.cancel(n) for n in [*blocker_ids, *jobs.values()]))
        start_lat: list[float] = []
        end_lat: list[float] = []
        for job_id, native_id in jobs.items():
            stamps = [float(x) for x in (await backend.read_output(job_id)).split()]
            observed = seen.get(job_id, {})
            (allocation,) = [r for r in (await backend.accounting(native_id)).records if r.step is None]
            line = f"job {native_id}: {allocation.state}"
            if JobState.RUNNING in observed and stamps:
                start_lat.append(observed[JobState.RUNNING] - stamps[0])
                line += f", running seen {start_lat[-1]:+.2f} s after the script started"
            if JobState.COMPLETED in observed and len(stamps) == 2:
                end_lat.append(observed[JobState.COMPLETED] - stamps[1])
                line += f", completed seen {end_lat[-1]:+.2f} s after its last line"
            if allocation.start is not None and allocation.end is not None:
                line += f" (sacct: {allocation.start:%H:%M:%S} -> {allocation.end:%H:%M:%S})"
            print(line)
    latencies = start_lat + end_lat
    median = statistics.median(latencies)
    print(f"poll interval {FAST} s; {len(start_lat)} starts, {len(end_lat)} ends observed")
    print(
        f"median start latency {statistics.median(start_lat):.2f} s, median end latency "
        f"{statistics.median(end_lat):.2f} s, overall median {median:.2f} s, max {max(latencies):.2f} s"
    )
    print(
        json.dumps(
            {
                "bench": "state_latency",
                "poll_interval_s": FAST,
                "jobs": JOBS,
                "observed_changes": len(latencies),
                "median_start_latency_s": round(statistics.median(start_lat), 3),
                "median_end_latency_s": round(statistics.median(end_lat), 3),
                "median_latency_s": round(median, 3),
                "max_latency_s": round(max(latencies), 3),
                "target_median_max_s": TARGET,
                "met": median <= TARGET and len(latencies) == 2 * JOBS,
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
