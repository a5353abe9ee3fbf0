"""Runs porter and the submitter as real processes (`cloudhpc serve ...`) for whole-flow tests.

Processes, not threads, so that `kill -9` at any moment is a real crash: nothing is flushed, no
`finally` runs, and whatever survives must come from the job store and from SLURM.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import yaml

from cloudhpc.client import ApiError, Client
from cloudhpc.domain.api import Accounting
from cloudhpc.domain.jobs import Job
from cloudhpc.store import Store
from tests.testbed import Testbed


@contextlib.contextmanager
def running(dep: Deployment, *, submitter: bool = True) -> Iterator[Deployment]:
    """porter and (unless `submitter` is False) the submitter of `dep` as processes for the block,
    stopped (by PID) after it."""
    dep.start("porter")
    if submitter:
        dep.start("submitter")
    try:
        yield dep
    finally:
        dep.stop()


@contextlib.contextmanager
def porter_alone(root: Path, testbed: Testbed, **porter_settings: Any) -> Iterator[Deployment]:
    """One real porter process on SQLite in `root`, with no submitter: for tests of the HTTP API."""
    dep = Deployment(root, testbed, f"sqlite:///{root}/state.db", porter_settings=porter_settings)
    with running(dep, submitter=False):
        yield dep


def bridged_deployment(root: Path, testbed: Testbed, object_prefix: str | None = None) -> Deployment:
    """A deployment in `root` (SQLite store) whose porter has the testbed's bridge VM, for Ray jobs
    that expose ports; with `object_prefix`, artifacts go to s3://<testbed bucket>/<object_prefix>."""
    bridge = yaml.safe_load(testbed.config_file.read_text())["porter"]["bridge"]
    return Deployment(
        root / "deploy",
        testbed,
        f"sqlite:///{root / 'state.db'}",
        object_store=f"s3://{testbed.s3_bucket}/{object_prefix}" if object_prefix else None,
        porter_settings={"bridge": bridge},
    )


def final_accounting(client: Client, job: Job | UUID, timeout: float = 60.0) -> Accounting:
    """The job's accounting once the agent has stored it final: a short job's comes first
    provisional (SLURM sends the job's own row from a 5 s thread), a few seconds before."""
    deadline = time.monotonic() + timeout
    answer: Accounting | None = None
    while True:
        try:
            answer = client.accounting(job)
        except ApiError as exc:
            assert exc.status == 404, exc
        else:
            if answer.final:
                return answer
        assert time.monotonic() < deadline, f"no final accounting after {timeout} s (last: {answer})"
        time.sleep(0.5)


def submit(client: Client, name: str, script: str, **spec: object) -> Job:
    """Submit a batch job to the testbed's cluster (spec fields beyond the three as keywords)."""
    return client.submit({"name": name, "cluster": "testbed", "script": script} | spec)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Deployment:
    root: Path
    testbed: Testbed
    database: str
    channel: str = "http"
    mailbox: str | None = None
    object_store: str | None = None
    """s3://BUCKET/PREFIX on the testbed's S3 server for artifacts (default: a local directory)."""
    porter_settings: dict[str, Any] = field(default_factory=dict)
    """Extra `porter:` keys (e.g. metrics: {recent_window: 60})."""
    port: int = field(default_factory=free_port)
    submitter_port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    scraped: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config = self.root / "cloudhpc.yaml"
        base = yaml.safe_load(self.testbed.config_file.read_text())
        testbed_cluster = base["clusters"]["testbed"]
        testbed_cluster["poll"] = {"fast_interval": 0.5, "slow_interval": 5, "max_commands_per_minute": 240}
        config: dict[str, Any] = {
            "porter": {
                "listen": f"127.0.0.1:{self.port}",
                "database": self.database,
                "object_store": self.object_store or f"file://{self.root / 'objects'}",
                "metrics": {"token_file": str(scrape_token_file(self.testbed.prometheus_targets))},
                **self.porter_settings,
            },
            "submitter": {
                "porter_url": self.url,
                "token_file": str(self.root / "agent-token"),
                "channel": self.channel,
                "listen": f"127.0.0.1:{self.submitter_port}",
            },
            "clusters": {"testbed": testbed_cluster},
        }
        if self.object_store:
            config["porter"]["s3_endpoint_url"] = self.testbed.s3_endpoint
        if self.mailbox:
            config["submitter"]["mailbox"] = self.mailbox
            config["submitter"]["s3_endpoint_url"] = self.testbed.s3_endpoint
            config["porter"]["mailbox"] = self.mailbox
            config["porter"]["mailbox_clusters"] = ["testbed"]
            config["porter"]["s3_endpoint_url"] = self.testbed.s3_endpoint
            # One key, two places: porter's directory (a mounted Secret) and beside the HPC key.
            keys = self.root / "mailbox-keys"
            keys.mkdir(mode=0o700, exist_ok=True)
            key_file = keys / "testbed.key"
            if not key_file.exists():
                key_file.write_text(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
                key_file.chmod(0o600)
            config["porter"]["mailbox_key_dir"] = str(keys)
            config["submitter"]["mailbox_key_file"] = str(key_file)
        self.config.write_text(yaml.safe_dump(config))
        store = Store(self.database)
        try:
            store.migrate()
            self.user_token = store.create_token("alice", "user")
            # alice's agent token: she owns the testbed cluster, so her jobs may use it
            (self.root / "agent-token").write_text(store.create_token("alice", "agent", ["testbed"]))
        finally:
            store.close()
        (self.root / "agent-token").chmod(0o600)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> Client:
        return Client(self.url, self.user_token)

    def process_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDHPC_")}
        env["CLOUDHPC_CONFIG"] = str(self.config)
        if self.mailbox or self.object_store:
            env["AWS_ACCESS_KEY_ID"] = self.testbed.s3_access_key
            env["AWS_SECRET_ACCESS_KEY"] = self.testbed.s3_secret_key
            env["AWS_DEFAULT_REGION"] = "us-east-1"
        return env

    def start(self, role: str, *, name: str | None = None, listen: str | None = None) -> None:
        """Start `cloudhpc serve <role>` as the process `name` (default: the role; its log is
        `<name>.log`). A porter started with `listen` (HOST:PORT) listens there instead of
        `porter.listen`: one replica of several behind a balancer at `url`."""
        name = name or role
        env = self.process_env()
        if listen is not None:
            env["CLOUDHPC_PORTER__LISTEN"] = listen
        log = (self.root / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "cloudhpc", "serve", role, "--log-level", "INFO"],
            cwd=self.root,
            env=env,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        if role == "porter":
            self.wait_ready(name=name, url=f"http://{listen}" if listen else self.url)

    def wait_ready(self, timeout: float = 30, *, name: str = "porter", url: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.processes.get(name)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} exited {proc.returncode}: {self.log(name)[-2000:]}")
            try:
                if httpx.get(f"{url or self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{name} not ready after {timeout}s: {self.log(name)[-2000:]}")

    def kill(self, role: str, sig: int = signal.SIGKILL) -> None:
        proc = self.processes.pop(role, None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(timeout=30)

    def stop(self) -> None:
        for role in list(self.processes):
            self.kill(role, signal.SIGTERM)
        for path in self.scraped:
            path.unlink(missing_ok=True)
        self.scraped.clear()

    def scrape_with_prometheus(self, label: str) -> None:
        """Have the testbed's Prometheus scrape this deployment's porter and submitter, with the
        label `deployment=<label>` on every series (removed again by `stop`)."""
        targets = self.testbed.prometheus_targets
        for role, port in (("porter", self.port), ("submitter", self.submitter_port)):
            path = targets / f"{role}-{label}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps([{"targets": [f"127.0.0.1:{port}"], "labels": {"deployment": label}}]))
            tmp.rename(path)  # Prometheus must never read half a file
            self.scraped.append(path)

    def log(self, role: str) -> str:
        path = self.root / f"{role}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def scrape_token_file(prometheus_targets: Path) -> Path:
    """The token the testbed's (or the topology's) Prometheus sends to porter's /metrics:
    scripts/testbed-lib.sh makes it beside the targets; made here too, the same way, when the
    running testbed predates it."""
    path = prometheus_targets.parent / "scrape-token"
    if not path.exists():
        tmp = path.with_name(f"scrape-token.{os.getpid()}")
        tmp.write_text(secrets.token_hex(32))
        tmp.chmod(0o600)
        tmp.rename(path)
    return path


def slurm_jobs_named(name: str) -> list[str]:
    """SLURM's own answer (as root, locally): every allocation ever created with this job name."""
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", f"--name={name}", "--starttime=now-1days", "--format=JobID"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    queued = subprocess.run(
        ["squeue", "-h", f"--name={name}", "--states=all", "-o", "%i"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sorted(set(out.split()) | set(queued.split()))
