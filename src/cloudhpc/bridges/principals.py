"""The bridge sshd's side of per-job certificates: which ports a job's certificate may listen on.

OpenSSH certificates carry no `permitlisten`, so the bridge sshd asks
`cloudhpc bridge principals <key id>` (its `AuthorizedPrincipalsCommand`, token `%i`) at each
login with a certificate its `TrustedUserCAKeys` signed. The answer is one AuthorizedPrincipalsFile
line: the certificate's principal (the key id itself) preceded by `forwarding_options` for exactly
the ports named in the key id. A key id that is not cloudhpc's, or names a port outside
`port_range`, gets no line, and sshd refuses the login.

The command takes everything on its command line (what `sshd_config_lines` prints) and reads no
configuration file: the bridge VM needs cloudhpc installed, not porter's configuration.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from cloudhpc.bridges.authorized_key import forwarding_options, parse_permit_open
from cloudhpc.bridges.certificates import parse_key_id

__all__ = ["parse_port_range", "principals_line", "sshd_config_lines"]


def parse_port_range(value: str) -> tuple[int, int]:
    """`LOW-HIGH` as (low, high); ValueError naming the problem."""
    low, sep, high = value.partition("-")
    if not (sep and low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high) <= 65535):
        raise ValueError(f"{value!r} is not a port range LOW-HIGH (e.g. 19500-19599)")
    return int(low), int(high)


def principals_line(
    key_id: str, *, bind_address: str, port_range: tuple[int, int], permit_open: Sequence[str] = ()
) -> str:
    """The AuthorizedPrincipalsFile line for a certificate with `key_id`; ValueError when the key id
    must be refused (not cloudhpc's, or a port outside `port_range`)."""
    _job, ports = parse_key_id(key_id)
    low, high = port_range
    outside = [p for p in ports if not low <= p <= high]
    if outside:
        raise ValueError(f"{key_id!r}: port(s) {outside} outside the bridge range {low}-{high}")
    return f"{forwarding_options(bind_address, ports, permit_open)} {key_id}"


def sshd_config_lines(
    *,
    ssh_user: str,
    ca_public_key_file: str,
    cloudhpc: str,
    bind_address: str,
    port_range: tuple[int, int],
    permit_open: Sequence[str] = (),
    command_user: str = "nobody",
) -> list[str]:
    """The sshd_config block that makes the bridge sshd trust the CA for `ssh_user` only, each
    certificate restricted to its own ports. A `Match` block: it goes at the end of sshd_config."""
    low, high = port_range
    command = [
        cloudhpc,
        "bridge",
        "principals",
        "--bind-address",
        bind_address,
        "--port-range",
        f"{low}-{high}",
    ]
    for target in permit_open:
        command += ["--permit-open", parse_permit_open(target)]
    for word in (cloudhpc, ca_public_key_file, ssh_user, command_user, bind_address):
        if not word or any(c.isspace() or c in "\"'#%" for c in word):
            raise ValueError(f"{word!r}: sshd_config cannot hold this word (spaces, quotes, # or %)")
    if not cloudhpc.startswith("/") or not ca_public_key_file.startswith("/"):
        raise ValueError("sshd needs absolute paths for the cloudhpc command and the CA public key")
    return [
        "# cloudhpc bridges: per-job certificates signed by porter.bridge.ca_key_file, each allowed to",
        "# listen on its own job's ports only (`cloudhpc bridge sshd-config`; docs/bridge-vm.md)",
        f"Match User {ssh_user}",
        f"    TrustedUserCAKeys {ca_public_key_file}",
        f"    AuthorizedPrincipalsCommand {shlex.join(command)} %i",
        f"    AuthorizedPrincipalsCommandUser {command_user}",
    ]
