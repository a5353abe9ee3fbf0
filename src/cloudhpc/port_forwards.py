"""The platform VM's access port-forwards, supervised (`cloudhpc platform forward`, docs/platform.md).

The original setup's forwards (Kubeflow dashboard 8080, Kubeflow's object store 9000, MLflow 5000,
MLflow's S3 store 9001, Prometheus 8090, Grafana 5050, porter 5555) run as `kubectl port-forward`
child processes on the VM's loopback. `ForwardSupervisor` says which opened and which failed (and
why), and keeps them open, restarting one whose pod went away, until stopped. From one's own
machine, `ssh -L 5000:localhost:5000 ... cpouta` then reaches them.

The Kubernetes API is reached only through the `kubectl` command line (no client library): that is
the thin interface the offline tests replace with a stand-in executable, since no API server can run
there.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = [
    "FORWARDS",
    "Forward",
    "ForwardSupervisor",
    "Kubectl",
    "OpenedForward",
    "Target",
]


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

    def run(
        self, *args: str, stdin: str | None = None, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """`kubectl ARGS`, its output captured. Anything secret goes in through `stdin` (manifests
        for `apply -f -`) or comes back on stdout, never through `args`, which every local user can
        read in /proc while it runs."""
        return subprocess.run(
            self.argv(*args),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

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

    def supervise(self, stopped: Callable[[], bool], *, interval: float = 0.5) -> None:
        """Watch the forwards until `stopped()` says so (a signal handler sets it)."""
        while not stopped():
            self.watch_once()
            time.sleep(interval)

    def close(self) -> None:
        for item in self.opened:
            self._stop(item)
        if self._logdir is not None:
            self._logdir.cleanup()
            self._logdir = None
