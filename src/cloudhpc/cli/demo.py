"""`cloudhpc demo`: the whole flow on the embedded default, with nothing configured.

Starts `cloudhpc serve all` (SQLite, local object store, the `local` cluster) as a child process on
a free loopback port, submits a small batch job through the SDK, follows it, prints its output and
accounting, and stops the server it started (by PID). `free_port`, `wait_ready` and `stop_server`
are the child's lifecycle, shared with the pipeline demo.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from cloudhpc.client import ApiError, Client
from cloudhpc.private_files import make_private_dirs

__all__ = ["free_port", "run_demo", "stop_server", "wait_ready"]

DEMO_SCRIPT = """\
echo "hello from cloudhpc job $CLOUDHPC_JOB_ID on $(hostname)"
python3 - <<'PY'
import math, time
start = time.time()
total = sum(math.sqrt(i) for i in range(3_000_000))
print(f"computed a sum of square roots: {total:.1f} in {time.time() - start:.2f}s")
PY
echo "GREETING=$GREETING"
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_ready(server: subprocess.Popen[bytes], url: str, token_file: Path, timeout: float) -> Client | None:
    """A client of the `serve all` child at `url` once it has written its admin token and an agent is
    online; None when the child exits first (`server.poll()` tells) or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            return None
        if token_file.exists():
            client = Client(url, token_file.read_text().strip())
            try:
                if any(c.agent_online for c in client.clusters()):
                    return client
            except ApiError:
                pass
            client.close()
        time.sleep(0.2)
    return None


def stop_server(server: subprocess.Popen[bytes], timeout: float) -> None:
    """Stop the child we started, by its PID: SIGTERM, then SIGKILL after `timeout` seconds."""
    server.terminate()
    try:
        server.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def run_demo(state_dir: Path = Path(".cloudhpc")) -> int:
    console = Console(stderr=True)
    port = free_port()
    env = {**os.environ, "CLOUDHPC_PORTER__LISTEN": f"127.0.0.1:{port}"}
    env.pop("CLOUDHPC_CONFIG", None)
    log_path = state_dir / "demo-server.log"
    make_private_dirs(state_dir)  # it will hold the tokens and the job store
    console.print(f"[bold]1/4[/bold] starting `cloudhpc serve all` on 127.0.0.1:{port}")
    with log_path.open("ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "cloudhpc", "serve", "all"],
            env=env,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
    console.print(f"      server pid {server.pid}, log {log_path}", soft_wrap=True)
    try:
        client = wait_ready(server, f"http://127.0.0.1:{port}", state_dir / "admin-token", 60)
        if client is None:
            if server.poll() is not None:
                console.print(f"[red]the server exited ({server.returncode}); see {log_path}[/red]")
            else:
                console.print(f"[red]the server did not become ready in 60 s; see {log_path}[/red]")
            return 1
        with client:
            console.print("[bold]2/4[/bold] submitting a batch job to the `local` cluster")
            job = client.submit(
                {
                    "name": "demo",
                    "cluster": "local",
                    "script": DEMO_SCRIPT,
                    "env": {"GREETING": "hello; $(not run)"},
                }
            )
            console.print(f"      job {job.id}")
            console.print("[bold]3/4[/bold] following it")
            final = client.wait(
                job, timeout=120, on_change=lambda j: console.print(f"      state: {j.state.value}")
            )
            console.print("[bold]4/4[/bold] output and accounting")
            sys.stdout.write(client.logs(final).data.decode(errors="replace"))
            accounting = None
            for _ in range(50):
                try:
                    accounting = client.accounting(final)
                    break
                except ApiError:
                    time.sleep(0.2)
            if accounting is None:
                console.print("      accounting was not collected in time; see the server log")
            else:
                rows = accounting.records
                elapsed = rows[0].elapsed_seconds if rows else None
                cpu = accounting.efficiency.cpu_efficiency if accounting.efficiency else None
                cpu_text = "-" if cpu is None else f"{100 * float(cpu):.1f}%"
                console.print(
                    f"      elapsed {elapsed}s, exit code {final.exit_code}, CPU efficiency {cpu_text}"
                )
            console.print(f"job ended [bold]{final.state.value}[/bold]")
            return 0 if final.state.value == "completed" else 1
    finally:
        stop_server(server, 15)
        console.print(f"stopped the server (pid {server.pid})")
