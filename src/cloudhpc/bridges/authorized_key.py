"""The bridge key's line in the bridge VM's authorized_keys: forwarding only, to the bridge ports only.

`forwarding_options` is also what the bridge VM's sshd applies to a job's certificate
(`bridges/principals.py`), with the job's own ports instead of the whole range.

The shared bridge key (the mode for sites that cannot change sshd_config) travels with every job that has bridges (staged 0600 in the job directory on the
HPC side, deleted when the job ends), so it must be worth little if it leaks. The line that
authorizes it on the bridge VM allows exactly what a job needs:

- `restrict`: no pty, no agent or X11 forwarding, no ~/.ssh/rc, and no port forwarding...
- `port-forwarding`: ...except port forwarding, which the next options narrow down;
- `command="/bin/false"`: no shell and no command (the job's `ssh -N` runs none);
- `permitlisten="<bind_address>:<port>"` for each port of `porter.bridge.port_range`: `-R` may listen
  there and nowhere else;
- `permitopen="<host>:<port>"` for each cloud service jobs may import (`ray.import`): `-L` may reach
  those and nothing else. With none, `-L` is refused altogether.

Any holder of the shared key may listen on every port of the range, other jobs' ports included;
per-job certificates (`bridges/certificates.py`) do not have that weakness.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the principals command, run by sshd at each login, imports no configuration
    from cloudhpc.config import BridgeConfig

__all__ = ["NO_LISTEN", "authorized_key_line", "forwarding_options", "parse_permit_open"]

_HOST_PORT = re.compile(r"^(?P<host>[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]+\]):(?P<port>[0-9]{1,5})$")
_PUBLIC_KEY = re.compile(r"^(?P<type>(?:ssh|ecdsa|sk)-[a-z0-9@.-]+) (?P<blob>AAAA[A-Za-z0-9+/=]*)(?: .*)?$")
NO_DESTINATION = "127.0.0.1:1"
"""permitopen target when no import is allowed: OpenSSH has no `permitopen="none"`, and without any
permitopen every destination would be open, so the one destination is a closed port."""
NO_LISTEN = 1
"""permitlisten port when no listening is allowed (a job that only imports): likewise no
`permitlisten="none"`, and port 1 is privileged, so the bridge account cannot bind it."""


def parse_permit_open(value: str) -> str:
    """Check a `HOST:PORT` an import may reach; raises ValueError naming the problem."""
    match = _HOST_PORT.match(value.strip())
    if match is None or not 1 <= int(match.group("port")) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT (e.g. 10.0.0.5:5000 for MLflow)")
    return value.strip()


def forwarding_options(
    bind_address: str, listen_ports: Iterable[int], permit_open: Sequence[str] = ()
) -> str:
    """The key options (authorized_keys and AuthorizedPrincipalsFile syntax): port forwarding only,
    `-R` on `bind_address` at `listen_ports` only, `-L` to `permit_open` only, no command."""
    options = ["restrict", "port-forwarding", 'command="/bin/false"']
    ports = list(listen_ports) or [NO_LISTEN]
    options += [f'permitlisten="{bind_address}:{port}"' for port in ports]
    targets = [parse_permit_open(t) for t in permit_open] or [NO_DESTINATION]
    options += [f'permitopen="{target}"' for target in targets]
    return ",".join(options)


def authorized_key_line(public_key: str, config: BridgeConfig, permit_open: Sequence[str] = ()) -> str:
    """The authorized_keys line for `public_key` (an OpenSSH public key line): every port of the range."""
    match = _PUBLIC_KEY.match(public_key.strip())
    if match is None:
        raise ValueError("not an OpenSSH public key line (expected `ssh-ed25519 AAAA... comment`)")
    low, high = config.port_range
    options = forwarding_options(config.bind_address, range(low, high + 1), permit_open)
    return f"{options} {match.group('type')} {match.group('blob')} cloudhpc-bridge"
