"""Warm Ray sessions without a cluster: the spec's rules, the package a session job travels in, the
session's script section and its idle watcher (run against a small HTTP server playing Ray's job
list). The whole path on real Ray and SLURM is tests/e2e/test_ray_sessions.py."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import ValidationError

from cloudhpc.domain.jobs import Bridge, JobSpec
from cloudhpc.domain.paths import JobPaths
from cloudhpc.domain.states import JobState
from cloudhpc.ray.jobs_api import ENTRYPOINT_COMMAND, RayJobInfo, session_package
from cloudhpc.ray.script import SESSION_TOKEN_FILE, TunnelAccess, render_ray_job

NODE_SCRIPT = Path(__file__).resolve().parents[2] / "src" / "cloudhpc" / "ray" / "node_script.py"


def session_job(**fields: Any) -> dict[str, Any]:
    return {
        "name": "on-dev",
        "cluster": "c",
        "kind": "ray-job",
        "ray": {"session": "dev", "entrypoint": "x"},
    } | fields


def test_a_session_job_takes_its_entrypoint_files_and_env() -> None:
    spec = JobSpec.model_validate(session_job(files={"a.py": "print(1)"}, env={"A": "b"}))
    assert spec.ray is not None
    assert spec.ray.session == "dev"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (session_job(resources={"time": "10"}), "leave out resources"),
        (session_job(ray={"session": "dev", "entrypoint": "x", "head": {"cpus_per_task": 2}}), "ray.head"),
        (session_job(ray={"session": "dev", "entrypoint": "x", "expose": ["dashboard"]}), "ray.expose"),
        (session_job(environment={"packages": ["numpy"]}), "environment"),
        (session_job(outputs=["*.csv"]), "outputs"),
        (session_job(ray={"session": "dev"}), "entrypoint"),
        (session_job(ray={"session": "no spaces", "entrypoint": "x"}), "ray.session"),
        (session_job(kind="ray-cluster", ray={"session": "dev"}), "a ray-cluster is a session itself"),
        (
            session_job(ray={"entrypoint": "x", "idle_timeout": 60}),
            "ray.idle_timeout` is for kind ray-cluster",
        ),
        (
            {"name": "s", "cluster": "c", "kind": "ray-cluster", "ray": {"idle_timeout": 3}},
            "greater than or equal",
        ),
    ],
)
def test_session_rules_name_the_field(body: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        JobSpec.model_validate(body)


def test_the_package_carries_the_entrypoint_as_a_file_never_in_the_command() -> None:
    hostile = "echo $(id) `uname`; rm -rf ~ 'quoted' \"double\"\n"
    uri, data = session_package(hostile, {"data/in.txt": b"123"}, b"export A='b c'\n")
    again, _ = session_package(hostile, {"data/in.txt": b"123"}, b"export A='b c'\n")
    assert uri == again, "the same job gives the same package"
    assert uri.startswith("gcs://_ray_pkg_")
    assert uri.endswith(".zip")
    members = zipfile.ZipFile(io.BytesIO(data))
    assert members.read(".cloudhpc/entrypoint").decode() == hostile
    assert members.read("data/in.txt") == b"123"
    assert members.read(".cloudhpc/env") == b"export A='b c'\n"
    assert ENTRYPOINT_COMMAND == "/bin/bash .cloudhpc/run"
    runner = members.read(".cloudhpc/run").decode()
    assert "hostile" not in runner
    assert "rm -rf" not in runner
    assert ".cloudhpc/env" not in session_package("x", {}, None)[1].decode(errors="replace")


def test_the_runner_sources_env_and_runs_the_entrypoint(tmp_path: Path) -> None:
    _, data = session_package('echo "A=$A"; echo "$1" args; exit 4\n', {}, b"export A='b c'\n")
    zipfile.ZipFile(io.BytesIO(data)).extractall(tmp_path)
    done = subprocess.run(
        ENTRYPOINT_COMMAND.split(), cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert done.returncode == 4
    assert done.stdout.splitlines()[0] == "A=b c"


@pytest.mark.parametrize(
    ("details", "state", "code"),
    [
        ({"status": "PENDING"}, JobState.QUEUED, None),
        ({"status": "RUNNING", "start_time": 1_700_000_000_000}, JobState.RUNNING, None),
        (
            {"status": "SUCCEEDED", "driver_exit_code": 0, "end_time": 1_700_000_001_000},
            JobState.COMPLETED,
            0,
        ),
        ({"status": "FAILED", "driver_exit_code": 3, "message": "boom"}, JobState.FAILED, 3),
        ({"status": "FAILED", "message": "runtime env failed"}, JobState.FAILED, 1),
        ({"status": "STOPPED"}, JobState.CANCELLED, None),
    ],
)
def test_ray_job_details_in_cloudhpc_words(
    details: dict[str, Any], state: JobState, code: int | None
) -> None:
    info = RayJobInfo.from_details(details)
    assert info.state == state
    assert info.exit_code == code
    assert info.terminal == state.terminal
    assert (info.ended_at is not None) == ("end_time" in details)


def _session_sections(idle: int | None) -> dict[str, list[str]]:
    ray: dict[str, Any] = {"expose": ["dashboard"]} | ({"idle_timeout": idle} if idle else {})
    spec = JobSpec.model_validate({"name": "s", "cluster": "c", "kind": "ray-cluster", "ray": ray})
    job_id = uuid.uuid4()
    tunnel = TunnelAccess(
        host="vm", ssh_port=22, ssh_user="u", bind_address="0.0.0.0", key=b"k", known_hosts=b"h"
    )
    bridges = [Bridge(name="dashboard", remote_port=8265, bridge_host="vm", bridge_port=20000)]
    script = render_ray_job(
        job_id=job_id,
        spec=spec,
        paths=JobPaths("/w", job_id),
        resources=spec.resources,
        bridges=bridges,
        tunnel=tunnel,
    )
    return script.sections | {"secrets": list(script.secret_files)}


def test_a_session_watches_its_idle_time_and_ends_completed() -> None:
    main = "\n".join(_session_sections(120)["main"])
    assert "watch-idle --dashboard" in main
    assert "--idle 120" in main
    assert "exit 0" in main
    assert "$chpc_state/auth_token" in main
    assert SESSION_TOKEN_FILE in _session_sections(120)["secrets"]
    teardown = "\n".join(_session_sections(120)["teardown"])
    assert SESSION_TOKEN_FILE in teardown, "Ray's token copy is deleted whatever way the session ends"
    plain = "\n".join(_session_sections(None)["main"])
    assert "watch-idle" not in plain
    assert "auth_token" not in plain


class _RayJobs(BaseHTTPRequestHandler):
    jobs: ClassVar[list[dict[str, str]]] = []

    def do_GET(self) -> None:
        body = json.dumps(self.jobs if self.path == "/api/jobs/" else {}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def ray_jobs() -> Iterator[tuple[int, type[_RayJobs]]]:
    class Handler(_RayJobs):
        jobs: ClassVar[list[dict[str, str]]] = [{"status": "RUNNING"}]

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], Handler
    finally:
        server.shutdown()


def _watch(port: int, pid: int, idle: float) -> subprocess.Popen[str]:
    argv = [sys.executable, str(NODE_SCRIPT), "watch-idle", "--dashboard", str(port), "--idle", str(idle)]
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen(
        [*argv, "--pid", str(pid), "--interval", "0.1"], env=env, stdout=subprocess.PIPE, text=True
    )


def test_idle_watcher_waits_while_a_job_runs_then_ends_the_session(
    ray_jobs: tuple[int, type[_RayJobs]],
) -> None:
    port, handler = ray_jobs
    watcher = _watch(port, os.getpid(), 1.0)
    try:
        time.sleep(2.0)
        assert watcher.poll() is None, "a running Ray job keeps the session"
        handler.jobs = [{"status": "SUCCEEDED"}, {"status": "STOPPED"}]
        ended = time.monotonic()
        assert watcher.wait(timeout=10) == 0
        assert 0.8 <= time.monotonic() - ended <= 5.0
    finally:
        watcher.kill()
    assert "ending the session" in (watcher.stdout.read() if watcher.stdout else "")


def test_idle_watcher_fails_fast_when_the_head_is_gone(ray_jobs: tuple[int, type[_RayJobs]]) -> None:
    port, _ = ray_jobs
    dead = subprocess.Popen(["true"])
    dead.wait()
    watcher = _watch(port, dead.pid, 60.0)
    try:
        assert watcher.wait(timeout=10) == 2
    finally:
        watcher.kill()


def test_the_training_step_on_a_session_sends_only_what_a_session_job_takes() -> None:
    from cloudhpc.pipelines.fmnist.steps import TRAIN_ENTRYPOINT_FILE, training_job_spec
    from cloudhpc.pipelines.fmnist.train import HParams

    common: dict[str, Any] = {
        "name": "fmnist-train",
        "cluster": "c",
        "train_url": "s3://b/users/a/train.npz",
        "run_id": "r1",
        "hp": HParams(1, 32, 0.05, 0.9, 42),
        "job_tracking_uri": "http://mlflow:5000",
    }
    spec = JobSpec.model_validate(training_job_spec(**common, session="dev"))
    assert spec.ray is not None
    assert spec.ray.session == "dev"
    assert (spec.ray.entrypoint or "").startswith(f"python {TRAIN_ENTRYPOINT_FILE} ")
    assert spec.resources.model_dump(exclude_none=True) == {}
    assert spec.environment.is_empty
    assert set(spec.files) == {TRAIN_ENTRYPOINT_FILE, "data/train.npz"}
    assert spec.env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    cold = JobSpec.model_validate(training_job_spec(**common))
    assert cold.ray is not None
    assert cold.ray.session is None
    with pytest.raises(ValueError, match="job_tracking_uri"):
        training_job_spec(**(common | {"job_tracking_uri": ""}), mlflow_import="10.0.0.1:5000", session="dev")
