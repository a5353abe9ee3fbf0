"""`cloudhpc serve all` as a process in a directory of its own, for whole-flow tests on the `local`
backend (the SLURM testbed's deployments are in harness.py)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cloudhpc.cli.demo import stop_server, wait_ready
from cloudhpc.client import Client
from tests.e2e.harness import free_port


@dataclass(frozen=True)
class Embedded:
    root: Path
    url: str

    def token(self) -> str:
        """The admin token `serve all` made for itself on its first start."""
        return (self.root / ".cloudhpc" / "admin-token").read_text().strip()

    def client(self) -> Client:
        return Client(self.url, self.token())

    def log(self) -> str:
        return (self.root / "serve.log").read_text(errors="replace")


@contextlib.contextmanager
def serve_all(root: Path, clusters: dict[str, Any]) -> Iterator[Embedded]:
    """`serve all` with these `clusters`, a SQLite store and a local object store under `root`;
    stopped (SIGTERM to its PID) after the block."""
    port = free_port()
    config = {
        "porter": {
            "listen": f"127.0.0.1:{port}",
            "database": f"sqlite:///{root / 'state.db'}",
            "object_store": f"file://{root / 'objects'}",
        },
        "submitter": {"listen": f"127.0.0.1:{free_port()}"},
        "clusters": clusters,
    }
    (root / "cloudhpc.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDHPC_")}
    env["CLOUDHPC_CONFIG"] = str(root / "cloudhpc.yaml")
    with (root / "serve.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cloudhpc", "serve", "all"],
            cwd=root,
            env=env,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
    embedded = Embedded(root, f"http://127.0.0.1:{port}")
    try:
        # the demo's own wait: the admin token is written and an agent serves the cluster
        client = wait_ready(proc, embedded.url, root / ".cloudhpc" / "admin-token", timeout=60)
        assert client is not None, f"serve all did not become ready: {embedded.log()[-2000:]}"
        client.close()
        yield embedded
    finally:
        stop_server(proc, timeout=30)
