"""The seed's workflow across the multi-host topology, with the configurations as shipped.

- porter runs on `cloud` with what `deploy/kustomize` renders for it: the ConfigMap `porter-config`
  mounted where the Deployment mounts it, the Deployment's environment, the Secret `porter-secrets`
  and the ConfigMap `porter-bridge` of docs/platform.md as environment, as the Deployment's user;
- the submitter runs on `laptop` exactly as `deploy/compose/submitter.yaml` runs it: its command, its
  environment (interpolated from a `.env` filled in as `deploy/compose/env.example` says), its secrets
  under /run/secrets/, its config and volumes where compose mounts them, as SUBMITTER_UID;
- the operator's console (the root namespace, this process) submits with a user token.

"Where compose or Kubernetes mounts it" is real: each process runs in a private mount namespace
(`unshare --mount`) where the sources are bind-mounted onto the container paths, so a path in
secrets.json or in a manifest that does not match its mount fails here as it would in the container.
The only hand-written values are the ones the docs tell an operator or a user to fill in; they are
gathered in OPERATOR_FILL_INS, `user_env()`, USER_EDITS and SITE_PIP below.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
import yaml
from sqlalchemy import create_engine, text

from cloudhpc.client import ApiError, Client
from cloudhpc.config import PipConfig, SSHConfig
from cloudhpc.domain.jobs import Environment, Job
from cloudhpc.domain.states import JobState
from cloudhpc.hpc.envs import EnvironmentCache
from cloudhpc.hpc.ssh import SSHConnection
from cloudhpc.store.engine import normalize_url
from tests.testbed import Testbed
from tests.topology import Host, Topology

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
"""The image's /opt/cloudhpc/bin: the venv that has this checkout installed."""
IMAGE_ENV = {"HOME": "/var/lib/cloudhpc", "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
IMAGE_WORKDIR = "/var/lib/cloudhpc"
"""ENV and WORKDIR of deploy/docker/cloudhpc.Dockerfile's runtime stage."""

SCRATCH = Path("/tmp/chpc-shipped-overlays")
CODE_HOLD = Path("/run/chpc-shipped-code")
"""Where this checkout (the image's code: its venv and editable sources) is held while the pod's
volumes are mounted, when it lies under one of their paths (a checkout under /tmp, as CI may clone)."""
"""The overlays' upper and work directories (removed by the module's `scratch` fixture)."""

CLUSTER = "mahti"
"""The cluster secrets.json defines (secrets_json.py); porter learns it from the agent token."""
RAY_ENV = {"packages": [f"ray[default]=={ray.__version__}"]}

# ---------------------------------------------------------------- what people fill in, and only that

OPERATOR_FILL_INS = {
    # deploy/kustomize/porter/cloudhpc.yaml: "porter outside this cluster: the S3 server's URL"
    "http://mlflow-s3.mlflow.svc.cluster.local:9000": "s3_endpoint",
}
"""Text of the rendered porter-config replaced by the topology's value (a Topology attribute)."""

PLATFORM_SHELL = {
    "$VM_FLOATING_IP": "bridge_host",
    "$VM_ADDRESS": "bridge_bind_address",
    "$USER": "bridge_user",
}
"""docs/platform.md section 10's shell variables for ConfigMap porter-bridge (Topology attributes)."""

NO_KUBERNETES = {"CLOUDHPC_PORTER__BRIDGE__KUBERNETES__ENABLED": "false"}
"""The topology has no Kubernetes: porter is a plain process on the VM (docs/platform.md, section 10)."""

USER_EDITS = {("clusters", CLUSTER, "prelude"): "", ("clusters", CLUSTER, "defaults", "partition"): "debug"}
"""deploy/compose/submitter-cloudhpc.yaml says "Edit partition, time and prelude to taste": the
topology's site has partition `debug` and no module profile (/appl/profile/zz-csc-env.sh is Mahti's)."""

SITE_PIP = {"find_links": ["/opt/wheels"]}
"""`clusters.mahti.pip`, added to the compose config: docs/pipelines.md asks for PyTorch's CPU wheel
from the site on a CPU partition (PyPI's build is CUDA's, several GB), and `pip.find_links` is where
a site's wheels are named (docs/configuration-reference.md); the topology's site has it in
/opt/wheels. Part of every environment's hash, so the prebuilt ones are built with it too."""


def user_env(topology: Topology, files: Mapping[str, Path]) -> dict[str, str]:
    """deploy/compose/.env as a user fills it in from env.example (docs/platform.md, section 8)."""
    return {
        "SECRETS_JSON": str(files["secrets"]),
        "MAHTI_KEY": str(files["mahti_key"]),
        "BRIDGE_KEY": str(files["bridge_key"]),
        "AGENT_TOKEN": str(files["agent_token"]),
        "KNOWN_HOSTS": str(files["known_hosts"]),
        "BRIDGE_HOST": topology.bridge_host,
        "BRIDGE_USER": topology.bridge_user,
        "BRIDGE_BIND_ADDRESS": topology.bridge_bind_address,
        "BRIDGE_KNOWN_HOSTS": str(files["bridge_known_hosts"]),
        "MAHTI_ACCOUNT": "default",  # the topology's SLURM account
        "SUBMITTER_UID": str(os.getuid()),
        "SUBMITTER_GID": str(os.getgid()),
        # the laptop reaches porter on the VM's address (docs/platform.md, section 8, step 4)
        "CLOUDHPC_PORTER_URL": topology.porter_url,
    }


# ---------------------------------------------------------------- a container, as far as it matters


@dataclass(frozen=True)
class Mount:
    source: Path
    target: str
    read_only: bool = True


def container_argv(host: Host, mounts: Sequence[Mount], user: str, argv: Sequence[str]) -> list[str]:
    """`argv` on `host` in a private mount namespace with `mounts` in place, as uid:gid `user`, in
    the image's WORKDIR. Directories missing on this machine (/etc/cloudhpc, /run/secrets...) are
    made in an overlay seen only by that namespace."""
    lines = ["set -e"]
    overlays: list[Path] = []
    for m in mounts:
        parent = Path(m.target).parent
        base = parent
        while not base.exists():
            base = base.parent
        if (base != parent or not Path(m.target).exists()) and base not in overlays:
            overlays.append(base)
    scratch = SCRATCH / uuid.uuid4().hex[:8]
    for i, base in enumerate(overlays):
        upper, work = scratch / f"{i}-up", scratch / f"{i}-work"
        lines.append(f"mkdir -p {upper} {work}")
        lines.append(f"mount -t overlay overlay -o lowerdir={base},upperdir={upper},workdir={work} {base}")
    # the image's code stays where it is even if a volume is mounted over its parent (/tmp)
    hidden = any(ROOT.is_relative_to(m.target) for m in mounts)
    if hidden:
        CODE_HOLD.mkdir(parents=True, exist_ok=True)
        lines.append(f"mount --bind {shlex.quote(str(ROOT))} {CODE_HOLD}")
    # parents before what is mounted inside them (as a container runtime does); /tmp last: the
    # overlays' scratch directories live there
    for m in sorted(mounts, key=lambda m: (m.target == "/tmp", len(Path(m.target).parts))):
        target = shlex.quote(m.target)
        if m.source.is_dir():
            lines.append(f"mkdir -p {target}")
        else:
            lines.append(
                f"mkdir -p {shlex.quote(str(Path(m.target).parent))}; [ -e {target} ] || : > {target}"
            )
        lines.append(f"mount --bind {shlex.quote(str(m.source))} {target}")
        if m.read_only:
            lines.append(f"mount -o remount,bind,ro {target}")
    if hidden:
        lines.append(f"mkdir -p {shlex.quote(str(ROOT))}")
        lines.append(f"mount --bind {CODE_HOLD} {shlex.quote(str(ROOT))}")
    uid, _, gid = user.partition(":")
    lines.append(f"cd {IMAGE_WORKDIR}")
    lines.append(f'exec setpriv --reuid {uid} --regid {gid or uid} --clear-groups -- "$@"')
    script = "\n".join(lines)
    return host.argv(
        "unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script, "sh", *argv
    )


@dataclass
class Process:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        """SIGTERM by PID (nsenter, unshare, sh and setpriv exec: the PID is cloudhpc's), then KILL."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start(name: str, argv: list[str], env: Mapping[str, str], log: Path) -> Process:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, env=dict(env), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    return Process(name, proc, log)


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """compose's ${VAR}, ${VAR:-default} and ${VAR:?message}."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3) or ""
        if env.get(name):
            return env[name]
        if op == ":?":
            raise AssertionError(f"compose would refuse: {name}: {arg}")
        return arg if op == ":-" else ""

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)([^}]*))?\}", one, value)


# ---------------------------------------------------------------- the rendered manifests


def render_platform() -> tuple[dict[str, Any], ...]:
    kubectl = BIN / "kubectl"
    proc = subprocess.run(
        [
            str(kubectl),
            "kustomize",
            "--load-restrictor",
            "LoadRestrictionsNone",
            str(DEPLOY / "kustomize" / "kubeflow-monitoring" / "local"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def one(objs: Sequence[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [
        o
        for o in objs
        if o["kind"] == kind
        and (o["metadata"]["name"] == name or o["metadata"]["name"].startswith(name + "-"))
    ]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def platform_md_bridge_literals(topology: Topology) -> dict[str, str]:
    """ConfigMap porter-bridge as docs/platform.md section 10 creates it, its variables filled in."""
    doc = (ROOT / "docs" / "platform.md").read_text()
    section = doc[doc.index("## 10. Bridges") : doc.index("## 11.")]
    literals = dict(re.findall(r"--from-literal=(CLOUDHPC_PORTER__BRIDGE__\w+)=(\S+)", section))
    assert literals, "docs/platform.md section 10 creates ConfigMap porter-bridge"
    for key, value in literals.items():
        for variable, attr in PLATFORM_SHELL.items():
            value = value.replace(variable, str(getattr(topology, attr)))
        assert "$" not in value, f"{key}={value}: a variable the docs do not say how to fill in"
        literals[key] = value
    return {**literals, **NO_KUBERNETES}


PLATFORM_UP_ENV = {"PIPELINE_NS": "kubeflow-user-example-com", "HPC_CLUSTER": CLUSTER}
"""scripts/platform-up.sh's variables for its default environment, kubeflow-monitoring."""


def platform_up_tokens() -> dict[str, list[str]]:
    """The `porter_cli tokens create ...` calls of scripts/platform-up.sh, as bash expands them with
    the default environment's variables, by role (admin, user: the pipelines' token, agent)."""
    script = (ROOT / "scripts" / "platform-up.sh").read_text()
    calls = re.findall(r"porter_cli (tokens create [^)\n]*)\)", script)
    tokens: dict[str, list[str]] = {}
    for call in calls:
        expanded = subprocess.run(
            ["bash", "-c", f'set -- {call}; printf "%s\\0" "$@"'],
            env={"PATH": os.environ["PATH"], **PLATFORM_UP_ENV},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\0")[:-1]
        tokens[expanded[expanded.index("--role") + 1]] = expanded
    assert set(tokens) == {"admin", "user", "agent"}, calls
    return tokens


# ---------------------------------------------------------------- the platform: porter on cloud


@pytest.fixture(scope="module", autouse=True)
def scratch() -> Iterator[None]:
    SCRATCH.mkdir(mode=0o700, exist_ok=True)
    try:
        yield
    finally:
        subprocess.run(["rm", "-rf", str(SCRATCH)], check=False)


@dataclass
class Platform:
    porter: Process
    url: str
    user_token: str
    agent_token: str
    secrets: tuple[str, ...]
    """Values that must appear in no log and no process argument."""
    run_tool: Any
    """run_tool(*args, overrides=None): `cloudhpc ARGS` as porter's pod runs it, its environment
    changed by `overrides`."""
    in_pod: Any
    """in_pod(argv, extra_mounts=(), as_user=None) -> (argv, env): `argv` in porter's pod (`kubectl exec
    deploy/porter -- ARGV`) with `extra_mounts` besides the pod's, as `as_user` (default: the pod's), and
    the pod's environment."""


@pytest.fixture(scope="module")
def platform(topology: Topology, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    root = tmp_path_factory.mktemp("platform")
    root.chmod(0o755)
    objs = render_platform()
    deployment = one(objs, "Deployment", "porter")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    user = f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"

    # volumes: the ConfigMap as files, the PVC and the emptyDir as directories the pod's user owns
    mounts: list[Mount] = []
    for vm in container["volumeMounts"]:
        volume = next(v for v in pod["volumes"] if v["name"] == vm["name"])
        source = root / "volumes" / vm["name"]
        source.mkdir(parents=True)
        if "configMap" in volume:
            data = one(objs, "ConfigMap", volume["configMap"]["name"])["data"]
            for name, content in data.items():
                for k8s_value, attr in OPERATOR_FILL_INS.items():
                    content = content.replace(k8s_value, str(getattr(topology, attr)))
                (source / name).write_text(content)
            source.chmod(0o755)
        else:
            os.chown(source, *(int(x) for x in user.split(":")))
        mounts.append(Mount(source, vm["mountPath"], bool(vm.get("readOnly"))))

    # a database of its own in the cloud's PostgreSQL (a schema), as porter-secrets names it
    schema = f"chpc_shipped_{uuid.uuid4().hex[:10]}"
    admin = create_engine(normalize_url(topology.pg_dsn))
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    database = f"{topology.pg_dsn}?options=-csearch_path%3D{schema}"

    env = {"PATH": f"{BIN}:/usr/bin:/bin", **IMAGE_ENV}
    env.update({e["name"]: e["value"] for e in container.get("env", [])})
    for source in container.get("envFrom", []):
        if source.get("secretRef", {}).get("name") == "porter-secrets":
            # what platform-up.sh puts in it (S3 identity for bucket cloudhpc), plus the database
            # URL that deploy/kustomize/porter/cloudhpc.yaml says to add for PostgreSQL
            env.update(
                {
                    "AWS_ACCESS_KEY_ID": topology.s3_access_key,
                    "AWS_SECRET_ACCESS_KEY": topology.s3_secret_key,
                    "CLOUDHPC_PORTER__DATABASE": database,
                }
            )
        elif source.get("configMapRef", {}).get("name") == "porter-bridge":
            env.update(platform_md_bridge_literals(topology))
        else:
            raise AssertionError(f"porter's Deployment reads {source}: the test does not provide it")
    cloud = topology.cloud

    def run_tool(*args: str, overrides: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """`kubectl exec deploy/porter -- cloudhpc ...` (docs/platform.md, section 12), or another
        pod of the Deployment with `overrides` in its environment."""
        return subprocess.run(
            container_argv(cloud, mounts, user, ["cloudhpc", *args]),
            env={**env, **(overrides or {})},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def in_pod(
        argv: Sequence[str], extra_mounts: Sequence[Mount] = (), as_user: str | None = None
    ) -> tuple[list[str], dict[str, str]]:
        return container_argv(cloud, [*mounts, *extra_mounts], as_user or user, list(argv)), dict(env)

    def token(*args: str) -> str:
        proc = run_tool(*args)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    porter = start(
        "porter",
        container_argv(cloud, mounts, user, ["cloudhpc", *container["args"]]),
        env,
        root / "porter.log",
    )
    url = f"http://{cloud.addr}:{container['ports'][0]['containerPort']}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert porter.proc.poll() is None, f"porter exited:\n{porter.tail()}"
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"porter not ready:\n{porter.tail()}"
            time.sleep(0.3)
        # the tokens scripts/platform-up.sh makes (porter_cli = kubectl exec deploy/porter -- cloudhpc)
        tokens = {role: token(*argv) for role, argv in platform_up_tokens().items()}
        agent_token, user_token = tokens["agent"], tokens["user"]
        yield Platform(
            porter,
            url,
            user_token,
            agent_token,
            (topology.s3_secret_key, database.split("@")[0].rsplit(":", 1)[1], user_token, agent_token),
            run_tool,
            in_pod,
        )
    finally:
        porter.stop()
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


# ---------------------------------------------------------------- the submitter on the laptop


@dataclass
class Laptop:
    submitter: Process
    health_url: str
    passphrase: str
    host: Host
    mounts: list[Mount]
    env: dict[str, str]
    user: str

    def compose_run(self, *args: str) -> str:
        """`docker compose -f deploy/compose/submitter.yaml run --rm submitter ARGS...`: the service's
        mounts, environment and user, another command."""
        proc = subprocess.run(
            container_argv(self.host, self.mounts, self.user, ["cloudhpc", *args]),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout


def pinned_login_key(topology: Topology, path: Path) -> None:
    """docs/submitter.md: `ssh-keyscan -p 22 <login node> >> known_hosts` after checking the
    fingerprint the site publishes (here: the login sshd's public host key)."""
    scanned = topology.run("laptop", ["ssh-keyscan", "-p", "22", topology.ssh_host], timeout=30).stdout
    published = (
        (topology.known_hosts.parent / "login-sshd" / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    )
    lines = [line for line in scanned.splitlines() if line and not line.startswith("#")]
    assert [line.split()[1:3] for line in lines if "ed25519" in line] == [published], scanned
    path.write_text("".join(line + "\n" for line in lines))


def pinned_bridge_key(topology: Topology, path: Path) -> None:
    """docs/platform.md section 8: the VM's host key as the jobs see it, compared with the console's
    fingerprint. The laptop has no path to cloud:22 in the topology (only to porter), so the scan
    runs from the operator's console: docs/bridge-vm.md's "trusted network path"."""
    scanned = topology.run(
        "operator", ["ssh-keyscan", "-t", "ed25519", topology.bridge_host], timeout=30
    ).stdout
    published = (
        (topology.known_hosts.parent / "cloud-sshd" / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    )
    lines = [line for line in scanned.splitlines() if line and not line.startswith("#")]
    assert [line.split()[1:3] for line in lines] == [published], scanned
    path.write_text("".join(line + "\n" for line in lines))


@pytest.fixture(scope="module")
def laptop(
    topology: Topology, testbed: Testbed, platform: Platform, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Laptop]:
    home = tmp_path_factory.mktemp("laptop")
    compose_file = DEPLOY / "compose" / "submitter.yaml"
    compose = yaml.safe_load(compose_file.read_text())
    service = compose["services"]["submitter"]

    # the user's files: keys, the agent token from the VM, secrets.json in the seed's format
    passphrase = testbed.passphrase_file.read_text()
    files = {
        "mahti_key": home / "mahti.pem",
        "bridge_key": home / "cpouta-mahti",
        "agent_token": home / "agent-token-mahti",
        "known_hosts": home / "known_hosts",
        "bridge_known_hosts": home / "cpouta-known_hosts",
        "secrets": home / "secrets.json",
    }
    files["mahti_key"].write_bytes(testbed.ssh_key_pass.read_bytes())
    files["bridge_key"].write_bytes(topology.bridge_key.read_bytes())
    files["agent_token"].write_text(platform.agent_token + "\n")
    pinned_login_key(topology, files["known_hosts"])
    pinned_bridge_key(topology, files["bridge_known_hosts"])
    files["secrets"].write_text(
        json.dumps(
            {
                "CSC_USER": topology.ssh_user,
                "MAHTI_NODE_ADDRESS": topology.ssh_host,
                "MAHTI_PRIVATE_KEY_PATH": "/run/secrets/mahti_key",
                "MAHTI_PRIVATE_KEY_PASSPHRASE": passphrase,
                "BRIDGE_PRIVATE_KEY_PATH": "/run/secrets/bridge_key",
            },
            indent=2,
        )
    )
    for file in files.values():
        file.chmod(0o600)
    dotenv = user_env(topology, files)

    # the compose config with the user's edits
    config_source = compose_file.parent / compose["configs"][service["configs"][0]["source"]]["file"]
    config = yaml.safe_load(config_source.read_text())
    for path, value in USER_EDITS.items():
        node = config
        for key in path[:-1]:
            node = node[key]
        assert path[-1] in node, f"{'.'.join(path)} is not in {config_source.name}"
        node[path[-1]] = value
    assert "pip" not in config["clusters"][CLUSTER]
    config["clusters"][CLUSTER]["pip"] = SITE_PIP
    edited = home / "submitter-cloudhpc.yaml"
    edited.write_text(yaml.safe_dump(config))

    mounts = [Mount(edited, service["configs"][0]["target"])]
    for name in service["secrets"]:
        mounts.append(
            Mount(Path(interpolate(compose["secrets"][name]["file"], dotenv)), f"/run/secrets/{name}")
        )
    for volume in service["volumes"]:
        source, target, *mode = interpolate(volume, dotenv).split(":")
        mounts.append(Mount(Path(source).expanduser(), target, mode == ["ro"]))
    workdir = home / "workdir"  # the image's /var/lib/cloudhpc (mode 1777)
    workdir.mkdir(mode=0o1777)
    workdir.chmod(0o1777)
    mounts.append(Mount(workdir, IMAGE_WORKDIR, read_only=False))

    env = {"PATH": f"{BIN}:/usr/bin:/bin", **IMAGE_ENV}
    env.update({k: interpolate(str(v), dotenv) for k, v in service["environment"].items()})
    user = interpolate(service["user"], dotenv)
    argv = container_argv(topology.laptop, mounts, user, ["cloudhpc", *service["command"]])
    submitter = start("submitter", argv, env, home / "submitter.log")
    listen_port = service["ports"][0].rsplit(":", 1)[1]
    health = f"http://{topology.laptop.addr}:{listen_port}/healthz"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert submitter.proc.poll() is None, f"the submitter exited:\n{submitter.tail()}"
            try:
                answer = httpx.get(health, timeout=2)
                if answer.status_code == 200 and answer.json().get("status") == "ok":
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"the submitter is not healthy:\n{submitter.tail()}"
            time.sleep(0.5)
        yield Laptop(submitter, health, passphrase, topology.laptop, mounts, env, user)
    finally:
        submitter.stop()


@pytest.fixture
def client(platform: Platform, laptop: Laptop) -> Iterator[Client]:
    with Client(platform.url, platform.user_token) as c:
        yield c


def wait_state(client: Client, job: Job, timeout: float) -> Job:
    final = client.wait(job, timeout=timeout, poll=5)
    return final


def sacct(topology: Topology, job: Job, fields: str, expected: str, timeout: float = 30) -> str:
    """The job's sacct line on the login node (over ssh from the laptop), asked again for a while
    until it is `expected`: slurmdbd completes a record a moment after the job ends."""
    deadline = time.monotonic() + timeout
    while True:
        record = topology.ssh(f"sacct -X -P -n -j {job.slurm_job_id} --format={fields}").strip()
        if record == expected or time.monotonic() > deadline:
            return record
        time.sleep(1)


def no_secrets_leaked(topology: Topology, platform: Platform, laptop: Laptop, job: Job) -> None:
    """No token, S3 key, database password or key passphrase in porter's or the submitter's log or
    arguments, nor in anything the job left on the cluster (its directory in hpcuser's home, shared
    by every host); the staged bridge key is gone once the job ended."""
    secrets = [*platform.secrets, laptop.passphrase]
    for process in (platform.porter, laptop.submitter):
        log = process.log.read_text(errors="replace")
        cmdline = Path(f"/proc/{process.proc.pid}/cmdline").read_bytes().decode(errors="replace")
        for secret in secrets:
            assert secret not in log, f"a secret in {process.name}'s log"
            assert secret not in cmdline, f"a secret in {process.name}'s arguments"
    home = subprocess.run(
        ["getent", "passwd", topology.ssh_user], capture_output=True, text=True, check=True
    ).stdout.split(":")[5]
    jobdir = Path(home, ".cloudhpc", "jobs", str(job.id))
    assert jobdir.is_dir(), jobdir
    deadline = time.monotonic() + 30
    while any(p.name == "bridge_key" for p in jobdir.rglob("*")) and time.monotonic() < deadline:
        time.sleep(1)
    for path in jobdir.rglob("*"):
        assert path.name != "bridge_key", f"{path} outlived the job"
        if path.is_file():
            content = path.read_bytes().decode(errors="replace")
            for secret in secrets:
                assert secret not in content, f"a secret in {path}"


# ---------------------------------------------------------------- the tests


def test_a_batch_job_from_the_console_runs_on_the_topo_cluster(
    topology: Topology, platform: Platform, laptop: Laptop, client: Client
) -> None:
    tag = uuid.uuid4().hex[:8]
    job = client.submit(
        {
            "name": f"shipped-batch-{tag}",
            "cluster": CLUSTER,
            "kind": "batch",
            "script": f"#!/bin/bash\necho hello-{tag} from $(hostname)\nsleep 3\n",
            "resources": {"time": "00:02:00"},
        }
    )
    t0 = time.monotonic()
    final = wait_state(client, job, timeout=120)
    print(f"TIMING batch ended after {time.monotonic() - t0:.1f}s")
    assert final.state == JobState.COMPLETED, (final.state, final.reason, laptop.submitter.tail())
    assert final.slurm_job_id
    out = client.logs(final).data.decode()
    assert re.search(rf"hello-{tag} from c[12]\b", out), out
    # SLURM's own record on the login node: the topo cluster, cloudhpc's comment, the site's account
    expected = f"{topology.slurm_cluster}|COMPLETED|cloudhpc:{final.id}|default|debug|{topology.ssh_user}"
    record = sacct(topology, final, "Cluster,State,Comment,Account,Partition,User", expected)
    assert record == expected, record
    # accounting came back through porter
    deadline = time.monotonic() + 90
    accounting: dict[str, Any] = {}
    while not accounting and time.monotonic() < deadline:
        try:
            accounting = client.accounting(final)
        except ApiError as exc:
            assert exc.code == "not_available", exc
            time.sleep(1)
    print(f"TIMING accounting after {time.monotonic() - t0:.1f}s")
    assert accounting, f"no accounting came back:\n{laptop.submitter.tail()}"
    # the cloud's Prometheus scrapes porter, which counts the job (the submitter's own metrics would
    # need the laptop's ssh -R of docs/platform.md section 9: the topology gives the laptop no path
    # to cloud:22, so that target stays down, as the docs say it does without the tunnel)
    query = 'cloudhpc_jobs{cluster="mahti",state="completed"}'
    deadline = time.monotonic() + 30
    while True:
        answer = httpx.get(
            f"{topology.prometheus_url}/api/v1/query", params={"query": query}, timeout=5
        ).json()
        values = [float(r["value"][1]) for r in answer["data"]["result"]]
        if (values and max(values) >= 1) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert values, f"Prometheus on cloud has no {query}: {answer}"
    assert max(values) >= 1, answer
    # artifacts: the compose submitter has no object store of its own and the laptop reaches no S3
    # of the platform, so they go through porter into porter's store; the listing's presigned URLs
    # point at the cloud's S3, which the operator's console reaches
    required = {"spec.json", "job.sh", "output.log", "sacct.json"}
    deadline = time.monotonic() + 60
    while True:
        artifacts = {a["name"]: a["url"] for a in client.artifacts(final)}
        if required <= set(artifacts) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert required <= set(artifacts), (sorted(artifacts), laptop.submitter.tail())
    assert artifacts["output.log"].startswith(topology.s3_endpoint), artifacts["output.log"]
    stored = httpx.get(artifacts["output.log"], timeout=10)
    assert stored.status_code == 200, stored.text
    assert stored.text == out, (stored.text, out)
    assert "could not store artifacts" not in laptop.submitter.log.read_text(), laptop.submitter.tail()

    no_secrets_leaked(topology, platform, laptop, final)


# ---------------------------------------------------------------- a Ray job with bridges

RAY_PROBE = """\
import os, socket, sys, time, urllib.request
cloud, marker = sys.argv[1], sys.argv[2]
local = os.environ["CLOUDHPC_IMPORT_MLFLOW"]
body = urllib.request.urlopen(f"http://{local}/health", timeout=30).read().decode().strip()
print("import:", local, body, flush=True)
try:
    socket.create_connection((cloud, 5000), timeout=3)
    print("direct: open", flush=True)
except OSError as exc:
    print("direct:", type(exc).__name__, flush=True)
print("node:", socket.gethostname(), flush=True)
deadline = time.time() + 240
while not os.path.exists(marker) and time.time() < deadline:
    time.sleep(0.5)
print("released:", os.path.exists(marker), flush=True)
"""


JOB_SUBMISSION = """\
import sys, time
from ray.job_submission import JobStatus, JobSubmissionClient
client = JobSubmissionClient(sys.argv[1])
entry = "python -c 'import ray, socket; ray.init(); print(\\"answer\\", 6 * 7, \\"on\\", socket.gethostname())'"
job = client.submit_job(entrypoint=entry)
deadline = time.time() + 120
while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
    assert time.time() < deadline, "the job did not end"
    time.sleep(1)
print(client.get_job_status(job).value)
print(client.get_job_logs(job))
"""


@pytest.fixture(scope="module")
def ray_environment(testbed: Testbed) -> None:
    """The Ray environment the job asks for, ready in hpcuser's `~/.cloudhpc/envs/`.

    The topology's login and compute nodes have no route out (no PyPI), as many sites' compute
    nodes; the filesystem is shared with the single-host testbed, whose login node (loopback, with
    the machine's network) builds it once, for the same spec and prelude, hence the same directory.
    When it is already built this is one stat."""
    prebuild_environment(testbed, RAY_ENV)


def prebuild_environment(testbed: Testbed, environment: Mapping[str, Any]) -> None:
    """`environment` built through the single-host testbed's login node (see `ray_environment`)."""

    async def ensure() -> None:
        ssh = SSHConfig(
            host=testbed.ssh_host,
            port=testbed.ssh_port,
            user=testbed.ssh_user,
            key_file=testbed.ssh_key,
            known_hosts=testbed.known_hosts,
        )
        conn = SSHConnection(ssh, cluster="testbed")
        try:
            prelude = str(USER_EDITS[("clusters", CLUSTER, "prelude")])
            pip = PipConfig.model_validate(SITE_PIP)
            cache = EnvironmentCache(conn, workdir="~/.cloudhpc", prelude=prelude, pip=pip)
            await cache.ensure(Environment.model_validate(environment))
        finally:
            await conn.close()

    asyncio.run(ensure())


def test_a_ray_job_exposes_its_dashboard_on_cloud_and_imports_mlflow_through_its_tunnel(
    topology: Topology, platform: Platform, laptop: Laptop, client: Client, ray_environment: None
) -> None:
    cloud = topology.cloud.addr
    marker_dir = Path(f"/tmp/chpc-shipped-{uuid.uuid4().hex[:8]}")  # /tmp is shared by every host
    marker_dir.mkdir(mode=0o777)
    marker_dir.chmod(0o777)
    marker = marker_dir / "release"
    try:
        job = client.submit(
            {
                "name": "shipped-ray",
                "cluster": CLUSTER,
                "kind": "ray-job",
                "ray": {
                    "entrypoint": f"python probe.py {cloud} {marker}",
                    "head": {"cpus_per_task": 1, "mem": "1G"},
                    "expose": ["dashboard"],
                    # MLflow as the bridge VM reaches it (its authorized_keys line permits it)
                    "import": [{"name": "mlflow", "host": cloud, "port": 5000}],
                },
                "files": {"probe.py": RAY_PROBE},
                "environment": RAY_ENV,
                "resources": {"time": "00:10:00"},
            }
        )
        (bridge,) = client.wait_bridges(job, names=["dashboard"], timeout=240)
        assert (bridge.bridge_host, bridge.ready) == (topology.bridge_bind_address, True), bridge
        low, high = topology.bridge_port_range
        assert low <= bridge.bridge_port <= high
        # the dashboard answers on the cloud VM's address, from the cloud, through the job's -R
        version = topology.run(
            "cloud", ["curl", "-sf", "--max-time", "10", f"http://{cloud}:{bridge.bridge_port}/api/version"]
        ).stdout
        assert json.loads(version)["ray_version"] == ray.__version__, version
        # a real JobSubmissionClient on cloud runs a job on the HPC Ray cluster through the bridge
        submitted = topology.run(
            "cloud",
            [sys.executable, "-c", JOB_SUBMISSION, bridge.url or f"http://{cloud}:{bridge.bridge_port}"],
            timeout=150,
        ).stdout
        assert "SUCCEEDED" in submitted, submitted
        assert "answer 42 on c" in submitted, submitted
        # ... and only there: the laptop has no path to it
        assert topology.probe("laptop", [(cloud, bridge.bridge_port)]) != ["open"]
        running = client.get(job)
        assert running.state == JobState.RUNNING, running.state
        marker.touch()
        final = client.wait(job, timeout=120, poll=5)
        out = client.logs(final).data.decode()
        assert final.state == JobState.COMPLETED, (final.state, final.reason, out[-3000:])
        # MLflow reached through the tunnel's -L; a direct connection from the compute node refused
        assert re.search(r"^import: 127\.0\.0\.1:\d+ OK$", out, re.M), out[-3000:]
        assert "direct: ConnectionRefusedError" in out, out[-3000:]
        node = re.search(r"^node: (\S+)$", out, re.M)
        assert node is not None
        assert node.group(1) in topology.slurm_nodes
        expected = f"COMPLETED|cloudhpc:{final.id}|{node.group(1)}"
        record = sacct(topology, final, "State,Comment,NodeList", expected)
        assert record == expected, record
        no_secrets_leaked(topology, platform, laptop, final)
    finally:
        subprocess.run(["rm", "-rf", str(marker_dir)], check=False)


RAY_SPREAD = """\
import os, socket, time
import ray
ray.init()
deadline = time.time() + 120
while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.time() < deadline:
    time.sleep(1)
alive = [n for n in ray.nodes() if n["Alive"]]
print("nodes:", len(alive), sorted(n["NodeManagerAddress"] for n in alive), flush=True)

from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

@ray.remote(num_cpus=1)
def where():
    return socket.gethostname(), ray.util.get_node_ip_address()

group = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
ray.get(group.ready(), timeout=60)
tasks = [
    where.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)).remote()
    for i in range(2)
]
print("tasks:", sorted(ray.get(tasks)), flush=True)
"""


def test_a_two_node_ray_job_spans_c1_and_c2(
    topology: Topology, platform: Platform, laptop: Laptop, client: Client, ray_environment: None
) -> None:
    """Item 3 of issue 11, the part without the pipeline: a ray-job with one worker node is one SLURM
    job on c1 and c2, and its Ray cluster has a node on each, at the nodes' own addresses."""
    node = {"cpus_per_task": 1, "mem": "1G"}
    job = client.submit(
        {
            "name": "shipped-ray-2n",
            "cluster": CLUSTER,
            "kind": "ray-job",
            "ray": {"entrypoint": "python spread.py", "head": node, "workers": {"nodes": 1, **node}},
            "files": {"spread.py": RAY_SPREAD},
            "environment": RAY_ENV,
            "resources": {"time": "00:10:00"},
        }
    )
    final = client.wait(job, timeout=300, poll=5)
    out = client.logs(final).data.decode()
    assert final.state == JobState.COMPLETED, (final.state, final.reason, out[-3000:])
    addrs = sorted(topology.hosts[n].addr for n in topology.slurm_nodes)
    assert f"nodes: 2 {addrs!r}" in out, out[-3000:]
    tasks = re.search(r"^tasks: (.*)$", out, re.M)
    assert tasks is not None, out[-3000:]
    assert all(f"('{n}', '{topology.hosts[n].addr}')" in tasks.group(1) for n in topology.slurm_nodes), (
        tasks.group(1)
    )
    expected = f"COMPLETED|cloudhpc:{final.id}|c[1-2]|2"
    record = sacct(topology, final, "State,Comment,NodeList,NNodes", expected)
    assert record == expected, record


def test_the_bridge_line_from_the_submitters_image_is_what_the_vm_holds(
    topology: Topology, laptop: Laptop
) -> None:
    """docs/platform.md section 10, step 3: `docker compose ... run --rm submitter bridge
    authorized-key --permit-open ...` prints, from the compose configuration and the mounted bridge
    key, the line the bridge VM's account holds (the topology's cloud:22 was set up with it)."""
    cloud = topology.cloud.addr
    printed = laptop.compose_run(
        "bridge", "authorized-key", "--permit-open", f"{cloud}:5000", "--permit-open", f"{cloud}:9000"
    )
    home = subprocess.run(
        ["getent", "passwd", topology.bridge_user], capture_output=True, text=True, check=True
    ).stdout.split(":")[5]
    assert Path(home, ".ssh", "authorized_keys").read_text() == printed


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"BIND_ADDRESS": "127.0.0.1", "KUBERNETES__ENABLED": "true"}, "porter.bridge.bind_address"),
        ({"BIND_ADDRESS": "cloud", "KUBERNETES__ENABLED": "true"}, "porter.bridge.bind_address"),
        ({"BIND_ADDRESS": "0.0.0.0", "HOST": "cloud", "KUBERNETES__ENABLED": "true"}, "porter.bridge.host"),
    ],
)
def test_porter_refuses_a_bridge_setup_that_cannot_work(
    platform: Platform, overrides: dict[str, str], key: str
) -> None:
    """The ConfigMap porter-bridge of docs/platform.md with a loopback or a host name while Kubernetes
    publishing is on: porter's pod does not start, and says which key to fix."""
    proc = platform.run_tool(
        "serve", "porter", overrides={f"CLOUDHPC_PORTER__BRIDGE__{k}": v for k, v in overrides.items()}
    )
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert f"{key}: " in proc.stderr, proc.stderr
    assert "EndpointSlice" in proc.stderr, proc.stderr


def test_an_object_store_input_reaches_the_compose_submitter_through_porter(
    topology: Topology, laptop: Laptop, client: Client
) -> None:
    """A job whose `files` name an object of porter's store (as the example pipeline's training step
    passes its data): the compose submitter has no path to the platform's S3 and no object store of
    its own, so it reads the object through porter (`GET /api/v1/agent/jobs/{id}/inputs`); the job
    prints it. Another user's object, named by a job, is still refused at submission."""
    import boto3

    user = PLATFORM_UP_ENV["PIPELINE_NS"]
    assert topology.probe("laptop", [(topology.cloud.addr, 9000)]) != ["open"]
    key = f"users/{user}/shipped-{uuid.uuid4().hex[:8]}/input.txt"
    assert client.me()["inputs"][0] == f"s3://{topology.s3_bucket}/users/{user}/"
    s3 = boto3.client(
        "s3",
        endpoint_url=topology.s3_endpoint,
        aws_access_key_id=topology.s3_access_key,
        aws_secret_access_key=topology.s3_secret_key,
        region_name="us-east-1",
    )
    tag = uuid.uuid4().hex
    s3.put_object(Bucket=topology.s3_bucket, Key=key, Body=f"data {tag}\n".encode())
    try:
        job = client.submit(
            {
                "name": "shipped-input",
                "cluster": CLUSTER,
                "kind": "batch",
                "script": "#!/bin/bash\ncat input.txt\n",
                "files": {"input.txt": f"s3://{topology.s3_bucket}/{key}"},
                "resources": {"time": "00:02:00"},
            }
        )
        final = client.wait(job, timeout=180, poll=5)
        assert final.state == JobState.COMPLETED, (final.state, final.reason, laptop.submitter.tail())
        assert client.logs(final).data.decode() == f"data {tag}\n"
        with pytest.raises(ApiError) as refused:
            client.submit(
                {
                    "name": "shipped-input-not-mine",
                    "cluster": CLUSTER,
                    "kind": "batch",
                    "script": "#!/bin/bash\ncat input.txt\n",
                    "files": {"input.txt": f"s3://{topology.s3_bucket}/users/someone-else/input.txt"},
                }
            )
        assert refused.value.status == 422, refused.value
    finally:
        s3.delete_object(Bucket=topology.s3_bucket, Key=key)


# ---------------------------------------------------------------- the example pipeline on cloud

PIPELINE_RUN = """\
import json, sys, time
from kfp import local
from cloudhpc.pipelines.fmnist.pipeline import cloud_hpc_pipeline
params, root = json.loads(sys.argv[1]), sys.argv[2]
local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=root)
started = time.monotonic()
task = cloud_hpc_pipeline(**params)
print("PIPELINE accuracy", float(task.output), "seconds", round(time.monotonic() - started, 1), flush=True)
"""
"""The pipeline as docs/pipelines.md runs it without Kubeflow: KFP's local runner, each step a process."""
EPOCHS = 3
"""Few, on the 1,797 digits: the gate's 0.80 is passed with room (0.90 seen)."""


@pytest.fixture(scope="module")
def training_environment(testbed: Testbed) -> dict[str, Any]:
    """The training job's environment (Ray Train, PyTorch's CPU wheel from the site's wheels, the
    MLflow client), prebuilt like `ray_environment`."""
    packages = [f"ray[default,train]=={ray.__version__}", "torch==2.13.0+cpu", "mlflow-skinny", "numpy"]
    environment = {"packages": packages}
    prebuild_environment(testbed, environment)
    return environment


@pytest.mark.timeout(1500)
def test_the_example_pipeline_on_cloud_trains_across_c1_and_c2_and_registers_in_mlflow(
    topology: Topology,
    platform: Platform,
    laptop: Laptop,
    client: Client,
    training_environment: dict[str, Any],
    tmp_path: Path,
) -> None:
    """Issue 11, items 2 and 3: the fmnist-cloud-hpc pipeline run on `cloud` with KFP's local runner
    (docs/pipelines.md): preprocess stores the splits in porter's S3 under the pipeline user's
    prefix; the train step submits a 2-node ray-job through porter, which the laptop's compose
    submitter stages (train.npz read through porter: the laptop has no path to S3) onto c1 and c2;
    Ray Train's workers log to MLflow through the job's `-L` import (the compute nodes cannot reach
    MLflow directly); evaluation and registration run on cloud."""
    from mlflow.tracking import MlflowClient

    cloud = topology.cloud.addr
    # the compute nodes have no direct path to MLflow (only the job's tunnel through cloud:22)
    for node in topology.slurm_nodes:
        assert topology.probe(node, [(cloud, 5000)]) != ["open"], node
    model_name = f"shipped-{uuid.uuid4().hex[:8]}"
    (store_prefix,) = [u for u in client.me()["inputs"] if "/users/" in u]
    params = {
        "porter_url": platform.url,
        "cluster": CLUSTER,
        "tracking_uri": topology.mlflow_url,
        # MLflow as the bridge VM reaches it (its authorized_keys line permits it)
        "mlflow_import": f"{cloud}:5000",
        "experiment": "shipped-cloud-hpc",
        "registered_model_name": model_name,
        "store_url": store_prefix.rstrip("/"),
        "s3_endpoint_url": topology.s3_endpoint,
        "epochs": EPOCHS,
        "hpc_job": {
            "resources": {"nodes": 2, "cpus_per_task": 1, "mem": "3G", "time": "00:20:00"},
            "environment": training_environment,
        },
        "timeout_seconds": 1200.0,
    }
    home = tmp_path / "home"
    home.mkdir()
    # what the pipelines' Secrets give the steps (cloudhpc-porter's token, cloudhpc-s3's keys)
    env = {
        "PATH": f"{BIN}:/usr/bin:/bin",
        "HOME": str(home),
        "CLOUDHPC_TOKEN": platform.user_token,
        "AWS_ACCESS_KEY_ID": topology.s3_access_key,
        "AWS_SECRET_ACCESS_KEY": topology.s3_secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
        "RAY_AUTH_MODE": "disabled",
    }
    log = tmp_path / "pipeline.log"
    started = time.monotonic()
    with log.open("wb") as sink:
        proc = subprocess.run(
            topology.cloud.argv(
                sys.executable, "-c", PIPELINE_RUN, json.dumps(params), str(tmp_path / "kfp")
            ),
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            timeout=1400,
            check=False,
            cwd=tmp_path,
        )
    took = time.monotonic() - started
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text[-6000:] + "\n--- submitter:\n" + laptop.submitter.tail()
    result = re.search(r"^PIPELINE accuracy (\S+) seconds (\S+)$", text, re.M)
    assert result is not None, text[-4000:]
    accuracy = float(result.group(1))
    assert accuracy > 0.8, accuracy

    # MLflow on cloud: the run (per-epoch metrics from the job, the test metrics from evaluation)
    # and the registered model
    mlflow_client = MlflowClient(topology.mlflow_url)
    versions = mlflow_client.search_model_versions(f"name = '{model_name}'")
    assert len(versions) == 1, versions
    run_id = versions[0].run_id
    assert run_id, versions
    run = mlflow_client.get_run(run_id)
    metrics, run_params = run.data.metrics, run.data.params
    history = mlflow_client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == list(range(1, EPOCHS + 1)), history
    assert run_params["ray.num_workers"] == "2", run_params
    assert metrics["test_accuracy"] == pytest.approx(accuracy)
    assert metrics["gate_passed"] == 1.0

    # the training job: on c1 and c2, a Ray cluster of 2 nodes, its input read through porter
    job = client.get(run.data.tags["cloudhpc.job_id"])
    assert job.state == JobState.COMPLETED, (job.state, job.reason)
    assert job.spec.files["data/train.npz"].startswith(store_prefix), job.spec.files
    out = client.logs(job).data.decode()
    assert "cloudhpc: Ray cluster ready: 2 node(s)" in out, out[-3000:]
    expected = f"COMPLETED|cloudhpc:{job.id}|c[1-2]|2"
    record = sacct(topology, job, "State,Comment,NodeList,NNodes", expected)
    assert record == expected, record
    # the job's artifacts went through porter into porter's store
    names = {a["name"] for a in client.artifacts(job)}
    assert {"spec.json", "job.sh", "output.log"} <= names, names
    no_secrets_leaked(topology, platform, laptop, job)
    print(
        f"\nTIMING shipped pipeline {took:.1f} s (in the runner: {result.group(2)} s), "
        f"test accuracy {accuracy:.3f}, train step {metrics.get('stage.step_wall_seconds', -1):.1f} s, "
        f"training {metrics.get('stage.training_seconds', -1):.1f} s"
    )
