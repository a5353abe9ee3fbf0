"""One multiplexed SSH connection per cluster: commands on exec channels, files over one SFTP client.

This is the only package that imports asyncssh. Everything above it sees `CommandRunner` /
`FileTransfer` and our own exceptions, so the transport can be swapped (or a site's quirks handled)
here alone.

- `command_line.py`: the one place where an argument list becomes shell text;
- `errors.py`: asyncssh's errors translated into ours, by one table;
- `keys.py`: the private key, its passphrase, the ssh-agent and the known_hosts policy;
- `session.py`: the one connection, opened lazily and replaced when lost (why one: see there);
- `commands.py`: commands on exec channels, and why only idempotent ones are retried;
- `files.py`: files over SFTP, written atomically;
- `connection.py`: `SSHConnection`, the session with its commands and files.

The names below are the package's interface; import them from `cloudhpc.hpc.ssh`.
"""

from cloudhpc.hpc.ssh.command_line import build_command_line, command_name
from cloudhpc.hpc.ssh.commands import DEFAULT_MAX_OUTPUT, CommandHook, Outcome
from cloudhpc.hpc.ssh.connection import SSHConnection
from cloudhpc.hpc.ssh.keys import PASSPHRASE_ENV

__all__ = [
    "DEFAULT_MAX_OUTPUT",
    "PASSPHRASE_ENV",
    "CommandHook",
    "Outcome",
    "SSHConnection",
    "build_command_line",
    "command_name",
]
