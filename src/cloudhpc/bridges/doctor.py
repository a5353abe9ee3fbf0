"""`cloudhpc doctor bridge-host`: check the bridge VM the way a job will use it, from porter's side.

The original setup guide had people edit sshd_config and authorized_keys by hand and hope. Every
check here is made with the system `ssh` client and the credentials a job gets, exactly as a job's
tunnel connects, and judged by what happens rather than by reading configuration files. With a
bridge CA (`porter.bridge.ca_key_file`) that is a short-lived test certificate, signed here for one
free port of the range as for a job; with the shared key, that key:

- the key or CA: readable, without a passphrase (jobs run unattended), and the host key pinned;
- with a CA, the bridge sshd trusts it (`cloudhpc bridge sshd-config`): the test certificate logs in;
- forwarding works: an `-R` on a free port of the range, reached from here at the address porter
  probes, carries bytes to a local echo server. That needs `AllowTcpForwarding` (yes or remote) and,
  for a non-loopback `bind_address`, `GatewayPorts clientspecified` (else sshd binds loopback only);
- the credentials are restricted: they cannot run a command, cannot listen outside the range (a
  certificate: nor on any port of the range but its own, which would be another job's), and cannot
  `-L` to a destination nobody allowed;
- the port range is free: no port of it answers, except those held by live jobs' bridges.

What it cannot see from here: whether the HPC site's NAT addresses may reach the VM's sshd (the
cloud security group). docs/bridge-vm.md says how to check that from a login node.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cloudhpc.bridges.certificates import BridgeCA
from cloudhpc.bridges.tunnel import tunnel_ssh_options
from cloudhpc.config import BridgeConfig
from cloudhpc.exceptions import ConfigError
from cloudhpc.private_files import open_private_file

__all__ = ["Check", "Login", "check_bridge_host", "public_key_of", "signed_login", "ssh_base_argv"]

SSH_TIMEOUT = 15.0
TEST_CERTIFICATE_LIFETIME = 300
"""Seconds the doctor's test certificate is valid: the checks take well under a minute."""


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Login:
    """The credentials the checks log in with: the shared key, or a test key and its certificate."""

    key: Path
    certificate: Path | None = None


def ssh_base_argv(config: BridgeConfig, login: Login) -> list[str]:
    """The job tunnel's ssh options (`tunnel_ssh_options`), with `login` and this machine's copy of
    known_hosts."""
    _, known_hosts = config.job_files()
    options = tunnel_ssh_options(
        key_path=str(login.key),
        known_hosts_path=str(known_hosts),
        ssh_port=config.ssh_port,
        certificate_path=str(login.certificate) if login.certificate else None,
        log_level="INFO",  # "administratively prohibited" (a refused -L) is an INFO message
    )
    return ["ssh", *options]


@contextlib.contextmanager
def signed_login(
    ca: BridgeCA, ports: Sequence[int], *, lifetime: int = TEST_CERTIFICATE_LIFETIME, expired: bool = False
) -> Iterator[Login]:
    """A key and certificate signed by `ca` for `ports` as for a job (a random job id), in a private
    temporary directory removed afterwards; `expired`: one whose validity ended a `lifetime` ago."""
    now = time.time() - 2 * lifetime if expired else None
    credentials = ca.issue(str(uuid.uuid4()), ports, lifetime, now=now)
    with tempfile.TemporaryDirectory(prefix="cloudhpc-doctor-") as tmp:
        key, certificate = Path(tmp) / "key", Path(tmp) / "key-cert.pub"
        for path, data in ((key, credentials.private_key), (certificate, credentials.certificate)):
            with os.fdopen(open_private_file(path, os.O_WRONLY | os.O_TRUNC), "wb") as handle:
                handle.write(data)
        yield Login(key, certificate)


def public_key_of(key_file: Path) -> str:
    """The public key line of an unencrypted private key (`ssh-keygen -y`); ValueError otherwise."""
    try:
        result = subprocess.run(
            ["ssh-keygen", "-y", "-P", "", "-f", str(key_file.expanduser())],
            capture_output=True,
            text=True,
            timeout=10,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise ValueError("ssh-keygen is not installed here (package openssh-client)") from exc
    if result.returncode != 0:
        raise ValueError(
            f"{key_file}: not an unencrypted private key ({result.stderr.strip() or 'ssh-keygen failed'}); "
            "the bridge key must have no passphrase, since jobs use it unattended"
        )
    return result.stdout.strip()


async def _run(argv: Sequence[str], timeout: float) -> tuple[int | None, str]:
    """Exit status (None: still running at `timeout`, then killed) and stderr."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
        return proc.returncode, err.decode(errors="replace").strip()
    except TimeoutError:
        proc.kill()
        _, err = await proc.communicate()
        return None, err.decode(errors="replace").strip()


async def _port_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class _Echo:
    """A one-shot TCP echo server on loopback: the far end of the test tunnel."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> int:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                writer.write(await reader.readexactly(16))
                await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def __aexit__(self, *exc: object) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def _free_local_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _round_trip(host: str, port: int) -> bool:
    payload = os.urandom(8).hex().encode()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2.0)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(payload)), 3.0) == payload
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False
    finally:
        writer.close()


async def _check_forwarding(config: BridgeConfig, login: Login, port: int) -> Check:
    """A real `-R` to a local echo server, reached from here where porter's probes connect."""
    destination = f"{config.ssh_user}@{config.host}"
    loopback = config.bind_address.startswith("127.") or config.bind_address in ("localhost", "::1")
    async with _Echo() as echo_port:
        argv = [
            *ssh_base_argv(config, login),
            "-N",
            "-R",
            f"{config.bind_address}:{port}:127.0.0.1:{echo_port}",
            destination,
        ]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            deadline = asyncio.get_running_loop().time() + SSH_TIMEOUT
            while asyncio.get_running_loop().time() < deadline:
                if proc.returncode is not None:
                    break
                if await _round_trip(config.public_host, port):
                    note = (
                        "GatewayPorts not needed (loopback bind_address)"
                        if loopback
                        else f"sshd honours the bind address {config.bind_address} (GatewayPorts clientspecified)"
                    )
                    return Check(
                        "forwarding",
                        True,
                        f"-R {config.bind_address}:{port} reached from here at {config.public_host}:{port}; {note}",
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 0.3)
        finally:
            if proc.returncode is None:
                proc.terminate()
            _, err = await proc.communicate()
    stderr = err.decode(errors="replace").strip()
    if proc.returncode not in (None, 0, -15) and stderr:
        hint = "sshd refused the forward: AllowTcpForwarding must be yes (or remote) and the key allowed to listen there"
        return Check("forwarding", False, f"ssh exited {proc.returncode}: {stderr[-300:]}; {hint}")
    hint = (
        "the tunnel came up but nothing arrived here: with a non-loopback bind_address, sshd needs "
        "`GatewayPorts clientspecified` (it bound loopback only), and a firewall must let porter reach the port"
    )
    return Check("forwarding", False, f"{config.public_host}:{port} carried no bytes; {hint}")


async def _check_ca_trusted(config: BridgeConfig, login: Login) -> Check:
    """A login with the test certificate: refused ("Permission denied") when the bridge sshd does not
    trust the CA for `ssh_user` or has no principals command that accepts cloudhpc's key ids."""
    status, err = await _run(
        [*ssh_base_argv(config, login), f"{config.ssh_user}@{config.host}", "true"], SSH_TIMEOUT
    )
    if status == 255 and "Permission denied" in err:
        return Check(
            "ca trusted",
            False,
            f"the bridge sshd refused a certificate signed by porter.bridge.ca_key_file for "
            f"{config.ssh_user}: add the lines `cloudhpc bridge sshd-config` prints to its sshd_config "
            "(with the CA public key of `cloudhpc bridge ca-public-key` in the file they name) and "
            "reload sshd (docs/bridge-vm.md)",
        )
    if status == 255:
        return Check("ca trusted", False, f"ssh could not log in: {err[-300:]}")
    return Check("ca trusted", True, f"a certificate signed by the CA logs in as {config.ssh_user}")


async def _check_no_command(config: BridgeConfig, login: Login) -> Check:
    status, _err = await _run(
        [*ssh_base_argv(config, login), f"{config.ssh_user}@{config.host}", "true"], SSH_TIMEOUT
    )
    if status == 0:
        fix = "`cloudhpc bridge sshd-config`" if login.certificate else "`cloudhpc bridge authorized-key`"
        return Check(
            "restricted: no command",
            False,
            f"the credentials can run commands on the bridge VM: restrict them with the line(s) of {fix}",
        )
    return Check("restricted: no command", True, f"a command is refused (ssh exited {status})")


async def _listen_refused(config: BridgeConfig, login: Login, port: int) -> bool:
    """Whether sshd refuses an `-R` on `port`, judged by what happens however slow the login (a
    certificate's login runs the principals command): ssh exits (ExitOnForwardFailure) when
    refused; the port starts answering at `public_host` when granted. Neither within SSH_TIMEOUT
    counts as granted, so a doubt is reported as a failure."""
    taken = await _port_answers(config.public_host, port)  # then only ssh's exit can tell
    argv = [*ssh_base_argv(config, login), "-N", "-R", f"{config.bind_address}:{port}:127.0.0.1:1"]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        f"{config.ssh_user}@{config.host}",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SSH_TIMEOUT
    try:
        while loop.time() < deadline:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 0.3)
            if proc.returncode is not None:
                return True
            if not taken and await _port_answers(config.public_host, port):
                return False
        return False
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


async def _check_listen_outside(config: BridgeConfig, login: Login, other: int | None) -> Check:
    """`-R` outside the range is refused; with a certificate, also on `other`, a free port of the
    range that is not the certificate's (another job's port)."""
    low, high = config.port_range
    outside = high + 1 if high < 65535 else low - 1
    if not await _listen_refused(config, login, outside):
        return Check(
            "restricted: listen",
            False,
            f"the credentials may listen on port {outside}, outside {low}-{high}: the "
            f"{'principals line' if login.certificate else 'authorized_keys line'} lacks permitlisten",
        )
    if login.certificate is None or other is None:
        return Check("restricted: listen", True, f"-R on port {outside} (outside the range) is refused")
    if not await _listen_refused(config, login, other):
        return Check(
            "restricted: listen",
            False,
            f"a certificate for one port may listen on port {other} of the range too (another job's "
            "port): AuthorizedPrincipalsCommand must be `cloudhpc bridge principals` (`cloudhpc bridge "
            "sshd-config`), and no authorized_keys line may trust the CA for all ports",
        )
    return Check(
        "restricted: listen",
        True,
        f"-R on port {outside} (outside the range) and on {other} (not the certificate's) are refused",
    )


async def _check_open_elsewhere(config: BridgeConfig, login: Login) -> Check:
    """-L to a destination nobody permitted: sshd must refuse the channel ("prohibited"),
    not try to connect (which would say "Connection refused")."""
    local = _free_local_port()
    argv = [
        *ssh_base_argv(config, login),
        "-N",
        "-L",
        f"127.0.0.1:{local}:127.0.0.1:2",
        f"{config.ssh_user}@{config.host}",
    ]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    err = bytearray()

    async def pump(stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(4096):
            err.extend(chunk)

    reader = asyncio.create_task(pump(proc.stderr))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SSH_TIMEOUT
    try:
        # each connection to the local end makes ssh ask sshd for the channel, however long the
        # login took; the answer is "open failed: administratively prohibited" (refused by policy)
        # or "open failed: connect failed" (sshd tried: not restricted)
        while loop.time() < deadline and b"open failed" not in err and proc.returncode is None:
            await _port_answers("127.0.0.1", local)
            await asyncio.sleep(0.3)
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()
        await reader
    stderr = err.decode(errors="replace")
    if "prohibited" in stderr:
        return Check("restricted: open", True, "-L to a destination not in permitopen is refused")
    return Check(
        "restricted: open",
        False,
        "-L to 127.0.0.1:2 was not refused by policy: the authorized_keys or principals line lacks permitopen",
    )


async def _check_range(config: BridgeConfig, held: set[int]) -> tuple[Check, list[int]]:
    low, high = config.port_range
    ports = [p for p in range(low, high + 1) if p not in held]
    answers = await asyncio.gather(*(_port_answers(config.public_host, p) for p in ports))
    busy = [p for p, a in zip(ports, answers, strict=True) if a]
    free = [p for p, a in zip(ports, answers, strict=True) if not a]
    detail = f"{len(free)} of {high - low + 1} ports free at {config.public_host}"
    if held:
        detail += f", {len(held)} held by live jobs"
    if busy:
        shown = ", ".join(map(str, busy[:10]))
        return Check("port range", False, f"{detail}; in use by something else: {shown}"), free
    return Check("port range", bool(free), detail), free


async def check_bridge_host(config: BridgeConfig, *, held: set[int] | None = None) -> list[Check]:
    """Every check, in order; later checks are skipped (reported failed) when the key is unusable."""
    checks: list[Check] = []
    try:
        key, known_hosts = config.job_files()
    except ConfigError as exc:
        return [Check("key", False, str(exc))]
    name = "ca" if config.uses_ca else "key"
    try:
        mode = stat.S_IMODE(key.stat().st_mode)
        public = BridgeCA.from_file(key).public_key if config.uses_ca else public_key_of(key)
    except (OSError, ValueError, ConfigError) as exc:
        return [Check(name, False, str(exc))]
    if mode & 0o077:
        checks.append(Check(name, False, f"{key} is mode {mode:o}: make it 0600 (chmod 600)"))
        return checks
    checks.append(Check(name, True, f"{key}: {public.split()[0]}, no passphrase, mode {mode:o}"))
    host = config.host if config.ssh_port == 22 else f"[{config.host}]:{config.ssh_port}"
    status, _ = await _run(["ssh-keygen", "-F", host, "-f", str(known_hosts)], 10.0)
    if status != 0:
        checks.append(
            Check(
                "host key", False, f"{config.known_hosts} has no key for {host}: ssh-keyscan it and check it"
            )
        )
        return checks
    checks.append(Check("host key", True, f"{host} pinned in {config.known_hosts}"))
    range_check, free = await _check_range(config, held or set())
    checks.append(range_check)
    if not free:
        return checks
    if not config.uses_ca:
        return checks + await _login_checks(config, Login(key), free[0], None)
    with signed_login(BridgeCA.from_file(key), [free[0]]) as login:
        trusted = await _check_ca_trusted(config, login)
        checks.append(trusted)
        if not trusted.ok:
            return checks
        return checks + await _login_checks(config, login, free[0], free[1] if len(free) > 1 else None)


async def _login_checks(config: BridgeConfig, login: Login, port: int, other: int | None) -> list[Check]:
    """Forwarding on `port`, then the restrictions (`other`: a port the credentials must not get)."""
    checks = [await _check_forwarding(config, login, port)]
    checks += await asyncio.gather(
        _check_no_command(config, login),
        _check_listen_outside(config, login, other),
        _check_open_elsewhere(config, login),
    )
    return checks
