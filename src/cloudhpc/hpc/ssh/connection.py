"""`SSHConnection`: the session with its commands and its files, as the backends use it."""

from __future__ import annotations

from cloudhpc.config import SSHConfig
from cloudhpc.hpc.ssh.commands import DEFAULT_MAX_OUTPUT, CommandHook, _CommandChannels
from cloudhpc.hpc.ssh.files import _SftpFiles

__all__ = ["SSHConnection"]


class SSHConnection(_CommandChannels, _SftpFiles):
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
        super().__init__(
            config,
            cluster=cluster,
            passphrase=passphrase,
            keepalive_count_max=keepalive_count_max,
            connect_attempts=connect_attempts,
            backoff_base=backoff_base,
            backoff_max=backoff_max,
        )
        self._on_command = on_command
        self._max_output = max_output
        self._home = None
