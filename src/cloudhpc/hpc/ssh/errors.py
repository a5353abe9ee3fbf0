"""asyncssh's and the socket's errors translated into ours, by one table, at one point.

Everything above this package sees only cloudhpc's exceptions. The table also says which errors
mean the connection is gone, so that a reconnect may help (`_is_transient`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import asyncssh

from cloudhpc.exceptions import HostKeyError, RemoteFileError, SSHConnectError, SSHError


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
