"""Access to the multi-host topology started by `scripts/topology.sh up` (docs/testbed.md).

Hosts `laptop`, `cloud`, `login`, `c1`, `c2` are network namespaces (each with its own UTS namespace,
so its own host name) joined through a router namespace on 198.18.0.0/15; the root namespace, where
pytest runs, is the operator's console and reaches every host. Tests that need the topology take the
`topology` fixture. When it is missing they fail (never skip): `make test` brings it up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.testbed import read_env_file

ROOT = Path(__file__).resolve().parent.parent
ENV_FILE = ROOT / ".testbed" / "topology" / "env.sh"
HOST_NAMES = ("laptop", "cloud", "login", "c1", "c2")


@dataclass(frozen=True)
class Host:
    name: str
    addr: str
    netns: Path
    uts: Path

    def argv(self, *cmd: str) -> list[str]:
        """`cmd` run with this host's network and host name (nsenter; `ip netns exec` would remount
        /sys, which breaks slurmd)."""
        return ["nsenter", f"--net={self.netns}", f"--uts={self.uts}", "--", *cmd]


@dataclass(frozen=True)
class Topology:
    hosts: Mapping[str, Host]
    net: str
    operator_addr: str
    """The root namespace's address on its link to the router: reaches every host, reachable by none."""
    router_addrs: tuple[str, ...]
    hpc_nat_addr: str
    """What the cloud sees as the source of connections from login, c1 and c2."""
    laptop_nat_addr: str
    """What login and cloud see as the source of the laptop's delayed connections (the relay's address)."""
    delay_ms: float
    relay_pidfile: Path
    ssh_host: str
    ssh_port: int
    ssh_user: str
    ssh_key: Path
    known_hosts: Path
    """Pinned host keys of login:22 and cloud:22."""
    login_sshd_pidfile: Path
    slurm_conf: Path
    slurm_cluster: str
    partition: str
    slurm_nodes: tuple[str, ...]
    bridge_host: str
    bridge_port: int
    bridge_user: str
    bridge_key: Path
    bridge_bind_address: str
    bridge_port_range: tuple[int, int]
    cloud_sshd_pidfile: Path
    porter_port: int
    porter_url: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    s3_bucket: str
    pg_dsn: str
    mlflow_url: str
    mlflow_bucket: str
    prometheus_url: str
    prometheus_targets: Path

    @property
    def laptop(self) -> Host:
        return self.hosts["laptop"]

    @property
    def cloud(self) -> Host:
        return self.hosts["cloud"]

    @property
    def login(self) -> Host:
        return self.hosts["login"]

    def run(
        self,
        host: str,
        cmd: Sequence[str],
        *,
        timeout: float = 60,
        check: bool = True,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `cmd` on `host` (or in the root namespace for host "operator") and capture its output."""
        argv = list(cmd) if host == "operator" else self.hosts[host].argv(*cmd)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"{host}: {cmd} exited {proc.returncode}: {proc.stderr or proc.stdout}")
        return proc

    def popen(
        self, host: str, cmd: Sequence[str], *, env: Mapping[str, str] | None = None, **kwargs: object
    ) -> subprocess.Popen[bytes]:
        """Start a long-running `cmd` on `host` (porter on cloud, the submitter on the laptop...);
        the caller stops it by the returned handle."""
        argv = list(cmd) if host == "operator" else self.hosts[host].argv(*cmd)
        return subprocess.Popen(argv, env=dict(env) if env is not None else None, **kwargs)  # type: ignore[call-overload, no-any-return]

    def slurm_env(self) -> dict[str, str]:
        """The environment for SLURM commands on the operator's console against cluster `topo`."""
        return {**os.environ, "SLURM_CONF": str(self.slurm_conf)}

    def ssh_argv(self, *remote: str, key: Path | None = None) -> list[str]:
        """OpenSSH client argv to login:22 as the user, host key pinned (run it on a host with `run`)."""
        return [
            "ssh",
            "-i",
            str(key or self.ssh_key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "ConnectTimeout=10",
            "-p",
            str(self.ssh_port),
            f"{self.ssh_user}@{self.ssh_host}",
            *remote,
        ]

    def ssh(self, command: str, *, host: str = "laptop", timeout: float = 60) -> str:
        """Run `command` on login over ssh from `host` (the laptop by default: through the relay)."""
        return self.run(host, self.ssh_argv(command), timeout=timeout).stdout

    def probe(self, host: str, targets: Sequence[tuple[str, int]], timeout: float = 2.0) -> list[str]:
        """Try a TCP connection from `host` to each (addr, port): "open", "refused", "unreachable",
        "timeout" or another error name, in order."""
        code = (
            "import errno, json, socket, sys\n"
            "out = []\n"
            "for addr, port in json.loads(sys.argv[1]):\n"
            "    s = socket.socket(); s.settimeout(float(sys.argv[2]))\n"
            "    try:\n"
            "        s.connect((addr, port)); out.append('open')\n"
            "    except ConnectionRefusedError: out.append('refused')\n"
            "    except TimeoutError: out.append('timeout')\n"
            "    except OSError as e:\n"
            "        out.append('unreachable' if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH) else errno.errorcode.get(e.errno or 0, str(e)))\n"
            "    finally: s.close()\n"
            "print(json.dumps(out))\n"
        )
        argv = [sys.executable, "-c", code, json.dumps([list(t) for t in targets]), str(timeout)]
        proc = self.run(host, argv, timeout=timeout * len(targets) + 30)
        result: list[str] = json.loads(proc.stdout)
        return result


def read_topology_env(path: Path = ENV_FILE) -> dict[str, str]:
    return read_env_file(path)


def load_topology() -> Topology:
    if not ENV_FILE.exists():
        pytest.fail(
            f"the multi-host topology is not up ({ENV_FILE} is missing): run `make testbed-up` "
            "(or `scripts/testbed.sh up`, which runs `scripts/topology.sh up` at its end) first",
            pytrace=False,
        )
    # only the file: it describes what runs (TOPOLOGY_DELAY_MS in the environment of the tests would
    # not change the relay; `TOPOLOGY_DELAY_MS=0 scripts/topology.sh up` does)
    env = read_topology_env()
    netns_dir = Path(env["TOPOLOGY_NETNS_DIR"])
    uts_dir = Path(env["TOPOLOGY_UTS_DIR"])
    prefix = env["TOPOLOGY_NETNS_PREFIX"]
    hosts = {
        name: Host(name, env[f"TOPOLOGY_{name.upper()}_ADDR"], netns_dir / f"{prefix}{name}", uts_dir / name)
        for name in HOST_NAMES
    }
    missing = [str(p) for h in hosts.values() for p in (h.netns, h.uts) if not p.exists()]
    if missing:
        pytest.fail(
            f"the multi-host topology is down ({', '.join(missing)} missing): run `scripts/topology.sh up`",
            pytrace=False,
        )
    low, high = (int(x) for x in env["TOPOLOGY_BRIDGE_PORT_RANGE"].split())
    return Topology(
        hosts=hosts,
        net=env["TOPOLOGY_NET"],
        operator_addr=env["TOPOLOGY_OPERATOR_ADDR"],
        router_addrs=tuple(env["TOPOLOGY_ROUTER_ADDRS"].split()),
        hpc_nat_addr=env["TOPOLOGY_HPC_NAT_ADDR"],
        laptop_nat_addr=env["TOPOLOGY_LAPTOP_NAT_ADDR"],
        delay_ms=float(env["TOPOLOGY_DELAY_MS"]),
        relay_pidfile=Path(env["TOPOLOGY_RELAY_PIDFILE"]),
        ssh_host=env["TOPOLOGY_SSH_HOST"],
        ssh_port=int(env["TOPOLOGY_SSH_PORT"]),
        ssh_user=env["TOPOLOGY_SSH_USER"],
        ssh_key=Path(env["TOPOLOGY_SSH_KEY"]),
        known_hosts=Path(env["TOPOLOGY_KNOWN_HOSTS"]),
        login_sshd_pidfile=Path(env["TOPOLOGY_LOGIN_SSHD_PIDFILE"]),
        slurm_conf=Path(env["TOPOLOGY_SLURM_CONF"]),
        slurm_cluster=env["TOPOLOGY_SLURM_CLUSTER"],
        partition=env["TOPOLOGY_SLURM_PARTITION"],
        slurm_nodes=tuple(env["TOPOLOGY_SLURM_NODES"].split()),
        bridge_host=env["TOPOLOGY_BRIDGE_HOST"],
        bridge_port=int(env["TOPOLOGY_BRIDGE_PORT"]),
        bridge_user=env["TOPOLOGY_BRIDGE_USER"],
        bridge_key=Path(env["TOPOLOGY_BRIDGE_KEY"]),
        bridge_bind_address=env["TOPOLOGY_BRIDGE_BIND_ADDRESS"],
        bridge_port_range=(low, high),
        cloud_sshd_pidfile=Path(env["TOPOLOGY_CLOUD_SSHD_PIDFILE"]),
        porter_port=int(env["TOPOLOGY_PORTER_PORT"]),
        porter_url=env["TOPOLOGY_PORTER_URL"],
        s3_endpoint=env["TOPOLOGY_S3_ENDPOINT"],
        s3_access_key=env["TOPOLOGY_S3_ACCESS_KEY"],
        s3_secret_key=env["TOPOLOGY_S3_SECRET_KEY"],
        s3_bucket=env["TOPOLOGY_S3_BUCKET"],
        pg_dsn=env["TOPOLOGY_PG_DSN"],
        mlflow_url=env["TOPOLOGY_MLFLOW_URL"],
        mlflow_bucket=env["TOPOLOGY_MLFLOW_BUCKET"],
        prometheus_url=env["TOPOLOGY_PROMETHEUS_URL"],
        prometheus_targets=Path(env["TOPOLOGY_PROMETHEUS_TARGETS"]),
    )
