"""Per-job bridge credentials: a fresh key pair and a short-lived OpenSSH certificate for each job.

The shared bridge key let whoever held it (every job with bridges, so every user's code) listen on
any port of the bridge range, other jobs' ports included (issue 12). Instead, the side that stages
jobs holds a bridge CA (`porter.bridge.ca_key_file`) and signs, for each job with bridges, a key that
exists only in that job's directory, with:

- key id and sole principal `cloudhpc:<job id>:<port>,<port>` (or `-` when it exports nothing):
  the job and exactly the bridge ports porter allocated to it;
- validity from a few minutes ago (clock skew) to the job's wait in the queue
  (`porter.bridge.certificate_queue_time`) plus its time limit plus `MARGIN`;
- only the `permit-port-forwarding` extension, and `force-command /bin/false`.

OpenSSH certificates cannot say which ports a forward may listen on, so the bridge sshd does it:
`AuthorizedPrincipalsCommand` runs `cloudhpc bridge principals %i` (`bridges/principals.py`), which
turns the signed key id back into the `permitlisten` options of those ports only.

Why the submitter signs and not porter: the submitter already holds the bridge credentials and is
the only side that writes into a job's directory; with porter signing, certificates would have to
travel through the mailbox or the API to reach the job, and a porter compromise would gain nothing
it cannot already do (porter decides the ports). Keeping the CA key next to where the shared key was
moves no secret to a new place.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cloudhpc.exceptions import ConfigError

if TYPE_CHECKING:  # the SSH library is the server extra's: the light install's CLI imports this module
    from cloudhpc.hpc.ssh.certificates import CertificateAuthority

__all__ = [
    "CLOCK_SKEW",
    "MARGIN",
    "NO_TIME_LIMIT",
    "BridgeCA",
    "JobCredentials",
    "format_key_id",
    "job_lifetime",
    "parse_key_id",
]

log = logging.getLogger(__name__)

CLOCK_SKEW = 300
"""Seconds a certificate is valid before it was signed: the bridge VM's clock may run behind."""
MARGIN = 600
"""Seconds beyond the job's time limit: SLURM's KillWait and the tunnel's last reconnection."""
NO_TIME_LIMIT = 7 * 24 * 3600
"""The run time assumed for a job without a time limit (the partition's default applies, which the
submitter does not know): a week, after which the job's bridges are refused."""
KEY_ID_PREFIX = "cloudhpc"
MAX_PORTS = 64
"""Bridge ports one certificate may name: bounds the key id (and the principals line sshd parses)."""
_KEY_ID = re.compile(
    r"^cloudhpc:(?P<job>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}):"
    rf"(?P<ports>-|[0-9]{{1,5}}(?:,[0-9]{{1,5}}){{0,{MAX_PORTS - 1}}})$"
)


def format_key_id(job_id: str, ports: Sequence[int]) -> str:
    """`cloudhpc:<job id>:<port>,...` (`-` for no port); ValueError when `parse_key_id` would refuse
    it, so that no certificate is signed that the bridge sshd cannot read."""
    key_id = f"{KEY_ID_PREFIX}:{job_id}:{','.join(str(p) for p in sorted(ports)) or '-'}"
    parse_key_id(key_id)
    return key_id


def parse_key_id(key_id: str) -> tuple[str, tuple[int, ...]]:
    """(job id, ports) of a key id made by `format_key_id`; ValueError for anything else."""
    match = _KEY_ID.match(key_id)
    if match is None:
        raise ValueError(f"{key_id[:200]!r} is not a cloudhpc bridge key id (cloudhpc:<job id>:<ports>)")
    raw = match.group("ports")
    ports = () if raw == "-" else tuple(int(p) for p in raw.split(","))
    if not all(1 <= p <= 65535 for p in ports):
        raise ValueError(f"{key_id!r}: a port is outside 1-65535")
    return match.group("job"), ports


@dataclass(frozen=True)
class JobCredentials:
    """What one job receives: its private key and certificate (OpenSSH formats)."""

    key_id: str
    private_key: bytes
    certificate: bytes
    valid_before: int
    """Unix time at which the certificate expires."""

    def __repr__(self) -> str:  # never the private key, whatever logs the object
        return f"JobCredentials(key_id={self.key_id!r}, valid_before={self.valid_before})"


class BridgeCA:
    """The bridge CA's private key, read from `porter.bridge.ca_key_file`."""

    def __init__(self, authority: CertificateAuthority) -> None:
        self._ca = authority

    @classmethod
    def from_file(cls, path: Path, *, setting: str = "porter.bridge.ca_key_file") -> BridgeCA:
        """The CA in `path` (an OpenSSH private key without passphrase); `ConfigError` naming `setting`
        when it is missing or unreadable (the message never quotes the file)."""
        path = path.expanduser()
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(
                f"{setting}: {path} does not exist; create it with "
                f"`ssh-keygen -t ed25519 -N '' -C cloudhpc-bridge-ca -f {path}` (docs/bridge-vm.md)"
            ) from None
        except OSError as exc:
            raise ConfigError(f"{setting}: cannot read {path} ({exc.strerror or exc})") from None
        from cloudhpc.hpc.ssh.certificates import CertificateAuthority

        try:
            authority = CertificateAuthority.from_bytes(data)
        except ValueError:
            raise ConfigError(
                f"{setting}: {path} is not an OpenSSH private key without a passphrase"
            ) from None
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            # A warning, not a refusal: a Kubernetes Secret volume is 0644 unless defaultMode says otherwise.
            log.warning("%s: %s is readable by other users (mode %03o); make it 0600", setting, path, mode)
        return cls(authority)

    @property
    def public_key(self) -> str:
        """The line for the bridge sshd's `TrustedUserCAKeys` file."""
        return self._ca.public_key

    @property
    def fingerprint(self) -> str:
        """`SHA256:...`, as `ssh-keygen -l` and sshd's log show it: safe to log."""
        return self._ca.fingerprint

    def issue(
        self, job_id: str, ports: Sequence[int], lifetime: int, *, now: float | None = None
    ) -> JobCredentials:
        """A fresh ed25519 key and its certificate for `job_id`, allowing `ports`, valid for `lifetime`
        seconds from `now` (and `CLOCK_SKEW` before it)."""
        if lifetime <= 0:
            raise ValueError("a certificate's lifetime must be positive")
        key_id = format_key_id(job_id, ports)
        start = int(time.time() if now is None else now)
        valid_before = start + lifetime
        private_key, certificate = self._ca.issue_forwarding_only(
            key_id,
            valid_after=max(0, start - CLOCK_SKEW),
            valid_before=valid_before,
            force_command="/bin/false",
        )
        return JobCredentials(
            key_id=key_id,
            private_key=private_key,
            certificate=certificate,
            valid_before=valid_before,
        )


def job_lifetime(time_limit: int | None, queue_time: int) -> int:
    """Seconds a job's certificate is valid: its wait in the queue, its time limit (`NO_TIME_LIMIT`
    when it has none) and `MARGIN`."""
    return queue_time + (time_limit if time_limit is not None else NO_TIME_LIMIT) + MARGIN
