"""A local MLflow tracking server for the demo: SQLite runs, proxied artifacts, loopback only.

It is the same server a platform runs (`mlflow server --serve-artifacts`), with local storage, so
that the demo exercises the same client paths as a real deployment: clients (and jobs) need only
its URL. It runs in its own session and is stopped by signalling that session: `mlflow server`
starts uvicorn as a child, which a signal to the parent alone leaves running.

A small supervisor (this module run as a program) leads that session and ends it when the process
that started it is gone, so a demo killed with SIGKILL (a test's timeout) leaves no server behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

__all__ = ["LocalMlflowServer"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LocalMlflowServer:
    """`with LocalMlflowServer(directory) as server: server.url` -- started, ready, stopped."""

    def __init__(self, directory: Path, *, port: int | None = None, startup_timeout: float = 120.0) -> None:
        self.directory = directory.resolve()
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.directory / "server.log"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        mlflow = Path(sys.executable).with_name("mlflow")
        argv = [
            str(mlflow) if mlflow.exists() else "mlflow",
            "server",
            "--host=127.0.0.1",
            f"--port={self.port}",
            "--workers=1",
            f"--backend-store-uri=sqlite:///{self.directory / 'mlflow.db'}",
            "--serve-artifacts",
            f"--artifacts-destination={self.directory / 'artifacts'}",
        ]
        # Job execution starts a pool of worker processes nothing here uses.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        supervised = [sys.executable, "-m", __name__, "--parent", str(os.getpid()), "--", *argv]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                supervised, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.process.returncode}); see {self.log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlflow server not ready after {self.startup_timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)  # its own session: this PID is the group
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # a child that outlived its parent

    def __enter__(self) -> LocalMlflowServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _supervise(parent: int, argv: list[str]) -> int:
    """Run `argv` in this process's group (this process leads its own session) until it exits or
    `parent` is gone; then end the whole group, this process included."""
    child = subprocess.Popen(argv)
    while child.poll() is None and os.getppid() == parent:
        time.sleep(0.5)
    if child.poll() is not None:
        return child.returncode
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(0, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(timeout=10)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.killpg(0, signal.SIGKILL)
    return 1


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="run a command; end its process group when --parent is gone")
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    sys.exit(_supervise(args.parent, command))
