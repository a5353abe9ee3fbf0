"""#13 item 8 end to end: a job's `outputs` collected into the object store with hostile names,
and `GET /jobs/{id}/files` listing and reading a running and an ended job's directory through the
agent, never outside it. On the SLURM testbed over SSH (porter and the submitter as processes) and
on the `local` backend (`cloudhpc serve all`); the agent offline is a 504."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from cloudhpc.cli.main import app
from cloudhpc.client import ApiError, Client
from cloudhpc.domain.job_files import EntryType
from cloudhpc.domain.jobs import Job
from cloudhpc.domain.states import JobState
from tests.e2e.embedded import serve_all
from tests.e2e.harness import Deployment, running
from tests.testbed import Testbed

TIMEOUT = 120.0
MAX_BYTES = 100_000
"""The cluster's `outputs.max_bytes` here: `big.bin` (200 000 bytes) is over it."""

# name as written by the job -> its content
HOSTILE = {
    "with space.txt": "space\n",
    "new\nline.txt": "newline\n",
    "ünïcødé ✓.txt": "unicode\n",
    "-rf": "dash\n",
    "a..b": "dots\n",
    "100%.txt": "percent\n",
    "results/r1.csv": "1,2\n",
    "deep/er/x.pt": "weights\n",
}
PATTERNS = ["*.txt", "-rf", "a..b", "results/*.csv", "**/*.pt", "big.bin", "escape.txt", "missing/*.dat"]


def _quoted(text: str) -> str:
    """`text` as a bash ANSI-C string: every byte escaped, so no name reaches the shell unquoted."""
    return "$'" + "".join(f"\\x{b:02x}" for b in text.encode()) + "'"


def script(other: Job | None, release: Path) -> str:
    """Write the hostile files, links that escape (to /etc, to another job's directory, into the
    job's own `.cloudhpc/`), then stay running until the file `release` appears (the test makes it
    once it has browsed the running job; at most 60 s), instead of a fixed sleep that had to outlast
    the browsing with margin. `release` is outside the job's directory, on the one host that the
    test, the testbed's SLURM and the local backend share."""
    lines = ["mkdir -p results deep/er"]
    for name, content in HOSTILE.items():
        lines.append(f"printf %s {_quoted(content)} > {_quoted(name)}")
    lines += [
        "head -c 200000 /dev/zero > big.bin",
        "ln -s /etc etc",
        "ln -s /etc/hostname escape.txt",
        "ln -s .cloudhpc secrets",
        "ln -s r1.csv results/inside.csv",
    ]
    if other is not None:
        lines.append(f"ln -s ../{other.id} other")
    wait = f"for _ in $(seq 600); do [ -e {_quoted(str(release))} ] && break; sleep 0.1; done"
    lines += ["touch ready", wait, "echo done"]
    return "\n".join(lines) + "\n"


def wait_for(check: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
        except ApiError:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {check}")
        time.sleep(0.3)


def names(client: Client, job: Job, path: str = "") -> dict[str, EntryType]:
    answer = client.files(job, path)
    assert answer.type == EntryType.DIRECTORY
    return {e.name: e.type for e in answer.entries or []}


def refused(client: Client, job: Job, path: str) -> ApiError:
    with pytest.raises(ApiError) as caught:
        client.files(job, path)
    return caught.value


def check_browsing(client: Client, job: Job, other: Job | None) -> None:
    """What must hold for a running job and again after it ended."""
    top = names(client, job)
    assert ".cloudhpc" not in top
    for name in ("with space.txt", "new\nline.txt", "ünïcødé ✓.txt", "-rf", "a..b", "100%.txt", "big.bin"):
        assert top[name] == EntryType.FILE, (name, top)
    assert top["results"] == EntryType.DIRECTORY
    assert top["etc"] == EntryType.SYMLINK
    assert names(client, job, "results") == {"r1.csv": EntryType.FILE, "inside.csv": EntryType.SYMLINK}
    for name, content in HOSTILE.items():
        assert client.read_file(job, name) == content.encode(), name
    assert client.read_file(job, "results/inside.csv") == b"1,2\n"  # a symlink that stays inside
    assert client.read_file(job, "big.bin", offset=199_990) == b"\0" * 10
    part = client.files(job, "big.bin", offset=10, length=5)
    assert (part.size, part.offset, base64.b64decode(part.content or ""), part.eof) == (
        200_000,
        10,
        b"\0" * 5,
        False,
    )
    # escapes: refused by form at porter (422 naming `path`), or by where they lead on the cluster (403)
    for path in ("../x", "/etc", "a/../../b", ".cloudhpc/env", ".cloudhpc"):
        error = refused(client, job, path)
        assert error.status == 422, (path, error)
        assert error.message.startswith("invalid request: path:"), (path, error)
    for path in ("etc", "etc/passwd", "escape.txt", "secrets", "secrets/job.sh"):
        error = refused(client, job, path)
        assert error.status == 403, (path, error)
        assert "outside the job directory" in error.message or ".cloudhpc/" in error.message
    if other is not None:
        assert refused(client, job, "other").status == 403
        assert refused(client, job, "other/ready").status == 403
    assert refused(client, job, "nothing-here").status == 404


def check_outputs(client: Client, job: Job, token: str) -> None:
    artifacts = {a.name for a in client.artifacts(job)}
    expected = {
        "outputs/with space.txt": "space\n",
        "outputs/new%0Aline.txt": "newline\n",
        "outputs/ünïcødé ✓.txt": "unicode\n",
        "outputs/-rf": "dash\n",
        "outputs/a..b": "dots\n",
        "outputs/100%25.txt": "percent\n",
        "outputs/results/r1.csv": "1,2\n",
        "outputs/results/inside.csv": "1,2\n",
        "outputs/deep/er/x.pt": "weights\n",
    }
    assert {n for n in artifacts if n.startswith("outputs/")} == set(expected), artifacts
    for name, content in expected.items():
        assert client.download_artifact(job, name) == content.encode(), name
    # the listed links too: presigned S3 URLs as they are, porter's own route with the token
    for artifact in client.artifacts(job):
        if artifact.name in expected:
            fetched = httpx.get(artifact.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
            assert fetched.status_code == 200, (artifact.name, artifact.url, fetched.text[:200])
            assert fetched.content == expected[artifact.name].encode(), artifact.name
    report = json.loads(client.download_artifact(job, "outputs.json"))
    skipped = {s["path"]: s["reason"] for s in report["skipped"]}
    assert "outside the job directory" in skipped["escape.txt"]
    assert f"limit of {MAX_BYTES} bytes" in skipped["big.bin"]
    assert report["unmatched"] == ["missing/*.dat"]
    assert report["bytes"] == sum(len(c.encode()) for c in expected.values())


def run_and_check(
    client: Client, token: str, submit: Callable[[dict[str, Any]], Job], other: Job | None
) -> Job:
    release = Path("/tmp") / f"chpc-release-{uuid.uuid4().hex}"
    job = submit({"name": "files", "script": script(other, release), "outputs": PATTERNS})
    try:
        wait_for(lambda: client.get(job).state == JobState.RUNNING and "ready" in names(client, job))
        check_browsing(client, job, other)  # running
        assert client.get(job).state == JobState.RUNNING  # browsed while it ran, not after
        release.touch()
        assert client.wait(job, timeout=TIMEOUT).state == JobState.COMPLETED
    finally:
        release.unlink(missing_ok=True)
    check_browsing(client, job, other)  # ended
    wait_for(lambda: "outputs.json" in {a.name for a in client.artifacts(job)})
    check_outputs(client, job, token)
    return job


# ---- the SLURM testbed ---------------------------------------------------------------------------


@pytest.fixture
def deployment(tmp_path: Path, testbed: Testbed) -> Iterator[Deployment]:
    dep = Deployment(
        tmp_path / "deploy",
        testbed,
        f"sqlite:///{tmp_path / 'state.db'}",
        object_store=f"s3://{testbed.s3_bucket}/job-files-{uuid.uuid4().hex[:8]}",  # presigned links
        porter_settings={"agent_query_wait": 3},
    )
    data = yaml.safe_load(dep.config.read_text())
    data["clusters"]["testbed"]["outputs"] = {"max_bytes": MAX_BYTES}
    dep.config.write_text(yaml.safe_dump(data))
    with running(dep):
        yield dep


def test_files_and_outputs_on_slurm(deployment: Deployment) -> None:
    with deployment.client() as client:

        def submit(spec: dict[str, Any]) -> Job:
            return client.submit({"cluster": "testbed"} | spec)

        other = submit({"name": "other", "script": "touch ready\n"})
        assert client.wait(other, timeout=TIMEOUT).state == JobState.COMPLETED
        job = run_and_check(client, deployment.user_token, submit, other)

        # the CLI: a listing as a table and as JSON, a file printed as is
        env = {
            "CLOUDHPC_URL": deployment.url,
            "CLOUDHPC_TOKEN": deployment.user_token,
            "CLOUDHPC_CONFIG": None,
        }
        listed = CliRunner().invoke(app, ["jobs", "files", str(job.id), "results"], env=env)
        assert listed.exit_code == 0
        assert "r1.csv" in listed.stdout
        assert "inside.csv" in listed.stdout
        as_json = CliRunner().invoke(app, ["jobs", "files", str(job.id), "-o", "json"], env=env)
        assert as_json.exit_code == 0
        assert {"-rf", "new\nline.txt"} <= {e["name"] for e in json.loads(as_json.stdout)["entries"]}
        printed = CliRunner().invoke(app, ["jobs", "files", str(job.id), "new\nline.txt"], env=env)
        assert printed.exit_code == 0
        assert printed.stdout == "newline\n"

        # the agent offline: a 504 that says so, within the configured wait
        # (the SDK sends it once: porter has waited already)
        deployment.kill("submitter")
        started = time.monotonic()
        error = refused(client, job, "results")
        assert error.status == 504, error
        assert error.code == "agent_timeout"
        assert "did not answer within 3 s" in error.message
        assert 3 <= time.monotonic() - started < 8


# ---- the local backend (`serve all`) --------------------------------------------------------------


def test_files_and_outputs_on_the_local_backend(tmp_path: Path) -> None:
    cluster = {"backend": "local", "workdir": str(tmp_path / "work"), "outputs": {"max_bytes": MAX_BYTES}}
    with serve_all(tmp_path, {"local": cluster}) as embedded, embedded.client() as client:

        def submit(spec: dict[str, Any]) -> Job:
            return client.submit({"cluster": "local"} | spec)

        other = submit({"name": "other", "script": "touch ready\n"})
        assert client.wait(other, timeout=TIMEOUT).state == JobState.COMPLETED
        run_and_check(client, embedded.token(), submit, other)


# ---- behind the S3 mailbox -------------------------------------------------------------------------


def test_outputs_through_the_mailbox_and_no_files_queries(tmp_path: Path, testbed: Testbed) -> None:
    """An agent that never talks to porter still collects `outputs` (their keys come through the
    mailbox); a files query for its cluster is a 503 that says why, at once."""
    mailbox = f"s3://{testbed.s3_bucket}/job-files-{uuid.uuid4().hex[:8]}"
    dep = Deployment(
        tmp_path / "deploy", testbed, f"sqlite:///{tmp_path / 'state.db'}", channel="s3", mailbox=mailbox
    )
    with running(dep), dep.client() as client:
        job = client.submit(
            {
                "name": "mailbox-outputs",
                "cluster": "testbed",
                "script": "printf x > " + _quoted("new\nline.txt") + "\n",
                "outputs": ["*.txt"],
            }
        )
        assert client.wait(job, timeout=TIMEOUT).state == JobState.COMPLETED
        wait_for(lambda: "outputs.json" in {a.name for a in client.artifacts(job)})
        assert client.download_artifact(job, "outputs/new%0Aline.txt") == b"x"
        started = time.monotonic()
        with pytest.raises(ApiError) as refused_here:
            client.files(job)
        assert refused_here.value.status == 503
        assert "S3 mailbox" in refused_here.value.message
        assert time.monotonic() - started < 5
