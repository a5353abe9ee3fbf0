"""Credentials and host keys: the private key (a file decrypted once, or an ssh-agent's keys), its
passphrase kept out of sight, and the known_hosts policy, with errors that say how to fix them.

Exactly one source of keys is used: the configured key file, or else the agent's keys alone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

import asyncssh

from cloudhpc.config import SSHConfig
from cloudhpc.exceptions import HostKeyError, SSHConnectError
from cloudhpc.hpc.ssh.errors import _translate_errors

if TYPE_CHECKING:
    from cloudhpc.hpc.ssh.session import _Session

__all__ = ["PASSPHRASE_ENV", "agent_socket", "check_known_hosts_file", "load_key", "read_passphrase"]

# The package logs under one name, the one it had as a single module.
logger = logging.getLogger(__package__)

PASSPHRASE_ENV = "CLOUDHPC_SSH_PASSPHRASE"  # noqa: S105 (the variable's name, not a secret)


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


def read_passphrase(config: SSHConfig, given: _Secret | None) -> tuple[_Secret | None, str]:
    """The passphrase and where it came from (for error messages; never the value itself)."""
    if given is not None:
        return given, "the passphrase argument"
    if config.passphrase is not None:
        return _Secret(config.passphrase.get_secret_value()), "ssh.passphrase"
    if config.passphrase_file is not None:
        path = config.passphrase_file.expanduser()
        text = path.read_text(encoding="utf-8")
        return _Secret(text.rstrip("\r\n")), f"ssh.passphrase_file ({path})"
    env = os.environ.get(PASSPHRASE_ENV)
    if env is not None:
        return _Secret(env), f"the {PASSPHRASE_ENV} environment variable"
    return None, "none given"


def agent_socket(config: SSHConfig, cluster: str) -> str:
    """The ssh-agent to sign with when no key file is configured (checked before connecting)."""
    socket = config.agent_socket or os.environ.get("SSH_AUTH_SOCK")
    if not socket:
        raise SSHConnectError(
            f"cluster {cluster}: no SSH key: set ssh.key_file, or run an ssh-agent holding the key "
            "and set ssh.agent_socket (or SSH_AUTH_SOCK)"
        )
    path = Path(socket).expanduser()
    if not path.is_socket():
        raise SSHConnectError(
            f"cluster {cluster}: the ssh-agent socket {path} does not exist: start the agent "
            "(`eval $(ssh-agent)`, then `ssh-add KEY`) or fix ssh.agent_socket / SSH_AUTH_SOCK"
        )
    return str(path)


async def load_key(config: SSHConfig, cluster: str, given: _Secret | None) -> asyncssh.SSHKey | None:
    """The configured key, decrypted; None when the keys come from an ssh-agent."""
    if config.key_file is None:
        agent_socket(config, cluster)  # a missing agent is a setup error: say so before any retrying
        return None
    key_file = config.key_file.expanduser()
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

    with _translate_errors(f"loading the key for cluster {cluster}", explain):
        secret, source = read_passphrase(config, given)
        # bcrypt key derivation takes a noticeable fraction of a second: keep it off the loop.
        key = await asyncio.to_thread(
            asyncssh.read_private_key, key_file, secret.reveal() if secret is not None else None
        )
    return key


def check_known_hosts_file(config: SSHConfig, path: Path, *, cluster: str, target: str) -> None:
    """Refuse to connect without a known_hosts file, unless trust on first use may create it."""
    if path.is_file():
        return
    if config.trust_on_first_use:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.touch(mode=0o600)
        return
    hint = _keyscan_hint(config.host, config.port, path)
    raise HostKeyError(
        f"connecting to {target} for cluster {cluster}: the known_hosts file {path} does not "
        f"exist, so the server's host key cannot be checked. Create it after verifying the fingerprint: "
        f"`{hint}` (or set ssh.known_hosts to the right file)"
    )


class _Client(asyncssh.SSHClient):
    """Decides about host keys asyncssh could not match, and reports a lost connection.

    asyncssh calls `validate_host_public_key` only for keys not already in the known_hosts file, so
    here we only tell "unknown" (no key recorded for this host) from "changed" (a different key is
    recorded), which need different advice, and apply trust-on-first-use to the unknown case only.
    """

    def __init__(self, owner: _Session) -> None:
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
