"""#13 leftovers on the testbed's SLURM, porter and the submitter as processes: a `ray-job` with
`checkpoint` is warned before its time limit, its driver saves its counter, Ray is stopped, the job
is requeued and finishes on its second run with the result of an uninterrupted count; and a
`ray-job` whose environment is the testbed's Lmod pytorch module plus an extra package imports that
package in its Ray tasks (workers), not only in its driver.

Timings as in tests/e2e/test_requeue.py: a 1-minute limit with `warn_before: 30` warns 0 to 30 s
into a run (SLURM checks time limits every 30 s), the testbed holds a requeued job for about 30 s.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cloudhpc.client import Client
from cloudhpc.domain.states import JobState
from tests.e2e.ray_jobs import ray_spec
from tests.e2e.test_site_modules import EXTRA, pytorch_module
from tests.jobs import stored_log

pytestmark = pytest.mark.timeout(900)

STEPS = 25
"""Ray tasks, one a second: more than a first run gets before its warning once Ray is up, less than
a second run has after Ray's start (max_restarts 1: the second run is not warned)."""

COUNTER = f"""\
import json, os, sys, time
import ray
path = os.path.join(os.environ["CLOUDHPC_CHECKPOINT_DIR"], "counter.json")
state = json.load(open(path)) if os.path.exists(path) else {{"i": 0, "total": 0}}
print("run", os.environ.get("CLOUDHPC_RESTART_COUNT"), "from", state["i"], flush=True)
ray.init()

@ray.remote
def square(i):
    time.sleep(1)
    return i * i

while state["i"] < {STEPS}:
    state["total"] += ray.get(square.remote(state["i"] + 1))
    state["i"] += 1
    with open(path + ".tmp", "w") as f:
        json.dump(state, f)
    os.replace(path + ".tmp", path)
    print("step", state["i"], flush=True)
print("result", state["total"], flush=True)
"""
"""A driver that checkpoints after every Ray task; the default action of SIGUSR1 ends it."""

PROBE = """\
import sys
import ray
ray.init()

@ray.remote
def where():
    import sys, tomli
    return sys.executable, tomli.__file__

import tomli
print("driver", sys.executable, tomli.__file__, flush=True)
print("worker", *ray.get(where.remote()), flush=True)
"""


def test_ray_job_checkpoint_requeues_and_finishes_like_an_uninterrupted_run(client: Client) -> None:
    spec = ray_spec("ray-ckpt", "ray-job", entrypoint="python counter.py")
    spec |= {
        "files": {"counter.py": COUNTER},
        "resources": {"time": "1"},
        "checkpoint": {"warn_before": 30, "signal": "USR1", "max_restarts": 1},
    }
    job = client.submit(spec)
    ended = client.wait(job, timeout=600)
    text = stored_log(client, ended).decode()
    assert ended.state == JobState.COMPLETED, (ended.reason, text[-4000:])
    assert ended.restarts == 1, (ended.reason, text[-4000:])
    assert ended.reason == "Time limit warning; requeued (restart 1 of 1): COMPLETED"
    # (the warning may reach run 0 while Ray starts: its driver then ends before it prints anything)
    assert re.search(r"run 0 ended \(status \d+\) after SIGUSR1: requeued", text), text[-4000:]
    assert re.search(r"^run 1 from \d+$", text, re.MULTILINE), text[-4000:]
    steps = [int(line.split()[1]) for line in text.splitlines() if line.startswith("step ")]
    assert sorted(set(steps)) == list(range(1, STEPS + 1))
    result = [line for line in text.splitlines() if line.startswith("result ")]
    assert result == [f"result {sum(i * i for i in range(1, STEPS + 1))}"]


def test_ray_job_on_a_site_module_sees_the_venv_packages_in_its_workers(client: Client) -> None:
    module, prefix = pytorch_module()
    spec = ray_spec("ray-module", "ray-job", entrypoint="python probe.py")
    spec |= {"files": {"probe.py": PROBE}, "environment": {"modules": [module], "packages": [EXTRA]}}
    ended = client.wait(client.submit(spec), timeout=600)
    text = stored_log(client, ended).decode()
    assert ended.state == JobState.COMPLETED, (ended.reason, text[-4000:])
    found = {
        line.split()[0]: line.split()[1:]
        for line in text.splitlines()
        if line.startswith(("driver ", "worker "))
    }
    driver_python, driver_tomli = found["driver"]
    worker_python, worker_tomli = found["worker"]
    venv = str(Path(driver_python).parent.parent)
    assert venv.endswith("/venv"), text[-3000:]
    assert not venv.startswith(prefix), text[-3000:]  # the cached venv, not the module's own
    assert driver_tomli.startswith(f"{venv}/"), text[-3000:]
    assert worker_python == driver_python, text[-3000:]  # Ray's workers run the venv's Python
    assert worker_tomli == driver_tomli, text[-3000:]
