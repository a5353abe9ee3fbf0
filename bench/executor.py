"""`cloudhpc.Executor`'s round trip on the testbed's SLURM (issue 15 item 1; target <= 3 s).

porter and the agent run as processes (`tests/e2e/harness.py`) with the cluster's shipped poll
settings (not the tests' faster ones). A first call builds the job's environment (the caller's
Python and cloudpickle, cached under the cluster's workdir) and is not timed; then each run times
`ex.submit(trivial).result()` from the SDK's side: the upload of the pickled call, the POST, the
agent's claim and staging (the environment only checked), sbatch, SLURM starting the job, the
poller seeing its end, the outcome stored as an artifact, the SDK's poll finding and downloading
it. The median and the spread (min-max) are printed, then one JSON line.

Run on the testbed machine: `python bench/executor.py [runs]` (default 5).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cloudpickle
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.*

from tests.e2e.harness import Deployment, running
from tests.testbed import load_testbed

from cloudhpc.config import PollConfig
from cloudhpc.executor import Executor

TARGET = 3.0
RUNS = 5

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the cluster has no `bench` package


def trivial(x: int) -> int:
    return x + 1


def _shipped_poll(dep: Deployment) -> None:
    """The harness speeds the agent's polling up for tests; the bench measures the defaults."""
    config = yaml.safe_load(dep.config.read_text())
    config["clusters"]["testbed"].pop("poll", None)
    dep.config.write_text(yaml.safe_dump(config))


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else RUNS
    testbed = load_testbed()
    times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-executor-") as tmp:
        dep = Deployment(Path(tmp) / "deploy", testbed, f"sqlite:///{tmp}/state.db")
        _shipped_poll(dep)
        with running(dep), dep.client() as client:
            ex = Executor(cluster="testbed", client=client)
            ex.update_parameters(time="00:05:00", name="bench-executor")
            started = time.monotonic()
            assert ex.submit(trivial, 0).result(timeout=600) == 1
            print(f"warm-up (environment built or checked): {time.monotonic() - started:.2f} s")
            for number in range(1, runs + 1):
                started = time.monotonic()
                value = ex.submit(trivial, number).result(timeout=120)
                took = time.monotonic() - started
                assert value == number + 1
                times.append(took)
                print(f"run {number}: submit -> result {took:.2f} s")
    median = statistics.median(times)
    poll = PollConfig()
    print(
        f"poll fast {poll.fast_interval} s; submit -> result of a trivial function, warm environment: "
        f"median {median:.2f} s (min {min(times):.2f}, max {max(times):.2f}) over {len(times)} runs; "
        f"target <= {TARGET} s"
    )
    print(
        json.dumps(
            {
                "bench": "executor",
                "runs": len(times),
                "poll_fast_interval_s": poll.fast_interval,
                "median_round_trip_s": round(median, 3),
                "min_round_trip_s": round(min(times), 3),
                "max_round_trip_s": round(max(times), 3),
                "target_max_s": TARGET,
                "met": median <= TARGET,
            }
        )
    )


if __name__ == "__main__":
    main()
