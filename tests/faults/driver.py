"""A seeded fault-injection run on the multi-host topology (issue 12, item 7; docs/reliability.md).

A load of short batch jobs with known output is submitted through porter while, at points chosen by
`random.Random(seed)`, the parts the jobs depend on are killed and brought back. Afterwards every job
is checked against SLURM's own record and against what its script printed: nothing lost, nothing
duplicated, nothing changed.

Why porter and the submitter are started here (`Topology.popen`) and not as the shipped platform
(tests/shipped.py): a fault run kills and restarts them many times with the same configuration, and
the shipped harness is a context manager built to start each once; the processes here are the same
`cloudhpc serve porter|submitter` on the same hosts (porter on `cloud` with a PostgreSQL schema of its
own and artifacts in the topology's S3, the submitter on `laptop` reaching login:22 and porter through
the delaying relay), so every fault crosses the same network paths.

Daemons of the topology are restarted only by `bash scripts/topology.sh up`, which starts exactly the
ones that are not running. Run it directly: `python -m tests.faults.driver --seed 7 --jobs 200`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import yaml
from sqlalchemy import create_engine, text

from cloudhpc.client import ApiError, Client
from cloudhpc.domain.jobs import Job
from cloudhpc.domain.paths import JobPaths
from cloudhpc.domain.states import JobState
from cloudhpc.store import Store
from cloudhpc.store.engine import normalize_url
from tests.e2e.ray_jobs import NODE, RAY_ENV
from tests.jobs import stored_log
from tests.shipped import SITE_PIP, prebuild_environment
from tests.testbed import load_testbed
from tests.topology import Topology, load_topology, read_topology_env

ROOT = Path(__file__).resolve().parents[2]
TOPOLOGY_SH = ROOT / "scripts" / "topology.sh"
CLUSTER = "faults"
SUBMITTER_PORT = 5590
ARTIFACTS = frozenset({"spec.json", "job.sh", "output.log", "sacct.json", "efficiency.json"})
"""What every ended batch job has in the object store (docs/architecture.md, Artifacts)."""

FAULT_KINDS = (
    "porter",
    "submitter",
    "sshd-login",
    "slurmctld",
    "slurmdbd",
    "s3",
    "postgres",
    "partition",
    "tunnel",
)
"""The faults of every run (see `Faults`)."""
OPT_IN_KINDS = ("slurmctld-kill9", "bridge-partition")
"""Faults injected only when asked for (`--kinds`): slurmctld killed with -9 right after an sbatch
loses the jobs it accepted since its last state save and leaves SLURM itself wedged (a node drained
for "Duplicate jobid", jobs "launch failed requeued held" that never run until an operator releases
them), so a run with it does not end by itself (docs/reliability.md). `bridge-partition` (the
compute nodes cut off from the bridge host) adds `partition_for` seconds to a run for what `tunnel`
mostly covers already."""


# ---------------------------------------------------------------- the load


def job_output(index: int, lines: int, task: int | None = None) -> bytes:
    """What job `index`'s script prints, byte for byte (array task `task`'s output for an array)."""
    who = f"faults job {index:04d}" + ("" if task is None else f" task {task}")
    return b"".join(f"{who} line {n} of {lines}\n".encode() for n in range(1, lines + 1))


def job_script(index: int, lines: int, exit_code: int, failing_tasks: Sequence[int] | None = None) -> str:
    """Print `job_output(index, lines)` over about `lines * 0.5` seconds, then exit `exit_code`; an
    array's task (`failing_tasks` not None) prints `job_output(index, lines, task)` and exits 3 when
    it is one of `failing_tasks`, else 0."""
    if failing_tasks is not None:
        fails = "|".join(str(t) for t in failing_tasks) or "none"
        who, args = " task %d", " $SLURM_ARRAY_TASK_ID"
        end = f"case $SLURM_ARRAY_TASK_ID in {fails}) exit 3;; esac\nexit 0\n"
    else:
        who, args, end = "", "", f"exit {exit_code}\n"
    return (
        f"for n in $(seq 1 {lines}); do printf 'faults job %04d{who} line %d of %d\\n' {index}{args} $n {lines}; "
        "sleep 0.5; done\n" + end
    )


ARRAY = "0-4"
ARRAY_TASKS = tuple(range(5))
"""The array jobs of the load: five tasks, each of which must end exactly once."""


@dataclass(frozen=True)
class Planned:
    index: int
    lines: int
    exit_code: int
    key: str
    """The Idempotency-Key: a submission retried after a crash is the same job."""
    failing_tasks: tuple[int, ...] | None = None
    """None for a plain batch job; for an array job (`array: "0-4"`), the tasks that exit 3."""
    bridge: bool = False
    """A Ray job exposing its dashboard through a bridge, holding until the run releases it."""

    @property
    def is_array(self) -> bool:
        return self.failing_tasks is not None

    @property
    def expected_state(self) -> JobState:
        return JobState.COMPLETED if self.exit_code == 0 else JobState.FAILED

    def task_exit_code(self, task: int) -> int:
        return 3 if task in (self.failing_tasks or ()) else 0

    def spec(self, release: Path) -> dict[str, Any]:
        """The job's spec; a bridge job holds until the file `release` exists."""
        if self.bridge:
            return {
                "name": f"faults-{self.index:04d}",
                "cluster": CLUSTER,
                "kind": "ray-job",
                "ray": {
                    "entrypoint": f"python hold.py {release} {self.index}",
                    "head": NODE,
                    "expose": ["dashboard"],
                },
                "files": {"hold.py": BRIDGE_HOLD},
                "environment": RAY_ENV,
                "resources": {"time": "00:30:00"},
            }
        spec: dict[str, Any] = {
            "name": f"faults-{self.index:04d}",
            "cluster": CLUSTER,
            "script": job_script(self.index, self.lines, self.exit_code, self.failing_tasks),
            "resources": {"time": "00:05:00"},
        }
        if self.is_array:
            spec["array"] = ARRAY
        return spec


BRIDGE_HOLD = """\
import os, sys, time
release, index = sys.argv[1], int(sys.argv[2])
print(f"faults job {index:04d} bridge up", flush=True)
deadline = time.time() + 1500
while not os.path.exists(release) and time.time() < deadline:
    time.sleep(0.5)
print(f"faults job {index:04d} released {os.path.exists(release)}", flush=True)
"""
"""A bridge job's entrypoint: its dashboard stays up (and its tunnel can be dropped) until the run
has injected every fault and releases it."""


def bridge_lines(index: int) -> list[bytes]:
    """What a bridge job's entrypoint prints, in order, each exactly once, among Ray's own lines."""
    return [
        f"faults job {index:04d} bridge up\n".encode(),
        f"faults job {index:04d} released True\n".encode(),
    ]


def plan_load(rng: random.Random, n_jobs: int, n_bridges: int = 0) -> list[Planned]:
    """Jobs of 2-16 lines (1-8 s); about one in seven fails with exit code 3. About one in six is an
    array of five tasks of 2-6 lines, half of them with one task that exits 3 (the array then ends
    failed with exit code 3, the highest of its tasks'). `n_bridges` jobs, spread from the first
    one on, are bridge jobs (a Ray job whose dashboard is exposed; the tunnel fault drops its tunnel)."""
    bridges = {k * n_jobs // n_bridges for k in range(n_bridges)} if n_bridges else set()
    load = []
    for i in range(n_jobs):
        lines, fails, key = rng.randint(2, 16), rng.random() < 0.15, f"faults-{uuid.uuid4()}"
        if i in bridges:
            load.append(Planned(i, 0, 0, key, bridge=True))
        elif rng.random() < 1 / 6:
            failing = (rng.choice(ARRAY_TASKS),) if rng.random() < 0.5 else ()
            load.append(Planned(i, 2 + lines % 5, 3 if failing else 0, key, failing))
        else:
            load.append(Planned(i, lines, 3 if fails else 0, key))
    return load


def plan_faults(
    rng: random.Random, n_jobs: int, kinds: Sequence[str], per_kind: int
) -> list[tuple[int, str]]:
    """(after how many submissions, fault kind), in order: each kind `per_kind` times, at points
    spread over the first 90 % of the load."""
    faults = [kind for kind in kinds for _ in range(per_kind)]
    rng.shuffle(faults)
    points = sorted(rng.randint(1, max(1, int(n_jobs * 0.9))) for _ in faults)
    return list(zip(points, faults, strict=True))


def fault_time(schedule: Sequence[tuple[int, str]], down_for: float, partition_for: float) -> float:
    """About how long injecting `schedule` takes (each fault and the `up` after it), so that the
    submissions are spread over the faults instead of all being made before the second one."""
    pauses = {
        "slurmctld": down_for,
        "slurmctld-kill9": down_for,
        "bridge-partition": partition_for,
        "slurmdbd": down_for,
        "partition": partition_for,
    }
    return sum(pauses.get(kind, 2.0) + 8.0 for _, kind in schedule) or 1.0


# ---------------------------------------------------------------- porter and the submitter


@dataclass
class Platform:
    """porter on cloud and the submitter on laptop, as processes this driver starts and kills."""

    topology: Topology
    root: Path
    schema: str = field(default_factory=lambda: f"chpc_faults_{uuid.uuid4().hex[:10]}")
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    starts: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.database = f"{self.topology.pg_dsn}?options=-csearch_path%3D{self.schema}"
        self.prefix = f"faults/{self.schema}"
        t = self.topology
        self.url = t.porter_url
        # the bridge jobs hold until this file exists (/tmp is every host's: hpcuser reads it on c1, c2)
        self.release_dir = Path(f"/tmp/chpc-faults-{self.schema}")
        self.release_dir.mkdir(mode=0o755)
        self.release_dir.chmod(0o755)
        self.release = self.release_dir / "release"
        bridge = {
            "host": t.bridge_host,
            "ssh_port": t.bridge_port,
            "ssh_user": t.bridge_user,
            "bind_address": t.bridge_bind_address,
            "port_range": list(t.bridge_port_range),
        }
        porter = {
            "porter": {
                "listen": f"{t.cloud.addr}:{t.porter_port}",
                "database": self.database,
                "object_store": f"s3://{t.s3_bucket}/{self.prefix}",
                "s3_endpoint_url": t.s3_endpoint,
                "bridge": bridge,
            }
        }
        submitter = {
            # each job's own certificate, signed by the topology's bridge CA, which cloud's sshd trusts
            "porter": {
                "bridge": {
                    **bridge,
                    "ca_key_file": read_topology_env()["TOPOLOGY_BRIDGE_CA_KEY"],
                    "known_hosts": str(t.known_hosts),
                }
            },
            "submitter": {
                "porter_url": t.porter_url,
                "token_file": str(self.root / "agent-token"),
                "channel": "http",
                "listen": f"{t.laptop.addr}:{SUBMITTER_PORT}",
            },
            "clusters": {
                CLUSTER: {
                    "backend": "slurm",
                    "ssh": {
                        "host": t.ssh_host,
                        "port": t.ssh_port,
                        "user": t.ssh_user,
                        "key_file": str(t.ssh_key),
                        "known_hosts": str(t.known_hosts),
                    },
                    # the shipped configuration's workdir, prelude and pip: the Ray environment of the
                    # bridge jobs is the one tests/shipped.py's prebuild_environment builds (the
                    # topology's nodes have no route to PyPI); each job has a directory of its own
                    "workdir": "~/.cloudhpc",
                    "prelude": "",
                    "pip": SITE_PIP,
                    "defaults": {"partition": t.partition, "time": "00:10:00"},
                    "poll": {"fast_interval": 0.5, "slow_interval": 5, "max_commands_per_minute": 240},
                }
            },
        }
        (self.root / "porter.yaml").write_text(yaml.safe_dump(porter))
        (self.root / "submitter.yaml").write_text(yaml.safe_dump(submitter))
        admin = create_engine(normalize_url(t.pg_dsn))
        try:
            with admin.begin() as conn:
                conn.execute(text(f"CREATE SCHEMA {self.schema}"))
        finally:
            admin.dispose()
        store = Store(self.database)
        try:
            store.migrate()
            self.user_token = store.create_token("faults", "user")
            (self.root / "agent-token").write_text(store.create_token("faults", "agent", [CLUSTER]))
        finally:
            store.close()
        (self.root / "agent-token").chmod(0o600)

    def client(self) -> Client:
        return Client(self.url, self.user_token)

    def start(self, role: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDHPC_", "AWS_"))}
        env["CLOUDHPC_CONFIG"] = str(self.root / f"{role}.yaml")
        if role == "porter":
            env |= {
                "AWS_ACCESS_KEY_ID": self.topology.s3_access_key,
                "AWS_SECRET_ACCESS_KEY": self.topology.s3_secret_key,
                "AWS_DEFAULT_REGION": "us-east-1",
            }
        log = (self.root / f"{role}.log").open("ab")
        host = "cloud" if role == "porter" else "laptop"
        self.processes[role] = self.topology.popen(
            host,
            [sys.executable, "-m", "cloudhpc", "serve", role, "--log-level", "INFO"],
            env=env,
            cwd=self.root,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        self.starts[role] += 1
        if role == "porter":
            self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.processes["porter"]
            if proc.poll() is not None:
                raise RuntimeError(f"porter exited {proc.returncode}: {self.log('porter')[-2000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"porter not ready after {timeout} s: {self.log('porter')[-2000:]}")

    def wait_cluster(self, timeout: float = 60) -> None:
        """Until porter knows the cluster: the submitter registers it when it first polls."""
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while CLUSTER not in {c.name for c in client.clusters()}:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster {CLUSTER} not registered: {self.log('submitter')[-2000:]}")
                time.sleep(0.5)

    def kill(self, role: str, sig: int = signal.SIGKILL) -> None:
        proc = self.processes.pop(role, None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(timeout=60)

    def stop(self) -> None:
        for role in ("submitter", "porter"):
            self.kill(role, signal.SIGTERM)

    def log(self, role: str) -> str:
        path = self.root / f"{role}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def tunnel_pidfile(self, job: Job) -> Path:
        """Where a bridge job's tunnel keeps its current ssh's pid (ray/script.py), in hpcuser's home,
        which every host shares."""
        home = subprocess.run(
            ["getent", "passwd", self.topology.ssh_user], capture_output=True, text=True, check=True
        ).stdout.split(":")[5]
        return Path(JobPaths(workdir=f"{home}/.cloudhpc", job_id=job.id).control, "ray", "tunnel.pid")

    def bridge_rows(self) -> int:
        engine = create_engine(normalize_url(self.topology.pg_dsn))
        try:
            with engine.begin() as conn:
                held = conn.execute(text(f"SELECT count(*) FROM {self.schema}.bridges"))  # noqa: S608 (our schema)
                return int(held.scalar_one())
        finally:
            engine.dispose()

    def drop(self) -> None:
        self.release.unlink(missing_ok=True)
        with suppress(OSError):
            self.release_dir.rmdir()
        engine = create_engine(normalize_url(self.topology.pg_dsn))
        try:
            with engine.begin() as conn:
                conn.execute(text(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE"))
        finally:
            engine.dispose()


# ---------------------------------------------------------------- the faults


def _pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


def _kill9(pid: int | None, *, with_children: bool = False) -> bool:
    """SIGKILL `pid` (and its direct children first, when asked): a crash, nothing flushed."""
    if pid is None:
        return False
    victims = [*_children(pid), pid] if with_children else [pid]
    for victim in victims:
        with suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
    return True


def _conf_value(path: Path, key: str) -> str:
    for line in path.read_text().splitlines():
        name, _, value = line.partition("=")
        if name.strip().lower() == key.lower():
            return value.strip()
    raise KeyError(f"{key} not in {path}")


@dataclass
class Faults:
    """How each fault kind is injected and undone. `down_for` is how long slurmctld and slurmdbd stay
    down, `partition_for` how long the laptop is cut off."""

    topology: Topology
    platform: Platform
    down_for: float
    partition_for: float
    log: Callable[[str], None]
    restores: list[float] = field(default_factory=list)
    bridge_jobs: list[Job] = field(default_factory=list)
    """The bridge jobs submitted so far (the tunnel fault picks one whose bridge is ready)."""
    drops: list[TunnelDrop] = field(default_factory=list)

    def topology_up(self) -> None:
        """`scripts/topology.sh up`: starts exactly the daemons that are not running."""
        started = time.monotonic()
        for attempt in range(3):
            # no timeout: a killed `up` would leave its self-check holding the topology's lock
            proc = subprocess.run(
                ["bash", str(TOPOLOGY_SH), "up"], capture_output=True, text=True, check=False
            )
            if proc.returncode == 0:
                self.restores.append(time.monotonic() - started)
                return
            self.log(f"topology.sh up failed (attempt {attempt + 1}): {proc.stderr[-800:]}")
            time.sleep(3)
        raise RuntimeError(f"scripts/topology.sh up failed 3 times: {proc.stderr[-2000:]}")

    def inject(self, kind: str) -> None:
        getattr(self, "fault_" + kind.replace("-", "_"))()

    def fault_porter(self) -> None:
        self.platform.kill("porter")
        time.sleep(1)
        self.platform.start("porter")

    def fault_submitter(self) -> None:
        self.platform.kill("submitter")
        time.sleep(1)
        self.platform.start("submitter")

    def fault_sshd_login(self) -> None:
        # the listener and its per-connection children: every session to login ends at once
        _kill9(_pid(self.topology.login_sshd_pidfile), with_children=True)
        time.sleep(2)
        self.topology_up()

    def _slurm_pidfile(self, daemon: str) -> Path:
        conf = self.topology.slurm_conf
        if daemon == "slurmctld":
            return Path(_conf_value(conf, "SlurmctldPidFile"))
        return Path(_conf_value(conf.parent / "slurmdbd.conf", "PidFile"))

    def fault_slurmctld(self) -> None:
        # SIGTERM, as an operator's restart or a failover stops it: slurmctld saves its state first
        self._stop_slurmctld(signal.SIGTERM)

    def fault_slurmctld_kill9(self, wait: float = 30) -> None:
        """A crash right after an sbatch (the first new SLURM job id seen within `wait` s): the
        jobs accepted since slurmctld's last state save are not in the state it restarts from, and
        their ids may be handed out again (docs/reliability.md)."""
        newest = self._newest_slurm_id()
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and self._newest_slurm_id() <= newest:
            time.sleep(0.1)
        self._stop_slurmctld(signal.SIGKILL)

    def _newest_slurm_id(self) -> int:
        out = subprocess.run(
            ["squeue", "-h", "--states=all", "-o", "%A"],
            capture_output=True, text=True, env=self.topology.slurm_env(), check=False, timeout=30,
        ).stdout  # fmt: skip
        return max((int(word) for word in out.split() if word.isdigit()), default=0)

    def _stop_slurmctld(self, sig: int) -> None:
        pid = _pid(self._slurm_pidfile("slurmctld"))
        if pid is not None:
            with suppress(ProcessLookupError):
                os.kill(pid, sig)
        time.sleep(self.down_for)
        self.topology_up()

    def fault_slurmdbd(self) -> None:
        _kill9(_pid(self._slurm_pidfile("slurmdbd")))
        time.sleep(self.down_for)
        self.topology_up()

    def fault_s3(self) -> None:
        _kill9(_pid(self.topology.relay_pidfile.parent / "weed.pid"))
        time.sleep(2)
        self.topology_up()

    def fault_postgres(self) -> None:
        # the postmaster and its backends (a backend left behind keeps the shared memory, and the
        # next postmaster would refuse to start)
        for data in (
            self.topology.relay_pidfile.parents[1] / "pg",
            Path("/var/lib/cloudhpc-testbed/topology-pg"),
        ):
            pid = _pid(data / "postmaster.pid")
            if pid is not None and Path(f"/proc/{pid}").exists():
                _kill9(pid, with_children=True)
                break
        time.sleep(2)
        self.topology_up()

    def fault_partition(self) -> None:
        # the relay carries every connection of the laptop (to login:22 and to porter): killing it
        # cuts them all, and nothing reaches the other side until `up` starts it again
        _kill9(_pid(self.topology.relay_pidfile))
        time.sleep(self.partition_for)
        self.topology_up()

    def fault_tunnel(self) -> None:
        """`kill -9` of a bridge job's `ssh -R` on its compute node; then the job's restart loop must
        bring a new ssh (another pid in its pid file) through which the dashboard answers on cloud
        and porter's probe says ready again. A job whose bridge is not back is recorded."""
        self._drop_bridge("tunnel", _kill9, new_ssh=True)

    def fault_bridge_partition(self) -> None:
        """The compute nodes cut off from the bridge host's sshd for `partition_for` s: a rule at the
        head of the router's forward chain drops c1, c2 -> cloud:22, established connections
        included, until `topology.sh up` puts the router's rules back. The job's ssh notices by its
        keepalives (about 15 s) and reconnects; its bridge must answer again."""
        t = self.topology
        router = t.cloud.netns.with_name(read_topology_env()["TOPOLOGY_NETNS_PREFIX"] + "router")
        nodes = ", ".join(t.hosts[n].addr for n in t.slurm_nodes)
        rule = f"ip saddr {{ {nodes} }} ip daddr {t.bridge_host} tcp dport {t.bridge_port} drop"

        def cut(_ssh: int | None) -> None:
            subprocess.run(
                ["nsenter", f"--net={router}", "--", "nft", "insert", "rule", "inet", "chpc", "forward", *rule.split()],
                check=True, capture_output=True, timeout=30,
            )  # fmt: skip
            time.sleep(self.partition_for)
            self.topology_up()

        self._drop_bridge("bridge-partition", cut, new_ssh=False)

    def _drop_bridge(
        self,
        kind: str,
        drop: Callable[[int], object],
        *,
        new_ssh: bool,
        wait: float = 300,
        back_within: float = 120,
    ) -> None:
        """`drop(ssh pid)` of a bridge job whose bridge is ready, then wait until its dashboard answers
        again through the bridge (from cloud) with porter's probe saying ready, through another ssh
        when `new_ssh`; recorded in `drops`."""
        found = self._ready_bridge_job(time.monotonic() + wait)
        if found is None:
            self.log(f"{kind}: no bridge job had a ready bridge within {wait:.0f} s: nothing dropped")
            self.drops.append(TunnelDrop(None, None, f"{kind}: no bridge job ready"))
            return
        job, pidfile, old = found
        dropped = time.monotonic()
        drop(old)
        deadline = time.monotonic() + back_within
        with self.platform.client() as client:
            while time.monotonic() < deadline:
                new = _pid(pidfile)
                if new is not None and (new != old or not new_ssh) and Path(f"/proc/{new}").exists():
                    with suppress(ApiError, httpx.HTTPError):
                        bridges = client.bridges(job)
                        if all(b.ready for b in bridges) and all(
                            self._answers(b.bridge_port) for b in bridges
                        ):
                            back = time.monotonic() - dropped
                            self.log(
                                f"{kind} of job {job.id}: ssh {old} -> {new}, answering after {back:.1f} s"
                            )
                            self.drops.append(TunnelDrop(job.id, back, f"{kind}: ssh {old} -> {new}"))
                            return
                time.sleep(0.5)
        self.drops.append(TunnelDrop(job.id, None, f"{kind}: ssh {old}; pid file now {_pid(pidfile)}"))

    def _ready_bridge_job(self, deadline: float) -> tuple[Job, Path, int] | None:
        """A running bridge job whose every bridge porter says ready and whose tunnel's ssh runs."""
        with self.platform.client() as client:
            while time.monotonic() < deadline:
                for job in list(self.bridge_jobs):
                    with suppress(ApiError, httpx.HTTPError):
                        bridges = client.bridges(job)
                        pidfile = self.platform.tunnel_pidfile(job)
                        pid = _pid(pidfile)
                        if (
                            bridges
                            and all(b.ready for b in bridges)
                            and pid
                            and Path(f"/proc/{pid}").exists()
                        ):
                            return job, pidfile, pid
                time.sleep(1)
        return None

    def _answers(self, port: int) -> bool:
        """Ray's dashboard answers on the bridge port, from cloud (where the bridge VM listens)."""
        url = f"http://{self.topology.bridge_bind_address}:{port}/api/version"
        probe = self.topology.run("cloud", ["curl", "-sf", "--max-time", "5", url], timeout=30, check=False)
        return probe.returncode == 0 and "ray_version" in probe.stdout


@dataclass(frozen=True)
class TunnelDrop:
    """One tunnel fault: the job whose ssh was killed, and how long until it answered again."""

    job_id: UUID | None
    back_after: float | None
    """Seconds from the kill to a new ssh answering with porter's bridge ready; None: never."""
    note: str


# ---------------------------------------------------------------- the run


@dataclass
class Outcome:
    planned: Planned
    job: Job | None = None
    submit_attempts: int = 0
    problems: list[str] = field(default_factory=list)


def _retrying(what: str, call: Callable[[], Any], deadline: float) -> Any:
    """`call()` until it answers, across porter's restarts and the store's (transport errors, 5xx,
    and 409 while a replayed submission is still being committed)."""
    while True:
        try:
            return call()
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            error: Exception = exc
        except ApiError as exc:
            if 0 < exc.status < 500 and exc.status not in (409, 429):  # 0: porter unreachable
                raise
            error = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: still failing at the deadline: {error}")
        time.sleep(1)


def submit_all(
    platform: Platform,
    load: list[Planned],
    rng: random.Random,
    submitted: list[int],
    gap: float,
    deadline: float,
    bridge_jobs: list[Job],
) -> list[Outcome]:
    """Submit the load, `gap` seconds apart on average, each retried under its idempotency key; the
    bridge jobs are added to `bridge_jobs` as they are submitted."""
    outcomes = [Outcome(p) for p in load]
    with platform.client() as client:
        for outcome in outcomes:
            p = outcome.planned

            def once(p: Planned = p, outcome: Outcome = outcome) -> Job:
                outcome.submit_attempts += 1
                return client.submit(p.spec(platform.release), idempotency_key=p.key)

            outcome.job = _retrying(f"submit job {p.index}", once, deadline)
            if p.bridge:
                bridge_jobs.append(outcome.job)
            submitted[0] += 1
            time.sleep(rng.uniform(0, 2 * gap))
    return outcomes


def wait_all(platform: Platform, outcomes: list[Outcome], deadline: float) -> None:
    with platform.client() as client:
        for outcome in outcomes:
            assert outcome.job is not None
            job_id = outcome.job.id
            while True:
                job = _retrying(
                    f"wait {job_id}", lambda job_id=job_id: client.wait(job_id, timeout=20), deadline
                )
                if job.state.terminal or time.monotonic() > deadline:
                    break
            outcome.job = job


def sacct_rows(topology: Topology, name: str) -> list[dict[str, str]]:
    """SLURM's own record of every allocation named `name` on cluster topo (sacct, plus squeue for
    what slurmdbd has not recorded yet)."""
    env = topology.slurm_env()
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", f"--name={name}", "--starttime=now-2days",
         "--format=JobID,State,ExitCode,Comment"],
        capture_output=True, text=True, env=env, check=True, timeout=60,
    ).stdout  # fmt: skip
    rows = [
        dict(zip(("id", "state", "exit", "comment"), line.split("|"), strict=False))
        for line in out.splitlines()
    ]
    queued = subprocess.run(
        ["squeue", "-h", f"--name={name}", "--states=all", "-o", "%i|%T"],
        capture_output=True, text=True, env=env, check=True, timeout=60,
    ).stdout  # fmt: skip
    known = {r["id"] for r in rows}
    for line in queued.split():
        jid, state = line.split("|")
        if jid not in known:
            rows.append({"id": jid, "state": state, "exit": "", "comment": ""})
    return rows


def _once_in_slurm(rows: list[dict[str, str]], job: Job) -> list[str]:
    """A plain job: one allocation, porter's, in porter's state, with our comment."""
    if len(rows) != 1:
        return [f"in SLURM {len(rows)} times: {rows}"]
    if rows[0]["id"] != job.slurm_job_id:
        return [f"SLURM id {rows[0]['id']}, porter says {job.slurm_job_id}"]
    problems = []
    slurm_state = rows[0]["state"].split()[0]
    if slurm_state != job.state.value.upper():
        problems.append(f"state {job.state.value}, SLURM says {slurm_state}")
    if rows[0]["comment"] not in ("", f"cloudhpc:{job.id}"):
        problems.append(f"comment {rows[0]['comment']!r}")
    return problems


def _array_once_in_slurm(rows: list[dict[str, str]], job: Job, tasks: dict[int, Any]) -> list[str]:
    """An array: one SLURM array (porter's id), each of its tasks exactly once (`<id>_<task>`), each
    task in the state porter reports for it, with our comment."""
    ids = Counter(row["id"] for row in rows)
    expected = {f"{job.slurm_job_id}_{t}" for t in ARRAY_TASKS}
    if set(ids) != expected or any(n != 1 for n in ids.values()):
        return [f"in SLURM as {sorted(ids.elements())}, porter says array {job.slurm_job_id} of {ARRAY}"]
    problems = []
    for row in rows:
        task = int(row["id"].rpartition("_")[2])
        slurm_state = row["state"].split()[0]
        porter = tasks.get(task)
        if porter is None or slurm_state != porter.state.value.upper():
            problems.append(f"state of task {task} {porter and porter.state.value}, SLURM says {slurm_state}")
        if row["comment"] not in ("", f"cloudhpc:{job.id}"):
            problems.append(f"comment {row['comment']!r}")
    return problems


def _wait_for_artifacts(
    client: Client, job: Job, wanted: frozenset[str], deadline: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The job's accounting and artifacts, once the agent has stored them all (a moment after the
    end) or at the deadline."""
    accounting: dict[str, Any] = {}
    names: dict[str, Any] = {}
    while True:
        with suppress(ApiError, httpx.HTTPError):
            accounting = client.accounting(job).model_dump(mode="json")
        with suppress(ApiError, httpx.HTTPError):
            names = {a.name: a.model_dump() for a in client.artifacts(job)}
        if (names.keys() >= wanted and accounting) or time.monotonic() > deadline:
            return accounting, names
        time.sleep(1)


def _task_artifacts() -> frozenset[str]:
    """An array's artifacts: no `output.log` of its own, one per task."""
    return (ARTIFACTS - {"output.log"}) | {f"tasks/{t}/output.log" for t in ARRAY_TASKS}


def _check_array(client: Client, job: Job, p: Planned, deadline: float) -> list[str]:
    """Each task's state, exit code and output (through `logs?task=`, stored when the array ended)."""
    problems = []
    tasks = {t.index: t for t in _retrying("tasks", lambda: client.tasks(job), deadline)}
    if sorted(tasks) != list(ARRAY_TASKS):
        problems.append(f"state of tasks: porter lists tasks {sorted(tasks)}, the array is {ARRAY}")
    for index, task in sorted(tasks.items()):
        code = p.task_exit_code(index)
        want = JobState.COMPLETED if code == 0 else JobState.FAILED
        if (task.state, task.exit_code) != (want, code):
            problems.append(
                f"ended: task {index} {task.state.value} exit {task.exit_code}, script gives {want.value} exit {code}"
            )
        expected = job_output(p.index, p.lines, index)
        got = _retrying("task output", lambda index=index: client.task_output(job, index), deadline)
        if got != expected:
            problems.append(f"log of task {index} {got[:200]!r} != printed {expected!r}")
    return problems


def _check_bridge_log(log: bytes, p: Planned) -> list[str]:
    """The entrypoint's lines, each exactly once and in order, among Ray's start-up lines."""
    lines = bridge_lines(p.index)
    counts = [log.count(line) for line in lines]
    if counts != [1] * len(lines) or not log.index(lines[0]) < log.index(lines[1]):
        return [f"log of the bridge job has its lines {counts} times (or out of order): {log[-1500:]!r}"]
    return []


def check(topology: Topology, platform: Platform, outcomes: list[Outcome], settle: float) -> None:
    """The invariants, each job's problems in `outcome.problems`."""
    deadline = time.monotonic() + settle
    with platform.client() as client:
        for outcome in outcomes:
            job, p = outcome.job, outcome.planned
            if job is None:
                outcome.problems.append("never submitted")
                continue
            if not job.state.terminal:
                outcome.problems.append(f"not ended: {job.state}")
                continue
            if (job.reason or "").startswith("lost by the scheduler"):
                # SLURM forgot the job (slurmctld kill -9) and porter says so: still a lost job,
                # but not one mistaken for the job that took its id
                rows = sacct_rows(topology, f"chpc-{job.id}")
                outcome.problems.append(f"reported lost by SLURM ({len(rows)} records by name): {job.reason}")
                continue
            if job.state != p.expected_state or job.exit_code != p.exit_code:
                outcome.problems.append(
                    f"ended {job.state.value} exit {job.exit_code}, script gives {p.expected_state.value} exit {p.exit_code}"
                )
            # reached SLURM exactly once (each task of an array), and ended as SLURM says
            rows = sacct_rows(topology, f"chpc-{job.id}")
            if p.is_array:
                tasks = {t.index: t for t in _retrying("tasks", lambda job=job: client.tasks(job), deadline)}
                outcome.problems += _array_once_in_slurm(rows, job, tasks)
                outcome.problems += _check_array(client, job, p, deadline)
            else:
                outcome.problems += _once_in_slurm(rows, job)
                # the complete and exact output (a bridge job's lines among Ray's own)
                log = _retrying("logs", lambda job=job: stored_log(client, job), deadline)
                if p.bridge:
                    outcome.problems += _check_bridge_log(log, p)
                elif log != (expected := job_output(p.index, p.lines)):
                    outcome.problems.append(f"log {log!r} != printed {expected!r}")
            # accounting and artifacts (the agent stores them a moment after the end: wait for them)
            wanted = _task_artifacts() if p.is_array else ARTIFACTS
            accounting, names = _wait_for_artifacts(client, job, wanted, deadline)
            if accounting.get("slurm_job_id") != job.slurm_job_id:
                outcome.problems.append(f"accounting missing or wrong: {str(accounting)[:200]}")
            missing = wanted - names.keys()
            if missing:
                outcome.problems.append(f"artifacts missing: {sorted(missing)}")
            elif not p.is_array and (got := _download(client, platform, names["output.log"]["url"])) != (
                log if p.bridge else job_output(p.index, p.lines)
            ):
                outcome.problems.append(f"output.log artifact {got[:200]!r} != printed")
    if (held := platform.bridge_rows()) != 0:
        outcomes[0].problems.append(f"{held} bridge port(s) still held after every job ended")


def _download(client: Client, platform: Platform, url: str) -> bytes:
    headers = {"Authorization": f"Bearer {platform.user_token}"} if url.startswith(platform.url) else {}
    answer = httpx.get(url, headers=headers, timeout=30)
    answer.raise_for_status()
    return answer.content


@dataclass
class Report:
    seed: int
    n_jobs: int
    injected: list[tuple[float, str]]
    outcomes: list[Outcome]
    took: float
    restores: list[float]
    drops: list[TunnelDrop] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return [
            f"job {o.planned.index} ({o.job.id if o.job else '-'}): {p}"
            for o in self.outcomes
            for p in o.problems
        ]

    def invariant_counts(self) -> dict[str, int]:
        """Jobs failing each invariant."""
        tags = {
            "once in SLURM": ("in SLURM", "SLURM id", "never submitted", "not ended"),
            "lost by SLURM, reported so (not mistaken)": ("reported lost by SLURM",),
            "state as SLURM": ("state ", "ended "),
            "exact output": ("log ", "log of task"),
            "accounting": ("accounting",),
            "artifacts": ("artifact", "output.log artifact"),
            "bridge back after a tunnel drop": ("bridge not back", "tunnel fault not injected"),
            "no bridge leak": ("bridge port",),
        }
        return {
            name: sum(any(p.startswith(prefixes) for p in o.problems) for o in self.outcomes)
            for name, prefixes in tags.items()
        }

    def table(self) -> str:
        counts = Counter(kind for _, kind in self.injected)
        bad = self.invariant_counts()
        ended = Counter(o.job.state.value for o in self.outcomes if o.job)
        arrays = sum(o.planned.is_array for o in self.outcomes)
        bridges = sum(o.planned.bridge for o in self.outcomes)
        back = [f"{d.back_after:.1f} s" if d.back_after is not None else "never" for d in self.drops]
        lines = [
            f"seed {self.seed}, {self.n_jobs} jobs ({arrays} arrays of {len(ARRAY_TASKS)} tasks, "
            f"{bridges} with bridges; {dict(ended)}), {len(self.injected)} faults, "
            f"{self.took:.0f} s; topology.sh up after a fault: "
            + (f"median {sorted(self.restores)[len(self.restores) // 2]:.1f} s" if self.restores else "-")
            + (f"; bridge answering again after a tunnel drop: {', '.join(back)}" if back else ""),
            "",
            "| fault | injected |",
            "|---|---|",
            *(
                f"| {kind} | {n} |"
                for kind in (*FAULT_KINDS, *OPT_IN_KINDS)
                if (n := counts.get(kind, 0)) or kind in FAULT_KINDS
            ),
            "",
            "| invariant | jobs failing it |",
            "|---|---|",
            *(f"| {name} | {n} of {self.n_jobs} |" for name, n in bad.items()),
        ]
        return "\n".join(lines)


def run(
    seed: int,
    n_jobs: int,
    *,
    kinds: Sequence[str] = FAULT_KINDS,
    per_kind: int = 1,
    down_for: float = 10,
    partition_for: float = 10,
    bridges: int = 1,
    root: Path,
    timeout: float = 1800,
    log: Callable[[str], None] = print,
) -> Report:
    topology = load_topology()
    if bridges:
        # the bridge jobs' Ray environment, built where the topology's nodes find it (one stat when
        # it is there already)
        prebuild_environment(load_testbed(), RAY_ENV)
    elif {"tunnel", "bridge-partition"} & set(kinds):
        raise ValueError("the tunnel and bridge-partition faults need bridge jobs in the load (bridges >= 1)")
    rng = random.Random(seed)
    load = plan_load(rng, n_jobs, bridges)
    schedule = plan_faults(rng, n_jobs, kinds, per_kind)
    log(f"seed {seed}: {n_jobs} jobs ({bridges} with bridges), faults {schedule}")
    started = time.monotonic()
    deadline = started + timeout
    platform = Platform(topology, root)
    faults = Faults(topology, platform, down_for, partition_for, log)
    injected: list[tuple[float, str]] = []
    with _platform_running(platform):
        submitted = [0]
        errors: list[BaseException] = []

        def inject_all() -> None:
            try:
                for point, kind in schedule:
                    while submitted[0] < point and time.monotonic() < deadline:
                        time.sleep(0.2)
                    at = time.monotonic() - started
                    log(f"{at:6.1f} s after {submitted[0]} submissions: {kind}")
                    faults.inject(kind)
                    injected.append((at, kind))
            except BaseException as exc:  # reported after the load, the topology brought back first
                errors.append(exc)

        injector = threading.Thread(target=inject_all, name="faults")
        injector.start()
        try:
            gap = fault_time(schedule, down_for, partition_for) / n_jobs
            outcomes = submit_all(
                platform, load, random.Random(seed + 1), submitted, gap, deadline, faults.bridge_jobs
            )
        finally:
            submitted[0] = n_jobs  # whatever is left of the schedule runs now
            injector.join()
            faults.topology_up()
            platform.release.touch()  # every fault is done: the bridge jobs may end
        if errors:
            raise errors[0]
        wait_all(platform, outcomes, deadline)
        # the agent asks sacct again 120 s after a minute of failed tries: with slurmdbd down at the
        # end of the load, the accounting comes that much after slurmdbd does
        check(topology, platform, outcomes, settle=max(90, down_for + 200))
        for drop in faults.drops:
            if drop.back_after is None and drop.job_id is not None:
                (hit,) = [o for o in outcomes if o.job is not None and o.job.id == drop.job_id]
                hit.problems.append(f"bridge not back after its tunnel was dropped: {drop.note}")
            elif drop.job_id is None:
                outcomes[0].problems.append(f"tunnel fault not injected: {drop.note}")
    report = Report(
        seed, n_jobs, injected, outcomes, time.monotonic() - started, faults.restores, faults.drops
    )
    (root / "report.json").write_text(
        json.dumps(
            {
                "seed": seed,
                "jobs": n_jobs,
                "faults": injected,
                "invariants": report.invariant_counts(),
                "problems": report.problems,
                "took": report.took,
                "restores": report.restores,
                "tunnel_drops": [[str(d.job_id), d.back_after, d.note] for d in faults.drops],
                "starts": dict(platform.starts),
            },
            indent=2,
        )
    )
    return report


@contextmanager
def _platform_running(platform: Platform) -> Iterator[None]:
    try:
        platform.start("porter")
        platform.start("submitter")
        platform.wait_cluster()
        yield
    finally:
        platform.stop()
        platform.drop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=int(os.environ.get("FAULTS_SEED", "1")))
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("FAULTS_JOBS", "200")))
    parser.add_argument("--per-kind", type=int, default=int(os.environ.get("FAULTS_PER_KIND", "2")))
    parser.add_argument("--down-for", type=float, default=float(os.environ.get("FAULTS_DOWN_FOR", "120")))
    parser.add_argument(
        "--partition-for", type=float, default=float(os.environ.get("FAULTS_PARTITION_FOR", "30"))
    )
    parser.add_argument("--bridges", type=int, default=int(os.environ.get("FAULTS_BRIDGES", "3")))
    parser.add_argument(
        "--kinds",
        default=os.environ.get("FAULTS_KINDS", ",".join(FAULT_KINDS)),
        help="comma-separated fault kinds to inject (default: all of them)",
    )
    parser.add_argument("--root", type=Path, default=None)
    args = parser.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    if unknown := set(kinds) - set(FAULT_KINDS) - set(OPT_IN_KINDS):
        known = ", ".join((*FAULT_KINDS, *OPT_IN_KINDS))
        parser.error(f"--kinds: unknown fault kinds {sorted(unknown)}; known: {known}")
    root = args.root or Path(tempfile.mkdtemp(prefix=f"chpc-faults-seed{args.seed}-"))
    report = run(
        args.seed,
        args.jobs,
        kinds=kinds,
        per_kind=args.per_kind,
        bridges=args.bridges,
        down_for=args.down_for,
        partition_for=args.partition_for,
        root=root,
        timeout=3600,
    )
    print(report.table())
    for problem in report.problems:
        print(problem)
    print(f"details: {root}")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
