"""#15 item 1 end to end: `cloudhpc.Executor` runs Python functions as `python` jobs, on `serve all`'s
local cluster and on the testbed's SLURM (porter and the submitter as processes).

Functions that return, raise (the exception's type and the remote traceback come back), take a
100 MB argument (through `POST /api/v1/uploads`, beyond the bounded POST body); `map_array` as one
SLURM array; `concurrent.futures.as_completed` and `wait` over the futures."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest

from cloudhpc.client import Client
from cloudhpc.domain.jobs import JobKind
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import NoResult, RemoteCallError
from cloudhpc.executor import Executor
from tests.docs_blocks import load
from tests.e2e.embedded import Embedded, serve_all
from tests.e2e.harness import Deployment

# The cluster has no `tests` package: this module's functions travel by value, as a notebook's do.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

BIG = 100 * 1024 * 1024


def add(a: int, b: int, *, times: int = 1) -> int:
    return (a + b) * times


def fails(message: str) -> None:
    inner_helper_that_raises(message)


def inner_helper_that_raises(message: str) -> None:
    raise ValueError(message)


def digest(data: bytes) -> tuple[int, str, str]:
    """The argument's size and hash, and where it ran (the cluster's host and job id)."""
    where = os.environ.get("SLURM_JOB_ID") or os.environ.get("CLOUDHPC_JOB_ID", "")
    return len(data), hashlib.sha256(data).hexdigest(), where


def square(x: int) -> int:
    if x == 3:
        raise ZeroDivisionError(f"item {x} refuses")
    print(f"squaring {x}")
    return x * x


def check_returns_and_raises(ex: Executor) -> None:
    ok = ex.submit(add, 2, 3, times=7)
    bad = ex.submit(fails, "no luck here")
    assert ok.result(timeout=300) == 35
    assert ok.done()
    assert ok.exception() is None
    error = bad.exception(timeout=300)
    assert isinstance(error, ValueError), repr(error)
    assert str(error) == "no luck here"
    cause = error.__cause__
    assert isinstance(cause, RemoteCallError), repr(cause)
    # the remote traceback names the frames that ran on the cluster, the innermost last
    assert "inner_helper_that_raises" in cause.remote_traceback
    assert cause.remote_traceback.rstrip().endswith("ValueError: no luck here")
    with pytest.raises(ValueError, match="no luck here"):
        bad.result()
    job = bad.job()
    assert job.spec.kind == JobKind.PYTHON
    assert job.state == JobState.FAILED  # the runner exits 1 when the function raised


def check_large_argument(ex: Executor) -> None:
    data = os.urandom(BIG)
    size, sha, where = ex.submit(digest, data).result(timeout=600)
    assert (size, sha) == (BIG, hashlib.sha256(data).hexdigest())
    assert where


def check_as_completed(ex: Executor) -> None:
    futures = [ex.submit(add, i, i) for i in range(3)]
    done = [f.result() for f in concurrent.futures.as_completed(futures, timeout=300)]
    assert sorted(done) == [0, 2, 4]
    finished, not_done = concurrent.futures.wait(futures, timeout=1)
    assert finished == set(futures)
    assert not not_done


# ---- serve all's local cluster -----------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Embedded]:
    root = tmp_path_factory.mktemp("executor-local")
    with serve_all(root, {"local": {"backend": "local", "workdir": str(root / "work")}}) as running_all:
        yield running_all


@pytest.fixture
def local_executor(embedded: Embedded, tmp_path: Path) -> Iterator[Executor]:
    with embedded.client() as client:
        yield Executor(cluster="local", folder=tmp_path / "results", client=client)


@pytest.mark.timeout(600)
def test_local_functions_return_and_raise(local_executor: Executor, embedded: Embedded) -> None:
    check_returns_and_raises(local_executor)
    # the pickled calls were uploaded, staged, and deleted once their jobs ended
    assert list((embedded.root / "objects" / "users").glob("*/uploads/*/*")) == []
    # and porter's index entries of them (the retention sweep's), with them
    index = embedded.root / "objects" / "porter" / "uploads"
    assert [p for p in index.rglob("*") if p.is_file()] == []
    # the folder keeps a copy of each outcome, as submitit's does
    assert len(list((local_executor.folder or Path()).glob("*/result.pkl"))) == 2


@pytest.mark.timeout(600)
def test_local_large_argument(local_executor: Executor) -> None:
    check_large_argument(local_executor)


@pytest.mark.timeout(600)
def test_local_as_completed(local_executor: Executor) -> None:
    check_as_completed(local_executor)


@pytest.mark.timeout(600)
def test_local_cancel_and_no_result(local_executor: Executor) -> None:
    sleeper = local_executor.submit(time.sleep, 600)
    deadline = time.monotonic() + 120
    while sleeper.job().state != JobState.RUNNING:
        assert time.monotonic() < deadline, sleeper.job()
        time.sleep(0.2)
    assert sleeper.cancel()
    assert sleeper.cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        sleeper.result()
    assert local_executor.client.wait(sleeper.job_id, timeout=60).state == JobState.CANCELLED
    # an environment that cannot be built: the job fails before the function runs
    local_executor.update_parameters(environment={"packages": ["cloudhpc-no-such-package-anywhere"]})
    error = local_executor.submit(add, 1, 2).exception(timeout=300)
    assert isinstance(error, NoResult), repr(error)
    assert error.state == "failed"
    assert "cloudhpc-no-such-package-anywhere" in (error.reason or "")
    # the local backend runs no arrays: map_array's futures say so instead of waiting forever
    local_executor.update_parameters(environment={})
    for future in local_executor.map_array(add, [1, 2], [3, 4]):
        refused = future.exception(timeout=120)
        assert isinstance(refused, NoResult), repr(refused)
        assert "job arrays" in (refused.reason or "")


@pytest.mark.timeout(600)
def test_the_documented_example_runs(embedded: Embedded) -> None:
    """docs/executor.md's first Python block, as a reader runs it: a script of its own, with
    CLOUDHPC_URL and CLOUDHPC_TOKEN naming `serve all`."""
    docs = Path(__file__).resolve().parents[2] / "docs" / "executor.md"
    example = next(b for b in load(docs) if b.language == "python")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDHPC_")}
    env |= {"CLOUDHPC_URL": embedded.url, "CLOUDHPC_TOKEN": embedded.token(), "CLUSTER": "local"}
    run = subprocess.run(
        [sys.executable, "-c", example.text],
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "-> 9592" in run.stdout
    assert sorted(line for line in run.stdout.splitlines() if line.startswith("primes:")) == [
        "primes: 168",
        "primes: 25",
        "primes: 4",
    ]
    assert "ZeroDivisionError division by zero" in run.stdout
    assert "in fails" in run.stdout  # the remote traceback's frame


# ---- the testbed's SLURM -----------------------------------------------------------------------


@pytest.fixture
def slurm_executor(deployment: Deployment, tmp_path: Path) -> Iterator[Executor]:
    with Client(deployment.url, deployment.user_token) as client:
        ex = Executor(cluster="testbed", folder=tmp_path / "results", client=client)
        ex.update_parameters(time="00:05:00", name="executor-test")
        yield ex


@pytest.mark.timeout(900)
def test_slurm_functions_return_and_raise(slurm_executor: Executor) -> None:
    check_returns_and_raises(slurm_executor)


@pytest.mark.timeout(900)
def test_slurm_large_argument(slurm_executor: Executor) -> None:
    check_large_argument(slurm_executor)


@pytest.mark.timeout(900)
def test_slurm_map_array_is_one_array(slurm_executor: Executor) -> None:
    futures = slurm_executor.map_array(square, [0, 1, 2, 3, 4])
    assert len({f.job_id for f in futures}) == 1  # one job...
    assert [f.task for f in futures] == [0, 1, 2, 3, 4]
    outcomes: dict[int, object] = {}
    for future in concurrent.futures.as_completed(futures, timeout=600):
        assert future.task is not None
        outcomes[future.task] = future.exception() or future.result()
    assert {k: v for k, v in outcomes.items() if k != 3} == {0: 0, 1: 1, 2: 4, 4: 16}
    assert isinstance(outcomes[3], ZeroDivisionError), outcomes[3]
    assert "refuses" in str(outcomes[3])
    # ...and one SLURM array: every task carries the same array job id in SLURM's accounting
    job = futures[0].job()
    assert job.spec.array is not None
    assert job.slurm_job_id
    ids = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-j", job.slurm_job_id, "--format=JobID"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert sorted(ids) == sorted(f"{job.slurm_job_id}_{i}" for i in range(5)), ids
    assert "squaring 4" in futures[4].output()


@pytest.mark.timeout(900)
def test_slurm_as_completed(slurm_executor: Executor) -> None:
    check_as_completed(slurm_executor)
