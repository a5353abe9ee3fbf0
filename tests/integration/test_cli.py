"""The `cloudhpc` command, in-process with Typer's `CliRunner`, against a real `cloudhpc serve all`.

The server runs as a subprocess (cwd = a fresh directory, so `.cloudhpc/` is its own) serving the
`local` cluster and the testbed's SLURM cluster over SSH. Every command is checked for what it
prints and for its exit code: 0 ok, 1 the job failed, 2 usage or configuration error, 3 the API
refused, 69 porter unreachable (docs/cli.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import text
from typer.testing import CliRunner, Result

from cloudhpc.cli.main import app
from cloudhpc.store import Store
from tests.e2e.harness import free_port, slurm_jobs_named
from tests.testbed import Testbed

JOB_FIELDS = {
    "id", "name", "owner", "cluster", "kind", "state", "reason", "cancel_requested", "slurm_job_id",
    "exit_code", "created_at", "submitted_at", "started_at", "ended_at", "spec", "bridges", "artifacts",
    "dependency", "cancel_tasks",  # since #13: arrays and `after`
    "restarts",  # since #13: times SLURM ran the job again
}  # fmt: skip


@dataclass
class ServeAll:
    """`cloudhpc serve all` as a child process in `root` (its `.cloudhpc/` lives there)."""

    root: Path
    config: Path | None = None
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_token(self) -> str:
        return (self.root / ".cloudhpc" / "admin-token").read_text().strip()

    def start(self, clusters: int = 1, timeout: float = 60) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDHPC_")}
        env["CLOUDHPC_PORTER__LISTEN"] = f"127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "cloudhpc", "serve", "all"]
        if self.config is not None:
            argv += ["--config", str(self.config)]
        with (self.root / "serve-all.log").open("ab") as log:
            self.process = subprocess.Popen(
                argv, cwd=self.root, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve all exited {self.process.returncode}: {self.log()[-3000:]}")
            try:
                clusters_seen = httpx.get(
                    f"{self.url}/api/v1/clusters",
                    headers={"Authorization": f"Bearer {self.admin_token}"},
                    timeout=2,
                ).json()["clusters"]
                if sum(c["agent_online"] for c in clusters_seen) >= clusters:
                    return
            except (httpx.TransportError, OSError, KeyError, ValueError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"serve all not ready after {timeout}s: {self.log()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def log(self) -> str:
        path = self.root / "serve-all.log"
        return path.read_text(errors="replace") if path.exists() else ""


@dataclass
class Cli:
    """Runs `cloudhpc ARGS` in-process against one server, with the admin token of `serve all`."""

    server: ServeAll
    runner: CliRunner = field(default_factory=CliRunner)

    def __call__(self, *args: str, token: str | None = None, url: str | None = None) -> Result:
        env = {
            "CLOUDHPC_URL": url or self.server.url,
            "CLOUDHPC_TOKEN": token or self.server.admin_token,
            "CLOUDHPC_CONFIG": None,
        }
        result = self.runner.invoke(app, list(args), env=env)
        # An exception other than the exits the CLI raises itself is a bug, whatever the exit code.
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            result.exception,
            result.output,
        )
        return result

    def json(self, *args: str, **kwargs: Any) -> Any:
        result = self(*args, "-o", "json", **kwargs)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, testbed: Testbed) -> Iterator[ServeAll]:
    """One `serve all` for the module: SQLite, the `local` cluster and the testbed's SLURM."""
    root = tmp_path_factory.mktemp("serve-all")
    testbed_cluster = yaml.safe_load(testbed.config_file.read_text())["clusters"]["testbed"]
    testbed_cluster["poll"] = {"fast_interval": 0.5, "slow_interval": 5, "max_commands_per_minute": 240}
    config = {
        "porter": {
            "database": f"sqlite:///{root / 'state.db'}",
            "object_store": f"file://{root / 'objects'}",
        },
        "clusters": {
            "local": {"backend": "local", "workdir": str(root / "local-jobs")},
            "testbed": testbed_cluster,
        },
    }
    (root / "cloudhpc.yaml").write_text(yaml.safe_dump(config))
    serve = ServeAll(root, config=root / "cloudhpc.yaml")
    serve.start(clusters=2)
    try:
        yield serve
    finally:
        serve.stop()


@pytest.fixture
def cli(server: ServeAll) -> Cli:
    return Cli(server)


def words(text: str) -> str:
    """Output with line breaks and repeated blanks folded, so assertions ignore wrapping."""
    return " ".join(text.split())


def write(path: Path, content: str) -> Path:
    path.write_text(content)
    return path


def accounting_when_ready(cli: Cli, job_id: str, timeout: float = 60) -> dict[str, Any]:
    """Accounting is collected after the job ends (sacct lags a little): 3 (porter's answer) and a clear
    message until then."""
    deadline = time.monotonic() + timeout
    while True:
        result = cli("jobs", "accounting", job_id, "-o", "json")
        if result.exit_code == 0:
            record: dict[str, Any] = json.loads(result.stdout)
            return record
        assert result.exit_code == 3, result.output
        assert "no accounting" in result.stderr
        assert time.monotonic() < deadline, "accounting never arrived"
        time.sleep(0.5)


# ---- tokens ------------------------------------------------------------------------------------


def test_tokens_create_prints_the_token_once_and_stores_only_its_hash(cli: Cli, server: ServeAll) -> None:
    config = str(server.config)
    result = cli("tokens", "create", "--user", "carol", "--config", config)
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    assert token.startswith("chpc_")
    assert result.stdout.count(token) == 1
    assert token not in result.stderr

    store = Store(f"sqlite:///{server.root / 'state.db'}")
    try:
        principal = store.verify_token(token)
        assert principal is not None
        assert (principal.user, principal.role, principal.clusters) == ("carol", "user", ())
        with store.engine.connect() as conn:
            stored = [tuple(row) for row in conn.execute(text("SELECT * FROM tokens"))]
    finally:
        store.close()
    assert token not in repr(stored)
    assert hashlib.sha256(token.encode()).hexdigest() in repr(stored)

    # The new token works and sees only carol's jobs (none yet).
    assert cli.json("jobs", "list", token=token) == []

    agent = cli(
        "tokens", "create", "--user", "a2", "--role", "agent", "--cluster", "testbed", "--config", config
    )
    assert agent.exit_code == 0, agent.output
    assert cli("tokens", "create", "--user", "x", "--role", "agent", "--config", config).exit_code == 2
    refused = cli("tokens", "create", "--user", "x", "--role", "wizard", "--config", config)
    assert refused.exit_code == 2
    assert "--role" in refused.stderr


def test_tokens_list_shows_no_secret_and_revoke_shuts_a_token_out(cli: Cli, server: ServeAll) -> None:
    config = str(server.config)
    token = cli("tokens", "create", "--user", "dave", "--config", config).stdout.strip()
    assert cli.json("jobs", "list", token=token) == []
    listed = cli("tokens", "list", "--user", "dave", "--config", config, "-o", "json")
    assert listed.exit_code == 0, listed.output
    assert token not in listed.stdout
    (entry,) = json.loads(listed.stdout)
    assert (entry["user"], entry["role"], entry["revoked_at"]) == ("dave", "user", None)
    table = cli("tokens", "list", "--config", config)
    assert "dave" in table.stdout
    assert token not in table.stdout

    revoked = cli("tokens", "revoke", str(entry["id"]), "--config", config)
    assert revoked.exit_code == 0, revoked.output
    (after,) = json.loads(cli("tokens", "list", "--user", "dave", "--config", config, "-o", "json").stdout)
    assert after["revoked_at"] is not None
    deadline = time.monotonic() + 15  # porter caches a verified token for up to 5 s
    while (refused := cli("jobs", "list", token=token)).exit_code == 0:
        assert time.monotonic() < deadline, "the revoked token still works"
        time.sleep(0.5)
    assert "HTTP 401" in refused.stderr
    again = cli("tokens", "revoke", str(entry["id"]), "--config", config)
    assert again.exit_code == 1
    assert "already revoked" in again.stderr


# ---- jobs on the local cluster -----------------------------------------------------------------


def test_submit_a_yaml_file_and_read_it_back(cli: Cli, tmp_path: Path) -> None:
    name = f"yaml-{uuid.uuid4().hex[:8]}"
    spec = write(
        tmp_path / "job.yaml",
        yaml.safe_dump(
            {
                "name": name,
                "cluster": "local",
                "script": 'echo "first line"\necho "greeting=$GREETING"\n',
                "env": {"GREETING": "hi; $(not run)"},
            }
        ),
    )
    result = cli("jobs", "submit", str(spec), "--wait", "-o", "json")
    assert result.exit_code == 0, result.output
    job = json.loads(result.stdout)
    assert set(job) == JOB_FIELDS
    assert (job["name"], job["state"], job["exit_code"]) == (name, "completed", 0)
    assert "state=completed" in result.stderr  # the status line

    got = cli.json("jobs", "get", job["id"])
    assert set(got) == JOB_FIELDS
    assert got["id"] == job["id"]
    listed = cli.json("jobs", "list", "--name", name)
    assert [j["id"] for j in listed] == [job["id"]]
    assert all(
        set(j) == JOB_FIELDS - {"spec", "bridges", "artifacts", "dependency", "cancel_tasks"} for j in listed
    )  # summaries
    assert job["id"] in [j["id"] for j in cli.json("jobs", "list", "--state", "completed")]
    assert cli.json("jobs", "list", "--name", name, "--state", "failed") == []
    table = cli("jobs", "get", job["id"])
    assert table.exit_code == 0
    assert "completed" in table.stdout

    logs = cli("jobs", "logs", job["id"])
    assert logs.exit_code == 0
    assert logs.stdout == "first line\ngreeting=hi; $(not run)\n"
    assert cli("jobs", "logs", "-f", job["id"]).stdout == logs.stdout
    chunk = cli.json("jobs", "logs", job["id"], "--offset", "6")
    assert chunk == {
        "data": "line\ngreeting=hi; $(not run)\n",
        "next_offset": len(logs.stdout),
        "complete": True,
    }

    accounting = accounting_when_ready(cli, job["id"])
    assert {"slurm_job_id", "records", "efficiency"} <= set(accounting)
    assert accounting["slurm_job_id"] == job["slurm_job_id"]
    table = cli("jobs", "accounting", job["id"])
    assert table.exit_code == 0
    assert "CPU efficiency" in table.stdout


def test_a_job_whose_files_cannot_be_staged_fails_with_the_reason(
    cli: Cli, server: ServeAll, tmp_path: Path
) -> None:
    """A staging failure (`StagingError`) ends the job `failed`, its reason the agent's message alone."""
    missing = f"file://{(server.root / 'objects').resolve()}/users/admin/missing.txt"  # the admin's own
    spec = write(
        tmp_path / "job.yaml",
        yaml.safe_dump(
            {
                "name": f"unstaged-{uuid.uuid4().hex[:8]}",
                "cluster": "local",
                "script": "cat data.txt\n",
                "files": {"data.txt": missing},
            }
        ),
    )
    result = cli("jobs", "submit", str(spec), "--wait", "-o", "json")
    assert result.exit_code == 1, result.output
    job = json.loads(result.stdout)
    assert (job["state"], job["slurm_job_id"]) == ("failed", None)
    assert job["reason"] == f"{missing}: no such object"


def test_submit_from_options_wait_exit_codes_and_cancel(cli: Cli, tmp_path: Path) -> None:
    failing = write(tmp_path / "fail.sh", "echo about to fail\nexit 3\n")
    result = cli(
        "jobs",
        "submit",
        "--name",
        "opt-fail",
        "--cluster",
        "local",
        "--script",
        str(failing),
        "--wait",
        "-o",
        "json",
    )
    assert result.exit_code == 1, result.output
    assert "ended failed" in result.stderr
    job = json.loads(result.stdout)  # the final job is printed before exiting 1
    job_id = job["id"]
    assert (job["state"], job["exit_code"]) == ("failed", 3)
    waited = cli("jobs", "wait", job_id)
    assert waited.exit_code == 1
    assert f"job {job_id} ended failed" in waited.stderr
    assert cli("jobs", "logs", job_id).stdout == "about to fail\n"

    ok = write(tmp_path / "ok.sh", "echo fine\n")
    submitted = cli("jobs", "submit", "--name", "opt-ok", "--cluster", "local", "--script", str(ok))
    assert submitted.exit_code == 0, submitted.output
    ok_id = submitted.stdout.strip()
    uuid.UUID(ok_id)  # the table form prints the id alone
    waited = cli("jobs", "wait", ok_id)
    assert waited.exit_code == 0, waited.output
    assert "state=completed" in waited.stderr
    assert cli.json("jobs", "wait", ok_id)["state"] == "completed"

    slow = write(tmp_path / "slow.sh", "echo started\nsleep 300\n")
    sleeper = cli.json("jobs", "submit", "--name", "opt-slow", "--cluster", "local", "--script", str(slow))
    deadline = time.monotonic() + 30
    while cli.json("jobs", "get", sleeper["id"])["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    timed_out = cli("jobs", "wait", sleeper["id"], "--timeout", "1")
    assert timed_out.exit_code == 1
    assert "still running" in timed_out.stderr
    cancelled = cli("jobs", "cancel", sleeper["id"])
    assert cancelled.exit_code == 0, cancelled.output
    assert "cancel requested" in cancelled.stdout
    final = cli("jobs", "wait", sleeper["id"], "--timeout", "60")
    assert final.exit_code == 1
    assert "ended cancelled" in final.stderr
    assert cli.json("jobs", "get", sleeper["id"])["state"] == "cancelled"


def test_logs_follow_prints_output_as_the_job_runs(cli: Cli, tmp_path: Path) -> None:
    script = write(tmp_path / "slowly.sh", "echo one\nsleep 2\necho two\nsleep 1\necho three\n")
    job = cli.json("jobs", "submit", "--name", "follow", "--cluster", "local", "--script", str(script))
    started = time.monotonic()
    followed = cli("jobs", "logs", "-f", job["id"])
    assert followed.exit_code == 0, followed.output
    assert followed.stdout == "one\ntwo\nthree\n"
    assert time.monotonic() - started >= 2.5  # it really waited for the job, not just read what was there
    assert cli.json("jobs", "get", job["id"])["state"] == "completed"


def test_clusters_list(cli: Cli) -> None:
    clusters = {c["name"]: c for c in cli.json("clusters", "list")}
    assert set(clusters) == {"local", "testbed"}
    for cluster in clusters.values():
        assert set(cluster) == {"name", "backend", "agent_online", "agent_last_seen"}
        assert cluster["agent_online"] is True
    assert (clusters["local"]["backend"], clusters["testbed"]["backend"]) == ("local", "slurm")
    table = cli("clusters", "list")
    assert table.exit_code == 0
    assert "testbed" in table.stdout


def test_output_yaml_is_the_json_document(cli: Cli, tmp_path: Path) -> None:
    """`-o yaml` (#14 item 8) prints the same document as `-o json`, for a job, a list and clusters."""
    script = write(tmp_path / "hello.sh", "echo hello\n")
    job = cli.json(
        "jobs", "submit", "--name", "yaml", "--cluster", "local", "--script", str(script), "--wait"
    )
    for args in (("jobs", "get", job["id"]), ("jobs", "list", "--name", "yaml"), ("clusters", "list")):
        as_yaml = cli(*args, "-o", "yaml")
        assert as_yaml.exit_code == 0, as_yaml.output
        assert not as_yaml.stdout.lstrip().startswith(("{", "[")), as_yaml.stdout[:80]  # YAML's block style
        document = yaml.safe_load(as_yaml.stdout)
        if args[:2] == ("clusters", "list"):  # agent_last_seen moves between the two calls
            document = [{k: v for k, v in c.items() if k != "agent_last_seen"} for c in document]
            expected = [{k: v for k, v in c.items() if k != "agent_last_seen"} for c in cli.json(*args)]
        else:
            expected = cli.json(*args)
        assert document == expected, args


def test_submit_options_set_the_13_fields_without_a_spec_file(cli: Cli, tmp_path: Path) -> None:
    """`--qos`, `--checkpoint-warn-before`/`--max-restarts`, `--outputs` (over a spec file's
    checkpoint, field by field) reach porter's stored spec and SLURM; the job's output file is
    collected and listed."""
    script = write(tmp_path / "opts.sh", "mkdir -p results && echo 1,2 > results/a.csv\necho done\n")
    spec = write(tmp_path / "spec.yaml", "checkpoint: {signal: USR2}\n")
    job = cli.json(
        "jobs", "submit", str(spec), "--name", "opts", "--cluster", "testbed", "--script", str(script),
        "-r", "time=5", "--qos", "normal", "--checkpoint-warn-before", "1m30s", "--max-restarts", "2",
        "--outputs", "results/*.csv", "--wait",
    )  # fmt: skip
    assert job["state"] == "completed", job
    assert job["spec"]["resources"]["qos"] == "normal"
    assert job["spec"]["checkpoint"] == {"warn_before": 90, "signal": "USR2", "max_restarts": 2}
    assert job["spec"]["outputs"] == ["results/*.csv"]
    deadline = time.monotonic() + 30
    while not any(
        k.endswith("/outputs/results/a.csv") for k in cli.json("jobs", "get", job["id"])["artifacts"]
    ):
        assert time.monotonic() < deadline, cli.json("jobs", "get", job["id"])["artifacts"]
        time.sleep(0.5)
    shown = subprocess.run(
        ["scontrol", "show", "job", job["slurm_job_id"]], capture_output=True, text=True, check=True
    ).stdout  # SLURM's own view of what was asked (sacct has no QOS without accounting enforcement)
    assert " QOS=normal " in f" {shown.replace(chr(10), ' ')} ", shown


# ---- refusals and errors -----------------------------------------------------------------------


def test_bad_specs_exit_2_locally_and_1_when_the_api_refuses(cli: Cli, tmp_path: Path) -> None:
    before = len(cli.json("jobs", "list"))
    unknown_field = write(tmp_path / "extra.yaml", "name: x\ncluster: local\nscript: echo\nnodes: 2\n")
    result = cli("jobs", "submit", str(unknown_field))
    assert result.exit_code == 2
    assert "invalid job spec: nodes" in result.stderr
    bad_name = cli(
        "jobs", "submit", "--name", "no spaces!", "--cluster", "local", "--script", str(unknown_field)
    )
    assert bad_name.exit_code == 2
    assert "invalid job spec: name" in bad_name.stderr
    not_yaml = write(tmp_path / "broken.yaml", "name: [unclosed\n")
    assert cli("jobs", "submit", str(not_yaml)).exit_code == 2
    missing = cli("jobs", "submit", str(tmp_path / "missing.yaml"))
    assert missing.exit_code == 2
    assert "does not exist" in words(missing.output)

    # Valid locally, refused by porter (it alone knows the clusters, and whose they are): 404 -> exit 1.
    refused = cli(
        "jobs", "submit", "--name", "nowhere", "--cluster", "nowhere", "--script", str(unknown_field)
    )
    assert refused.exit_code == 3
    assert "ApiError: cluster 'nowhere': no such cluster, or not one you may use" in refused.stderr
    assert "HTTP 404" in refused.stderr
    assert len(cli.json("jobs", "list")) == before  # nothing stored

    gone = cli("jobs", "get", str(uuid.uuid4()))
    assert gone.exit_code == 3
    assert "HTTP 404" in gone.stderr
    assert cli("jobs", "get", "not-a-uuid").exit_code == 3  # porter's 422 on the path
    assert cli("jobs", "list", "--token-typo").exit_code == 2  # usage error


def test_unreachable_porter_is_a_clear_message_and_exit_69(cli: Cli, server: ServeAll) -> None:
    """69 (EX_UNAVAILABLE): a script retries it, where 2 means fix the command and 3 porter said no."""
    url = f"http://127.0.0.1:{free_port()}"
    for args in (
        ("jobs", "list"),
        ("jobs", "get", str(uuid.uuid4())),
        ("clusters", "list"),
        ("bridge", "list", str(uuid.uuid4())),
    ):
        result = cli(*args, url=url)
        assert result.exit_code == 69, result.output
        assert f"cannot reach porter at {url}" in result.stderr
        assert "is `cloudhpc serve` running?" in result.stderr
        assert "Traceback" not in result.output
    # The same codes as a shell sees them, from the installed command: down, then up and refusing.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDHPC_")}
    command = [str(Path(sys.executable).with_name("cloudhpc")), "jobs", "get", str(uuid.uuid4())]
    down = subprocess.run([*command, "--url", url], env=env, capture_output=True, text=True, check=False)
    assert down.returncode == 69, down.stderr
    env["CLOUDHPC_TOKEN"] = server.admin_token
    up = subprocess.run([*command, "--url", server.url], env=env, capture_output=True, text=True, check=False)
    assert up.returncode == 3, up.stderr
    assert "HTTP 404" in up.stderr


def test_wrong_token_is_refused_with_exit_3(cli: Cli) -> None:
    result = cli("jobs", "list", token="chpc_not-a-real-token")
    assert result.exit_code == 3
    assert "HTTP 401" in result.stderr


def test_token_file_wins_over_the_environment(cli: Cli, server: ServeAll, tmp_path: Path) -> None:
    """--token-file (or CLOUDHPC_TOKEN_FILE, or `-` for standard input) over CLOUDHPC_TOKEN: the
    token never needs to be on a command line."""
    good = write(tmp_path / "admin-token", server.admin_token + "\n")
    bad = write(tmp_path / "bad-token", "chpc_not-a-real-token\n")
    wrong_env = "chpc_also-not-a-token"
    ok = cli("clusters", "list", "--token-file", str(good), "-o", "json", token=wrong_env)
    assert ok.exit_code == 0, ok.output
    assert {c["name"] for c in json.loads(ok.stdout)} >= {"local", "testbed"}
    refused = cli("clusters", "list", "--token-file", str(bad))  # the env's token is the admin's
    assert refused.exit_code == 3
    assert "HTTP 401" in refused.stderr
    env = {"CLOUDHPC_URL": server.url, "CLOUDHPC_TOKEN": wrong_env, "CLOUDHPC_TOKEN_FILE": str(good)}
    from_env = CliRunner().invoke(app, ["jobs", "list", "-o", "json"], env=env)
    assert from_env.exit_code == 0, from_env.output
    piped = CliRunner().invoke(
        app,
        ["jobs", "list", "--token-file", "-", "-o", "json"],
        env=env | {"CLOUDHPC_TOKEN_FILE": None},
        input=server.admin_token + "\n",
    )
    assert piped.exit_code == 0, piped.output
    assert server.admin_token not in piped.output


def test_invalid_config_exits_2_naming_the_key(cli: Cli, tmp_path: Path) -> None:
    bad = write(
        tmp_path / "bad.yaml", "porter:\n  databse: sqlite:///x.db\nclusters:\n  c1: {backend: slurm}\n"
    )
    for args in (
        ("tokens", "create", "--user", "x"),
        ("clusters", "check"),
        ("serve", "all"),
        ("serve", "submitter"),
    ):
        result = cli(*args, "--config", str(bad))
        assert result.exit_code == 2, (args, result.output)
        assert "porter.databse: Extra inputs are not permitted" in result.stderr
        assert "clusters.c1" in result.stderr
        assert "Traceback" not in result.output
    missing = cli("clusters", "check", "--config", str(tmp_path / "nope.yaml"))
    assert missing.exit_code == 2
    assert "does not exist" in missing.stderr
    # Environment overrides are validated the same way, and named by their key.
    from_env = CliRunner().invoke(
        app, ["serve", "porter"], env={"CLOUDHPC_CONFIG": None, "CLOUDHPC_PORTER__LISTEN": "nonsense"}
    )
    assert from_env.exit_code == 2
    assert "porter.listen: Value error, 'nonsense' must look like HOST:PORT" in from_env.stderr


# ---- the testbed -------------------------------------------------------------------------------


def test_clusters_check_against_the_testbed(
    cli: Cli, server: ServeAll, tmp_path: Path, testbed: Testbed
) -> None:
    ok = cli("clusters", "check", "testbed", "--config", str(server.config))
    assert ok.exit_code == 0, ok.output
    assert "testbed: ok" in words(ok.stdout)
    assert "slurm" in ok.stdout
    checked = cli.json("clusters", "check", "--config", str(server.config))
    assert {r["cluster"]: r["ok"] for r in checked} == {"local": True, "testbed": True}

    # The same cluster, but this machine has never seen its host key: refused, not trusted.
    assert server.config is not None
    config = yaml.safe_load(server.config.read_text())
    config["clusters"]["testbed"]["ssh"]["known_hosts"] = str(write(tmp_path / "known_hosts", ""))
    stranger = write(tmp_path / "stranger.yaml", yaml.safe_dump(config))
    failed = cli("clusters", "check", "testbed", "--config", str(stranger))
    assert failed.exit_code == 1, failed.output
    assert "testbed: FAILED" in words(failed.stdout)
    assert "host key" in failed.stdout.lower()
    unknown = cli("clusters", "check", "nosuch", "--config", str(server.config))
    assert unknown.exit_code == 1
    assert "not in the configuration" in unknown.stdout


def test_a_job_on_the_testbed_through_the_cli(cli: Cli, tmp_path: Path) -> None:
    script = write(tmp_path / "hello.sh", 'echo "on $(hostname) as $SLURM_JOB_ID"\nsrun true\n')
    result = cli(
        "jobs",
        "submit",
        "--name",
        "cli-slurm",
        "--cluster",
        "testbed",
        "--script",
        str(script),
        "--wait",
        "-o",
        "json",
    )
    assert result.exit_code == 0, result.output
    job = json.loads(result.stdout)
    assert job["state"] == "completed"
    assert cli("jobs", "logs", job["id"]).stdout.startswith("on ")
    assert f"as {job['slurm_job_id']}" in cli("jobs", "logs", job["id"]).stdout
    accounting = accounting_when_ready(cli, job["id"])
    assert accounting["slurm_job_id"] == job["slurm_job_id"]
    states = {r["step"]: r["state"] for r in accounting["records"]}
    assert states[None] == "COMPLETED"
    assert accounting["efficiency"]["state"] == "COMPLETED"
    assert slurm_jobs_named(f"chpc-{job['id']}") == [job["slurm_job_id"]]

    failing = write(tmp_path / "fail.sh", "exit 5\n")
    failed = cli(
        "jobs",
        "submit",
        "--name",
        "cli-slurm-fail",
        "--cluster",
        "testbed",
        "--script",
        str(failing),
        "--wait",
    )
    assert failed.exit_code == 1
    assert "ended failed" in failed.stderr


def test_directives_and_resource_options_through_the_cli_reach_slurm(cli: Cli, tmp_path: Path) -> None:
    """#13 items 1-2 through the CLI, porter and the agent: the script's #SBATCH lines and the
    `--resource` options are merged (the options win), stored, and what SLURM reports."""
    script = write(
        tmp_path / "train.sh", "#!/bin/bash\n#SBATCH --ntasks=2\n#SBATCH -t 3 --mail-type=END\nsrun true\n"
    )
    options = ["-r", "time=4", "-r", "exclusive=true", "-r", "begin=now+3600", "-r", "qos=normal"]
    submit = ["jobs", "submit", "--name", "cli-opts", "--cluster", "testbed", "--script", str(script)]
    result = cli(*submit, *options, "-o", "json")
    assert result.exit_code == 0, result.output
    job = json.loads(result.stdout)
    shown = {k: v for k, v in job["spec"]["resources"].items() if v is not None}
    assert shown == {
        "ntasks": 2,
        "time": "4",
        "mail_type": "END",
        "exclusive": True,
        "begin": "now+3600",
        "qos": "normal",
    }
    deadline = time.monotonic() + 60
    while not job["slurm_job_id"]:
        assert time.monotonic() < deadline, f"never reached SLURM: {job}"
        time.sleep(0.5)
        job = cli.json("jobs", "get", job["id"])
    try:
        reported = subprocess.run(
            ["scontrol", "show", "job", job["slurm_job_id"]], capture_output=True, text=True, check=True
        ).stdout
    finally:
        assert cli("jobs", "cancel", job["id"]).exit_code == 0
    for expected in ("TimeLimit=00:04:00", "NumTasks=2", "MailType=END", "OverSubscribe=NO", "QOS=normal"):
        assert expected in reported.split(), reported

    bad_value = cli(*submit, "-r", "gres=gpu::4")
    assert bad_value.exit_code == 2
    assert "invalid job spec: resources.gres" in bad_value.stderr
    owned = write(tmp_path / "owned.sh", "#!/bin/bash\n#SBATCH --output=/tmp/x\necho\n")
    refused = cli("jobs", "submit", "--name", "cli-opts", "--cluster", "testbed", "--script", str(owned))
    assert refused.exit_code == 2
    assert "line 2" in refused.stderr
    assert "--output is set by cloudhpc" in words(refused.stderr)
    assert cli(*submit, "-r", "qos").exit_code == 2


# ---- serve all's token files -------------------------------------------------------------------


def test_serve_all_creates_token_files_0600_once_and_reuses_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no configuration at all (the embedded default), as a new user starts it."""
    serve = ServeAll(tmp_path)
    admin_file = tmp_path / ".cloudhpc" / "admin-token"
    agent_file = tmp_path / ".cloudhpc" / "agent-token"
    assert not admin_file.exists()
    serve.start()
    try:
        first = {}
        for path in (admin_file, agent_file):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
            first[path] = path.read_text()
        assert first[admin_file] != first[agent_file]
    finally:
        serve.stop()
    serve.start()
    try:
        for path in (admin_file, agent_file):
            assert path.read_text() == first[path], f"{path} was replaced on the second start"
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
        # Next to `serve all`, the CLI needs no token: it reads .cloudhpc/admin-token.
        monkeypatch.chdir(tmp_path)
        result = CliRunner().invoke(
            app,
            ["clusters", "list", "-o", "json"],
            env={"CLOUDHPC_URL": serve.url, "CLOUDHPC_TOKEN": None, "CLOUDHPC_CONFIG": None},
        )
        assert result.exit_code == 0, result.output
        assert [c["name"] for c in json.loads(result.stdout)] == ["local"]
    finally:
        serve.stop()
    assert "created the admin token" in serve.log()
    assert serve.log().count("created the admin token") == 1
