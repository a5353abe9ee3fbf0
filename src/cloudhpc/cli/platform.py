"""`cloudhpc platform`: helpers for the cloud VM the platform runs on (docs/platform.md).

`cloudhpc platform forward` opens the original setup's access port-forwards (Kubeflow dashboard 8080,
Kubeflow's object store 9000, MLflow 5000, MLflow's S3 store 9001, Prometheus 8090, Grafana 5050,
porter 5555) as `kubectl port-forward` child processes on the VM's loopback, says which opened and
which failed (and why), and keeps them open, restarting one whose pod went away, until stopped.
From one's own machine, `ssh -L 5000:localhost:5000 ... cpouta` then reaches them.

The Kubernetes API is reached only through the `kubectl` command line (no client library): that is
the thin interface the offline tests replace with a stand-in executable, since no API server can run
there.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import FrameType
from typing import IO, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

__all__ = [
    "FORWARDS",
    "Forward",
    "ForwardSupervisor",
    "Kubectl",
    "OpenedForward",
    "Target",
    "platform_app",
]

platform_app = typer.Typer(no_args_is_help=True, help="The cloud platform's VM (docs/platform.md).")

out = Console()
err = Console(stderr=True, soft_wrap=True)


@dataclass(frozen=True)
class Target:
    """A Service port in the cluster."""

    namespace: str
    service: str
    port: int

    def __str__(self) -> str:
        return f"{self.namespace}/{self.service}:{self.port}"


@dataclass(frozen=True)
class Forward:
    """One access forward. `targets` are tried in order and the first Service that exists is used,
    because the full Kubeflow and standalone Kubeflow Pipelines name the same thing differently."""

    name: str
    local_port: int
    targets: tuple[Target, ...]
    description: str


FORWARDS: tuple[Forward, ...] = (
    Forward(
        "kubeflow",
        8080,
        (Target("istio-system", "istio-ingressgateway", 80), Target("kubeflow", "ml-pipeline-ui", 80)),
        "Kubeflow dashboard (standalone: the Pipelines UI)",
    ),
    Forward(
        "kubeflow-s3",
        9000,
        (Target("kubeflow", "minio-service", 9000), Target("kubeflow", "seaweedfs", 8333)),
        "Kubeflow Pipelines' object store",
    ),
    Forward("mlflow", 5000, (Target("mlflow", "mlflow", 5000),), "MLflow"),
    Forward("mlflow-s3", 9001, (Target("mlflow", "mlflow-s3", 9000),), "MLflow's S3 artifact store"),
    Forward("prometheus", 8090, (Target("monitoring", "prometheus-service", 8080),), "Prometheus"),
    Forward("grafana", 5050, (Target("monitoring", "grafana", 3000),), "Grafana"),
    Forward("porter", 5555, (Target("monitoring", "porter-service", 5555),), "porter (cloudhpc API)"),
)


@dataclass
class Kubectl:
    """How `kubectl` is run: the executable and global flags such as `--context`."""

    executable: str = "kubectl"
    context: str | None = None
    lookup_timeout: float = 15.0

    def argv(self, *args: str) -> list[str]:
        base = [self.executable]
        if self.context:
            base += ["--context", self.context]
        return [*base, *args]

    def service_exists(self, target: Target) -> tuple[bool, str]:
        """Whether the Service exists, and kubectl's complaint when it does not."""
        try:
            proc = subprocess.run(
                self.argv("-n", target.namespace, "get", "service", target.service, "-o", "name"),
                capture_output=True,
                text=True,
                timeout=self.lookup_timeout,
                check=False,
            )
        except FileNotFoundError:
            return False, f"{self.executable}: command not found"
        except subprocess.TimeoutExpired:
            return False, f"kubectl get service {target} timed out after {self.lookup_timeout:.0f}s"
        if proc.returncode == 0:
            return True, ""
        return False, _last_line(proc.stderr) or f"kubectl exited {proc.returncode}"

    def port_forward(
        self, target: Target, local_port: int, address: str, log: IO[bytes]
    ) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self.argv(
                "-n",
                target.namespace,
                "port-forward",
                f"service/{target.service}",
                f"{local_port}:{target.port}",
                "--address",
                address,
            ),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _port_open(address: str, port: int) -> bool:
    host = "127.0.0.1" if address in ("0.0.0.0", "localhost") else address  # noqa: S104 (a bind address, compared)
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


@dataclass
class OpenedForward:
    """The state of one forward: the child process while it runs, or why it failed."""

    forward: Forward
    local_port: int
    target: Target | None = None
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    error: str = ""
    restarts: int = 0
    next_restart: float = 0.0

    @property
    def ok(self) -> bool:
        return self.process is not None and self.process.poll() is None and not self.error

    def log_tail(self) -> str:
        if self.log_path is None:
            return ""
        try:
            return _last_line(self.log_path.read_text(errors="replace"))
        except OSError:
            return ""

    def as_dict(self, address: str) -> dict[str, Any]:
        return {
            "name": self.forward.name,
            "local": f"http://{address}:{self.local_port}",
            "target": str(self.target) if self.target else None,
            "ok": self.ok,
            "error": self.error or None,
            "description": self.forward.description,
        }


@dataclass
class ForwardSupervisor:
    """Starts the forwards, reports them, restarts those that end, and stops all the children it
    started (by PID, never by name) when closed."""

    forwards: Sequence[Forward]
    kubectl: Kubectl = field(default_factory=Kubectl)
    address: str = "127.0.0.1"
    port_offset: int = 0
    start_timeout: float = 20.0
    on_event: Callable[[str], None] = lambda message: None
    opened: list[OpenedForward] = field(default_factory=list)
    _logdir: tempfile.TemporaryDirectory[str] | None = None

    def open_all(self) -> list[OpenedForward]:
        self._logdir = tempfile.TemporaryDirectory(prefix="cloudhpc-forward-")
        self.opened = [OpenedForward(f, f.local_port + self.port_offset) for f in self.forwards]
        for item in self.opened:
            self._resolve(item)
            if item.target is not None:
                self._spawn(item)
        deadline = time.monotonic() + self.start_timeout
        pending = [item for item in self.opened if item.process is not None]
        while pending:
            still: list[OpenedForward] = []
            for item in pending:
                assert item.process is not None
                if _port_open(self.address, item.local_port):
                    continue
                if item.process.poll() is not None:
                    item.error = item.log_tail() or f"kubectl port-forward exited {item.process.returncode}"
                elif time.monotonic() >= deadline:
                    item.error = f"port {item.local_port} not open after {self.start_timeout:.0f}s"
                    self._stop(item)
                else:
                    still.append(item)
            pending = still
            if pending:
                time.sleep(0.1)
        return self.opened

    def _resolve(self, item: OpenedForward) -> None:
        reasons = []
        for target in item.forward.targets:
            exists, why = self.kubectl.service_exists(target)
            if exists:
                item.target = target
                return
            reasons.append(f"{target.namespace}/{target.service}: {why}")
        item.error = "service not found or cluster unreachable (" + "; ".join(reasons) + ")"

    def _spawn(self, item: OpenedForward) -> None:
        assert item.target is not None
        assert self._logdir is not None
        item.log_path = Path(self._logdir.name) / f"{item.forward.name}.log"
        with item.log_path.open("wb") as log:
            item.process = self.kubectl.port_forward(item.target, item.local_port, self.address, log)
        item.error = ""

    def _stop(self, item: OpenedForward) -> None:
        proc = item.process
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def watch_once(self) -> None:
        """Restart forwards whose kubectl ended (a restarted pod ends a port-forward), with backoff."""
        now = time.monotonic()
        for item in self.opened:
            if item.target is None or item.process is None:
                continue
            if item.process.poll() is None:
                continue
            if item.next_restart == 0.0:
                reason = item.log_tail() or f"exited {item.process.returncode}"
                delay = min(30.0, 2.0 ** min(item.restarts, 5))
                item.next_restart = now + delay
                self.on_event(
                    f"{item.forward.name}: port-forward ended ({reason}); restarting in {delay:.0f}s"
                )
            elif now >= item.next_restart:
                item.restarts += 1
                item.next_restart = 0.0
                self._spawn(item)
                self.on_event(f"{item.forward.name}: port-forward restarted (restart {item.restarts})")

    def close(self) -> None:
        for item in self.opened:
            self._stop(item)
        if self._logdir is not None:
            self._logdir.cleanup()
            self._logdir = None


def _report(opened: Sequence[OpenedForward], address: str) -> Table:
    table = Table("NAME", "LOCAL", "SERVICE", "STATUS")
    for item in opened:
        status = "[green]open[/green]" if item.ok else f"[red]FAILED[/red] {item.error}"
        table.add_row(
            item.forward.name,
            f"http://{address}:{item.local_port}",
            str(item.target) if item.target else "-",
            status,
        )
    return table


class Output(StrEnum):
    table = "table"
    json = "json"


@platform_app.command("forward")
def forward(
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help=f"open only these (repeat): {', '.join(f.name for f in FORWARDS)}"),
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="open, report and close again (exit 1 if any failed)")
    ] = False,
    address: Annotated[str, typer.Option(help="local address to listen on")] = "127.0.0.1",
    port_offset: Annotated[
        int, typer.Option(help="add this to every local port (when the usual ones are taken)")
    ] = 0,
    context: Annotated[str | None, typer.Option(help="kubectl context (default: the current one)")] = None,
    kubectl: Annotated[str, typer.Option(envvar="KUBECTL", help="the kubectl executable")] = "kubectl",
    timeout: Annotated[float, typer.Option(help="seconds each forward may take to open")] = 20.0,
    output: Annotated[Output, typer.Option("--output", "-o", help="table or json")] = Output.table,
) -> None:
    """Open the platform's port-forwards on this VM, say which failed, and keep them open."""
    known = {f.name: f for f in FORWARDS}
    unknown = [name for name in only or [] if name not in known]
    if unknown:
        err.print(f"--only: unknown forward(s) {', '.join(unknown)}; known: {', '.join(known)}")
        raise typer.Exit(2)
    chosen = [known[name] for name in only] if only else list(FORWARDS)
    supervisor = ForwardSupervisor(
        chosen,
        kubectl=Kubectl(kubectl, context),
        address=address,
        port_offset=port_offset,
        start_timeout=timeout,
        on_event=lambda message: err.print(message, highlight=False),
    )
    stop = False

    def _stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        opened = supervisor.open_all()
        if output == Output.json:
            sys.stdout.write(json.dumps([o.as_dict(address) for o in opened], indent=2) + "\n")
        else:
            # full error lines when piped or logged: Rich would squeeze the table into 80 columns
            (out if out.is_terminal else Console(width=240)).print(_report(opened, address))
        failed = [o for o in opened if not o.ok]
        if check or len(failed) == len(opened):
            if failed and not check:
                err.print("no port-forward could be opened; is kubectl pointed at the platform's cluster?")
            raise typer.Exit(1 if failed else 0)
        if failed:
            err.print(f"{len(failed)} of {len(opened)} failed: {', '.join(o.forward.name for o in failed)}")
        err.print("forwarding; Ctrl-C to stop", highlight=False)
        while not stop:
            supervisor.watch_once()
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        supervisor.close()
        signal.signal(signal.SIGTERM, previous)
