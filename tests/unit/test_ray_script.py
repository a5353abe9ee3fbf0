"""The Ray batch script: golden files, hostile input, and the rules of the spec.

Golden files are in tests/unit/golden/; after a deliberate change, regenerate them with
`CLOUDHPC_UPDATE_GOLDEN=1 pytest tests/unit/test_ray_script.py` and review the diff.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from cloudhpc.bridges.doctor import Login, ssh_base_argv
from cloudhpc.bridges.tunnel import (
    TunnelExport,
    TunnelPlan,
    render_tunnel,
    ssh_argv_words,
    tunnel_ssh_options,
)
from cloudhpc.config import BridgeConfig
from cloudhpc.domain.jobs import Bridge, JobSpec, Resources, import_variable, parse_mem
from cloudhpc.hpc.backend import JobPaths
from cloudhpc.hpc.jobscript import ENV_FILE, environment_file, render_batch_script
from cloudhpc.ray import node_script
from cloudhpc.ray.script import (
    ENTRYPOINT_END_MARKER,
    ENTRYPOINT_FILE,
    HELPERS_FILE,
    KEY_FILE,
    KNOWN_HOSTS_FILE,
    SECTIONS,
    WORKER_FILE,
    RayJobScript,
    TunnelAccess,
    ray_node_count,
    render_ray_job,
)
from tests.conftest import HOSTILE_STRINGS

GOLDEN = Path(__file__).parent / "golden"
JOB_ID = uuid.UUID("12345678-1234-5678-1234-567812345678")
HOSTILE_WORKDIR = "/home/u/we ird $(touch x) 'q'/.cloudhpc"
ACCESS = TunnelAccess(
    host="bridge.example.org",
    ssh_port=2222,
    ssh_user="cloudhpc",
    bind_address="0.0.0.0",
    key=b"-----BEGIN OPENSSH PRIVATE KEY-----\nsecret\n-----END OPENSSH PRIVATE KEY-----\n",
    known_hosts=b"[bridge.example.org]:2222 ssh-ed25519 AAAAC3Nza\n",
)


def spec(kind: str = "ray-cluster", **ray: Any) -> JobSpec:
    body: dict[str, Any] = {"name": "ray-test", "cluster": "c", "kind": kind, "ray": ray}
    return JobSpec.model_validate(body)


def bridges_for(s: JobSpec, first: int = 19500) -> list[Bridge]:
    assert s.ray is not None
    return [
        Bridge(name=e.name, remote_port=e.port, bridge_host="198.51.100.7", bridge_port=first + i)
        for i, e in enumerate(s.ray.expose)
    ]


def render_body(s: JobSpec, *, workdir: str = HOSTILE_WORKDIR, colocate: bool = False) -> RayJobScript:
    tunnel = ACCESS if s.ray and (s.ray.expose or s.ray.import_) else None
    return render_ray_job(
        job_id=JOB_ID,
        spec=s,
        paths=JobPaths(workdir, JOB_ID),
        resources=s.resources,
        bridges=bridges_for(s),
        tunnel=tunnel,
        colocate_workers=colocate,
    )


def render(
    s: JobSpec, *, workdir: str = HOSTILE_WORKDIR, colocate: bool = False
) -> tuple[str, dict[str, bytes]]:
    paths = JobPaths(workdir, JOB_ID)
    result = render_body(s, workdir=workdir, colocate=colocate)
    script = render_batch_script(
        job_id=JOB_ID,
        spec=s,
        paths=paths,
        activation=["source /envs/abc/venv/bin/activate"],
        body=result.body,
    )
    return script, dict(result.files)


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("CLOUDHPC_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with CLOUDHPC_UPDATE_GOLDEN=1"
    assert text == path.read_text(), (
        f"{name} differs from the golden file (CLOUDHPC_UPDATE_GOLDEN=1 to update)"
    )


def bash_syntax_ok(text: str, tmp_path: Path) -> None:
    script = tmp_path / "check.sh"
    script.write_text(text)
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


CLUSTER = spec(
    "ray-cluster",
    expose=["dashboard", "client", "metrics", {"name": "tensorboard", "port": 6006}],
    head={"cpus_per_task": 2, "mem": "4G"},
    workers={"nodes": 2, "cpus_per_task": 8, "gpus_per_node": 1},
)
JOB = JobSpec.model_validate(
    {
        "name": "ray-job",
        "cluster": "c",
        "kind": "ray-job",
        "ray": {
            "entrypoint": "python train.py --msg '$(touch /tmp/pwned)'",
            "import": [
                {"name": "mlflow", "host": "10.0.0.5", "port": 5000},
                {"name": "s3.store", "host": "s3", "port": 9000},
            ],
            "expose": ["dashboard"],
        },
        "env": {"HOSTILE": "$(touch /tmp/pwned); `id`"},
    }
)


def test_golden_ray_cluster(tmp_path: Path) -> None:
    script, files = render(CLUSTER)
    check_golden("ray_cluster.sh", script)
    check_golden("ray_worker.sh", files[WORKER_FILE].decode())
    bash_syntax_ok(script, tmp_path)
    bash_syntax_ok(files[WORKER_FILE].decode(), tmp_path)


@pytest.mark.parametrize("case", ["ray_cluster", "ray_job"])
def test_golden_sections(case: str) -> None:
    """Each section of the body on its own (tests/unit/golden/<case>/<section>.sh, empty when the
    job has none), so a change shows which part of the script it touched."""
    result = render_body(CLUSTER if case == "ray_cluster" else JOB)
    assert list(result.sections) == list(SECTIONS)
    for name, lines in result.sections.items():
        check_golden(f"{case}/{name}.sh", "".join(f"{line}\n" for line in lines))
    assert result.body == [line for name in SECTIONS for line in result.sections[name]]


def test_golden_ray_job(tmp_path: Path) -> None:
    script, files = render(JOB)
    check_golden("ray_job.sh", script)
    bash_syntax_ok(script, tmp_path)
    assert files[ENTRYPOINT_FILE] == b"python train.py --msg '$(touch /tmp/pwned)'"
    assert "touch /tmp/pwned" not in script  # env values are in their own file, never in the script
    assert environment_file(JOB.env)[ENV_FILE] == b"export HOSTILE='$(touch /tmp/pwned); `id`'\n"


def test_cluster_layout() -> None:
    script, files = render(CLUSTER)
    assert ray_node_count(CLUSTER) == 3
    assert '--nodes=2 --ntasks=2 --ntasks-per-node=1 --exclude="$SLURMD_NODENAME"' in script
    assert "--nodes 3 " in script  # readiness waits for the head and both workers
    assert "chpc_helpers node-ip" in script  # multi-node: an address the other nodes reach
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" not in script  # workers would refuse to join
    assert "--dashboard-host=127.0.0.1" in script
    assert "--num-cpus=2" in script
    memory = parse_mem("4G")
    assert f"--object-store-memory={int(memory * 0.3)}" in script
    assert "--num-gpus=1" in files[WORKER_FILE].decode()
    assert "ray stop" not in script.replace("Never `ray stop`", "")
    assert files[HELPERS_FILE] == Path(node_script.__file__).read_bytes()
    # a ray-cluster has no entrypoint; it serves until cancelled
    assert ENTRYPOINT_FILE not in files
    assert 'wait "$chpc_head_pid"' in script


def test_single_node_binds_loopback_only() -> None:
    s = spec("ray-cluster", expose=["dashboard"])
    script, files = render(s, workdir="/w")
    assert "chpc_ip=127.0.0.1" in script
    assert "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in script
    assert WORKER_FILE not in files
    assert "srun" not in script
    assert '--num-cpus="${SLURM_CPUS_ON_NODE:-1}"' in script


def test_bridge_key_is_staged_private_and_deleted() -> None:
    s = spec("ray-cluster", expose=["dashboard"])
    result = render_ray_job(
        job_id=JOB_ID,
        spec=s,
        paths=JobPaths("/w", JOB_ID),
        resources=s.resources,
        bridges=bridges_for(s),
        tunnel=ACCESS,
    )
    assert result.modes[KEY_FILE] == 0o600
    assert result.files[KEY_FILE] == ACCESS.key
    assert result.files[KNOWN_HOSTS_FILE] == ACCESS.known_hosts
    assert result.secret_files == (KEY_FILE,)
    script = "\n".join(result.body)
    assert "secret" not in script  # the key's content is never in the script
    assert f"rm -f /w/jobs/{JOB_ID}/.cloudhpc/bridge_key" in script
    assert f"-i /w/jobs/{JOB_ID}/.cloudhpc/bridge_key" in script


def test_ray_job_runs_entrypoint_and_ends_with_its_status() -> None:
    script, _ = render(JOB, workdir="/w")
    lines = script.splitlines()
    assert lines[-1] == 'exit "$chpc_rc"'
    assert lines[-2] == f'echo "{ENTRYPOINT_END_MARKER} $chpc_rc"'
    assert lines[-3] == "chpc_cleanup 3"
    assert 'export RAY_ADDRESS="$chpc_ip:$chpc_gcs"' in script
    assert 'export CLOUDHPC_IMPORT_MLFLOW=127.0.0.1:"$chpc_import_0"' in script
    assert 'export CLOUDHPC_IMPORT_S3_STORE=127.0.0.1:"$chpc_import_1"' in script
    assert "wait-ports" in script  # imports are reachable before the entrypoint starts
    assert '-L 127.0.0.1:"$chpc_import_0":10.0.0.5:5000' in script


def test_colocated_workers_for_one_node_tests() -> None:
    s = spec("ray-cluster", workers={"nodes": 1, "cpus_per_task": 1})
    result = render_ray_job(
        job_id=JOB_ID, spec=s, paths=JobPaths("/w", JOB_ID), resources=s.resources, bridges=[], tunnel=None,
        colocate_workers=True,
    )  # fmt: skip
    script = "\n".join(result.body)
    assert result.resources.nodes == 1
    assert "--nodes=1 --ntasks=1 --overlap" in script
    assert "--nodes 2 " in script


def test_missing_bridge_or_tunnel_is_refused() -> None:
    s = spec("ray-cluster", expose=["dashboard"])
    with pytest.raises(ValueError, match="bridge VM"):
        render_ray_job(
            job_id=JOB_ID,
            spec=s,
            paths=JobPaths("/w", JOB_ID),
            resources=s.resources,
            bridges=[],
            tunnel=None,
        )
    with pytest.raises(ValueError, match="no bridge port"):
        render_ray_job(
            job_id=JOB_ID,
            spec=s,
            paths=JobPaths("/w", JOB_ID),
            resources=s.resources,
            bridges=[],
            tunnel=ACCESS,
        )


@pytest.mark.parametrize("hostile", HOSTILE_STRINGS)
def test_hostile_input_never_runs(hostile: str, tmp_path: Path) -> None:
    """The rendered script, run without Ray on PATH, stops at the Ray check; nothing hostile ran."""
    marker = Path("/tmp/pwned")
    marker.unlink(missing_ok=True)
    workdir = tmp_path / "wd $(touch /tmp/pwned)"
    s = JobSpec.model_validate(
        {
            "name": "h",
            "cluster": "c",
            "kind": "ray-job",
            "ray": {"entrypoint": hostile},
            "env": {"V": hostile},
        }
    )
    paths = JobPaths(str(workdir), JOB_ID)
    result = render_ray_job(
        job_id=JOB_ID, spec=s, paths=paths, resources=s.resources, bridges=[], tunnel=None
    )
    script = render_batch_script(job_id=JOB_ID, spec=s, paths=paths, body=result.body)
    Path(paths.control).mkdir(parents=True)
    for rel, data in (result.files | environment_file(s.env)).items():
        Path(paths.file(rel)).write_bytes(data)
    Path(paths.batch_script).write_text(script)
    run = subprocess.run(
        ["/bin/bash", paths.batch_script],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        timeout=30,
    )
    assert run.returncode == 98, run.stderr
    assert "ray[default]" in run.stderr
    assert not marker.exists()


def test_tunnel_words_are_quoted_and_checked() -> None:
    plan = TunnelPlan(
        host="vm.example.org",
        ssh_port=22,
        ssh_user="user name",
        bind_address="0.0.0.0",
        key_path="/w/a b/key",
        known_hosts_path="/w/a b/kh",
        pid_file="/w/a b/pid",
        exports=[TunnelExport("dashboard", 19500, '"$chpc_dashboard"')],
    )
    words = ssh_argv_words(plan)
    assert "'/w/a b/key'" in words
    assert "'user name@vm.example.org'" in words
    for option in (
        "ExitOnForwardFailure=yes",
        "StrictHostKeyChecking=yes",
        "BatchMode=yes",
        "ServerAliveInterval=5",
    ):
        assert option in words
    assert '0.0.0.0:19500:127.0.0.1:"$chpc_dashboard"' in words
    lines = render_tunnel(plan)
    assert lines[-2:] == ["chpc_tunnel &", "chpc_tunnel_pid=$!"]
    with pytest.raises(ValueError, match="local port"):
        ssh_argv_words(
            TunnelPlan(**{**plan.__dict__, "exports": [TunnelExport("x", 19500, "$(touch /tmp/pwned)")]})
        )
    with pytest.raises(ValueError, match="not a TCP port"):
        ssh_argv_words(TunnelPlan(**{**plan.__dict__, "exports": [TunnelExport("x", 70000, "1")]}))
    assert render_tunnel(TunnelPlan(**{**plan.__dict__, "exports": []})) == []


def test_doctor_connects_with_the_tunnels_options() -> None:
    """`cloudhpc doctor bridge-host` checks what a job gets: the same ssh options, one function."""
    config = BridgeConfig(
        host="vm.example.org",
        ssh_user="cloudhpc",
        ssh_port=2222,
        key_file=Path("/keys/bridge"),
        known_hosts=Path("/keys/known_hosts"),
    )
    options = tunnel_ssh_options(key_path="/keys/bridge", known_hosts_path="/keys/known_hosts", ssh_port=2222)
    # the same options; only ssh's log level differs (the doctor reads sshd's INFO refusals)
    login = Login(Path("/keys/bridge"))
    assert ssh_base_argv(config, login) == [
        "ssh",
        *(o.replace("LogLevel=ERROR", "LogLevel=INFO") for o in options),
    ]
    # a job's own certificate is named explicitly, in the doctor's argv as in the job's
    signed = tunnel_ssh_options(
        key_path="/k/key",
        known_hosts_path="/keys/known_hosts",
        ssh_port=2222,
        certificate_path="/k/key-cert.pub",
    )
    assert signed[4:6] == ["-o", "CertificateFile=/k/key-cert.pub"]
    assert ssh_base_argv(config, Login(Path("/k/key"), Path("/k/key-cert.pub")))[1:] == [
        o.replace("LogLevel=ERROR", "LogLevel=INFO") for o in signed
    ]
    plan = TunnelPlan(
        host="vm.example.org",
        ssh_port=2222,
        ssh_user="cloudhpc",
        bind_address="0.0.0.0",
        key_path="/keys/bridge",
        known_hosts_path="/keys/known_hosts",
        pid_file="/w/pid",
    )
    assert ssh_argv_words(plan)[3 : 3 + len(options)] == options


# ---- the spec's rules -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"kind": "ray-cluster", "ray": {"entrypoint": "x"}}, "entrypoint` is for kind ray-job"),
        ({"kind": "ray-job", "ray": {}}, "needs `ray.entrypoint`"),
        ({"kind": "ray-cluster", "ray": {"head": {"time": "10"}}}, "ray.head: time not used"),
        ({"kind": "ray-cluster", "ray": {"workers": {"partition": "p"}}}, "ray.workers: partition"),
        ({"kind": "ray-cluster", "ray": {"head": {"nodes": 2}}}, "ray.head: nodes"),
        ({"kind": "ray-cluster", "ray": {"workers": {"nodes": 2}}, "resources": {"nodes": 2}}, "must be ray.workers.nodes + 1"),
        ({"kind": "ray-cluster", "ray": {"expose": ["gui"]}}, "unknown port name"),
        ({"kind": "ray-cluster", "ray": {"expose": ["dashboard", {"name": "x", "port": 8265}]}}, "ports must be unique"),
        (
            {"kind": "ray-cluster", "ray": {"import": [{"name": "a.b", "host": "h", "port": 1}, {"name": "a-b", "host": "h", "port": 2}]}},
            "distinct as environment variables",
        ),
        ({"kind": "ray-cluster", "ray": {"import": [{"name": "x", "host": "h;rm", "port": 1}]}}, "pattern"),
        ({"kind": "ray-cluster", "ray": {}, "script": "echo"}, "takes `ray`, not `script`"),
    ],
)  # fmt: skip
def test_spec_rules(body: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        JobSpec.model_validate({"name": "n", "cluster": "c", **body})


def test_node_count_and_import_variables() -> None:
    assert ray_node_count(spec(workers={"nodes": 3})) == 4
    assert (
        ray_node_count(
            JobSpec.model_validate(
                {"name": "n", "cluster": "c", "kind": "ray-cluster", "ray": {}, "resources": {"nodes": 5}}
            )
        )
        == 5
    )
    assert ray_node_count(spec()) == 1
    assert import_variable("mlflow") == "CLOUDHPC_IMPORT_MLFLOW"
    assert import_variable("s3.main-store") == "CLOUDHPC_IMPORT_S3_MAIN_STORE"
    assert parse_mem("4000") == 4000 * 1024**2
    assert parse_mem("2G") == 2 * 1024**3
    assert Resources(mem="16G").mem_bytes == 16 * 1024**3
    assert Resources().mem_bytes is None


def test_helpers_pick_distinct_free_ports_and_an_address() -> None:
    ports = node_script.free_ports(6)
    assert len(set(ports)) == 6
    assert all(1024 < p < 65536 for p in ports)
    assert node_script.node_ip().count(".") == 3
    assert node_script.alive_nodes("127.0.0.1:1", timeout=0.5) == -1  # nothing there: "cannot answer"
