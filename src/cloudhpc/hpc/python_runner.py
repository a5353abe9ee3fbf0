"""Runs one pickled Python call in a `python` job (shipped with the job, never imported by cloudhpc).

The job's script runs `python .cloudhpc/python_runner.py CALL RESULT VERSION` in the job's cached
environment, which has cloudpickle (the SDK adds it to the environment). The cluster need not have
cloudhpc installed: this file uses the standard library and cloudpickle only.

CALL holds cloudpickle's bytes of `(function, args, kwargs)`, or for an array job
`(function, [(args, kwargs), ...])` of which task `$SLURM_ARRAY_TASK_ID` runs its own item. RESULT
is where the outcome goes (`%a` in it becomes the task index): a standard-library pickle of a small
dict, so that even a failure to import cloudpickle or to unpickle the call is reported as an
outcome with its traceback rather than only a line in the job's log:

    {"format": 1, "ok": True,  "value": <cloudpickle bytes of the return value>}
    {"format": 1, "ok": False, "type": "module.Name", "message": str, "traceback": str,
     "exception": <cloudpickle bytes of the exception, or None when it cannot be pickled>}

It is written to a temporary name and renamed, so the agent never stores half an outcome. The
exit status is 0 when the function returned and 1 when it raised (the job then shows `failed`).
"""

from __future__ import annotations

import os
import pickle
import sys
import traceback
from typing import Any

FORMAT = 1


def _outcome_of_exception(exc: BaseException, dumps: Any) -> dict[str, Any]:
    """The outcome of a call that raised: the exception pickled when it can be, its text always."""
    kind = type(exc)
    outcome: dict[str, Any] = {
        "format": FORMAT,
        "ok": False,
        "type": f"{kind.__module__}.{kind.__qualname__}",
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(kind, exc, exc.__traceback__)),
        "exception": None,
    }
    try:
        outcome["exception"] = dumps(exc)
    except Exception as not_picklable:  # an exception holding a lock, a socket...
        outcome["traceback"] += f"\n(the exception could not be pickled: {not_picklable!r})\n"
    return outcome


def _write(path: str, outcome: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as handle:
        pickle.dump(outcome, handle, protocol=4)
    os.replace(tmp, path)


def run(call_path: str, result_path: str, version: str) -> int:
    """Load the call, run it, write its outcome to `result_path`; 0 when it returned, else 1."""
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if task is not None:
        result_path = result_path.replace("%a", task)
    dumps: Any = pickle.dumps  # until cloudpickle is imported: enough for the errors before that
    try:
        here = f"{sys.version_info[0]}.{sys.version_info[1]}"
        if here != version:
            raise RuntimeError(
                f"this job's Python is {here} ({sys.executable}) but the call was pickled by Python "
                f"{version}: pickled functions only load in the same minor version; set the "
                f"environment's `python` to {version}"
            )
        import cloudpickle

        dumps = cloudpickle.dumps
        with open(call_path, "rb") as handle:
            call = pickle.load(handle)  # noqa: S301 -- the job owner's own call, in the owner's job
        if task is not None:
            function, items = call
            args, kwargs = items[int(task)]
        else:
            function, args, kwargs = call
        del call
    except BaseException as exc:
        _write(result_path, _outcome_of_exception(exc, dumps))
        return 1
    try:
        value = function(*args, **kwargs)
    except BaseException as exc:
        traceback.print_exc()
        _write(result_path, _outcome_of_exception(exc, dumps))
        return 1
    try:
        _write(result_path, {"format": FORMAT, "ok": True, "value": dumps(value)})
    except BaseException as exc:  # a return value cloudpickle cannot pickle
        _write(result_path, _outcome_of_exception(exc, dumps))
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.stderr.write("usage: python_runner.py CALL RESULT VERSION\n")
        sys.exit(2)
    sys.exit(run(sys.argv[1], sys.argv[2], sys.argv[3]))
