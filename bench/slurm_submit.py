"""100 submissions through the one shared SSH connection vs a new SSH connection per submission
(what the original did: every remote action paid connect + key exchange + auth). Target >= 5x.

Each submission is the real `SlurmBackend.submit`: create the job directory, upload the user's
script and the wrapper over SFTP, run sbatch. Measured in the same run, on the same testbed:

- baseline: a new `SSHConnection` per submission, one submission after another;
- shared, sequential: the same 100 submissions one after another on one connection;
- shared, concurrent: 100 submissions at once, multiplexed on one connection (channels capped
  below sshd's MaxSessions), which is how the agent submits a burst.

Run on the testbed machine: `python bench/slurm_submit.py`. The (instant) jobs are cancelled at the end.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.*

from tests.slurm_jobs import make_submission, testbed_ssh

from cloudhpc.config import SSHConfig
from cloudhpc.domain.jobs import Resources
from cloudhpc.hpc.backend import JobSubmission
from cloudhpc.hpc.slurm import SlurmBackend
from cloudhpc.hpc.ssh import SSHConnection

N = 100
TARGET = 5.0


async def shared(
    conn: SSHConnection, workdir: str, defaults: Resources, concurrent: bool
) -> tuple[float, list[str]]:
    backend = SlurmBackend("testbed", conn, workdir=workdir)
    submissions = [make_submission(workdir, "true\n", defaults=defaults) for _ in range(N)]
    t0 = time.perf_counter()
    if concurrent:
        ids = list(await asyncio.gather(*(backend.submit(s) for s in submissions)))
    else:
        ids = [await backend.submit(s) for s in submissions]
    return time.perf_counter() - t0, ids


async def connection_per_submit(
    config: SSHConfig, workdir: str, defaults: Resources
) -> tuple[float, list[str]]:
    async def one(submission: JobSubmission) -> str:
        async with SSHConnection(config, cluster="testbed") as conn:
            return await SlurmBackend("testbed", conn, workdir=workdir).submit(submission)

    submissions = [make_submission(workdir, "true\n", defaults=defaults) for _ in range(N)]
    t0 = time.perf_counter()
    ids = [await one(s) for s in submissions]
    return time.perf_counter() - t0, ids


async def main() -> None:
    testbed, config = testbed_ssh()
    defaults = Resources(partition=testbed.partition, time="00:05:00")
    async with SSHConnection(config, cluster="testbed") as conn:
        workdir = f"{await conn.home()}/.cloudhpc-bench"
        await shared(conn, workdir, defaults, concurrent=False)  # warm up: connection, SFTP, sbatch caches
        seq, ids_seq = await shared(conn, workdir, defaults, concurrent=False)
        base, ids_base = await connection_per_submit(config, workdir, defaults)
        conc, ids_conc = await shared(conn, workdir, defaults, concurrent=True)
        submitted = ids_seq + ids_base + ids_conc
        assert len(set(submitted)) == 3 * N, "every submission must yield its own SLURM job"
        cleanup = SlurmBackend("testbed", conn, workdir=workdir)
        await asyncio.gather(*(cleanup.cancel(i) for i in submitted))
    per = {name: 1000 * t / N for name, t in (("baseline", base), ("sequential", seq), ("concurrent", conc))}
    print(f"baseline, new connection per submission: {base:.2f} s for {N} ({per['baseline']:.1f} ms each)")
    print(f"shared connection, sequential:           {seq:.2f} s for {N} ({per['sequential']:.1f} ms each)")
    print(f"shared connection, concurrent:           {conc:.2f} s for {N} ({per['concurrent']:.1f} ms each)")
    speedup, speedup_seq = base / conc, base / seq
    print(
        f"speedup (shared, concurrent) {speedup:.1f}x; like for like (shared, sequential) {speedup_seq:.1f}x"
    )
    print(f"median of the three per-submission costs: {statistics.median(per.values()):.1f} ms")
    print(
        json.dumps(
            {
                "bench": "slurm_submit",
                "submissions": N,
                "baseline_s": round(base, 3),
                "shared_sequential_s": round(seq, 3),
                "shared_concurrent_s": round(conc, 3),
                "speedup": round(speedup, 2),
                "speedup_sequential": round(speedup_seq, 2),
                "target_speedup_min": TARGET,
                "met": speedup >= TARGET,
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
