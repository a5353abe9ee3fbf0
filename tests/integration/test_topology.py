"""The multi-host topology (scripts/topology.sh) for real: namespaces, SLURM across two network hosts,
the sshds, the firewalls, the delaying relay and a bridge's reverse tunnel. No mocks.

The test process runs in the root namespace (the operator's console); every client that matters runs
inside a host's namespace with nsenter, as that host would run it.
"""

from __future__ import annotations

import contextlib
import json
import random
import shlex
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.topology import Topology

ROOT = Path(__file__).resolve().parents[2]

# A TCP server for the tests: to each connection it first sends the peer's address and a newline,
# then echoes whatever it receives.
ECHO_SERVER = """
import socket, sys, threading
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
def serve(c, peer):
    with c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.sendall(peer[0].encode() + b"\\n")
        while data := c.recv(65536):
            c.sendall(data)
while True:
    c, peer = srv.accept()
    threading.Thread(target=serve, args=(c, peer), daemon=True).start()
"""

# Measures, from where it runs, the time of N one-byte round trips over one TCP connection (after the
# server's first line), and for an sshd the time from sending the client's banner to the server's
# first answer (a full round trip: sshd reads the client's banner before it sends KEXINIT).
RTT_PROBE = """
import json, socket, statistics, sys, time
mode, addr, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
out = {}
t0 = time.perf_counter()
s = socket.create_connection((addr, port), timeout=10)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
f = s.makefile("rb")
first = f.readline()
out["first_line_ms"] = (time.perf_counter() - t0) * 1000
out["first_line"] = first.decode(errors="replace").strip()
if mode == "echo":
    rtts = []
    for _ in range(n):
        t = time.perf_counter()
        s.sendall(b"x")
        assert f.read(1) == b"x"
        rtts.append((time.perf_counter() - t) * 1000)
    out["rtt_ms"] = rtts
else:
    t = time.perf_counter()
    s.sendall(b"SSH-2.0-topology-probe\\r\\n")
    assert s.recv(1)
    out["rtt_ms"] = [(time.perf_counter() - t) * 1000]
s.close()
print(json.dumps(out))
"""


@contextlib.contextmanager
def echo_server(topology: Topology, host: str, addr: str, port: int) -> Iterator[None]:
    """The echo server on `host` at addr:port while the block runs ("operator": the root namespace)."""
    argv = [sys.executable, "-c", ECHO_SERVER, addr, str(port)]
    if host != "operator":
        argv = topology.hosts[host].argv(*argv)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", (
            f"echo server on {host} {addr}:{port} did not start: {proc.stderr.read() if proc.stderr else ''}"
        )
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def rtt(
    topology: Topology, host: str, mode: str, addr: str, port: int, n: int = 20
) -> tuple[str, float, list[float]]:
    """(the server's first line, ms from connect() to it, the round-trip times in ms) measured from
    `host` (see RTT_PROBE)."""
    out = topology.run(host, [sys.executable, "-c", RTT_PROBE, mode, addr, str(port), str(n)], timeout=60)
    result = json.loads(out.stdout)
    return str(result["first_line"]), float(result["first_line_ms"]), [float(x) for x in result["rtt_ms"]]


def free_port(topology: Topology, host: str, low: int, high: int) -> int:
    """A port in [low, high] nothing listens on at `host`'s address (checked from `host`)."""
    addr = topology.hosts[host].addr
    for _ in range(50):
        port = random.randint(low, high)
        if topology.probe(host, [(addr, port)])[0] != "open":
            return port
    raise AssertionError(f"no free port in {low}-{high} on {host}")


@pytest.fixture(scope="module")
def porter_stand_in(topology: Topology) -> Iterator[None]:
    """Something listening where porter listens on cloud (the tests that start porter come later)."""
    port = topology.porter_port
    if topology.probe("operator", [(topology.cloud.addr, port)])[0] == "open":
        pytest.fail(f"cloud {topology.cloud.addr}:{port} is taken: a porter left running in the topology?")
    with echo_server(topology, "cloud", topology.cloud.addr, port):
        yield


@pytest.fixture(scope="module")
def laptop_listener(topology: Topology) -> Iterator[int]:
    """A listener on the laptop (where the submitter's metrics would be): nothing may reach it."""
    with echo_server(topology, "laptop", topology.laptop.addr, 5556):
        yield 5556


@pytest.fixture(scope="module")
def operator_listener(topology: Topology) -> Iterator[int]:
    """A listener in the root namespace on its topology address: no host may reach it."""
    with socket.create_server((topology.operator_addr, 0)) as srv:
        yield int(srv.getsockname()[1])


# ---------------------------------------------------------------- the hosts


def test_each_host_has_its_own_address_name_and_no_way_out(topology: Topology) -> None:
    for name, host in topology.hosts.items():
        assert topology.run(name, ["hostname"]).stdout.strip() == name
        addrs = topology.run(name, ["hostname", "-I"]).stdout.split()
        assert addrs == [host.addr], (name, addrs)
        routes = topology.run(name, ["ip", "-4", "route"]).stdout
        assert "default" not in routes, (name, routes)
        assert topology.net in routes, (name, routes)
        # its name resolves to its address (software that finds its address by its name, like Ray
        # without a route to 8.8.8.8, gets this one and not 127.0.0.1)
        assert topology.run(name, ["getent", "hosts", name]).stdout.split()[0] == host.addr
    status = subprocess.run(
        ["bash", str(ROOT / "scripts" / "topology.sh"), "status"], capture_output=True, text=True, check=False
    )
    assert status.returncode == 0, status.stdout + status.stderr


# ---------------------------------------------------------------- SLURM across two network hosts


def test_two_node_job_from_the_laptop_spans_c1_and_c2(topology: Topology) -> None:
    """Over ssh from the laptop (through the relay, host key pinned) to login:22: `sbatch -N2`; each
    task runs on its own network host, sacct and seff on login know the job."""
    tag = uuid.uuid4().hex[:8]
    out = f".cloudhpc-topology-{tag}.out"
    task = 'echo "task node=$SLURMD_NODENAME host=$(hostname) addr=$(hostname -I)"'
    script = f"#!/bin/bash\nsrun --ntasks-per-node=1 bash -c {shlex.quote(task)}\n"
    job_id = topology.ssh(
        f"cd ~ && echo $SLURM_CONF && printf %s {shlex.quote(script)} | "
        f"sbatch --parsable -N2 --ntasks-per-node=1 -t 5 -J topology-{tag} --comment=cloudhpc:topology-test -o {out}"
    ).split()
    slurm_conf, jid = job_id[0], job_id[-1].split(";")[0]
    assert slurm_conf == str(topology.slurm_conf)
    assert jid.isdigit(), job_id
    state = ""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = topology.ssh(
            # by name too: slurmdbd may hold an older record with this id, from a topology built
            # before this one with a fresh state directory (its job ids start again at 1)
            f"sacct -n -X -P -j {jid} --name=topology-{tag} --format=State,NodeList,Cluster,NNodes,Comment"
        ).strip()
        # right after the end, slurmdbd's record shows NodeList=c1 for a moment (seen repeatedly):
        # wait for the full record rather than for the first COMPLETED
        if state.startswith(("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "COMPLETED|c[1-2]")):
            break
        time.sleep(0.5)
    assert state == f"COMPLETED|c[1-2]|{topology.slurm_cluster}|2|cloudhpc:topology-test", state
    lines = sorted(line.strip() for line in topology.ssh(f"cat ~/{out} && rm -f ~/{out}").splitlines())
    assert lines == [
        f"task node=c1 host=c1 addr={topology.hosts['c1'].addr}",
        f"task node=c2 host=c2 addr={topology.hosts['c2'].addr}",
    ]
    seff = topology.ssh(f"seff {jid}")
    assert "State: COMPLETED" in seff
    assert f"Cluster: {topology.slurm_cluster}" in seff
    assert "Nodes: 2" in seff


def test_login_needs_the_pinned_host_key(topology: Topology, tmp_path: Path) -> None:
    wrong = tmp_path / "known_hosts"
    cloud_key = [
        line for line in topology.known_hosts.read_text().splitlines() if line.startswith(topology.cloud.addr)
    ]
    # login's address with cloud's host key: the client must refuse
    wrong.write_text(cloud_key[0].replace(topology.cloud.addr, topology.ssh_host, 1) + "\n")
    argv = topology.ssh_argv("true")
    argv[argv.index(f"UserKnownHostsFile={topology.known_hosts}")] = f"UserKnownHostsFile={wrong}"
    proc = topology.run("laptop", argv, check=False)
    assert proc.returncode == 255
    assert (
        "REMOTE HOST IDENTIFICATION HAS CHANGED" in proc.stderr
        or "Host key verification failed" in proc.stderr
    )


def test_relay_resets_the_laptop_when_nothing_listens_behind_it(topology: Topology) -> None:
    """With no porter on cloud:5555, the laptop's connection (accepted by the relay in the router)
    is reset once the relay's onward connection is refused: an error, as a refusal would be."""
    cloud, port = topology.cloud.addr, topology.porter_port
    assert topology.probe("operator", [(cloud, port)]) == ["refused"], "something listens on cloud:5555"
    code = (
        "import socket, sys\n"
        "s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)\n"
        "try:\n"
        "    print('eof' if s.recv(1) == b'' else 'data')\n"
        "except ConnectionResetError:\n"
        "    print('reset')\n"
    )
    out = topology.run("laptop", [sys.executable, "-c", code, cloud, str(port)]).stdout.strip()
    assert out == "reset"


# ---------------------------------------------------------------- the firewalls


def test_firewall_matrix(
    topology: Topology, porter_stand_in: None, laptop_listener: int, operator_listener: int
) -> None:
    """Allowed paths connect; forbidden ones fail at once (every forbidden destination is shown to be
    listening by connecting to it from the operator's console)."""
    laptop, cloud, login = topology.laptop.addr, topology.cloud.addr, topology.login.addr
    c1, c2 = topology.hosts["c1"].addr, topology.hosts["c2"].addr
    ssh, porter, mlflow, s3, pg, prom = 22, topology.porter_port, 5000, 9000, 5432, 9090
    matrix: dict[str, list[tuple[str, int, bool]]] = {
        "laptop": [
            (login, ssh, True),
            (cloud, porter, True),
            (cloud, mlflow, False),
            (cloud, s3, False),
            (cloud, pg, False),
            (cloud, prom, False),
            (cloud, ssh, False),
            (login, 6817, False),
            (c1, 6818, False),
        ],
        "c1": [
            (login, ssh, True),
            (login, 6817, True),
            (c2, 6818, True),
            (cloud, ssh, True),
            (cloud, mlflow, False),
            (cloud, s3, False),
            (cloud, pg, False),
            (cloud, porter, False),
            (laptop, laptop_listener, False),
        ],
        "c2": [
            (login, 6817, True),
            (c1, 6818, True),
            (cloud, ssh, True),
            (cloud, mlflow, False),
            (cloud, s3, False),
        ],
        "login": [
            (c1, 6818, True),
            (c2, 6818, True),
            (cloud, ssh, True),
            (cloud, mlflow, False),
            (laptop, laptop_listener, False),
        ],
        "cloud": [
            (login, ssh, False),
            (login, 6817, False),
            (login, 6819, False),
            (c1, 6818, False),
            (c2, 6818, False),
            (laptop, laptop_listener, False),
            (cloud, mlflow, True),
            (cloud, s3, True),
            (cloud, porter, True),
        ],
    }
    for host in topology.hosts:
        # nothing opens a connection into the root namespace, nor to the router itself
        matrix[host].append((topology.operator_addr, operator_listener, False))
        if host != "laptop":
            matrix[host].append((topology.laptop_nat_addr, 40022, False))
    failures = []
    for host, rows in matrix.items():
        t0 = time.monotonic()
        got = topology.probe(host, [(a, p) for a, p, _ in rows])
        took = time.monotonic() - t0
        for (addr, port, allowed), outcome in zip(rows, got, strict=True):
            if allowed != (outcome == "open") or outcome == "timeout":
                failures.append(
                    f"{host} -> {addr}:{port}: {outcome} (expected {'open' if allowed else 'refused'})"
                )
        assert took < 10, f"probes from {host} took {took:.1f} s: a forbidden path hangs instead of failing"
    assert not failures, "\n".join(failures)
    # every destination above listens: the operator's console reaches each of them
    targets = sorted(
        {
            (a, p)
            for rows in matrix.values()
            for a, p, _ in rows
            if a not in (topology.operator_addr, topology.laptop_nat_addr)
        }
    )
    got = topology.probe("operator", targets)
    assert got == ["open"] * len(targets), dict(zip(targets, got, strict=True))


def test_no_route_out_of_the_topology(topology: Topology) -> None:
    outside = [("192.0.2.1", 80), ("8.8.8.8", 53), ("1.1.1.1", 443), ("10.0.0.1", 22), ("127.0.0.1", 2222)]
    # the root namespace's own addresses outside the topology (eth0, ...): no route to them either
    for line in subprocess.run(
        ["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True
    ).stdout.splitlines():
        addr = line.split()[3].split("/")[0]
        if not addr.startswith(("127.", "198.18.", "198.19.")):
            outside.append((addr, 22))
    for host in topology.hosts:
        got = topology.probe(host, outside, timeout=2)
        # 127.0.0.1 is the host's own loopback, where nothing of the single-host testbed listens
        for (addr, port), outcome in zip(outside, got, strict=True):
            expected = "refused" if addr == "127.0.0.1" else "unreachable"
            assert outcome == expected, f"{host} -> {addr}:{port}: {outcome}"


# ---------------------------------------------------------------- the delaying relay


def test_relay_delays_the_laptops_paths(topology: Topology, porter_stand_in: None) -> None:
    """laptop -> porter and laptop -> login:22 go through the relay in the router: each round trip
    takes about twice the configured delay; the operator's direct path does not."""
    delay = topology.delay_ms
    relay_peer, relay_first, relay_rtts = rtt(
        topology, "laptop", "echo", topology.cloud.addr, topology.porter_port
    )
    direct_peer, _, direct_rtts = rtt(topology, "operator", "echo", topology.cloud.addr, topology.porter_port)
    # the relay connects onwards from the laptop's NAT address: that is what porter sees
    assert relay_peer == topology.laptop_nat_addr
    assert direct_peer == topology.operator_addr
    relay_median = statistics.median(relay_rtts)
    direct_median = statistics.median(direct_rtts)
    banner, ssh_first, ssh_rtts = rtt(topology, "laptop", "ssh", topology.ssh_host, topology.ssh_port)
    ssh_rtt = ssh_rtts[0]
    assert banner.startswith("SSH-2.0-OpenSSH")
    print(
        f"\nrelay ({delay:g} ms each way): laptop->porter echo RTT median {relay_median:.1f} ms, "
        f"connect to first byte {relay_first:.1f} ms; laptop->login:22 connect to banner {ssh_first:.1f} ms, "
        f"banner-to-KEXINIT {ssh_rtt:.1f} ms; operator->porter direct RTT {direct_median:.2f} ms"
    )
    # a round trip is two delays; a new connection's first answer comes after the TCP handshake
    # over the delayed link too (SYN, SYN-ACK, ACK, then the answer: four delays)
    assert 1.5 * delay <= relay_median <= 2 * delay + 50, relay_median
    assert 1.5 * delay <= ssh_rtt <= 2 * delay + 200, ssh_rtt
    assert 3.5 * delay <= relay_first <= 4 * delay + 200, relay_first
    assert 3.5 * delay <= ssh_first <= 4 * delay + 200, ssh_first
    assert direct_median < max(5.0, delay / 2), direct_median


# ---------------------------------------------------------------- a bridge: a job on c1 tunnels to cloud:22


def test_reverse_tunnel_from_a_job_on_c1_is_reachable_on_cloud(topology: Topology) -> None:
    """What a job with bridges does: from c1, `ssh -R cloud:P:...` (and `-L` to MLflow) to the bridge
    account on cloud:22 with the restricted bridge key. cloud reaches the job's server on its own
    address; the job reaches MLflow through the tunnel while a direct connection is refused."""
    low, high = topology.bridge_port_range
    port = free_port(topology, "cloud", low, high)
    tag = uuid.uuid4().hex[:10]
    home = Path(
        subprocess.run(
            ["getent", "passwd", topology.ssh_user], capture_output=True, text=True, check=True
        ).stdout.split(":")[5]
    )
    work = home / f".cloudhpc-topology-{tag}"
    work.mkdir(mode=0o700)
    try:
        (work / "token.txt").write_text(tag)
        key = work / "bridge_key"
        key.write_bytes(topology.bridge_key.read_bytes())
        key.chmod(0o600)
        (work / "known_hosts").write_text(topology.known_hosts.read_text())
        subprocess.run(["chown", "-R", f"{topology.ssh_user}:", str(work)], check=True)
        cloud = topology.cloud.addr
        script = f"""#!/bin/bash
cd {work}
python3 -m http.server --bind 127.0.0.1 18080 >/dev/null 2>&1 &
python3 -c 'import socket
try:
    socket.create_connection(("{cloud}", 5000), timeout=3); print("open")
except OSError as e:
    print(type(e).__name__)' > direct_mlflow.txt
ssh -N -i bridge_key -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=yes \\
  -o UserKnownHostsFile={work}/known_hosts -o ExitOnForwardFailure=yes \\
  -R {cloud}:{port}:127.0.0.1:18080 -L 127.0.0.1:18081:{cloud}:5000 \\
  -p {topology.bridge_port} {topology.bridge_user}@{topology.bridge_host} 2> ssh.err &
for i in $(seq 1 100); do curl -s -o mlflow_health.txt http://127.0.0.1:18081/health && break; sleep 0.2; done
hostname > node.tmp && mv node.tmp node.txt   # written last, at once: the test waits for it
wait
"""
        (work / "job.sh").write_text(script)
        jid = (
            topology.ssh(f"sbatch --parsable -w c1 -t 5 -o {work}/job.out {work}/job.sh")
            .strip()
            .split(";")[0]
        )
        try:
            body = ""
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                proc = topology.run(
                    "cloud",
                    ["curl", "-s", "--max-time", "2", f"http://{cloud}:{port}/token.txt"],
                    check=False,
                )
                body = proc.stdout
                if body == tag:
                    break
                time.sleep(0.3)
            err = (work / "ssh.err").read_text() if (work / "ssh.err").exists() else ""
            assert body == tag, f"cloud could not reach the job's server through {cloud}:{port}: {err}"
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not (work / "node.txt").exists():
                time.sleep(0.2)
            assert (work / "node.txt").read_text().strip() == "c1"
            assert (work / "mlflow_health.txt").read_text().strip() == "OK"
            assert (work / "direct_mlflow.txt").read_text().strip() == "ConnectionRefusedError"
            # the bridge listens on cloud's address only for cloud: the laptop cannot reach it
            assert topology.probe("laptop", [(cloud, port)]) != ["open"]
        finally:
            topology.ssh(f"scancel {jid}")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and topology.probe("cloud", [(cloud, port)]) == ["open"]:
            time.sleep(0.3)
        assert topology.probe("cloud", [(cloud, port)]) != ["open"], "the tunnel outlived scancel"
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=True)


def test_bridge_account_line_is_what_the_cli_prints(topology: Topology, tmp_path: Path) -> None:
    """The bridge key's line on cloud is the one `cloudhpc bridge authorized-key` prints for this bridge."""
    config = tmp_path / "cloudhpc.yaml"
    low, high = topology.bridge_port_range
    config.write_text(
        "porter:\n  bridge:\n"
        f"    host: {topology.bridge_host}\n    ssh_user: {topology.bridge_user}\n    ssh_port: {topology.bridge_port}\n"
        f"    key_file: {topology.bridge_key}\n    known_hosts: {topology.known_hosts}\n"
        f"    bind_address: {topology.bridge_bind_address}\n    port_range: [{low}, {high}]\n"
        "    kubernetes: {enabled: false}\n"
    )
    cli = Path(sys.executable).with_name("cloudhpc")
    cloud = topology.cloud.addr
    printed = subprocess.run(
        [
            str(cli),
            "bridge",
            "authorized-key",
            "--config",
            str(config),
            "--permit-open",
            f"{cloud}:5000",
            "--permit-open",
            f"{cloud}:9000",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    home = subprocess.run(
        ["getent", "passwd", topology.bridge_user], capture_output=True, text=True, check=True
    ).stdout.split(":")[5]
    assert Path(home, ".ssh", "authorized_keys").read_text() == printed


def test_topology_scripts_are_clean() -> None:
    """scripts/topology.sh passes shellcheck (as the deploy scripts do) and the relay is stdlib-only."""
    script = ROOT / "scripts" / "topology.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    shellcheck = Path(sys.executable).with_name("shellcheck")
    proc = subprocess.run([str(shellcheck), str(script)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout
    relay = (ROOT / "scripts" / "delay_relay.py").read_text()
    imports = {
        line.split()[1].split(".")[0] for line in relay.splitlines() if line.startswith(("import ", "from "))
    }
    assert imports <= set(sys.stdlib_module_names) | {"__future__"}, imports
