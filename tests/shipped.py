"""The platform as shipped, on the multi-host topology: porter on `cloud` from what `deploy/kustomize`
renders, the submitter on `laptop` as `deploy/compose/submitter.yaml` runs it.

- porter runs on `cloud` with what `deploy/kustomize` renders for it: the ConfigMap `porter-config`
  mounted where the Deployment mounts it, the Deployment's environment, the Secret `porter-secrets`
  and the ConfigMap `porter-bridge` of docs/platform.md as environment, as the Deployment's user;
- the submitter runs on `laptop` exactly as `deploy/compose/submitter.yaml` runs it: its command, its
  environment (interpolated from a `.env` filled in as `deploy/compose/env.example` says), its secrets
  under /run/secrets/, its config and volumes where compose mounts them, as SUBMITTER_UID.

"Where compose or Kubernetes mounts it" is real: each process runs in a private mount namespace
(`unshare --mount`) where the sources are bind-mounted onto the container paths, so a path in
secrets.json or in a manifest that does not match its mount fails here as it would in the container.
The only hand-written values are the ones the docs tell an operator or a user to fill in; they are
gathered in OPERATOR_FILL_INS, `user_env()`, USER_EDITS and SITE_PIP below.

Shared by tests/e2e/test_topology_shipped.py and the benchmarks' `--topology` mode (bench/), so both
measure and check the same deployment.
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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import ray
import yaml
from sqlalchemy import create_engine, text

from cloudhpc.config import PipConfig
from cloudhpc.domain.jobs import Environment
from cloudhpc.hpc.envs import EnvironmentCache
from cloudhpc.hpc.ssh import SSHConnection
from cloudhpc.store.engine import normalize_url
from tests.e2e.harness import scrape_token_file
from tests.slurm_jobs import ssh_config
from tests.testbed import Testbed
from tests.topology import Host, Topology

ROOT = Path(__file__).resolve().parents[1]
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
        [str(kubectl), "kustomize", str(DEPLOY / "kustomize" / "kubeflow-monitoring" / "local")],
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


@contextmanager
def scratch_space() -> Iterator[None]:
    """The overlays' scratch directory for the processes started inside the block."""
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


@contextmanager
def shipped_platform(topology: Topology, root: Path) -> Iterator[Platform]:
    """porter on `cloud` as deploy/kustomize renders it, with a PostgreSQL schema of its own, until the
    block ends (then the schema is dropped)."""
    root.chmod(0o755)
    objs = render_platform()
    deployment = one(objs, "Deployment", "porter")
    pod = deployment["spec"]["template"]["spec"]
    # porter's own container (the pod's `tls` sidecar terminates TLS for clients outside the cluster)
    container = next(c for c in pod["containers"] if c["name"] == "porter")
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
        elif volume.get("secret", {}).get("secretName") == "metrics-scrape-token":
            # what platform-up.sh puts in it: the token the topology's Prometheus sends to /metrics
            token = scrape_token_file(topology.prometheus_targets).read_text()
            for item in volume["secret"]["items"]:
                (source / item["path"]).write_text(token)
                os.chown(source / item["path"], *(int(x) for x in user.split(":")))
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


@contextmanager
def shipped_laptop(topology: Topology, testbed: Testbed, platform: Platform, home: Path) -> Iterator[Laptop]:
    """The submitter on `laptop` exactly as deploy/compose/submitter.yaml runs it, its files in `home`,
    until the block ends."""
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


# ---------------------------------------------------------------- environments and the pipeline


def prebuild_environment(testbed: Testbed, environment: Mapping[str, Any]) -> None:
    """`environment` built through the single-host testbed's login node (see `ray_environment`)."""

    async def ensure() -> None:
        conn = SSHConnection(ssh_config(testbed), cluster="testbed")
        try:
            prelude = str(USER_EDITS[("clusters", CLUSTER, "prelude")])
            pip = PipConfig.model_validate(SITE_PIP)
            cache = EnvironmentCache(conn, workdir="~/.cloudhpc", prelude=prelude, pip=pip)
            await cache.ensure(Environment.model_validate(environment))
        finally:
            await conn.close()

    asyncio.run(ensure())


TRAINING_ENV = {
    "packages": [f"ray[default,train]=={ray.__version__}", "torch==2.13.0+cpu", "mlflow-skinny", "numpy"]
}
"""The training job's environment: Ray Train, PyTorch's CPU wheel from the site's wheels, the MLflow
client (the same for the single-host and the topology's runs, so one cached build serves both)."""


def hpc_pipeline_params(
    topology: Topology, platform: Platform, store_url: str, epochs: int, name: str
) -> dict[str, Any]:
    """fmnist-cloud-hpc's parameters on the topology: porter on cloud, MLflow on cloud imported by the
    job through the bridge VM (its authorized_keys line permits it), the pipeline user's store
    prefix, a 2-node training job on c1 and c2."""
    cloud = topology.cloud.addr
    return {
        "porter_url": platform.url,
        "cluster": CLUSTER,
        "tracking_uri": topology.mlflow_url,
        "mlflow_import": f"{cloud}:5000",
        "experiment": name,
        "registered_model_name": name,
        "store_url": store_url,
        "s3_endpoint_url": topology.s3_endpoint,
        "epochs": epochs,
        "hpc_job": {
            "resources": {"nodes": 2, "cpus_per_task": 1, "mem": "3G", "time": "00:20:00"},
            "environment": TRAINING_ENV,
        },
        "timeout_seconds": 1200.0,
    }


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


def run_pipeline_on_cloud(
    topology: Topology, platform: Platform, params: Mapping[str, Any], workdir: Path, timeout: float = 1400
) -> tuple[int, str, float]:
    """fmnist-cloud-hpc with KFP's local runner on `cloud`, as docs/pipelines.md runs it, with what the
    pipelines' Secrets give the steps (cloudhpc-porter's token, cloudhpc-s3's keys): (exit code, the
    runner's output, seconds)."""
    home = workdir / "home"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": f"{BIN}:/usr/bin:/bin",
        "HOME": str(home),
        "CLOUDHPC_TOKEN": platform.user_token,
        "AWS_ACCESS_KEY_ID": topology.s3_access_key,
        "AWS_SECRET_ACCESS_KEY": topology.s3_secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
        "RAY_AUTH_MODE": "disabled",
    }
    log = workdir / f"pipeline-{uuid.uuid4().hex[:6]}.log"
    started = time.monotonic()
    with log.open("wb") as sink:
        proc = subprocess.run(
            topology.cloud.argv(sys.executable, "-c", PIPELINE_RUN, json.dumps(params), str(workdir / "kfp")),
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
            cwd=workdir,
        )
    return proc.returncode, log.read_text(errors="replace"), time.monotonic() - started
