"""`cloudhpc demo --batch` (the quick demo: one batch job) as a new user runs it: a fresh directory,
nothing configured. The pipeline demo that `make demo` runs is tested in test_pipeline.py.

The demo starts `serve all` itself; it must run the job to the end, print the job's output and
accounting, and leave no server behind (neither its process nor a listener on its port).
"""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest


def cloudhpc_command() -> list[str]:
    """The installed `cloudhpc` script, as `make demo` calls it."""
    script = Path(sys.executable).with_name("cloudhpc")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cloudhpc"]


def serve_processes_in(directory: Path) -> list[int]:
    """PIDs of `cloudhpc serve` processes whose working directory is `directory`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if b"serve" in cmdline and any(b"cloudhpc" in part for part in cmdline) and cwd == directory:
            found.append(int(entry.name))
    return found


@pytest.mark.timeout(180)
def test_demo_runs_a_job_and_cleans_up(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDHPC_")}
    done = subprocess.run(
        [*cloudhpc_command(), "demo", "--batch"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    log = tmp_path / ".cloudhpc" / "demo-server.log"
    context = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}\nserver log:\n" + (
        log.read_text(errors="replace")[-3000:] if log.exists() else "(none)"
    )
    assert done.returncode == 0, context

    # The job's own output, from porter's logs endpoint, on stdout.
    assert re.search(r"^hello from cloudhpc job [0-9a-f-]{36} on \S+$", done.stdout, re.M), context
    assert "computed a sum of square roots" in done.stdout
    assert "GREETING=hello; $(not run)" in done.stdout  # passed through, never run by a shell
    # Progress and accounting on stderr.
    assert "state: running" in done.stderr
    assert re.search(r"elapsed \d+s, exit code 0, CPU efficiency \d+\.\d%", done.stderr), context
    assert "job ended completed" in done.stderr

    # It ran on the embedded default, in this directory, readable by this user only.
    for name in ("admin-token", "agent-token", "state.db"):
        assert (tmp_path / ".cloudhpc" / name).exists(), name
        assert stat.S_IMODE((tmp_path / ".cloudhpc" / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE((tmp_path / ".cloudhpc").stat().st_mode) == 0o700

    # Nothing left behind: the server's PID is gone and nobody listens on its port.
    started = re.search(r"serve all` on 127\.0\.0\.1:(\d+)", done.stderr)
    process = re.search(r"server pid (\d+)", done.stderr)
    assert started, context
    assert process, context
    port, pid = int(started.group(1)), int(process.group(1))
    assert f"stopped the server (pid {pid})" in done.stderr
    assert not Path(f"/proc/{pid}").exists() or b"serve" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert serve_processes_in(tmp_path) == []
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("127.0.0.1", port))
