"""The job's side of the bridges: one supervised `ssh -N` from the head node to the bridge VM.

One ssh carries every bridge of a job: `-R bind:bridge_port:127.0.0.1:port` per exported port
(HPC -> cloud) and `-L 127.0.0.1:local_port:host:port` per imported service (cloud -> HPC). It runs
in a restart loop, because a tunnel over the Internet does break (VM reboot, NAT timeout, sshd
restart), and with `ExitOnForwardFailure=yes`, so an ssh that could not set up every forward exits
and is retried instead of lingering half-useful. The host key is pinned (a known_hosts file staged
with the job, `StrictHostKeyChecking=yes`); the key (and the job's certificate, when the submitter
signs one) is a file staged 0600, named on the command line by path only, so its content never appears in a process list or a log.

Local ports are shell expressions (`"$chpc_dashboard"`): Ray's ports are picked on the node at run
time, so two jobs on one node never collide. Everything else is a `shlex.quote`d literal.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "TunnelExport",
    "TunnelImport",
    "TunnelPlan",
    "render_tunnel",
    "ssh_argv_words",
    "tunnel_ssh_options",
]

SERVER_ALIVE_INTERVAL = 5
"""Seconds between ssh keepalives: a dead path is noticed after about 3 x this."""
MAX_RESTART_DELAY = 8
"""Longest pause between two reconnection attempts, in seconds."""


@dataclass(frozen=True)
class TunnelExport:
    """`bind_address:bridge_port` on the bridge VM forwards to `127.0.0.1:<local>` on the head node."""

    name: str
    bridge_port: int
    local: str
    """A shell word for the local port: a literal number, or `"$var"` set earlier by the script."""


@dataclass(frozen=True)
class TunnelImport:
    """`127.0.0.1:<local>` on the head node forwards to `host:port` as seen from the bridge VM."""

    name: str
    host: str
    port: int
    local: str


@dataclass(frozen=True)
class TunnelPlan:
    host: str
    ssh_port: int
    ssh_user: str
    bind_address: str
    key_path: str
    known_hosts_path: str
    pid_file: str
    certificate_path: str | None = None
    """The job's own certificate (`bridges/certificates.py`); None with the shared bridge key."""
    exports: Sequence[TunnelExport] = field(default_factory=tuple)
    imports: Sequence[TunnelImport] = field(default_factory=tuple)

    @property
    def empty(self) -> bool:
        return not (self.exports or self.imports)


def _check_port(value: int, what: str) -> int:
    if not 1 <= value <= 65535:
        raise ValueError(f"{what} {value} is not a TCP port")
    return value


def _local(word: str) -> str:
    """Local ports come from the renderer itself (a number or a `"$chpc_..."` expansion), never a user."""
    if word.isdigit() or (word.startswith('"$chpc_') and word.endswith('"') and word[2:-1].isidentifier()):
        return word
    raise ValueError(f'local port {word!r} must be a number or a "$chpc_..." variable')


def tunnel_ssh_options(
    *,
    key_path: str,
    known_hosts_path: str,
    ssh_port: int,
    certificate_path: str | None = None,
    log_level: str = "ERROR",
) -> list[str]:
    """The ssh options of a job's tunnel, as an argv (unquoted): `cloudhpc doctor bridge-host`
    connects with the same ones, so what it checks is what a job will get. Only `log_level` may
    differ: a job's log wants ssh's errors, the doctor reads sshd's refusals, logged at INFO.
    A certificate is named explicitly, not left to ssh's `<key>-cert.pub` guess."""
    certificate = ["-o", f"CertificateFile={certificate_path}"] if certificate_path else []
    return [
        "-F",
        "/dev/null",
        "-i",
        key_path,
        *certificate,
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "IdentityAgent=none",
        "-o",
        "BatchMode=yes",
        "-o",
        "ExitOnForwardFailure=yes",
        "-o",
        f"ServerAliveInterval={SERVER_ALIVE_INTERVAL}",
        "-o",
        "ServerAliveCountMax=3",
        "-o",
        "ConnectTimeout=10",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"UserKnownHostsFile={known_hosts_path}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "UpdateHostKeys=no",
        "-o",
        "ControlMaster=no",
        "-o",
        "ControlPath=none",
        "-o",
        f"LogLevel={log_level}",
        "-p",
        str(_check_port(ssh_port, "ssh port")),
    ]


def ssh_argv_words(plan: TunnelPlan) -> list[str]:
    """The ssh command as shell words (quoted literals and the local-port expansions)."""
    q = shlex.quote
    options = tunnel_ssh_options(
        key_path=plan.key_path,
        known_hosts_path=plan.known_hosts_path,
        ssh_port=plan.ssh_port,
        certificate_path=plan.certificate_path,
    )
    words = ["ssh", "-N", "-T", *(q(word) for word in options)]
    for export in plan.exports:
        target = f"{plan.bind_address}:{_check_port(export.bridge_port, 'bridge port')}:127.0.0.1:"
        words += ["-R", q(target) + _local(export.local)]
    for imported in plan.imports:
        words += [
            "-L",
            "127.0.0.1:"
            + _local(imported.local)
            + q(f":{imported.host}:{_check_port(imported.port, 'port')}"),
        ]
    words += ["--", q(f"{plan.ssh_user}@{plan.host}")]
    return words


def render_tunnel(plan: TunnelPlan) -> list[str]:
    """Bash lines defining and starting the supervised tunnel in the background.

    Sets `chpc_tunnel_pid` (the restart loop); the current ssh's pid is in `plan.pid_file`. The
    loop waits 1 s after a tunnel that had run for a while, doubling up to MAX_RESTART_DELAY while
    attempts keep failing at once (a refused key, a port still held by the last connection).
    """
    if plan.empty:
        return []
    q = shlex.quote
    command = " \\\n      ".join(_pairs(ssh_argv_words(plan)))
    destination = q(f"{plan.ssh_user}@{plan.host}:{plan.ssh_port}")
    return [
        "# the bridges: one supervised ssh to the bridge VM (-R per exported port, -L per import)",
        "chpc_tunnel() {",
        "  local delay=1 started status",
        "  while :; do",
        "    started=$SECONDS",
        f"    {command} </dev/null &",
        f"    echo $! > {q(plan.pid_file)}",
        '    wait "$!"; status=$?',
        "    if [ $((SECONDS - started)) -ge 10 ]; then delay=1; fi",
        f'    echo "cloudhpc: bridge tunnel to "{destination}" ended (status $status); '
        'reconnecting in ${delay}s" >&2',
        '    sleep "$delay"',
        f'    if [ "$delay" -lt {MAX_RESTART_DELAY} ]; then delay=$((delay * 2)); fi',
        "  done",
        "}",
        "chpc_tunnel &",
        "chpc_tunnel_pid=$!",
    ]


def _pairs(words: list[str]) -> list[str]:
    """Keep each option with its value on one line, for a readable script."""
    lines: list[str] = []
    i = 0
    while i < len(words):
        if words[i] in ("-o", "-R", "-L", "-p", "-i", "-F") and i + 1 < len(words):
            lines.append(f"{words[i]} {words[i + 1]}")
            i += 2
        else:
            lines.append(words[i])
            i += 1
    # the leading `ssh -N -T` on one line
    head = " ".join(lines[:3])
    return [head, *lines[3:]]
