"""Ray on SLURM through porter: how soon a dashboard answers through its bridge, and what a ray-job costs.

porter and the submitter run as processes (the e2e harness) on the testbed, with the default poll
settings of a cluster (not the tests' faster ones); Ray comes from the cached environment (built
once, by a warm-up run that is not counted). One Ray cluster at a time.

- bridge ready: from the POST of a `ray-cluster` exposing its dashboard to the first HTTP answer of
  the dashboard at the bridge's URL (polled every 0.1 s from here), and to porter marking it ready;
- ray-job overhead: from the POST of a trivial `ray-job` to `completed` seen through the API (a
  long-poll), minus the entrypoint's own run time (it prints `date +%s.%N` first and last);
- end to completed: from the entrypoint's last timestamp to `completed` seen through the API.

Targets (issue 4): bridge ready median <= 10 s; ray-job overhead median <= 12 s; entrypoint exit to
`completed` median <= 2 s. For scale, the original's train step spent ~606 s of 885 s on overhead.

Run on the testbed machine: `python bench/ray_bridge.py [RUNS]` (default 5 of each).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.*

import httpx
import yaml
from tests.e2e.harness import bridged_deployment
from tests.e2e.ray_jobs import ray_spec
from tests.testbed import load_testbed

from cloudhpc.client import Client
from cloudhpc.domain.jobs import Job
from cloudhpc.domain.states import JobState

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
TARGET_BRIDGE = 10.0
TARGET_OVERHEAD = 12.0
TARGET_END = 2.0
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


def bridge_run(client: Client, name: str) -> tuple[float, float]:
    posted = time.time()
    job = client.submit(ray_spec(name, "ray-cluster", expose=["dashboard"]))
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


def rayjob_run(client: Client, name: str) -> tuple[float, float, float]:
    posted = time.time()
    job = client.submit(ray_spec(name, "ray-job", entrypoint=ENTRYPOINT))
    final, seen = wait_state(client, job, JobState.COMPLETED, 600)
    assert final.state == JobState.COMPLETED, client.logs(final).data.decode()[-2000:]
    text = client.logs(final).data.decode()
    start = float(text.split("START ", 1)[1].split()[0])
    end = float(text.split("END ", 1)[1].split()[0])
    return (seen - posted) - (end - start), seen - end, end - start


def main() -> int:
    testbed = load_testbed()
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        dep = bridged_deployment(Path(tmp), testbed)
        config = yaml.safe_load(dep.config.read_text())
        config["clusters"]["testbed"].pop("poll", None)  # the defaults a real cluster gets
        dep.config.write_text(yaml.safe_dump(config))
        dep.start("porter")
        dep.start("submitter")
        try:
            with dep.client() as client:
                print("warm-up (builds the Ray environment if it is not cached yet)...", flush=True)
                rayjob_run(client, "bench-warmup")
                bridge_answer, bridge_marked = [], []
                for i in range(RUNS):
                    answered, marked = bridge_run(client, f"bench-cluster-{i}")
                    bridge_answer.append(answered)
                    bridge_marked.append(marked)
                    print(
                        f"ray-cluster {i}: dashboard answers {answered:.1f} s after POST, ready in API {marked:.1f} s"
                    )
                overhead, end_lag, own = [], [], []
                for i in range(RUNS):
                    o, lag, run = rayjob_run(client, f"bench-job-{i}")
                    overhead.append(o)
                    end_lag.append(lag)
                    own.append(run)
                    print(
                        f"ray-job {i}: overhead {o:.1f} s (entrypoint {run:.1f} s), exit -> completed {lag:.2f} s"
                    )
        finally:
            dep.stop()
    result = {
        "bench": "ray_bridge",
        "runs": RUNS,
        "bridge_answer_median_s": round(statistics.median(bridge_answer), 2),
        "bridge_answer_max_s": round(max(bridge_answer), 2),
        "bridge_ready_in_api_median_s": round(statistics.median(bridge_marked), 2),
        "rayjob_overhead_median_s": round(statistics.median(overhead), 2),
        "rayjob_overhead_max_s": round(max(overhead), 2),
        "entrypoint_median_s": round(statistics.median(own), 2),
        "exit_to_completed_median_s": round(statistics.median(end_lag), 2),
        "exit_to_completed_max_s": round(max(end_lag), 2),
        "target_bridge_ready_s": TARGET_BRIDGE,
        "target_overhead_s": TARGET_OVERHEAD,
        "target_exit_to_completed_s": TARGET_END,
        "original_overhead_s": 606,
    }
    result["met"] = (
        result["bridge_answer_median_s"] <= TARGET_BRIDGE
        and result["bridge_ready_in_api_median_s"] <= TARGET_BRIDGE
        and result["rayjob_overhead_median_s"] <= TARGET_OVERHEAD
        and result["exit_to_completed_median_s"] <= TARGET_END
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
