"""The pieces of `cloudhpc.Executor` that need no cluster: the environment derived from the caller
(and the version check), the `python` kind's spec rules, the runner shipped with the job (run as
the job runs it, in a subprocess), and how an outcome becomes a value or an exception."""

from __future__ import annotations

import pickle
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from pydantic import ValidationError

from cloudhpc.domain.jobs import JobSpec
from cloudhpc.exceptions import PythonVersionMismatch, RemoteCallError
from cloudhpc.executor import Executor, caller_python, derive_environment, rebuild_exception
from cloudhpc.hpc import python_runner

RUNNER = Path(python_runner.__file__)


def test_the_environment_is_the_callers_python_with_cloudpickle() -> None:
    env = derive_environment({"packages": ["numpy"]}, "3.1.3")
    assert env.python == caller_python()
    assert env.packages == ["numpy", "cloudpickle==3.1.3"]
    pinned = derive_environment({"packages": ["cloudpickle>=3"], "modules": ["python-data/3.11"]}, "3.1.3")
    assert pinned.packages == ["cloudpickle>=3"]
    assert pinned.modules == ["python-data/3.11"]
    # a module providing Python: the runner checks the version on the cluster
    assert derive_environment({"python": "python/3.11-gcc"}, "3.1.3").python == "python/3.11-gcc"


def test_another_minor_version_is_refused_before_anything_is_sent() -> None:
    other = "3.10" if caller_python() != "3.10" else "3.12"
    with pytest.raises(PythonVersionMismatch, match=rf"environment.python is {other} but this Python is"):
        derive_environment({"python": other}, "3.1.3")
    ex = Executor(cluster="c", client=_NoClient())  # type: ignore[arg-type]
    ex.update_parameters(environment={"python": other})
    with pytest.raises(PythonVersionMismatch):
        ex.submit(print, "never sent")


class _NoClient:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the executor called the client ({name}) for a call it must refuse")


def test_update_parameters_names_an_unknown_field() -> None:
    ex = Executor(cluster="c", client=_NoClient())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown job field.*timeout"):
        ex.update_parameters(timeout=3)
    with pytest.raises(ValidationError, match="time"):
        ex.update_parameters(time="soon")
    ex.update_parameters(time="00:05:00", cpus_per_task=2, name="fit")


def _spec(**fields: Any) -> dict[str, Any]:
    return {
        "name": "f",
        "cluster": "c",
        "kind": "python",
        "python": {"call": "call.pkl", "version": "3.11"},
        "files": {"call.pkl": "file:///x/users/a/call.pkl"},
    } | fields


def test_python_kind_rules() -> None:
    JobSpec.model_validate(_spec(array="0-3"))
    with pytest.raises(ValidationError, match=r"python\.call: 'other\.pkl' is not one of the job's `files`"):
        JobSpec.model_validate(_spec(python={"call": "other.pkl", "version": "3.11"}))
    with pytest.raises(ValidationError, match="takes `python`, not `script`"):
        JobSpec.model_validate(_spec(script="echo"))
    with pytest.raises(ValidationError, match="needs a `python` section"):
        JobSpec.model_validate(_spec(python=None))
    with pytest.raises(ValidationError, match="only a python job takes one"):
        JobSpec.model_validate({"name": "b", "cluster": "c", "script": "x", "python": _spec()["python"]})
    with pytest.raises(ValidationError, match=r"python\.version"):
        JobSpec.model_validate(_spec(python={"call": "call.pkl", "version": "3.11; rm -rf"}))


def _run(tmp_path: Path, call: Any, *, version: str | None = None, task: int | None = None) -> dict[str, Any]:
    """The runner as the job script runs it; its outcome file, read back."""
    (tmp_path / "call.pkl").write_bytes(cloudpickle.dumps(call))
    env = {"PATH": "/usr/bin:/bin"} | ({"SLURM_ARRAY_TASK_ID": str(task)} if task is not None else {})
    result = tmp_path / ("result.pkl" if task is None else "result-%a.pkl")
    subprocess.run(
        [sys.executable, str(RUNNER), str(tmp_path / "call.pkl"), str(result), version or caller_python()],
        env=env,
        check=False,
        capture_output=True,
    )
    outcome: dict[str, Any] = pickle.loads(Path(str(result).replace("%a", str(task))).read_bytes())  # noqa: S301
    return outcome


def test_the_runner_returns_a_value_and_picks_its_array_item(tmp_path: Path) -> None:
    ok = _run(tmp_path, (divmod, (7, 2), {}))
    assert ok["ok"]
    assert pickle.loads(ok["value"])  # noqa: S301 == (3, 1)
    item = _run(tmp_path, (pow, [((2, 3), {}), ((3, 3), {})]), task=1)
    assert pickle.loads(item["value"])  # noqa: S301 == 27


def test_the_runner_reports_the_exception_with_its_traceback(tmp_path: Path) -> None:
    bad = _run(tmp_path, (int, ("twelve",), {}))
    assert not bad["ok"]
    assert bad["type"] == "builtins.ValueError"
    error = rebuild_exception(bad, "job-1")
    assert isinstance(error, ValueError)
    assert "twelve" in str(error)
    assert isinstance(error.__cause__, RemoteCallError)
    assert "ValueError: invalid literal" in error.__cause__.remote_traceback


def test_the_runner_refuses_another_python_with_a_clear_error(tmp_path: Path) -> None:
    outcome = _run(tmp_path, (divmod, (7, 2), {}), version="3.9")
    error = rebuild_exception(outcome, "job-2")
    assert isinstance(error, RuntimeError)
    assert f"this job's Python is {caller_python()}" in str(error)
    assert "pickled by Python 3.9" in str(error)


def test_a_value_that_cannot_be_pickled_is_an_error_not_a_lost_result(tmp_path: Path) -> None:
    outcome = _run(tmp_path, (threading.Lock, (), {}))
    assert not outcome["ok"]
    assert "lock" in outcome["message"].lower()


def test_an_exception_class_unknown_here_is_a_remote_call_error() -> None:
    outcome = {
        "format": 1,
        "ok": False,
        "type": "remote_only.Boom",
        "message": "boom",
        "traceback": "Traceback...\nremote_only.Boom: boom\n",
        "exception": None,
    }
    error = rebuild_exception(outcome, "job-3")
    assert isinstance(error, RemoteCallError)
    assert error.type_name == "remote_only.Boom"
    assert "remote_only.Boom: boom" in str(error)
