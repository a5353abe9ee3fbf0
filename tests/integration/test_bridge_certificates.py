"""Per-job bridge certificates against the testbed's sshd (the bridge VM of the tests), which trusts
the testbed's bridge CA for the bridge account through `cloudhpc bridge principals`.

Every connection is the system `ssh` with the options a job's tunnel uses (`ssh_base_argv`), and a
certificate made as the submitter makes it for a job (`BridgeCA.issue`, through `signed_login`).
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cloudhpc.bridges.certificates import BridgeCA
from cloudhpc.bridges.doctor import Login, signed_login, ssh_base_argv
from cloudhpc.cli.main import app
from cloudhpc.config import BridgeConfig
from tests.integration.test_bridge_cli import config_with_bridge
from tests.testbed import ROOT, Testbed, read_env_file
from tests.topology import Topology

runner = CliRunner()


def bridge_env() -> dict[str, str]:
    return {**read_env_file(), **{k: v for k, v in os.environ.items() if k.startswith("TESTBED_")}}


@pytest.fixture
def ca_key(testbed: Testbed) -> Path:
    path = bridge_env().get("TESTBED_BRIDGE_CA_KEY")
    if not path or not Path(path).is_file():
        pytest.fail("the testbed has no bridge CA: restart it (scripts/testbed.sh up)", pytrace=False)
    return Path(path)


@pytest.fixture
def bridge(testbed: Testbed, ca_key: Path) -> BridgeConfig:
    low, high = (int(p) for p in bridge_env()["TESTBED_BRIDGE_PORT_RANGE"].split())
    return BridgeConfig(
        host=testbed.ssh_host,
        ssh_user=testbed.ssh_user,
        ssh_port=testbed.ssh_port,
        ca_key_file=ca_key,
        known_hosts=testbed.known_hosts,
        bind_address="127.0.0.1",
        port_range=(low, high),
    )


def answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def free_ports(bridge: BridgeConfig, count: int) -> list[int]:
    """Ports of the range nothing listens on, from the top (live jobs take them from the bottom)."""
    low, high = bridge.port_range
    ports = [p for p in range(high, low - 1, -1) if not answers(p)][:count]
    assert len(ports) == count, "the bridge range is full"
    return ports


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(self.request.recv(64))


@pytest.fixture
def echo() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def ssh(bridge: BridgeConfig, login: Login, *args: str) -> list[str]:
    return [*ssh_base_argv(bridge, login), *args, f"{bridge.ssh_user}@{bridge.host}"]


def listen(bridge: BridgeConfig, login: Login, port: int, echo: int, timeout: float = 20.0) -> str | None:
    """None when `-R port` carried bytes to the echo server; else ssh's error output (the forward
    was refused, or the login was)."""
    argv = ssh(bridge, login, "-N", "-R", f"127.0.0.1:{port}:127.0.0.1:{echo}")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(b"ping-through-the-tunnel")
                    if sock.recv(64) == b"ping-through-the-tunnel":
                        return None
            except OSError:
                time.sleep(0.2)
        assert proc.poll() is not None, f"-R {port}: ssh neither forwarded nor failed in {timeout}s"
    finally:
        if proc.poll() is None:
            proc.terminate()
        _, err = proc.communicate(timeout=10)
    return err.decode(errors="replace")


def test_a_jobs_certificate_listens_on_its_own_ports_only(
    bridge: BridgeConfig, ca_key: Path, echo: int
) -> None:
    own, other_job, also_own = free_ports(bridge, 3)
    ca = BridgeCA.from_file(ca_key)
    with signed_login(ca, [own, also_own]) as login:
        assert listen(bridge, login, own, echo) is None
        assert listen(bridge, login, also_own, echo) is None
        # another job's port of the range, and a port outside it: refused by sshd
        refused = listen(bridge, login, other_job, echo)
        assert refused is not None
        assert f"remote port forwarding failed for listen port {other_job}" in refused
        outside = bridge.port_range[1] + 1
        refused = listen(bridge, login, outside, echo)
        assert refused is not None
        assert f"listen port {outside}" in refused
        # no command
        status = subprocess.run([*ssh(bridge, login), "id"], capture_output=True, timeout=20)
        assert status.returncode != 0
        assert b"uid=" not in status.stdout
    # the other job's own certificate does get its port
    with signed_login(ca, [other_job]) as login:
        assert listen(bridge, login, other_job, echo) is None


def logs_in(bridge: BridgeConfig, login: Login) -> bool:
    """Whether sshd accepts the login (its forced /bin/false then exits 1; a refusal is ssh's 255)."""
    result = subprocess.run(
        [*ssh(bridge, login), "true"], capture_output=True, timeout=20, stdin=subprocess.DEVNULL
    )
    return result.returncode != 255


def refused_login(bridge: BridgeConfig, login: Login) -> str:
    result = subprocess.run(
        ssh(bridge, login, "-N"), capture_output=True, timeout=20, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 255, result
    return result.stderr.decode(errors="replace")


def test_an_expired_certificate_is_refused(bridge: BridgeConfig, ca_key: Path) -> None:
    (port,) = free_ports(bridge, 1)
    ca = BridgeCA.from_file(ca_key)
    with signed_login(ca, [port], lifetime=60) as login:
        assert logs_in(bridge, login)  # the same certificate, still valid
    with signed_login(ca, [port], lifetime=60, expired=True) as login:
        assert "Permission denied" in refused_login(bridge, login)


def test_a_certificate_of_another_ca_is_refused(bridge: BridgeConfig, ca_key: Path, tmp_path: Path) -> None:
    other = tmp_path / "other_ca"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    (port,) = free_ports(bridge, 1)
    with signed_login(BridgeCA.from_file(ca_key), [port]) as login:
        assert logs_in(bridge, login)  # the same certificate from the bridge CA
    with signed_login(BridgeCA.from_file(other), [port]) as login:
        assert "Permission denied" in refused_login(bridge, login)


def test_a_certificate_naming_ports_outside_the_range_is_refused(bridge: BridgeConfig, ca_key: Path) -> None:
    """Even the CA cannot widen the range: the principals command refuses the key id."""
    outside = bridge.port_range[1] + 1
    ca = BridgeCA.from_file(ca_key)
    (inside,) = free_ports(bridge, 1)
    with signed_login(ca, [inside]) as login:
        assert logs_in(bridge, login)
    with signed_login(ca, [inside, outside]) as login:
        assert "Permission denied" in refused_login(bridge, login)


def test_doctor_passes_with_the_ca(tmp_path: Path, testbed: Testbed, ca_key: Path) -> None:
    config = config_with_bridge(tmp_path, testbed, ca_key_file=str(ca_key))
    result = runner.invoke(app, ["doctor", "bridge-host", "--config", str(config), "-o", "json"])
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    assert set(checks) == {
        "ca", "host key", "port range", "ca trusted", "forwarding", "restricted: no command",
        "restricted: listen", "restricted: open",
    }  # fmt: skip
    assert result.exit_code == 0, result.stdout
    assert "not the certificate's" in checks["restricted: listen"]["detail"]


def test_doctor_says_what_to_do_when_the_sshd_does_not_trust_the_ca(tmp_path: Path, testbed: Testbed) -> None:
    other = tmp_path / "other_ca"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    config = config_with_bridge(tmp_path, testbed, ca_key_file=str(other))
    result = runner.invoke(app, ["doctor", "bridge-host", "--config", str(config), "-o", "json"])
    assert result.exit_code == 1
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    assert checks["ca"]["ok"]
    assert checks["host key"]["ok"]
    assert not checks["ca trusted"]["ok"]
    assert "cloudhpc bridge sshd-config" in checks["ca trusted"]["detail"]
    assert "forwarding" not in checks  # nothing more to check with a refused certificate


def assert_installed_block_is_printed(sshd_config: Path, user: str, config: Path, imports: list[str]) -> None:
    """The `Match User` block ending `sshd_config` is what `cloudhpc bridge sshd-config` prints
    (comments aside) for `config` and `imports`, with the installed paths and command user; and the
    CA public key installed is the configured CA's."""
    installed = sshd_config.read_text().splitlines()
    block = installed[installed.index(f"Match User {user}") :]
    (command,) = [line.split()[1] for line in block if "AuthorizedPrincipalsCommand " in line]
    (command_user,) = [line.split()[1] for line in block if "AuthorizedPrincipalsCommandUser" in line]
    (ca_public,) = [line.split()[1] for line in block if "TrustedUserCAKeys" in line]
    argv = ["bridge", "sshd-config", "--config", str(config), "--ca-public-key-file", ca_public]
    argv += ["--cloudhpc", command, "--command-user", command_user]
    for target in imports:
        argv += ["--permit-open", target]
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert [line for line in result.stdout.splitlines() if not line.startswith("#")] == block
    public = runner.invoke(app, ["bridge", "ca-public-key", "--config", str(config)])
    assert public.stdout.split()[:2] == Path(ca_public).read_text().split()[:2]


def test_sshd_config_is_the_block_the_testbed_installed(
    tmp_path: Path, testbed: Testbed, ca_key: Path
) -> None:
    """The testbed's sshd trusts the CA with the block the CLI prints, the S3 and MLflow servers as imports."""
    sshd_config = bridge_env().get("TESTBED_SSHD_CONFIG", str(ROOT / ".testbed" / "sshd" / "sshd_config"))
    imports = [f"127.0.0.1:{url.rsplit(':', 1)[1]}" for url in (testbed.s3_endpoint, testbed.mlflow_url)]
    config = config_with_bridge(tmp_path, testbed, ca_key_file=str(ca_key))
    assert_installed_block_is_printed(Path(sshd_config), testbed.ssh_user, config, imports)


def test_the_topologys_bridge_vm_trusts_the_ca_with_the_block_the_cli_prints(
    topology: Topology, tmp_path: Path
) -> None:
    """cloud's sshd (the topology's bridge VM), for its bind address and imports (MLflow, S3)."""
    low, high = topology.bridge_port_range
    bridge = {
        "host": topology.bridge_host,
        "ssh_user": topology.bridge_user,
        "ssh_port": topology.bridge_port,
        "ca_key_file": str(topology.bridge_key.with_name("bridge_ca")),
        "known_hosts": str(topology.known_hosts),
        "bind_address": topology.bridge_bind_address,
        "port_range": [low, high],
    }
    config = tmp_path / "cloudhpc.yaml"
    config.write_text(json.dumps({"porter": {"bridge": bridge}}))  # JSON is YAML
    cloud = topology.cloud.addr
    sshd_config = ROOT / ".testbed" / "topology" / "cloud-sshd" / "sshd_config"
    assert_installed_block_is_printed(
        sshd_config, topology.bridge_user, config, [f"{cloud}:5000", f"{cloud}:9000"]
    )
