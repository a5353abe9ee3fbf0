"""slurmctld RPCs per poll tick while following 1 job vs 100 jobs, and 1 job vs one 100-task job
array (target: both ratios <= 1.5).

Sites rate-limit slurmctld RPCs per user; the original system checked each job on its own. This
counts the RPCs slurmctld actually served (`sdiag`, reset before each measurement) during N ticks
of the real Poller over the real SlurmBackend, and, as a baseline, one squeue per job per tick.

Run as root on the testbed machine (sdiag --reset needs root): `python bench/slurm_poll.py`.
The testbed is shared, so each figure is the minimum of a few repetitions (others' traffic only
ever adds RPCs). All bench jobs are cancelled at the end.

The array (issue 13, item 3) is one sbatch of `--array=0-99`: 8 tasks run, 92 pend as one squeue
row. Its tasks are followed with the same single squeue per tick as one job (`--jobs=<array id>`
lists every task), so the ratio measures that no task costs a call of its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.*

from tests.slurm_jobs import make_submission, testbed_ssh

from cloudhpc.config import PollConfig
from cloudhpc.domain.jobs import Observation, Resources
from cloudhpc.hpc.poller import Poller
from cloudhpc.hpc.slurm import SlurmBackend, Squeue
from cloudhpc.hpc.ssh import SSHConnection

TICKS = 20
REPEATS = 3
JOBS = 100
TARGET_RATIO = 1.5
_RPC = re.compile(r"^\s*(?P<type>[A-Z_]+)\s+\(\s*\d+\)\s+count:(?P<count>\d+)", re.M)
# sdiag's own request, and what slurmd sends on its own schedule, are not caused by polling.
_IGNORED = {"REQUEST_STATS_INFO", "MESSAGE_NODE_REGISTRATION_STATUS", "MESSAGE_EPILOG_COMPLETE"}


def sdiag_reset() -> None:
    subprocess.run(["sdiag", "--reset"], check=True, capture_output=True)


def sdiag_counts() -> dict[str, int]:
    text = subprocess.run(["sdiag"], check=True, capture_output=True, text=True).stdout
    section = text.split("Remote Procedure Call statistics by message type", 1)[1]
    section = section.split("Remote Procedure Call statistics by user", 1)[0]
    return {m["type"]: int(m["count"]) for m in _RPC.finditer(section) if m["type"] not in _IGNORED}


async def measure(backend: SlurmBackend, jobs: dict[UUID, str]) -> tuple[float, dict[str, int]]:
    """RPCs per tick (the best of REPEATS runs of TICKS ticks) and the per-type counts of that run."""

    async def ignore(job_id: UUID, native_id: str, observation: Observation) -> None:
        return None

    best: tuple[float, dict[str, int]] | None = None
    for _ in range(REPEATS):
        poller = Poller(backend, PollConfig(fast_interval=0.05, slow_interval=0.05), ignore)
        for job_id, native_id in jobs.items():
            poller.track(job_id, native_id)
        sdiag_reset()
        for _ in range(TICKS):
            await poller.tick()
            await asyncio.sleep(0.05)
        counts = sdiag_counts()
        per_tick = sum(counts.values()) / TICKS
        if best is None or per_tick < best[0]:
            best = (per_tick, counts)
    assert best is not None
    return best


async def baseline_per_job(backend: SlurmBackend, conn: SSHConnection, native_ids: list[str]) -> float:
    """What checking each job on its own costs: one squeue per job per tick (2 ticks)."""
    best = float("inf")
    for _ in range(REPEATS):
        sdiag_reset()
        for _ in range(2):
            for native_id in native_ids:
                await conn.run(Squeue(jobs=[native_id]).argv())
        best = min(best, sum(sdiag_counts().values()) / 2)
    return best


async def main() -> None:
    testbed, config = testbed_ssh()
    async with SSHConnection(config, cluster="testbed") as conn:
        backend = SlurmBackend(
            "testbed",
            conn,
            workdir="~/.cloudhpc-bench",
        )
        workdir = await backend.workdir()
        defaults = Resources(partition=testbed.partition, time="00:20:00")
        submissions = [make_submission(workdir, "sleep 1200\n", defaults=defaults) for _ in range(JOBS)]
        t0 = time.monotonic()
        native = await asyncio.gather(*(backend.submit(s) for s in submissions))
        jobs = {s.job_id: n for s, n in zip(submissions, native, strict=True)}
        print(f"submitted {JOBS} long jobs in {time.monotonic() - t0:.1f} s (8 run, the rest pend)")
        array = make_submission(workdir, "sleep 1200\n", defaults=defaults)
        array = dataclasses.replace(array, spec=array.spec.model_copy(update={"array": f"0-{JOBS - 1}"}))
        array_id = await backend.submit(array)
        print(f"submitted one array of {JOBS} tasks as SLURM job {array_id}")
        try:
            for _ in range(50):
                if len(await backend.poll([*jobs.values(), array_id])) == JOBS + 1:
                    break
                await asyncio.sleep(0.2)
            seen = (await backend.poll([array_id]))[array_id]
            tasks_seen = len(seen.tasks or ())
            assert tasks_seen == JOBS, f"the array's poll saw {tasks_seen} tasks, not {JOBS}"
            one = dict([next(iter(jobs.items()))])
            per_tick_1, types_1 = await measure(backend, one)
            per_tick_100, types_100 = await measure(backend, jobs)
            per_tick_array, types_array = await measure(backend, {array.job_id: array_id})
            per_job = await baseline_per_job(backend, conn, list(jobs.values()))
        finally:
            await asyncio.gather(*(backend.cancel(n) for n in [*jobs.values(), array_id]))
            print(f"cancelled {JOBS} bench jobs and the array")
    ratio = per_tick_100 / per_tick_1
    array_ratio = per_tick_array / per_tick_1
    print(f"1 job:    {per_tick_1:.2f} slurmctld RPCs per tick {types_1}")
    print(f"{JOBS} jobs: {per_tick_100:.2f} slurmctld RPCs per tick {types_100}")
    print(f"1 array of {JOBS} tasks: {per_tick_array:.2f} slurmctld RPCs per tick {types_array}")
    print(f"baseline, one squeue per job: {per_job:.1f} RPCs per tick for {JOBS} jobs")
    print(f"ratio {JOBS}/1 = {ratio:.2f} (target <= {TARGET_RATIO})")
    print(f"ratio array of {JOBS} tasks / 1 job = {array_ratio:.2f} (target <= {TARGET_RATIO})")
    print(
        json.dumps(
            {
                "bench": "slurm_poll",
                "ticks": TICKS,
                "rpcs_per_tick_1_job": round(per_tick_1, 3),
                f"rpcs_per_tick_{JOBS}_jobs": round(per_tick_100, 3),
                "ratio": round(ratio, 3),
                f"baseline_per_job_rpcs_per_tick_{JOBS}_jobs": round(per_job, 1),
                f"rpcs_per_tick_array_of_{JOBS}_tasks": round(per_tick_array, 3),
                "array_ratio": round(array_ratio, 3),
                "array_tasks_seen_per_poll": tasks_seen,
                "target_ratio_max": TARGET_RATIO,
                "met": ratio <= TARGET_RATIO and array_ratio <= TARGET_RATIO,
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
