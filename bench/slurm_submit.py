"""100 submissions through the one shared SSH connection vs a new SSH connection per submission
(what the original did: every remote action paid connect + key exchange + auth). Target >= 5x.

Each submission is the real `SlurmBackend.submit`: create the job directory, upload the user's
script and the wrapper over SFTP, run sbatch. Measured in the same run, on the same testbed:

- baseline: a new `SSHConnection` per submission, one submission after another;
- shared, sequential: the same 100 submissions one after another on one connection;
- shared, concurrent: 100 submissions at once, multiplexed on one connection (channels capped
  below sshd's MaxSessions), which is how the agent submits a burst.

Run on the testbed machine: `python bench/slurm_submit.py [--repeat 3]`. The (instant) jobs are
cancelled at the end.

`--topology`: across the multi-host topology (bench/topology_mode.py), from `laptop` to the login
node's sshd through the delaying relay (TOPOLOGY_DELAY_MS each way), sbatch on `login`, jobs on
`c1`/`c2`: every round trip of a new connection's key exchange and authentication pays the latency,
which is where the shared connection earns its keep. Target there: >= 10x.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.*

from bench.topology_mode import run_on_laptop, spread
from tests.slurm_jobs import make_submission, testbed_ssh
from tests.topology import load_topology

from cloudhpc.config import SSHConfig
from cloudhpc.domain.jobs import Resources
from cloudhpc.hpc.backend import JobSubmission
from cloudhpc.hpc.slurm import SlurmBackend
from cloudhpc.hpc.ssh import SSHConnection

N = 100
TARGET = 5.0
TARGET_TOPOLOGY = 10.0


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


@dataclass(frozen=True)
class Site:
    """Where the bench submits: the single-host testbed, or the topology's login node from the laptop."""

    name: str
    config: SSHConfig
    partition: str
    delay_ms: float
    target: float


def site(topology: bool) -> Site:
    if not topology:
        testbed, config = testbed_ssh()
        return Site("testbed", config, testbed.partition, 0.0, TARGET)
    topo = load_topology()
    config = SSHConfig(
        host=topo.ssh_host,
        port=topo.ssh_port,
        user=topo.ssh_user,
        key_file=topo.ssh_key,
        known_hosts=topo.known_hosts,
    )
    return Site("topology", config, topo.partition, topo.delay_ms, TARGET_TOPOLOGY)


async def measure(where: Site) -> dict[str, float]:
    """One round of the three ways, in seconds for N submissions each."""
    defaults = Resources(partition=where.partition, time="00:05:00")
    async with SSHConnection(where.config, cluster="testbed") as conn:
        workdir = f"{await conn.home()}/.cloudhpc-bench"
        await shared(conn, workdir, defaults, concurrent=False)  # warm up: connection, SFTP, sbatch caches
        seq, ids_seq = await shared(conn, workdir, defaults, concurrent=False)
        base, ids_base = await connection_per_submit(where.config, workdir, defaults)
        conc, ids_conc = await shared(conn, workdir, defaults, concurrent=True)
        submitted = ids_seq + ids_base + ids_conc
        assert len(set(submitted)) == 3 * N, "every submission must yield its own SLURM job"
        cleanup = SlurmBackend("testbed", conn, workdir=workdir)
        await asyncio.gather(*(cleanup.cancel(i) for i in submitted))
    return {"baseline": base, "sequential": seq, "concurrent": conc}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", action="store_true", help="across the multi-host topology")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; figures are their medians")
    args = parser.parse_args()
    where = site(args.topology)
    rounds: list[dict[str, float]] = []
    for r in range(args.repeat):
        took = await measure(where)
        rounds.append(took)
        print(
            f"round {r + 1}: baseline {took['baseline']:.2f} s, shared sequential {took['sequential']:.2f} s, "
            f"shared concurrent {took['concurrent']:.2f} s for {N} ({took['baseline'] / took['concurrent']:.1f}x)",
            flush=True,
        )
    base, seq, conc = (
        statistics.median(r[k] for r in rounds) for k in ("baseline", "sequential", "concurrent")
    )
    print(f"{where.name}, {where.delay_ms:g} ms added each way; medians of {args.repeat} round(s):")
    per = {name: 1000 * t / N for name, t in (("baseline", base), ("sequential", seq), ("concurrent", conc))}
    print(f"baseline, new connection per submission: {base:.2f} s for {N} ({per['baseline']:.1f} ms each)")
    print(f"shared connection, sequential:           {seq:.2f} s for {N} ({per['sequential']:.1f} ms each)")
    print(f"shared connection, concurrent:           {conc:.2f} s for {N} ({per['concurrent']:.1f} ms each)")
    speedups = [r["baseline"] / r["concurrent"] for r in rounds]
    speedup, speedup_seq = (
        statistics.median(speedups),
        statistics.median(r["baseline"] / r["sequential"] for r in rounds),
    )
    print(
        f"speedup (shared, concurrent) {speedup:.1f}x (rounds: {', '.join(f'{x:.1f}' for x in speedups)}); "
        f"like for like (shared, sequential) {speedup_seq:.1f}x"
    )
    print(
        json.dumps(
            {
                "bench": "slurm_submit",
                "site": where.name,
                "delay_ms_each_way": where.delay_ms,
                "submissions": N,
                "rounds": args.repeat,
                "baseline_s": round(base, 3),
                "shared_sequential_s": round(seq, 3),
                "shared_concurrent_s": round(conc, 3),
                "speedup": round(speedup, 2),
                "speedup_spread": spread(speedups),
                "speedup_sequential": round(speedup_seq, 2),
                "target_speedup_min": where.target,
                "met": speedup >= where.target,
            }
        )
    )


if __name__ == "__main__":
    if "--topology" in sys.argv[1:]:
        run_on_laptop(__file__, sys.argv[1:])
    asyncio.run(main())
