"""The fault run's load, without the topology: each job's script prints exactly what the checks
expect (`job_output`) and exits as planned, an array's tasks each their own lines and code; the
seeded plan has arrays and bridge jobs where the checks look for them."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tests.faults.driver import (
    ARRAY,
    ARRAY_TASKS,
    BRIDGE_HOLD,
    Planned,
    bridge_lines,
    job_output,
    plan_load,
)


def _run(script: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["bash", "-c", script.replace("sleep 0.5", "sleep 0")],
        capture_output=True,
        env={**os.environ, **(env or {})},
        timeout=30,
        check=False,
    )


def test_the_seeded_load_mixes_plain_jobs_arrays_and_bridge_jobs() -> None:
    load = plan_load(random.Random(12), 30, 1)
    arrays = [p for p in load if p.is_array]
    assert [p.index for p in load if p.bridge] == [0]
    assert len(arrays) >= 3
    assert any(p.failing_tasks for p in arrays)
    assert any(not p.failing_tasks for p in arrays)
    again = plan_load(random.Random(12), 30, 1)
    assert [replace(p, key="") for p in again] == [replace(p, key="") for p in load], "keys aside"
    assert [p.index for p in plan_load(random.Random(1), 200, 3) if p.bridge] == [0, 66, 133]


@pytest.mark.parametrize("planned", [p for p in plan_load(random.Random(12), 30, 1) if not p.bridge][:12])
def test_a_jobs_script_prints_what_the_checks_expect(planned: Planned, tmp_path: Path) -> None:
    spec = planned.spec(tmp_path / "release")
    if not planned.is_array:
        assert "array" not in spec
        done = _run(spec["script"])
        assert (done.stdout, done.returncode) == (job_output(planned.index, planned.lines), planned.exit_code)
        return
    assert spec["array"] == ARRAY
    codes = []
    for task in ARRAY_TASKS:
        done = _run(spec["script"], {"SLURM_ARRAY_TASK_ID": str(task)})
        assert done.stdout == job_output(planned.index, planned.lines, task)
        assert done.returncode == planned.task_exit_code(task)
        codes.append(done.returncode)
    # the array's own state and code, as docs/api.md derives them from its tasks'
    assert max(codes) == planned.exit_code


def test_a_bridge_jobs_entrypoint_holds_until_released(tmp_path: Path) -> None:
    (planned,) = [p for p in plan_load(random.Random(12), 30, 1) if p.bridge]
    release = tmp_path / "release"
    spec = planned.spec(release)
    assert spec["kind"] == "ray-job"
    assert spec["ray"]["expose"] == ["dashboard"]
    (tmp_path / "hold.py").write_text(spec["files"]["hold.py"])
    assert spec["files"]["hold.py"] == BRIDGE_HOLD
    python, *argv = spec["ray"]["entrypoint"].split()
    assert python == "python"
    proc = subprocess.Popen([sys.executable, *argv], cwd=tmp_path, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == bridge_lines(planned.index)[0]
    assert proc.poll() is None, "ended before it was released"
    release.touch()
    out, _ = proc.communicate(timeout=10)
    assert (out, proc.returncode) == (bridge_lines(planned.index)[1], 0)
