"""#13 item 5: a warning that came before the program started reaches it once it can catch it.

SLURM checks time limits every 30 s, so the warning often comes while a `ray-job`'s Ray starts: the
wrapper keeps it and forwards it after the entrypoint started. Forwarded at once, it met a program
that had not installed its handler yet (a Python interpreter importing torch, as `train.py` does)
and ended it by the default action, with no checkpoint saved; it now waits PRESTART_SETTLE_SECONDS.
Run by a real bash with the stand-ins of tests/unit/test_checkpoint.py.
"""

from __future__ import annotations

from pathlib import Path
from uuid import uuid4

import pytest

from cloudhpc.domain.jobs import JobSpec
from cloudhpc.domain.paths import JobPaths
from cloudhpc.hpc.jobscript import render_batch_script
from tests.unit import test_checkpoint

SLOW_START = (
    "sleep 0.5  # the interpreter and its imports, before the handler\n" + test_checkpoint.USER_SCRIPT
)


def test_a_warning_during_ray_start_is_caught_by_a_program_that_starts_slowly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(test_checkpoint, "USER_SCRIPT", SLOW_START)
    status, out, scontrol = test_checkpoint.run_wrapper(
        tmp_path, None, signal_after=0.3, kind="ray-job", ready_after=1.0
    )
    assert "user got USR1" in out  # its own handler ran: it could save its state
    assert "finished" not in out
    assert "requeued" in out
    assert scontrol == "requeue 4242\n"
    assert status != 0


def test_the_program_is_told_which_signal_warns_it() -> None:
    job = JobSpec.model_validate(
        {
            "name": "ckpt",
            "cluster": "testbed",
            "script": "true\n",
            "resources": {"time": "2"},
            "checkpoint": {"warn_before": 30, "signal": "sigterm"},
        }
    )
    job_id = uuid4()
    script = render_batch_script(job_id=job_id, spec=job, paths=JobPaths(workdir="/w", job_id=job_id))
    assert "export CLOUDHPC_CHECKPOINT_SIGNAL=TERM" in script
