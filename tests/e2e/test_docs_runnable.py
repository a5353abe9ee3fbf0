"""The docs as a test: every marked block of the setup guides runs in the topology, in the docs' order.

docs/hpc-site.md, docs/submitter.md, docs/bridge-vm.md and docs/platform.md mark each shell block
`<!-- run: host=... -->` or `<!-- skip: reason -->` and each config file a user writes
`<!-- file: host=... path=... -->` (tests/docs_blocks.py; an unmarked shell block fails). Per
document the blocks run in order, each on its host of the multi-host topology (docs/testbed.md), as
root with a home of the document's own: a private mount namespace binds a scratch directory over
/root, so `~` in a command, in ssh's own files and in cloudhpc's paths is that directory on every host
(the topology's hosts share one filesystem, as a shared home would). What a block exports is seen by
the next (`export -p` carried over). `as=porter` runs a block in porter's pod on cloud (the one of
tests/e2e/test_topology_shipped.py: the rendered kustomize configuration; its mounts and environment,
but as root, see `DocRun.argv`), the document's home mounted at its own path as the working directory.
Background blocks are stopped by their process group at the end; files a document changes outside
its home are put back (`restored`).

The only hand-written values are in `substitutions()` (what a document tells its reader to fill in,
and the topology's answer) and `given()` (what the reader has before the document starts: the HPC key
the site registered, its passphrase; for platform.md also the agent token its Kubernetes step makes);
the test prints both, and every block it runs or skips with the reason.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.docs_blocks import Block, load
from tests.e2e.test_topology_shipped import platform, scratch  # noqa: F401 (fixtures shared with it)
from tests.shipped import Mount, Platform
from tests.testbed import Testbed
from tests.topology import Topology

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
BIN = Path(sys.executable).parent
"""`pip install 'cloudhpc[server]'` as the docs ask: the venv that has this checkout installed."""
SCRATCH = Path("/var/tmp")
"""Where the documents' homes are made: not under /tmp, which porter's pod has as an emptyDir."""
BLOCK_TIMEOUT = 180.0
_python = Path(os.path.realpath(sys.executable))
ROOT_KEEP = [Path("/root", _python.relative_to("/root").parts[0])] if _python.is_relative_to("/root") else []
"""Directories of the real /root that stay visible under a document's home: where the venv's Python is."""


def substitutions(topology: Topology) -> dict[str, dict[str, str]]:
    """Per document: text the reader replaces with their own value -> the topology's value."""
    site = {
        # the login node, the reader's account on it, and the site's choices (docs/hpc-site.md)
        "mahti.csc.fi": topology.ssh_host,
        "user: alice": f"user: {topology.ssh_user}",
        "/projappl/project_2001234/alice/cloudhpc": "~/.cloudhpc",
        'prelude: "source /appl/profile/zz-csc-env.sh"': 'prelude: ""',  # Mahti's module profile
        "partition: medium": f"partition: {topology.partition}",
        "account: project_2001234": "account: default",
    }
    vm = {
        # the VM's admin appends to the bridge account's authorized_keys: in the topology the operator
        # (root) is that admin, and the bridge account takes no login (its one key is restricted)
        "ssh ubuntu@86.50.x.y 'cat >> ~/.ssh/authorized_keys'": (
            f"sh -c 'cat >> ~{topology.bridge_user}/.ssh/authorized_keys'"
        ),
        # the topology has no Kubernetes: porter is a plain process on the VM
        "kubernetes: {enabled: true,": "kubernetes: {enabled: false,",
        # the bridge VM (docs/bridge-vm.md): its floating IP, private address and account
        "86.50.x.y": topology.bridge_host,
        "192.168.1.10": topology.bridge_bind_address,
        "ssh_user: ubuntu": f"ssh_user: {topology.bridge_user}",
        "ubuntu@": f"{topology.bridge_user}@",
    }
    return {
        "hpc-site.md": site,
        "submitter.md": {**site, "https://porter.example.org": topology.porter_url},
        "bridge-vm.md": vm,
        "platform.md": {
            **{k: v for k, v in site.items() if k == "mahti.csc.fi"},
            "<your CSC username>": topology.ssh_user,
            "<the key's passphrase, or empty>": "",  # the given key has none
            "cd cloudhpc   # this repository": f"cd {ROOT}   # this repository",
            # the laptop reaches porter directly (section 8, step 4: no tunnel); the topology's porter
            # speaks plain HTTP, where the VM's has its TLS endpoint on 5443
            "CLOUDHPC_SUBMITTER__PORTER_URL=https://<floating IP>:5443": (
                f"CLOUDHPC_SUBMITTER__PORTER_URL={topology.porter_url}"
            ),
            "ACCOUNT=project_2001234": "ACCOUNT=default",
            "PARTITION=medium": f"PARTITION={topology.partition}",
            "PRELUDE='source /appl/profile/zz-csc-env.sh'": "PRELUDE=''",
            "<floating IP>": topology.bridge_host,
            "<private address>": topology.bridge_bind_address,
            "SSH_USER=ubuntu": f"SSH_USER={topology.bridge_user}",
        },
    }


def given(
    doc: str, testbed: Testbed, topology: Topology, request: pytest.FixtureRequest
) -> dict[str, tuple[bytes, str]]:
    """Files in the reader's home before `doc` starts: path under home -> (content, what it is).
    The HPC key is registered at the site (MyCSC for Mahti): one of the testbed's keys, which
    hpcuser's authorized_keys holds. platform.md also starts with what its steps that cannot run here
    leave behind."""
    if doc in ("hpc-site.md", "submitter.md"):
        return {
            ".ssh/id_ed25519_mahti": (testbed.ssh_key_pass.read_bytes(), "the HPC key (with a passphrase)"),
            ".config/cloudhpc/mahti-passphrase": (testbed.passphrase_file.read_bytes(), "its passphrase"),
        }
    if doc == "platform.md":
        platform = shipped_porter(request)
        return {
            ".ssh/mahti.pem": (
                testbed.ssh_key.read_bytes(),
                "the HPC key, registered (section 7); without a passphrase: ssh would ask for it",
            ),
            ".config/cloudhpc/agent-token-mahti": (
                (platform.agent_token + "\n").encode(),
                "the agent token platform-up.sh makes on the VM (section 5: Kubernetes), copied (section 8)",
            ),
            # SSL_CERT_FILE names it (section 8); unused over the topology's plain HTTP, but it must load
            ".config/cloudhpc/platform-ca.pem": (
                (ROOT / "deploy/kustomize/components/dev-credentials/dev-only-porter-tls.crt").read_bytes(),
                "the platform's CA that platform-up.sh makes on the VM, copied (section 8, step 4)",
            ),
        }
    if doc == "bridge-vm.md":
        # the CA that scripts/topology.sh made cloud's sshd trust: the document's step 1 keeps a CA it
        # finds, and its step 4 (installing the CA on the VM) cannot run in the topology
        ca = topology.bridge_key.with_name("bridge_ca")
        return {".ssh/cloudhpc-bridge-ca": (ca.read_bytes(), "the bridge CA the VM already trusts (step 4)")}
    return {}


def restored(topology: Topology) -> dict[str, list[Path]]:
    """Per document: files outside its home that it changes, put back as they were afterwards."""
    bridge_home = Path(
        subprocess.run(
            ["getent", "passwd", topology.bridge_user], capture_output=True, text=True, check=True
        ).stdout.split(":")[5]
    )
    return {"bridge-vm.md": [bridge_home / ".ssh" / "authorized_keys"]}


def ports_used(topology: Topology) -> dict[str, list[tuple[str, str, int]]]:
    """Per document: (host, address, port) its processes listen on, porter's included; another test's
    process there (the topology has one laptop and one cloud VM) is waited for."""
    porter = [] if "porter" in _OURS else [("operator", topology.cloud.addr, topology.porter_port)]
    submitter = ("laptop", "127.0.0.1", 5556)
    return {"submitter.md": [*porter, submitter], "platform.md": [*porter, submitter]}


DOC_NAMES = ("hpc-site.md", "submitter.md", "bridge-vm.md", "platform.md")

_OURS: set[str] = set()
"""What this module started and keeps for its other documents (the module-scoped porter)."""


def shipped_porter(request: pytest.FixtureRequest) -> Platform:
    """porter of tests/e2e/test_topology_shipped.py on cloud, started once for the module."""
    porter: Platform = request.getfixturevalue("platform")
    _OURS.add("porter")
    return porter


@dataclass
class Background:
    block: Block
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        """SIGTERM to the process group the test started (its leader's PID), then KILL."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


@dataclass
class DocRun:
    doc: str
    topology: Topology
    request: pytest.FixtureRequest
    base: Path
    subs: Mapping[str, str]
    home: Path = field(init=False)
    env_file: Path = field(init=False)
    background: list[Background] = field(default_factory=list)
    report: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.home = self.base / "home"
        self.home.mkdir(mode=0o700)
        for kept in ROOT_KEEP:
            (self.home / kept.name).mkdir()
        self.env_file = self.base / "env.sh"

    def substitute(self, text: str) -> str:
        for old, new in self.subs.items():
            text = text.replace(old, new)
        return text

    def path(self, block: Block) -> Path:
        path = block.options["path"]
        assert path.startswith("~/"), f"{block.where}: a file block writes under the reader's home (~/...)"
        return self.home / path.removeprefix("~/")

    def script(self, block: Block, carry: bool) -> str:
        lines = []
        if carry:
            lines.append(f"[ -f {self.env_file} ] && . {self.env_file}")
        lines += ["set -e -o pipefail", self.substitute(block.text).rstrip("\n")]
        if carry and "background" not in block.options:
            lines.append(f"export -p > {self.env_file}")
        return "\n".join(lines) + "\n"

    def argv(self, block: Block) -> tuple[list[str], dict[str, str]]:
        if block.options.get("as") == "porter":
            assert block.host == "cloud", f"{block.where}: as=porter runs on cloud"
            platform = shipped_porter(self.request)
            script = f"cd {shlex.quote(str(self.home))}\n" + self.script(block, carry=False)
            # as root: a shell as the pod's uid cannot exec this machine's venv Python, under /root
            # (0700); the pod's mounts, working directory and environment are kept
            pod: tuple[list[str], dict[str, str]] = platform.in_pod(
                ["bash", "-c", script], [Mount(self.home, str(self.home), read_only=False)], as_user="0:0"
            )
            return pod
        assert "as" not in block.options, f"{block.where}: unknown as={block.options['as']}"
        # the venv's Python may live under the real /root (pyenv): keep that directory in place
        keep = [
            f"mount --bind {shlex.quote(str(d))} {shlex.quote(str(self.home / d.name))}" for d in ROOT_KEEP
        ]
        inner = " && ".join([*keep, 'mount --rbind "$1" /root', "cd /root", 'exec bash -c "$2"'])
        cmd = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", inner, "sh"]
        cmd += [str(self.home), self.script(block, carry=True)]
        if block.host != "operator":
            cmd = self.topology.hosts[block.host].argv(*cmd)
        env = {"PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
        return cmd, env

    def fail(self, block: Block, why: str, output: str) -> None:
        logs = "".join(f"\n--- {b.block.where} (background) log:\n{b.tail()}" for b in self.background)
        pytest.fail(
            f"{block.where}: {why}\n--- block ({block.host}{' as ' + block.options['as'] if 'as' in block.options else ''}):\n"
            f"{self.substitute(block.text)}--- output:\n{output}{logs}",
            pytrace=False,
        )

    def run(self, block: Block) -> None:
        if block.verb == "skip":
            self.report.append(f"skip {block.where}: {block.reason}")
            return
        if block.verb == "file":
            target = self.path(block)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(self.substitute(block.text))
            target.chmod(int(block.options.get("mode", "600"), 8))
            self.report.append(f"file {block.where}: {block.options['path']} on {block.host}")
            return
        if block.verb != "run":
            return
        argv, env = self.argv(block)
        t0 = time.monotonic()
        if "background" in block.options:
            log = self.base / f"bg-{block.line}.log"
            with log.open("wb") as out:
                started = subprocess.Popen(
                    argv,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            self.background.append(Background(block, started, log))
            self.report.append(
                f"run  {block.where}: started in the background on {block.host} (pid {started.pid})"
            )
            return
        retry = float(block.options.get("retry", "0"))
        timeout = float(block.options.get("timeout", BLOCK_TIMEOUT))
        while True:
            for bg in self.background:
                if bg.proc.poll() is not None:
                    self.fail(bg.block, f"the background block exited ({bg.proc.returncode})", bg.tail())
            try:
                proc = subprocess.run(
                    argv, env=env, capture_output=True, text=True, timeout=timeout, check=False
                )
            except subprocess.TimeoutExpired as exc:
                self.fail(block, f"did not end within {timeout:.0f}s", str(exc.stdout or ""))
            output = proc.stdout + proc.stderr
            if proc.returncode == 0 or time.monotonic() - t0 > retry:
                break
            time.sleep(1)
        print(
            f"--- {block.where} on {block.host} ({time.monotonic() - t0:.1f}s, exit {proc.returncode}):\n{output}"
        )
        if proc.returncode != 0:
            self.fail(block, f"exited {proc.returncode}", output)
        self.report.append(f"run  {block.where} on {block.host}: ok in {time.monotonic() - t0:.1f}s")

    def stop(self) -> None:
        for bg in reversed(self.background):
            bg.stop()


@pytest.fixture
def doc_base() -> Iterator[Path]:
    base = SCRATCH / f"chpc-docs-{uuid.uuid4().hex[:8]}"
    base.mkdir(mode=0o700)  # the homes hold keys and tokens
    try:
        yield base
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)


@pytest.mark.parametrize("doc", DOC_NAMES)
def test_the_doc_runs_in_the_topology(
    doc: str, topology: Topology, testbed: Testbed, request: pytest.FixtureRequest, doc_base: Path
) -> None:
    blocks = load(DOCS / doc)
    subs = substitutions(topology)[doc]
    run = DocRun(doc, topology, request, doc_base, subs)
    print(f"=== {doc}: substitutions {subs}")
    for host, addr, port in ports_used(topology).get(doc, []):
        deadline = time.monotonic() + 300
        while topology.probe(host, [(addr, port)]) == ["open"]:
            assert time.monotonic() < deadline, f"{host}:{port} stays taken by another process"
            print(f"=== {doc}: waiting for {addr}:{port} on {host} (another test uses it)")
            time.sleep(5)
    for rel, (content, what) in given(doc, testbed, topology, request).items():
        target = run.home / rel
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        target.write_bytes(content)
        target.chmod(0o600)
        print(f"=== {doc}: given ~/{rel}: {what}")
    saved = {path: (path.read_bytes(), path.stat().st_mode) for path in restored(topology).get(doc, [])}
    t0 = time.monotonic()
    try:
        for block in blocks:
            run.run(block)
    finally:
        run.stop()
        for path, (content, mode) in saved.items():
            path.write_bytes(content)
            path.chmod(mode)
        ran = sum(1 for line in run.report if line.startswith("run"))
        skipped = [line for line in run.report if line.startswith("skip")]
        print(f"=== {doc}: {ran} blocks run, {len(skipped)} skipped, in {time.monotonic() - t0:.1f}s")
        print("\n".join(run.report))
