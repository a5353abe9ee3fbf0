"""The S3 mailbox's shared key: signatures on every object, encryption of secret values.

Whoever can write a mailbox prefix could otherwise make the agent run jobs with the HPC key, and
whoever can read it would see every user's environment values. porter and the agent of a cluster
share a secret (a file on each side, never in the bucket); from it HKDF derives two keys:

- a MAC key: every object is `HEADER hmac-sha256=<hex>\\n` + its body, the HMAC taken over the
  object's key and the body's exact bytes, so an object cannot be altered, nor copied or moved to
  another key (another cluster's mailbox, or a later stamp that a reader's cursor has not passed);
- an encryption key: AES-256-GCM for values that must not be readable in the bucket (a job's
  `env`), bound to where they belong (`context`) so that they cannot be swapped around either.

The secret is kept out of `repr`, logs and error messages; errors name the setting and the path.

A key file may hold more than one key, one per line, for a rotation without a stop: the first line
signs and encrypts, every line is accepted when opening and decrypting (docs/submitter.md, "Rotating
the key").
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets
import struct
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cloudhpc.exceptions import ConfigError

__all__ = [
    "CONTENT_TYPE",
    "HEADER",
    "KEYGEN_HINT",
    "MIN_SECRET_BYTES",
    "REASONS",
    "MailboxKey",
    "Reason",
    "Refused",
]

HEADER = b"cloudhpc-mailbox/1"
"""First word of every sealed object; a new protocol version gets a new header."""

CONTENT_TYPE = "text/plain; charset=utf-8"
"""A sealed object is text: the signature line, then JSON."""

MIN_SECRET_BYTES = 32

KEYGEN_HINT = (
    "create one with `(umask 077; openssl rand -base64 32 > FILE)`; porter and the cluster's agent "
    "need the same file (docs/submitter.md)"
)

Reason = Literal["unsigned", "bad_signature", "stale"]
REASONS: tuple[Reason, ...] = ("unsigned", "bad_signature", "stale")
"""Why an object was refused, as the refusal metrics label it: no (readable) signature; a
signature that does not match the bytes and the key (altered, moved, another key); authentic but
too old to act on (a replayed snapshot)."""

_NONCE_BYTES = 12

log = logging.getLogger(__name__)


class Refused(Exception):
    """An object the mailbox must not act on. Raised and caught inside the mailbox modules only;
    the message names the object key and never the secret or the object's contents."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason: Reason = reason


def _derive(secret: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"cloudhpc mailbox " + purpose).derive(
        secret
    )


class _Derived:
    """What one secret gives: its MAC key, its AEAD and its fingerprint."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"a mailbox key needs at least {MIN_SECRET_BYTES} bytes, not {len(secret)}")
        self.mac_key = _derive(secret, b"mac v1")
        self.aead = AESGCM(_derive(secret, b"env v1"))
        self.fingerprint = hashlib.sha256(_derive(secret, b"fingerprint v1")).hexdigest()[:12]


class MailboxKey:
    """`MailboxKey.from_file(path, setting="submitter.mailbox_key_file")`; `seal`/`open` objects,
    `encrypt`/`decrypt` values. The file holds at least 32 random bytes, base64 encoded, one key
    per line: the first signs and encrypts, the others (during a rotation) are accepted too."""

    def __init__(self, secret: bytes, *accepted: bytes) -> None:
        self._keys = [_Derived(secret), *(_Derived(other) for other in accepted)]
        self.fingerprint = self._keys[0].fingerprint
        """Says whether two sides hold the same key (logs, `repr`) without revealing it."""
        self.fingerprints = tuple(k.fingerprint for k in self._keys)
        """The signing key's fingerprint first, then those of the keys only accepted."""

    @classmethod
    def generate(cls) -> MailboxKey:
        return cls(secrets.token_bytes(MIN_SECRET_BYTES))

    @classmethod
    def from_file(cls, path: Path, *, setting: str) -> MailboxKey:
        """The key in `path`; `ConfigError` naming `setting` when it is missing, unreadable, not
        base64, or too short (the message never quotes the file)."""
        path = path.expanduser()
        try:
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:
            raise ConfigError(f"{setting}: {path} does not exist; {KEYGEN_HINT}") from None
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not base64 text"
            raise ConfigError(f"{setting}: cannot read {path} ({reason})") from None
        lines = [
            (number, line.strip())
            for number, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")
        ]
        if not lines:
            raise ConfigError(f"{setting}: {path} holds no key; {KEYGEN_HINT}")
        found: list[bytes] = []
        for number, line in lines:
            where = f"{path}" if len(lines) == 1 else f"{path} line {number}"
            try:
                secret = base64.b64decode(line, validate=True)
            except (binascii.Error, ValueError):
                raise ConfigError(f"{setting}: {where} is not base64; {KEYGEN_HINT}") from None
            if len(secret) < MIN_SECRET_BYTES:
                raise ConfigError(
                    f"{setting}: {where} holds {len(secret)} bytes, at least {MIN_SECRET_BYTES} are "
                    f"needed (one key per line); {KEYGEN_HINT}"
                )
            found.append(secret)
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            # A warning, not a refusal: a Kubernetes Secret volume is 0644 unless defaultMode says otherwise.
            log.warning(
                "%s: %s is readable by other users (mode %03o); make it 0600 (0400)", setting, path, mode
            )
        return cls(*found)

    def describe(self) -> str:
        """For the startup log line: the signing key's fingerprint, and the accepted ones."""
        if len(self.fingerprints) == 1:
            return self.fingerprint
        return f"{self.fingerprint} (also accepting {', '.join(self.fingerprints[1:])})"

    def __repr__(self) -> str:
        if len(self.fingerprints) == 1:
            return f"MailboxKey(fingerprint={self.fingerprint})"
        return f"MailboxKey(fingerprint={self.fingerprint}, accepts={list(self.fingerprints[1:])})"

    # ---- signatures ------------------------------------------------------------------------

    @staticmethod
    def _mac(derived: _Derived, key: str, body: bytes) -> str:
        name = key.encode()
        message = HEADER + b"\n" + struct.pack(">I", len(name)) + name + body
        return hmac.new(derived.mac_key, message, hashlib.sha256).hexdigest()

    def seal(self, key: str, body: bytes) -> bytes:
        """The object to store at `key`: a header line with the signature (by the first key), then
        `body` unchanged (still readable JSON for an operator: `tail -n +2`)."""
        return HEADER + b" hmac-sha256=" + self._mac(self._keys[0], key, body).encode() + b"\n" + body

    def open(self, key: str, data: bytes) -> bytes:
        """The body of the object read at `key`, or `Refused` when it is not signed for that key
        with one of this ring's keys."""
        head, newline, body = data.partition(b"\n")
        word, _, signature = head.partition(b" hmac-sha256=")
        if not newline or word != HEADER or len(signature) != 64:
            raise Refused("unsigned", f"{key} carries no mailbox signature")
        matches = [hmac.compare_digest(signature, self._mac(k, key, body).encode()) for k in self._keys]
        if not any(matches):
            raise Refused(
                "bad_signature",
                f"{key}: the signature does not match (altered, copied from another key, or signed "
                "with another mailbox key)",
            )
        return body

    # ---- secret values ---------------------------------------------------------------------

    def encrypt(self, value: str, context: str) -> str:
        """`value` encrypted (by the first key) and authenticated for `context` (where it belongs),
        as base64 text."""
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = self._keys[0].aead.encrypt(nonce, value.encode(), context.encode())
        return base64.b64encode(nonce + sealed).decode("ascii")

    def decrypt(self, token: str, context: str, *, key: str) -> str:
        """The value `encrypt` sealed for `context` with one of this ring's keys; `Refused` (naming
        the object `key`) otherwise."""
        try:
            raw = base64.b64decode(token, validate=True)
        except (binascii.Error, ValueError):
            raise Refused("bad_signature", f"{key}: an encrypted value does not open") from None
        for derived in self._keys:
            try:
                return derived.aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], context.encode()).decode()
            except (ValueError, InvalidTag, UnicodeDecodeError):
                continue
        raise Refused("bad_signature", f"{key}: an encrypted value does not open")
