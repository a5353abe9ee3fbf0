"""OpenSSH user certificates signed by a CA key held in a file.

Here, beside the connection, because this package is the only one that imports asyncssh: the bridge
CA (`bridges/certificates.py`) decides what a certificate allows and for how long, and this module
turns that into a key pair and a signed certificate.
"""

from __future__ import annotations

import secrets

import asyncssh

__all__ = ["CertificateAuthority"]


class CertificateAuthority:
    """A CA private key (OpenSSH format, no passphrase) that signs user certificates."""

    def __init__(self, key: asyncssh.SSHKey) -> None:
        self._key = key

    @classmethod
    def from_bytes(cls, data: bytes) -> CertificateAuthority:
        """ValueError when `data` is not an OpenSSH private key without a passphrase (the message
        never quotes the data)."""
        try:
            return cls(asyncssh.import_private_key(data))
        except (asyncssh.KeyImportError, ValueError):
            raise ValueError("not an OpenSSH private key without a passphrase") from None

    @property
    def public_key(self) -> str:
        """The CA's public key line (for sshd's `TrustedUserCAKeys`)."""
        return self._key.export_public_key("openssh").decode().strip()

    @property
    def fingerprint(self) -> str:
        """`SHA256:...`, as `ssh-keygen -l` and sshd's log show it: safe to log."""
        return str(self._key.get_fingerprint("sha256"))

    def issue_forwarding_only(
        self, key_id: str, *, valid_after: int, valid_before: int, force_command: str
    ) -> tuple[bytes, bytes]:
        """(private key, certificate), OpenSSH formats: a fresh ed25519 key whose certificate has
        `key_id` as key id and sole principal, permits port forwarding and nothing else (no pty, no
        agent or X11 forwarding, no ~/.ssh/rc) and forces `force_command`."""
        user_key = asyncssh.generate_private_key("ssh-ed25519", comment=key_id)
        certificate = self._key.generate_user_certificate(
            user_key,
            key_id,
            serial=secrets.randbits(63),
            principals=[key_id],
            valid_after=valid_after,
            valid_before=valid_before,
            force_command=force_command,
            permit_x11_forwarding=False,
            permit_agent_forwarding=False,
            permit_port_forwarding=True,
            permit_pty=False,
            permit_user_rc=False,
            comment=key_id,
        )
        return user_key.export_private_key("openssh"), certificate.export_certificate("openssh")
