"""Small tools the Ray batch script runs on the compute nodes, with the job's own Python: a script
shipped to the nodes, never imported by cloudhpc itself (`ray/script.py` reads it as a file).

This file is staged as is into every Ray job (`.cloudhpc/ray_helpers.py`) and run as
`python3 ray_helpers.py COMMAND ...`, so it uses the standard library only and no cloudhpc import:
the job's environment has Ray, not cloudhpc.

    ports N                  N free TCP ports, space-separated (Ray's ports, the import ports)
    node-ip                  the address other nodes reach this one at (loopback on a lone host)
    wait-ready ...           until N Ray nodes are alive (read from the head's dashboard)
    wait-ports ...           until local ports accept connections (the tunnel's imports)
    watch-idle ...           until no Ray job has run for --idle seconds (a session's idle end)

Every wait fails fast when the process it depends on has died, instead of running out its timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from typing import Any

__all__ = ["alive_nodes", "busy_jobs", "free_ports", "main", "node_ip"]


def free_ports(count: int) -> list[int]:
    """Ports nobody holds now. All sockets stay open until every port is picked, so the N ports
    differ; they are closed before Ray binds them (a small window, which Ray reports loudly)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("", 0))  # no listen(): nothing is served, the kernel only reserves the number
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def node_ip() -> str:
    """The first non-loopback IPv4 address of this host's name, else 127.0.0.1.

    Ray's own guess is the address of the default route (the site's Ethernet, not necessarily the
    interconnect the nodes share); the host name is what SLURM and the other nodes use.
    """
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return "127.0.0.1"
    for info in infos:
        address = str(info[4][0])
        if not address.startswith("127."):
            return address
    return "127.0.0.1"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ray_auth_token() -> str | None:
    """The token Ray's own clients send, found where Ray looks for it. Ray (2.5x and later) enables
    token authentication for every cluster a user starts once `~/.ray/auth_token` exists, and any
    `ray.init()` of a local cluster writes that file: the dashboard then answers 401 without it."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    if token:
        return token.strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip() or None
    except OSError:
        return None


def _dashboard_json(dashboard: str, path: str, timeout: float) -> object:
    """GET `path` of the head's dashboard as JSON, with Ray's token when there is one; None while
    the dashboard cannot answer."""
    request = urllib.request.Request(f"http://{dashboard}{path}")
    token = ray_auth_token() if os.environ.get("RAY_AUTH_MODE", "") != "disabled" else None
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 -- http to the head's loopback
            return json.loads(response.read().decode())
    except (OSError, ValueError, urllib.error.URLError):
        return None


def alive_nodes(dashboard: str, timeout: float = 2.0) -> int:
    """Alive Ray nodes as the head's dashboard (state API) lists them; -1 while it cannot answer."""
    body: Any = _dashboard_json(dashboard, "/api/v0/nodes?limit=10000&detail=false", timeout)
    if body is None:
        return -1
    try:
        nodes = body["data"]["result"]["result"]
    except (KeyError, TypeError):
        return -1
    return sum(1 for node in nodes if node.get("state") == "ALIVE")


def _wait_ready(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout
    dashboard = f"127.0.0.1:{args.dashboard}"
    last = -1
    while True:
        if not _process_alive(args.pid):
            print(
                f"cloudhpc: the Ray head (pid {args.pid}) exited before the cluster was ready",
                file=sys.stderr,
            )
            return 2
        seen = alive_nodes(dashboard)
        if seen >= args.nodes:
            return 0
        if seen != last and seen >= 0:
            print(f"cloudhpc: {seen} of {args.nodes} Ray node(s) joined", flush=True)
            last = seen
        if time.monotonic() > deadline:
            print(
                f"cloudhpc: only {max(seen, 0)} of {args.nodes} Ray node(s) joined within {args.timeout:.0f} s",
                file=sys.stderr,
            )
            return 3
        time.sleep(0.2)


BUSY_STATES = frozenset({"PENDING", "RUNNING"})
"""Ray job states that keep a session alive (Ray's JobStatus names)."""


def busy_jobs(dashboard: str, timeout: float = 2.0) -> int:
    """Ray jobs pending or running, as the head's job API lists them; -1 while it cannot answer."""
    body = _dashboard_json(dashboard, "/api/jobs/", timeout)
    if not isinstance(body, list):
        return -1
    return sum(1 for job in body if isinstance(job, dict) and job.get("status") in BUSY_STATES)


def _watch_idle(args: argparse.Namespace) -> int:
    """Until no Ray job has been pending or running for `--idle` seconds (0: the session ends
    itself) or the head has died (2). A dashboard that does not answer counts as busy: a slow
    dashboard on a loaded node must not end a session that is working."""
    dashboard = f"127.0.0.1:{args.dashboard}"
    idle_since = time.monotonic()
    print(f"cloudhpc: Ray session ready; it ends after {args.idle:.0f} s without a Ray job", flush=True)
    while True:
        if not _process_alive(args.pid):
            print(f"cloudhpc: the Ray head (pid {args.pid}) exited", file=sys.stderr)
            return 2
        if busy_jobs(dashboard) != 0:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since >= args.idle:
            print(f"cloudhpc: no Ray job for {args.idle:.0f} s: ending the session", flush=True)
            return 0
        time.sleep(args.interval)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _wait_ports(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout
    while True:
        missing = [p for p in args.ports if not _port_open(p)]
        if not missing:
            return 0
        if args.pid and not _process_alive(args.pid):
            print(f"cloudhpc: the bridge tunnel (pid {args.pid}) is gone", file=sys.stderr)
            return 2
        if time.monotonic() > deadline:
            print(
                f"cloudhpc: imported services not reachable yet on local port(s) {missing} "
                f"after {args.timeout:.0f} s; starting anyway",
                file=sys.stderr,
            )
            return 3
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ray_helpers.py")
    sub = parser.add_subparsers(dest="command", required=True)
    ports = sub.add_parser("ports")
    ports.add_argument("count", type=int)
    sub.add_parser("node-ip")
    ready = sub.add_parser("wait-ready")
    ready.add_argument("--dashboard", type=int, required=True)
    ready.add_argument("--nodes", type=int, required=True)
    ready.add_argument("--pid", type=int, required=True)
    ready.add_argument("--timeout", type=float, default=300.0)
    wait_ports = sub.add_parser("wait-ports")
    wait_ports.add_argument("ports", type=int, nargs="+")
    wait_ports.add_argument("--pid", type=int, default=0)
    wait_ports.add_argument("--timeout", type=float, default=60.0)
    idle = sub.add_parser("watch-idle")
    idle.add_argument("--dashboard", type=int, required=True)
    idle.add_argument("--idle", type=float, required=True)
    idle.add_argument("--pid", type=int, required=True)
    idle.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args(argv)
    if args.command == "ports":
        print(" ".join(str(p) for p in free_ports(args.count)))
        return 0
    if args.command == "node-ip":
        print(node_ip())
        return 0
    if args.command == "wait-ready":
        return _wait_ready(args)
    if args.command == "watch-idle":
        return _watch_idle(args)
    return _wait_ports(args)


if __name__ == "__main__":
    sys.exit(main())
