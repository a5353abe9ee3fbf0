"""The one long-lived SSH connection of a cluster: opened lazily, replaced when it is lost, closed.

Why one connection: HPC login nodes rate-limit and sometimes alert on new SSH logins, and a login
costs a key exchange plus PAM; one long-lived connection with many channels is what an interactive
user's ControlMaster does. sshd caps channels per connection (`MaxSessions`, 10 by default), so
concurrent commands wait on a semaphore sized from `ssh.max_channels`, one channel of which is kept
for the SFTP client.

`_Session` holds the connection and what rides on it; `commands.py` (exec channels) and `files.py`
(SFTP) build on it, and `connection.py` puts them together as `SSHConnection`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from pathlib import Path
from types import TracebackType
from typing import Self

import asyncssh

from cloudhpc.config import SSHConfig
from cloudhpc.exceptions import SSHError
from cloudhpc.hpc.ssh.errors import _is_transient, _translate_errors
from cloudhpc.hpc.ssh.keys import _Client, _Secret, agent_socket, check_known_hosts_file, load_key

# The package logs under one name, the one it had as a single module.
logger = logging.getLogger(__package__)

_CHANNEL_OPEN_TRIES = 6


class _Session:
    """One cluster's SSH connection, its keys and its channel budget; see `SSHConnection`."""

    def __init__(
        self,
        config: SSHConfig,
        *,
        cluster: str,
        passphrase: str | None,
        keepalive_count_max: int,
        connect_attempts: int,
        backoff_base: float,
        backoff_max: float,
    ) -> None:
        if connect_attempts < 1:
            raise ValueError("connect_attempts must be at least 1")
        self._config = config
        self.cluster = cluster
        self._passphrase = _Secret(passphrase) if passphrase is not None else None
        self._keepalive_count_max = keepalive_count_max
        self._connect_attempts = connect_attempts
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._known_hosts = (config.known_hosts or Path("~/.ssh/known_hosts")).expanduser()
        # One channel of max_channels is kept for the SFTP client, so runs never starve file access.
        self._run_slots = max(1, config.max_channels - 1)
        self._channels = asyncio.Semaphore(self._run_slots)
        self._connect_lock = asyncio.Lock()
        self._conn: asyncssh.SSHClientConnection | None = None
        # The SFTP client of the current connection: started by files.py, dropped with the connection.
        self._sftp_lock = asyncio.Lock()
        self._sftp: asyncssh.SFTPClient | None = None
        self._sftp_conn: asyncssh.SSHClientConnection | None = None
        self._key: asyncssh.SSHKey | None = None
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

    async def _load_key(self) -> asyncssh.SSHKey | None:
        """The configured key, decrypted once; None when the keys come from an ssh-agent."""
        if self._key is None:
            self._key = await load_key(self._config, self.cluster, self._passphrase)
        return self._key

    def _check_known_hosts_file(self) -> None:
        check_known_hosts_file(self._config, self._known_hosts, cluster=self.cluster, target=self._target)

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
                agent_path=None if key is not None else agent_socket(self._config, self.cluster),
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

    async def _pause_after_refusal(self, refusals: int) -> None:
        """Wait a little after sshd refused a channel.

        sshd frees a finished session only on its next loop turn, so a channel opened right after
        another closed can hit `MaxSessions` although we never exceed it; a short pause fixes that.
        """
        delay = random.uniform(0, min(1.0, 0.02 * 2**refusals))
        logger.debug("ssh[%s]: channel refused (%d); retrying in %.3fs", self.cluster, refusals, delay)
        await asyncio.sleep(delay)
