"""Ray on SLURM through porter: how soon a dashboard answers through its bridge, and what a ray-job costs.

porter and the submitter run as processes (the e2e harness) on the testbed, with the default poll
settings of a cluster (not the tests' faster ones); Ray comes from the cached environment (built
once, by a warm-up run that is not counted). One Ray cluster at a time.

- bridge ready: from the POST of a `ray-cluster` exposing its dashboard to the first HTTP answer of
  the dashboard at the bridge's URL (polled every 0.1 s from here), and to porter marking it ready;
- ray-job overhead: from the POST of a trivial `ray-job` to `completed` seen through the API (a
  long-poll), minus the entrypoint's own run time (it prints `date +%s.%N` first and last);
- end to completed: from the entrypoint's last timestamp to `completed` seen through the API;
- warm session (issue 15): the same trivial `ray-job`, but naming a warm session (`ray.session`,
  opened once with `cloudhpc.ray_session` and not counted): POST to `completed` through the API
  minus the entrypoint's own run time, against the cold ray-job overhead of the same run.

Targets (issue 4): bridge ready median <= 10 s; ray-job overhead median <= 12 s; entrypoint exit to
`completed` median <= 2 s. Issue 15: a ray-job's overhead on a warm session median <= 2 s. For scale, the original's train step spent ~606 s of 885 s on overhead.

Run on the testbed machine: `python bench/ray_bridge.py [--runs N]` (default 5 of each). The figures
are whatever the machine gives at the time: the JSON says when it was loaded (its 1-minute load
average before and after, and the core count).

`--topology`: across the multi-host topology (bench/topology_mode.py): porter on `cloud` as
deploy/kustomize renders it, the compose submitter on `laptop` behind the relay, the Ray clusters on
`c1`/`c2`, the dashboard's bridge on the cloud VM's address (polled from the console). The ray-jobs
there have a worker node, so each spans c1 and c2. Targets there: bridge answering median <= 10 s,
2-node ray-job overhead median <= 10 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.*

import httpx
import yaml
from bench.topology_mode import shipped, spread
from tests.e2e.harness import bridged_deployment
from tests.e2e.ray_jobs import NODE, RAY_ENV, ray_spec
from tests.shipped import prebuild_environment
from tests.testbed import load_testbed

from cloudhpc.client import Client
from cloudhpc.domain.jobs import Job
from cloudhpc.domain.states import JobState
from cloudhpc.sessions import RaySession, ray_session

TARGET_BRIDGE = 10.0
TARGET_OVERHEAD = 12.0
TARGET_OVERHEAD_TOPOLOGY = 10.0
TARGET_END = 2.0
TARGET_WARM = 2.0
WARM_IDLE = 120
"""The bench session's idle timeout: longer than any pause between its jobs."""
ENTRYPOINT = (
    'echo "START $(date +%s.%N)"\n'
    "python -c \"import ray; ray.init(); print('ray says', ray.get(ray.remote(lambda: 42).remote()))\"\n"
    'echo "END $(date +%s.%N)"\n'
)


def wait_state(client: Client, job: Job, state: JobState, timeout: float) -> tuple[Job, float]:
    """The job once it reaches `state` (or ends), and when this process saw it through the API."""
    deadline = time.monotonic() + timeout
    current = client.get(job)
    while current.state != state and not current.state.terminal and time.monotonic() < deadline:
        current = client.get(job, wait=min(20.0, deadline - time.monotonic()), since_state=current.state)
    return current, time.time()


def bridge_run(client: Client, name: str, cluster: str) -> tuple[float, float]:
    posted = time.time()
    job = client.submit(ray_spec(name, "ray-cluster", cluster, expose=["dashboard"]))
    url = next(b.url for b in job.bridges if b.name == "dashboard")
    assert url is not None
    answered = None
    with httpx.Client(timeout=1.0, trust_env=False) as http:
        while time.time() - posted < 600:
            try:
                if http.get(f"{url}/api/version").status_code == 200:
                    answered = time.time()
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    assert answered is not None, f"{name}: the dashboard never answered at {url}"
    client.wait_bridges(job, timeout=60)
    marked = time.time()
    client.cancel(job)
    final = client.wait(job, timeout=60)
    assert final.state == JobState.CANCELLED, final
    return answered - posted, marked - posted


def _overheads(client: Client, job: Job, posted: float) -> tuple[float, float, float]:
    """(POST to `completed` seen minus the entrypoint's run, its exit to `completed`, its run)."""
    final, seen = wait_state(client, job, JobState.COMPLETED, 600)
    assert final.state == JobState.COMPLETED, client.logs(final).data.decode()[-2000:]
    text = client.logs(final).data.decode()
    start = float(text.split("START ", 1)[1].split()[0])
    end = float(text.split("END ", 1)[1].split()[0])
    return (seen - posted) - (end - start), seen - end, end - start


def rayjob_run(client: Client, name: str, cluster: str, workers: int) -> tuple[float, float, float]:
    posted = time.time()
    extra = {"workers": {"nodes": workers, **NODE}} if workers else {}
    job = client.submit(ray_spec(name, "ray-job", cluster, entrypoint=ENTRYPOINT, **extra))
    return _overheads(client, job, posted)


def warm_run(session: RaySession, name: str) -> tuple[float, float, float]:
    """A trivial ray-job on the warm session: (overhead, exit to completed, entrypoint run)."""
    posted = time.time()
    job = session.submit(ENTRYPOINT, name=name)
    return _overheads(session.client, job, posted)


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


@contextlib.contextmanager
def testbed_deployment(root: Path) -> Iterator[tuple[Client, str]]:
    """porter and the submitter on the single-host testbed with a real cluster's poll defaults."""
    dep = bridged_deployment(root, load_testbed())
    config = yaml.safe_load(dep.config.read_text())
    config["clusters"]["testbed"].pop("poll", None)  # the defaults a real cluster gets
    dep.config.write_text(yaml.safe_dump(config))
    dep.start("porter")
    dep.start("submitter")
    try:
        with dep.client() as client:
            yield client, "testbed"
    finally:
        dep.stop()


@contextlib.contextmanager
def topology_deployment(root: Path) -> Iterator[tuple[Client, str]]:
    """The shipped platform on the topology; Ray's environment prebuilt (its nodes reach no PyPI)."""
    prebuild_environment(load_testbed(), RAY_ENV)
    with shipped(root) as dep, dep.client() as client:
        yield client, dep.cluster


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="measured runs of each kind")
    parser.add_argument("--topology", action="store_true", help="across the multi-host topology")
    args = parser.parse_args()
    runs, workers = args.runs, 1 if args.topology else 0
    target_overhead = TARGET_OVERHEAD_TOPOLOGY if args.topology else TARGET_OVERHEAD
    deployment = topology_deployment if args.topology else testbed_deployment
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp, deployment(Path(tmp)) as (client, cluster):
        print("warm-up (builds the Ray environment if it is not cached yet)...", flush=True)
        rayjob_run(client, "bench-warmup", cluster, workers)
        bridge_answer, bridge_marked = [], []
        for i in range(runs):
            answered, marked = bridge_run(client, f"bench-cluster-{i}", cluster)
            bridge_answer.append(answered)
            bridge_marked.append(marked)
            print(
                f"ray-cluster {i}: dashboard answers {answered:.1f} s after POST, ready in API {marked:.1f} s"
            )
        overhead, end_lag, own = [], [], []
        for i in range(runs):
            o, lag, run = rayjob_run(client, f"bench-job-{i}", cluster, workers)
            overhead.append(o)
            end_lag.append(lag)
            own.append(run)
            print(
                f"ray-job {i} ({workers + 1} node(s)): overhead {o:.1f} s (entrypoint {run:.1f} s), "
                f"exit -> completed {lag:.2f} s",
                flush=True,
            )
        warm, warm_own = [], []
        if not args.topology:
            print("opening a warm session (not counted)...", flush=True)
            with ray_session(
                cluster,
                name="bench-warm",
                idle_timeout=WARM_IDLE,
                time="00:30:00",
                head=NODE,
                environment=RAY_ENV,
                client=client,
                keep=False,
            ) as session:
                warm_run(session, "bench-warm-warmup")
                for i in range(runs):
                    o, lag, run = warm_run(session, f"bench-warm-{i}")
                    warm.append(o)
                    warm_own.append(run)
                    print(
                        f"ray-job {i} on the warm session: overhead {o:.2f} s (entrypoint {run:.1f} s), "
                        f"exit -> completed {lag:.2f} s",
                        flush=True,
                    )
    result: dict[str, object] = {
        "bench": "ray_bridge",
        "site": "topology" if args.topology else "testbed",
        "ray_nodes": workers + 1,
        "runs": runs,
        "bridge_answer_spread_s": spread(bridge_answer),
        "rayjob_overhead_spread_s": spread(overhead),
        "bridge_answer_median_s": round(statistics.median(bridge_answer), 2),
        "bridge_answer_max_s": round(max(bridge_answer), 2),
        "bridge_ready_in_api_median_s": round(statistics.median(bridge_marked), 2),
        "rayjob_overhead_median_s": round(statistics.median(overhead), 2),
        "rayjob_overhead_max_s": round(max(overhead), 2),
        "entrypoint_median_s": round(statistics.median(own), 2),
        "exit_to_completed_median_s": round(statistics.median(end_lag), 2),
        "exit_to_completed_max_s": round(max(end_lag), 2),
        "target_bridge_ready_s": TARGET_BRIDGE,
        "target_overhead_s": target_overhead,
        "target_exit_to_completed_s": TARGET_END,
        "original_overhead_s": 606,
        "load_average_1m_before": load_before,
        "load_average_1m_after": load_average(),
        "cores": os.cpu_count(),
    }
    if warm:
        result |= {
            "warm_overhead_median_s": round(statistics.median(warm), 2),
            "warm_overhead_max_s": round(max(warm), 2),
            "warm_overhead_spread_s": spread(warm),
            "warm_entrypoint_median_s": round(statistics.median(warm_own), 2),
            "cold_overhead_median_s": result["rayjob_overhead_median_s"],
            "target_warm_overhead_s": TARGET_WARM,
            "warm_met": statistics.median(warm) <= TARGET_WARM,
        }
    result["met"] = (
        statistics.median(bridge_answer) <= TARGET_BRIDGE
        and statistics.median(bridge_marked) <= TARGET_BRIDGE
        and statistics.median(overhead) <= target_overhead
        and statistics.median(end_lag) <= TARGET_END
        and (not warm or statistics.median(warm) <= TARGET_WARM)
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
