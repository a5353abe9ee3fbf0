"""One multiplexed SSH connection per cluster: commands on exec channels, files over one SFTP client.

This is the only module that imports asyncssh. Everything above it sees `CommandRunner` /
`FileTransfer` and our own exceptions, so the transport can be swapped (or a site's quirks handled)
here alone.

Why one connection: HPC login nodes rate-limit and sometimes alert on new SSH logins, and a login
costs a key exchange plus PAM; one long-lived connection with many channels is what an interactive
user's ControlMaster does. sshd caps channels per connection (`MaxSessions`, 10 by default), so
concurrent commands wait on a semaphore sized from `ssh.max_channels`, one channel of which is kept
for the SFTP client.

Why the retry rules: a command whose connection died before we saw its exit status may or may not
have run. Re-running `squeue` is harmless; re-running `sbatch` could submit a job twice. So only
commands the caller marks `idempotent=True` are retried; for the others `SSHConnectError` tells the
caller to reconcile (look the job up) first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import posixpath
import random
import secrets
import shlex
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Literal, Self, TypeVar

import asyncssh

from cloudhpc.config import SSHConfig
from cloudhpc.domain.paths import resolve_path
from cloudhpc.exceptions import (
    CommandTimeout,
    HostKeyError,
    OutputTooLarge,
    RemoteFileError,
    SSHConnectError,
    SSHError,
)
from cloudhpc.hpc.backend import CommandResult

__all__ = [
    "DEFAULT_MAX_OUTPUT",
    "PASSPHRASE_ENV",
    "CommandHook",
    "Outcome",
    "SSHConnection",
    "build_command_line",
    "command_name",
]

logger = logging.getLogger(__name__)

Outcome = Literal["ok", "error", "timeout", "disconnect"]
CommandHook = Callable[[str, str, Outcome, float], None]
"""`on_command(cluster, command_name, outcome, seconds)`, called once per `run()` (for metrics)."""

DEFAULT_MAX_OUTPUT = 16 * 1024 * 1024
PASSPHRASE_ENV = "CLOUDHPC_SSH_PASSPHRASE"  # noqa: S105 (the variable's name, not a secret)
_READ_CHUNK = 64 * 1024
_COPY_CHUNK = 1024 * 1024
_CHANNEL_OPEN_TRIES = 6
_T = TypeVar("_T")


# --------------------------------------------------------------------------- command lines


def build_command_line(argv: Sequence[str], prelude: str = "") -> str:
    """The remote command line: the one place where an argument list becomes shell text.

    Every argument is quoted; `prelude` (trusted cluster configuration such as
    `source /appl/profile/zz-csc-env.sh`) is the only unquoted text and comes before it.
    """
    if isinstance(argv, str):
        raise TypeError("argv must be a sequence of arguments, not a string")
    if not argv:
        raise ValueError("argv must not be empty")
    for arg in argv:
        if not isinstance(arg, str):
            raise TypeError(f"every argument must be a str, got {type(arg).__name__}: {arg!r}")
        if "\0" in arg:
            # A NUL cannot travel in an SSH exec request; refusing beats silently truncating.
            raise ValueError(f"argument contains a NUL byte: {arg!r}")
    line = shlex.join(argv)
    return f"{prelude}\n{line}" if prelude else line


def command_name(argv: Sequence[str]) -> str:
    """The label used in logs and metrics: the basename of the program, looking through an `env`
    prefix (`env SLURM_TIME_FORMAT=%s squeue ...` is `squeue`), so metric labels stay meaningful."""
    words = list(argv)
    if words and posixpath.basename(words[0]) == "env":
        words = words[1:]
        while words and "=" in words[0] and not words[0].startswith("-"):
            words = words[1:]
    if not words:
        return "env" if argv else "?"
    return posixpath.basename(words[0]) or words[0]


# --------------------------------------------------------------------------- error translation


@dataclass(frozen=True)
class _ErrorRule:
    source: type[BaseException]
    target: type[SSHError]
    lost: bool
    """True when this error means the connection is gone (a reconnect may help)."""
    hint: str


_ERROR_TABLE: tuple[_ErrorRule, ...] = (
    # Most specific first: the first rule whose `source` matches wins.
    _ErrorRule(
        asyncssh.HostKeyNotVerifiable, HostKeyError, False, "the server's host key could not be verified"
    ),
    _ErrorRule(
        asyncssh.PermissionDenied,
        SSHConnectError,
        False,
        "the server refused our key: check ssh.user and ssh.key_file, and that the public key is registered"
        " on the cluster (~/.ssh/authorized_keys, or the site's portal where it manages keys, e.g. MyCSC)",
    ),
    _ErrorRule(asyncssh.KeyEncryptionError, SSHConnectError, False, "the private key could not be decrypted"),
    _ErrorRule(asyncssh.KeyImportError, SSHConnectError, False, "the private key could not be read"),
    _ErrorRule(asyncssh.ConnectionLost, SSHConnectError, True, "the connection was lost"),
    _ErrorRule(asyncssh.DisconnectError, SSHConnectError, True, "the server closed the connection"),
    _ErrorRule(asyncssh.ChannelOpenError, SSHConnectError, False, "the server refused to open a channel"),
    _ErrorRule(asyncssh.SFTPConnectionLost, SSHConnectError, True, "the connection was lost during SFTP"),
    _ErrorRule(asyncssh.SFTPNoConnection, SSHConnectError, True, "the SFTP session has no connection"),
    _ErrorRule(asyncssh.SFTPNoSuchFile, RemoteFileError, False, "no such file"),
    _ErrorRule(asyncssh.SFTPNoSuchPath, RemoteFileError, False, "no such path"),
    _ErrorRule(asyncssh.SFTPPermissionDenied, RemoteFileError, False, "permission denied"),
    _ErrorRule(asyncssh.SFTPError, RemoteFileError, False, "the SFTP server refused the operation"),
    _ErrorRule(asyncssh.Error, SSHError, False, "SSH error"),
    _ErrorRule(TimeoutError, SSHConnectError, True, "timed out"),
    _ErrorRule(OSError, SSHConnectError, True, "network error"),
)
_CAUGHT: tuple[type[BaseException], ...] = tuple(rule.source for rule in _ERROR_TABLE)


def _rule_for(exc: BaseException | None) -> _ErrorRule | None:
    if exc is None:
        return None
    for rule in _ERROR_TABLE:
        if isinstance(exc, rule.source):
            return rule
    return None


@contextlib.contextmanager
def _translate_errors(
    what: str, explain: Callable[[BaseException], str | None] | None = None
) -> Iterator[None]:
    """Turn asyncssh and socket errors into ours: the single translation point of this module.

    `what` says what we were doing ("running `squeue` on cluster mahti"); `explain` may replace the
    generic hint with a precise one (the host key fingerprint and how to fix it, for example).
    """
    try:
        yield
    except _CAUGHT as exc:
        rule = _rule_for(exc)
        assert rule is not None  # _CAUGHT is built from the table
        detail = explain(exc) if explain is not None else None
        message = f"{what}: {detail}" if detail else f"{what}: {rule.hint} ({type(exc).__name__}: {exc})"
        raise rule.target(message) from exc


def _is_transient(exc: SSHError) -> bool:
    """Whether a reconnect could help: never for host key or authentication problems."""
    if isinstance(exc, HostKeyError) or not isinstance(exc, SSHConnectError):
        return False
    rule = _rule_for(exc.__cause__)
    return rule is not None and rule.lost


# --------------------------------------------------------------------------- secrets and host keys


class _Secret:
    """Holds the key passphrase so that no repr, log line or traceback locals dump shows it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__


def _known_hosts_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def _keyscan_hint(host: str, port: int, known_hosts: Path) -> str:
    port_opt = "" if port == 22 else f"-p {port} "
    return f"ssh-keyscan {port_opt}{shlex.quote(host)} >> {shlex.quote(str(known_hosts))}"


class _Client(asyncssh.SSHClient):
    """Decides about host keys asyncssh could not match, and reports a lost connection.

    asyncssh calls `validate_host_public_key` only for keys not already in the known_hosts file, so
    here we only tell "unknown" (no key recorded for this host) from "changed" (a different key is
    recorded), which need different advice, and apply trust-on-first-use to the unknown case only.
    """

    def __init__(self, owner: SSHConnection) -> None:
        self._owner = owner
        self.problem: str | None = None

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        owner = self._owner
        path = owner._known_hosts
        fingerprint = key.get_fingerprint("sha256")
        recorded = asyncssh.match_known_hosts(str(path), host, addr, port if port != 22 else None)[0]
        name = _known_hosts_name(host, port)
        if recorded:
            self.problem = (
                f"the host key of {name} has CHANGED: the server offered {key.get_algorithm()} {fingerprint}, "
                f"which is not the key recorded in {path}. This can be a man-in-the-middle attack or a "
                f"reinstalled login node; ask the site which it is. If the site announced a new key, remove "
                f"the old one (`ssh-keygen -R {shlex.quote(name)} -f {shlex.quote(str(path))}`), then add the "
                f"new one after checking its fingerprint: `{_keyscan_hint(host, port, path)}`"
            )
            return False
        if owner._config.trust_on_first_use:
            entry = key.export_public_key("openssh").decode("ascii").split()
            line = f"{name} {entry[0]} {entry[1]}\n"
            with path.open("a", encoding="ascii") as file:
                file.write(line)
            logger.warning(
                "ssh[%s]: trusting unknown host key of %s on first use: %s %s (recorded in %s); "
                "verify this fingerprint with the site",
                owner.cluster,
                name,
                key.get_algorithm(),
                fingerprint,
                path,
            )
            return True
        self.problem = (
            f"the host key of {name} ({key.get_algorithm()} {fingerprint}) is not in {path}. Check this "
            f"fingerprint against the one the site publishes, then record it: `{_keyscan_hint(host, port, path)}` "
            f"(or set ssh.trust_on_first_use: true to record it on the first connection)"
        )
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._connection_lost(exc)


# --------------------------------------------------------------------------- the connection


class SSHConnection:
    """`CommandRunner` + `FileTransfer` for one cluster over one lazily opened SSH connection.

    Use as `async with SSHConnection(cfg, cluster="mahti") as ssh: await ssh.run([...])`, or call
    `close()` yourself. Safe to share between many concurrent tasks of one event loop.
    """

    def __init__(
        self,
        config: SSHConfig,
        *,
        cluster: str,
        passphrase: str | None = None,
        on_command: CommandHook | None = None,
        max_output: int = DEFAULT_MAX_OUTPUT,
        keepalive_count_max: int = 3,
        connect_attempts: int = 5,
        backoff_base: float = 0.2,
        backoff_max: float = 10.0,
    ) -> None:
        if max_output < 1:
            raise ValueError("max_output must be positive")
        if connect_attempts < 1:
            raise ValueError("connect_attempts must be at least 1")
        self._config = config
        self.cluster = cluster
        self._passphrase = _Secret(passphrase) if passphrase is not None else None
        self._on_command = on_command
        self._max_output = max_output
        self._keepalive_count_max = keepalive_count_max
        self._connect_attempts = connect_attempts
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._known_hosts = (config.known_hosts or Path("~/.ssh/known_hosts")).expanduser()
        # One channel of max_channels is kept for the SFTP client, so runs never starve file access.
        self._run_slots = max(1, config.max_channels - 1)
        self._channels = asyncio.Semaphore(self._run_slots)
        self._connect_lock = asyncio.Lock()
        self._sftp_lock = asyncio.Lock()
        self._conn: asyncssh.SSHClientConnection | None = None
        self._sftp: asyncssh.SFTPClient | None = None
        self._sftp_conn: asyncssh.SSHClientConnection | None = None
        self._key: asyncssh.SSHKey | None = None
        self._home: str | None = None
        self._lost = False
        self._generation = 0
        """Bumped by close(): work that fails because we closed the connection is not retried."""
        self._connect_count = 0
        self.reconnects = 0
        """How many times a lost connection was replaced by a new one."""

    # ---- lifecycle

    def __repr__(self) -> str:
        state = "connected" if self.connected else "idle"
        return f"SSHConnection(cluster={self.cluster!r}, target={self._target!r}, {state})"

    @property
    def _target(self) -> str:
        return f"{self._config.user}@{self._config.host}:{self._config.port}"

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the SFTP client and the connection; a later call opens a new one."""
        conn, sftp = self._conn, self._sftp
        self._conn = self._sftp = self._sftp_conn = None
        self._generation += 1
        self._lost = False
        if sftp is not None:
            sftp.exit()
        if conn is not None:
            conn.close()
            with contextlib.suppress(Exception):
                await conn.wait_closed()

    def _connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            logger.info("ssh[%s]: connection to %s lost: %s", self.cluster, self._target, exc)

    def _discard(self, conn: asyncssh.SSHClientConnection) -> None:
        """Forget a connection that died under us, so the next use opens (and counts) a new one."""
        if self._conn is conn:
            self._conn = None
            self._lost = True
        if self._sftp_conn is conn:
            self._sftp = self._sftp_conn = None
        conn.abort()

    # ---- connecting

    def _read_passphrase(self) -> tuple[_Secret | None, str]:
        """The passphrase and where it came from (for error messages; never the value itself)."""
        if self._passphrase is not None:
            return self._passphrase, "the passphrase argument"
        if self._config.passphrase is not None:
            return _Secret(self._config.passphrase.get_secret_value()), "ssh.passphrase"
        if self._config.passphrase_file is not None:
            path = self._config.passphrase_file.expanduser()
            text = path.read_text(encoding="utf-8")
            return _Secret(text.rstrip("\r\n")), f"ssh.passphrase_file ({path})"
        env = os.environ.get(PASSPHRASE_ENV)
        if env is not None:
            return _Secret(env), f"the {PASSPHRASE_ENV} environment variable"
        return None, "none given"

    def _agent_socket(self) -> str:
        """The ssh-agent to sign with when no key file is configured (checked before connecting)."""
        socket = self._config.agent_socket or os.environ.get("SSH_AUTH_SOCK")
        if not socket:
            raise SSHConnectError(
                f"cluster {self.cluster}: no SSH key: set ssh.key_file, or run an ssh-agent holding the key "
                "and set ssh.agent_socket (or SSH_AUTH_SOCK)"
            )
        path = Path(socket).expanduser()
        if not path.is_socket():
            raise SSHConnectError(
                f"cluster {self.cluster}: the ssh-agent socket {path} does not exist: start the agent "
                "(`eval $(ssh-agent)`, then `ssh-add KEY`) or fix ssh.agent_socket / SSH_AUTH_SOCK"
            )
        return str(path)

    async def _load_key(self) -> asyncssh.SSHKey | None:
        """The configured key, decrypted once; None when the keys come from an ssh-agent."""
        if self._key is not None:
            return self._key
        if self._config.key_file is None:
            self._agent_socket()  # a missing agent is a setup error: say so before any retrying
            return None
        key_file = self._config.key_file.expanduser()
        secret: _Secret | None = None
        source = "none given"

        def explain(exc: BaseException) -> str | None:
            if isinstance(exc, asyncssh.KeyEncryptionError):
                if "passphrase" in str(exc).lower():
                    return f"the passphrase for SSH key {key_file} is wrong (it came from {source})"
                return f"cannot decrypt SSH key {key_file}: {exc}"
            if isinstance(exc, asyncssh.KeyImportError):
                if secret is None and "passphrase" in str(exc).lower():
                    return (
                        f"SSH key {key_file} is encrypted and no passphrase was given: name a file holding it "
                        f"in ssh.passphrase_file or set {PASSPHRASE_ENV}"
                    )
                return f"cannot read SSH key {key_file}: {exc}"
            if isinstance(exc, OSError):
                what = "SSH key" if exc.filename in (None, str(key_file)) else "ssh.passphrase_file"
                return f"cannot read {what} {exc.filename or key_file}: {exc.strerror or exc}"
            return None

        with _translate_errors(f"loading the key for cluster {self.cluster}", explain):
            secret, source = self._read_passphrase()
            # bcrypt key derivation takes a noticeable fraction of a second: keep it off the loop.
            key = await asyncio.to_thread(
                asyncssh.read_private_key, key_file, secret.reveal() if secret is not None else None
            )
        self._key = key
        return key

    def _check_known_hosts_file(self) -> None:
        path = self._known_hosts
        if path.is_file():
            return
        if self._config.trust_on_first_use:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.touch(mode=0o600)
            return
        hint = _keyscan_hint(self._config.host, self._config.port, path)
        raise HostKeyError(
            f"connecting to {self._target} for cluster {self.cluster}: the known_hosts file {path} does not "
            f"exist, so the server's host key cannot be checked. Create it after verifying the fingerprint: "
            f"`{hint}` (or set ssh.known_hosts to the right file)"
        )

    async def _open_connection(self, key: asyncssh.SSHKey | None) -> asyncssh.SSHClientConnection:
        self._check_known_hosts_file()
        cfg = self._config
        client = _Client(self)

        def explain(exc: BaseException) -> str | None:
            if isinstance(exc, asyncssh.HostKeyNotVerifiable):
                return client.problem
            if isinstance(exc, TimeoutError):
                return f"no SSH session within ssh.connect_timeout={cfg.connect_timeout:g}s"
            if isinstance(exc, ConnectionRefusedError):
                return "connection refused: nothing listens there; check ssh.host and ssh.port"
            return None

        with _translate_errors(f"connecting to {self._target} for cluster {self.cluster}", explain):
            conn = await asyncssh.connect(
                cfg.host,
                cfg.port,
                username=cfg.user,
                client_factory=lambda: client,
                # exactly one source of keys: the configured file, or else the agent's keys alone
                client_keys=[key] if key is not None else (),
                agent_path=None if key is not None else self._agent_socket(),
                known_hosts=str(self._known_hosts),
                config=[],  # our settings alone decide; ~/.ssh/config could silently redirect
                password_auth=False,
                kbdint_auth=False,
                gss_auth=False,
                connect_timeout=cfg.connect_timeout,
                keepalive_interval=cfg.keepalive_interval,
                keepalive_count_max=self._keepalive_count_max,
            )
        return conn

    async def _connect_with_backoff(self) -> asyncssh.SSHClientConnection:
        key = await self._load_key()  # a key problem is never fixed by retrying: outside the loop
        attempt = 0
        while True:
            try:
                conn = await self._open_connection(key)
            except SSHError as exc:
                attempt += 1
                if not _is_transient(exc) or attempt >= self._connect_attempts:
                    raise
                # Full jitter: many agents reconnecting after a login node reboot must not stampede.
                delay = random.uniform(0, min(self._backoff_max, self._backoff_base * 2 ** (attempt - 1)))
                logger.warning(
                    "ssh[%s]: connect attempt %d/%d failed (%s); retrying in %.2fs",
                    self.cluster,
                    attempt,
                    self._connect_attempts,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            self._connect_count += 1
            if self._lost:
                self._lost = False
                self.reconnects += 1
                logger.info(
                    "ssh[%s]: reconnected to %s (reconnect #%d)", self.cluster, self._target, self.reconnects
                )
            else:
                logger.debug("ssh[%s]: connected to %s", self.cluster, self._target)
            self._conn = conn
            return conn

    async def _connection(self) -> asyncssh.SSHClientConnection:
        conn = self._conn
        if conn is not None and not conn.is_closed():
            return conn
        async with self._connect_lock:
            conn = self._conn
            if conn is not None:
                if not conn.is_closed():
                    return conn
                self._discard(conn)
            return await self._connect_with_backoff()

    # ---- commands

    async def run(
        self,
        argv: Sequence[str],
        *,
        stdin: str | None = None,
        timeout: float | None = None,
        idempotent: bool = False,
        prelude: str = "",
    ) -> CommandResult:
        """Run `argv` on the login node. A non-zero exit is a result, not an exception.

        `idempotent=True` allows one transparent retry on a new connection when the connection
        drops before the exit status arrives. `timeout` defaults to ssh.command_timeout.
        """
        command = build_command_line(argv, prelude)
        args = tuple(argv)
        name = command_name(args)
        budget = self._config.command_timeout if timeout is None else timeout
        started = time.monotonic()
        outcome: Outcome = "error"
        status: int | None = None
        try:
            async with self._channels:
                result = await self._run_retrying(args, command, stdin, budget, idempotent)
            status = result.exit_status
            outcome = "ok" if result.ok else "error"
            return result
        except CommandTimeout:
            outcome = "timeout"
            raise
        except SSHConnectError:
            outcome = "disconnect"
            raise
        finally:
            elapsed = time.monotonic() - started
            logger.debug(
                "ssh[%s]: %s -> %s in %.3fs",
                self.cluster,
                shlex.join(args),
                status if status is not None else outcome,
                elapsed,
            )
            if self._on_command is not None:
                try:
                    self._on_command(self.cluster, name, outcome, elapsed)
                except Exception:
                    logger.exception("ssh[%s]: on_command hook failed", self.cluster)

    async def _run_retrying(
        self, argv: tuple[str, ...], command: str, stdin: str | None, budget: float, idempotent: bool
    ) -> CommandResult:
        name = command_name(argv)
        generation = self._generation
        drops = refusals = 0
        while True:
            conn = await self._connection()
            try:
                return await self._run_once(conn, argv, command, stdin, budget)
            except SSHError as exc:
                if self._generation != generation:
                    raise  # close() was called meanwhile: do not open a new connection behind its back
                # A channel that never opened never carried the command: safe to retry for any command.
                never_sent = isinstance(exc.__cause__, asyncssh.ChannelOpenError)
                if never_sent and not conn.is_closed():
                    refusals += 1
                    if refusals >= _CHANNEL_OPEN_TRIES:
                        raise
                    await self._pause_after_refusal(refusals)
                    continue
                if not (_is_transient(exc) or (isinstance(exc, SSHConnectError) and conn.is_closed())):
                    raise
                self._discard(conn)
                if not (idempotent or never_sent):
                    raise SSHConnectError(
                        f"the connection to cluster {self.cluster} dropped while `{name}` was running; it may "
                        f"or may not have taken effect, so it was not retried: check its effect before running "
                        f"it again ({exc})"
                    ) from exc
                drops += 1
                if drops >= 2:
                    raise
                logger.info("ssh[%s]: connection dropped during `%s`; retrying it once", self.cluster, name)

    async def _pause_after_refusal(self, refusals: int) -> None:
        """Wait a little after sshd refused a channel.

        sshd frees a finished session only on its next loop turn, so a channel opened right after
        another closed can hit `MaxSessions` although we never exceed it; a short pause fixes that.
        """
        delay = random.uniform(0, min(1.0, 0.02 * 2**refusals))
        logger.debug("ssh[%s]: channel refused (%d); retrying in %.3fs", self.cluster, refusals, delay)
        await asyncio.sleep(delay)

    async def _run_once(
        self,
        conn: asyncssh.SSHClientConnection,
        argv: tuple[str, ...],
        command: str,
        stdin: str | None,
        budget: float,
    ) -> CommandResult:
        name = command_name(argv)
        proc: asyncssh.SSHClientProcess[bytes] | None = None
        finished = False
        try:
            async with asyncio.timeout(budget):
                with _translate_errors(f"running `{name}` on cluster {self.cluster}"):
                    proc = await conn.create_process(command, encoding=None)
                    if stdin:
                        proc.stdin.write(stdin.encode("utf-8"))
                    proc.stdin.write_eof()
                    stdout, stderr = await self._collect(proc, name)
                    await proc.wait_closed()
                    finished = True
                    status = proc.returncode
                    if status is None:
                        if conn.is_closed():
                            raise asyncssh.ConnectionLost("the channel closed without an exit status")
                        status = 255  # what OpenSSH's client reports when the server sends none
        except TimeoutError as exc:
            raise CommandTimeout(
                f"`{name}` on cluster {self.cluster} did not finish within {budget:g}s; its channel was closed"
            ) from exc
        finally:
            if proc is not None and not finished:
                # Ask sshd to signal the command (OpenSSH honours "signal" requests), then drop the
                # channel: without a pty, closing alone would leave it running on the login node.
                with contextlib.suppress(Exception):
                    proc.terminate()
                proc.close()
        return CommandResult(
            argv=argv,
            exit_status=status,
            stdout=stdout.decode("utf-8", errors="replace"),
            stderr=stderr.decode("utf-8", errors="replace"),
        )

    async def _collect(self, proc: asyncssh.SSHClientProcess[bytes], name: str) -> tuple[bytes, bytes]:
        """Both output streams, read concurrently (a full stderr pipe must not stall stdout), capped."""
        out, err = bytearray(), bytearray()
        total = 0

        async def drain(reader: asyncssh.SSHReader[bytes], sink: bytearray) -> None:
            nonlocal total
            while chunk := await reader.read(_READ_CHUNK):
                total += len(chunk)
                if total > self._max_output:
                    raise OutputTooLarge(
                        f"`{name}` on cluster {self.cluster} printed more than {self._max_output} bytes; "
                        f"its channel was closed"
                    )
                sink += chunk

        tasks = [asyncio.create_task(drain(proc.stdout, out)), asyncio.create_task(drain(proc.stderr, err))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return bytes(out), bytes(err)

    # ---- files

    async def _sftp_client(self, conn: asyncssh.SSHClientConnection) -> asyncssh.SFTPClient:
        async with self._sftp_lock:
            if self._sftp is not None and self._sftp_conn is conn:
                return self._sftp
            refusals = 0
            while True:
                try:
                    with _translate_errors(f"starting SFTP on cluster {self.cluster}"):
                        sftp = await conn.start_sftp_client()
                    break
                except SSHError as exc:
                    refusals += 1
                    refused = isinstance(exc.__cause__, asyncssh.ChannelOpenError) and not conn.is_closed()
                    if not refused or refusals >= _CHANNEL_OPEN_TRIES:
                        raise
                    await self._pause_after_refusal(refusals)
            self._sftp, self._sftp_conn = sftp, conn
            return sftp

    async def _sftp_op(self, what: str, op: Callable[[asyncssh.SFTPClient], Awaitable[_T]]) -> _T:
        """Run one SFTP operation, retried once on a new connection if the old one dropped.

        Every file operation here is idempotent (writes go to a fresh temporary name, then rename).
        """
        generation = self._generation
        for attempt in (1, 2):
            conn = await self._connection()
            try:
                sftp = await self._sftp_client(conn)
                with _translate_errors(f"{what} on cluster {self.cluster}"):
                    return await op(sftp)
            except SSHError as exc:
                if self._generation != generation:
                    raise
                dropped = _is_transient(exc) or (isinstance(exc, SSHConnectError) and conn.is_closed())
                if not dropped or attempt == 2:
                    raise
                self._discard(conn)
                logger.info("ssh[%s]: connection dropped during SFTP (%s); retrying once", self.cluster, what)
        raise AssertionError("unreachable")

    async def home(self) -> str:
        if self._home is None:
            self._home = await self._sftp_op("resolving the home directory", lambda sftp: sftp.realpath("."))
        return self._home

    async def _resolve(self, path: str) -> str:
        if not path:
            raise ValueError("remote path must not be empty")
        if path.startswith("/"):
            return path
        return resolve_path(path, await self.home())

    async def makedirs(self, path: str, *, mode: int = 0o700) -> None:
        full = await self._resolve(path)
        attrs = asyncssh.SFTPAttrs(permissions=mode)
        await self._sftp_op(
            f"creating directory {full!r}", lambda sftp: sftp.makedirs(full, attrs, exist_ok=True)
        )

    async def exists(self, path: str) -> bool:
        full = await self._resolve(path)
        return await self._sftp_op(f"checking {full!r}", lambda sftp: sftp.exists(full))

    async def size(self, path: str) -> int | None:
        full = await self._resolve(path)

        async def op(sftp: asyncssh.SFTPClient) -> int | None:
            try:
                attrs = await sftp.stat(full)
            except (asyncssh.SFTPNoSuchFile, asyncssh.SFTPNoSuchPath):
                return None
            return attrs.size

        return await self._sftp_op(f"checking the size of {full!r}", op)

    async def read_file(self, path: str, *, offset: int = 0, length: int | None = None) -> bytes:
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must not be negative")
        full = await self._resolve(path)

        async def op(sftp: asyncssh.SFTPClient) -> bytes:
            async with sftp.open(full, "rb") as file:
                end = (await file.stat()).size or 0
                count = end - offset if length is None else min(length, end - offset)
                if count <= 0:
                    return b""
                data: bytes = await file.read(count, offset)
                return data

        return await self._sftp_op(f"reading {full!r}", op)

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        full = await self._resolve(path)

        async def op(sftp: asyncssh.SFTPClient) -> None:
            async def fill(file: asyncssh.SFTPClientFile) -> None:
                await file.write(data)

            await self._write_atomic(sftp, full, mode, fill)

        await self._sftp_op(f"writing {full!r}", op)

    async def upload(self, local_path: str | os.PathLike[str], remote: str, *, mode: int = 0o644) -> int:
        """Copy a local file to `remote` atomically (temporary name, then rename); returns its size."""
        full = await self._resolve(remote)
        local = await asyncio.to_thread(Path(local_path).open, "rb")
        try:

            async def op(sftp: asyncssh.SFTPClient) -> int:
                copied = 0

                async def fill(file: asyncssh.SFTPClientFile) -> None:
                    nonlocal copied
                    copied = 0
                    local.seek(0)
                    while chunk := await asyncio.to_thread(local.read, _COPY_CHUNK):
                        await file.write(chunk)
                        copied += len(chunk)

                await self._write_atomic(sftp, full, mode, fill)
                return copied

            return await self._sftp_op(f"uploading to {full!r}", op)
        finally:
            local.close()

    async def download(self, remote: str, local_path: str | os.PathLike[str]) -> int:
        """Copy `remote` to a local file (written beside it, then renamed); returns its size."""
        full = await self._resolve(remote)
        target = Path(local_path)
        partial = target.with_name(f"{target.name}.tmp-{secrets.token_hex(4)}")
        local: IO[bytes] = await asyncio.to_thread(partial.open, "wb")
        write: Callable[[bytes], object] = local.write
        try:

            async def op(sftp: asyncssh.SFTPClient) -> int:
                local.seek(0)
                local.truncate()
                copied = 0
                async with sftp.open(full, "rb") as file:
                    while True:
                        chunk: bytes = await file.read(_COPY_CHUNK)
                        if not chunk:
                            break
                        await asyncio.to_thread(write, chunk)
                        copied += len(chunk)
                return copied

            copied = await self._sftp_op(f"downloading {full!r}", op)
            local.close()
            await asyncio.to_thread(os.replace, partial, target)
            return copied
        finally:
            local.close()
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()

    async def _write_atomic(
        self,
        sftp: asyncssh.SFTPClient,
        full: str,
        mode: int,
        fill: Callable[[asyncssh.SFTPClientFile], Awaitable[None]],
    ) -> None:
        """Readers (a job starting, a log tail) must never see half a file: write aside, then rename."""
        parent = posixpath.dirname(full)
        if parent and parent != "/":
            await sftp.makedirs(parent, asyncssh.SFTPAttrs(permissions=0o700), exist_ok=True)
        partial = f"{full}.tmp-{secrets.token_hex(6)}"
        try:
            async with sftp.open(partial, "wb", asyncssh.SFTPAttrs(permissions=mode)) as file:
                await fill(file)
            await sftp.chmod(partial, mode)  # the server's umask may have narrowed it
            try:
                await sftp.posix_rename(partial, full)
            except asyncssh.SFTPOpUnsupported:
                # Plain SFTP rename refuses to replace; not atomic, but only on servers without the
                # posix-rename extension (OpenSSH has it).
                with contextlib.suppress(asyncssh.SFTPNoSuchFile):
                    await sftp.remove(full)
                await sftp.rename(partial, full)
        except BaseException:
            with contextlib.suppress(Exception):
                await sftp.remove(partial)
            raise
