"""The local backend with real processes on this machine (no testbed needed).

Every test submits through `LocalBackend.submit` the same kind of job directory the agent builds
(the rendered wrapper script, the user script under .cloudhpc/, user files) and follows it only
through the backend's public verbs, as the agent does.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from uuid import UUID, uuid4

import pytest
from pydantic import ValidationError

from cloudhpc.domain.jobs import JobSpec, Observation, Resources
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import CommandTimeout, JobNotFound, RemoteFileError
from cloudhpc.hpc.backend import CommandRunner, FileTransfer, JobBackend, JobSubmission
from cloudhpc.hpc.jobscript import environment_file, render_batch_script
from cloudhpc.hpc.local import LocalBackend, LocalRunner, job_environment
from cloudhpc.hpc.local_supervisor import STATE_FILE, process_alive, read_json
from tests.conftest import HOSTILE_STRINGS


def make_submission(
    backend: LocalBackend,
    script: str,
    *,
    env: Mapping[str, str] | None = None,
    files: Mapping[str, str] | None = None,
    resources: Resources | None = None,
) -> JobSubmission:
    job_id = uuid4()
    spec = JobSpec(
        name="local-test",
        cluster=backend.cluster,
        script=script,
        env=dict(env or {}),
        files=dict(files or {}),
        resources=resources or Resources(),
    )
    paths = backend.paths(job_id)
    staged = {name: content.encode() for name, content in spec.files.items()}
    staged[".cloudhpc/script"] = script.encode()
    secret_env = environment_file(spec.env)  # as the agent stages it (submitter/staging.py)
    staged |= secret_env
    return JobSubmission(
        job_id=job_id,
        spec=spec,
        resources=spec.resources,
        batch_script=render_batch_script(job_id=job_id, spec=spec, paths=paths),
        files=staged,
        modes=dict.fromkeys(secret_env, 0o600),
    )


async def wait_for(
    backend: LocalBackend, native: str, states: frozenset[JobState], timeout: float = 15.0
) -> Observation:
    deadline = time.monotonic() + timeout
    while True:
        obs = (await backend.poll([native])).get(native)
        if obs is not None and obs.state in states:
            return obs
        if time.monotonic() > deadline:
            raise AssertionError(f"{native} never reached {sorted(states)}; last seen {obs}")
        await asyncio.sleep(0.05)


ENDED = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.TIMEOUT})
RUNNING = frozenset({JobState.RUNNING})


@pytest.fixture
def backend(tmp_path: Path) -> LocalBackend:
    return LocalBackend("local", workdir=tmp_path / "work", kill_grace=2.0)


def test_implements_the_protocols(backend: LocalBackend) -> None:
    assert isinstance(backend.runner, CommandRunner)
    assert isinstance(backend.runner, FileTransfer)
    checked: JobBackend = backend  # mypy checks the structural match
    assert checked.cluster == "local"


async def test_job_completes_with_output_and_times(backend: LocalBackend) -> None:
    sub = make_submission(backend, "sleep 0.3\necho hello\necho oops >&2\n")
    native = await backend.submit(sub)
    assert native == f"local-{sub.job_id}"
    first = (await backend.poll([native]))[native]
    assert first.state in (JobState.QUEUED, JobState.RUNNING)
    assert first.submitted_at is not None
    await wait_for(backend, native, RUNNING)
    obs = await wait_for(backend, native, ENDED)
    assert (await backend.accounting(native)).final
    assert obs.state == JobState.COMPLETED
    assert obs.native_state == "COMPLETED"
    assert obs.exit_code == 0
    assert obs.reason is None
    assert obs.submitted_at
    assert obs.started_at
    assert obs.ended_at
    assert obs.submitted_at <= obs.started_at <= obs.ended_at
    assert (obs.ended_at - obs.started_at).total_seconds() >= 0.3
    assert await backend.read_output(sub.job_id) == b"hello\noops\n"
    paths = backend.paths(sub.job_id)
    assert os.stat(paths.batch_script).st_mode & 0o777 == 0o700
    assert os.stat(paths.jobdir).st_mode & 0o777 == 0o700


async def test_job_failing_with_exit_3(backend: LocalBackend) -> None:
    native = await backend.submit(make_submission(backend, "echo before\nexit 3\n"))
    obs = await wait_for(backend, native, ENDED)
    assert obs.state == JobState.FAILED
    assert obs.exit_code == 3
    assert obs.reason == "FAILED"
    assert obs.native_state == "FAILED"
    (record,) = (await backend.accounting(native)).records
    assert record.exit_code == 3
    assert record.state == "FAILED"


async def test_cancel_kills_the_whole_group(backend: LocalBackend, tmp_path: Path) -> None:
    child_pid_file = tmp_path / "child.pid"
    sub = make_submission(backend, f"sleep 60 &\necho $! > {child_pid_file}\nwait\n")
    native = await backend.submit(sub)
    await wait_for(backend, native, RUNNING)
    for _ in range(100):
        if child_pid_file.exists() and child_pid_file.read_text().strip():
            break
        await asyncio.sleep(0.02)
    background = int(child_pid_file.read_text())
    assert not (await backend.accounting(native)).final  # still running: the agent asks again
    started = time.monotonic()
    await backend.cancel(native)
    obs = await wait_for(backend, native, ENDED, timeout=5)
    assert (await backend.accounting(native)).final
    assert time.monotonic() - started < 3
    assert obs.state == JobState.CANCELLED
    assert obs.native_state == "CANCELLED"
    assert not process_alive(background)
    state = read_json(Path(backend.paths(sub.job_id).control) / STATE_FILE)
    assert state is not None
    assert not process_alive(state["pid"], state["pid_start"])
    # Cancelling an ended job is a no-op, not an error; an unknown one is.
    await backend.cancel(native)
    assert (await backend.poll([native]))[native].state == JobState.CANCELLED
    with pytest.raises(JobNotFound):
        await backend.cancel(f"local-{uuid4()}")


async def test_time_limit_ends_in_timeout(backend: LocalBackend) -> None:
    sub = make_submission(backend, "echo start\nsleep 30\n", resources=Resources(time="0:2"))
    started = time.monotonic()
    native = await backend.submit(sub)
    obs = await wait_for(backend, native, ENDED, timeout=10)
    took = time.monotonic() - started
    assert obs.state == JobState.TIMEOUT
    assert obs.native_state == "TIMEOUT"
    assert 2.0 <= took < 8.0
    assert obs.started_at
    assert obs.ended_at
    assert 1.9 <= (obs.ended_at - obs.started_at).total_seconds() < 6.0
    (record,) = (await backend.accounting(native)).records
    assert record.timelimit_seconds == 2
    assert record.signal == signal.SIGTERM


async def test_time_limit_escalates_to_sigkill(tmp_path: Path) -> None:
    backend = LocalBackend("local", workdir=tmp_path / "work", kill_grace=0.5)
    script = "trap '' TERM\necho ignoring\nwhile :; do sleep 0.1; done\n"
    native = await backend.submit(make_submission(backend, script, resources=Resources(time="0:1")))
    obs = await wait_for(backend, native, ENDED, timeout=8)
    assert obs.state == JobState.TIMEOUT
    (record,) = (await backend.accounting(native)).records
    assert record.signal == signal.SIGKILL


async def test_output_read_by_offset(backend: LocalBackend) -> None:
    sub = make_submission(backend, "printf 0123456789\n")
    assert await backend.read_output(sub.job_id) == b""  # before the job exists
    native = await backend.submit(sub)
    await wait_for(backend, native, ENDED)
    assert await backend.read_output(sub.job_id) == b"0123456789"
    assert await backend.read_output(sub.job_id, offset=3, length=4) == b"3456"
    assert await backend.read_output(sub.job_id, offset=7) == b"789"
    assert await backend.read_output(sub.job_id, offset=100) == b""


async def test_a_new_backend_instance_finds_and_follows_the_job(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    first = LocalBackend("local", workdir=workdir)
    sub = make_submission(first, "sleep 0.5\necho done\n")
    native = await first.submit(sub)
    await first.close()

    second = LocalBackend("local", workdir=workdir)  # "the agent restarted"
    assert await second.find(sub.job_id) == native
    assert await second.find(uuid4()) is None
    assert (await second.poll([native]))[native].state in (JobState.QUEUED, JobState.RUNNING)
    # Submitting again (e.g. a retried action) starts nothing new.
    assert await second.submit(sub) == native
    obs = await wait_for(second, native, ENDED)
    assert obs.state == JobState.COMPLETED
    assert await second.read_output(sub.job_id) == b"done\n"
    # Unknown and foreign ids are "unknown this time", never "failed".
    assert await second.poll([f"local-{uuid4()}", "12345", "local-not-a-uuid"]) == {}


async def test_supervisor_lost_is_a_failure_and_the_job_is_killed(backend: LocalBackend) -> None:
    sub = make_submission(backend, "sleep 60\n")
    native = await backend.submit(sub)
    await wait_for(backend, native, RUNNING)
    state = read_json(Path(backend.paths(sub.job_id).control) / STATE_FILE)
    assert state is not None
    os.kill(state["supervisor_pid"], signal.SIGKILL)
    obs = await wait_for(backend, native, ENDED, timeout=5)
    assert obs.state == JobState.FAILED
    assert obs.reason == "SUPERVISOR_LOST"
    for _ in range(50):
        if not process_alive(state["pid"], state["pid_start"]):
            break
        await asyncio.sleep(0.02)
    assert not process_alive(state["pid"], state["pid_start"])


def _valid_file_names(marker: Path) -> list[str]:
    names = []
    for raw in HOSTILE_STRINGS:
        name = raw.replace("/tmp/pwned", str(marker))
        try:
            JobSpec(name="x", cluster="local", script="true", files={name: "x"})
        except ValidationError:
            continue
        names.append(name)
    return names


async def test_hostile_values_and_file_names_are_carried_literally(
    backend: LocalBackend, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    values = [s.replace("/tmp/pwned", str(marker)) for s in HOSTILE_STRINGS]
    env = {f"HOSTILE_{i}": v for i, v in enumerate(values)}
    names = _valid_file_names(marker)
    assert len(names) >= 5
    files = {name: f"content of {name}" for name in names}
    script = "".join(f"printf '%s\\0' \"$HOSTILE_{i}\"\n" for i in range(len(values)))
    sub = make_submission(backend, script, env=env, files=files)
    native = await backend.submit(sub)
    obs = await wait_for(backend, native, ENDED)
    assert obs.state == JobState.COMPLETED, await backend.read_output(sub.job_id)
    printed = (await backend.read_output(sub.job_id)).split(b"\0")[:-1]
    assert [p.decode() for p in printed] == values
    jobdir = Path(backend.paths(sub.job_id).jobdir)
    for name, content in files.items():
        assert (jobdir / name).read_text() == content
    assert not marker.exists()


async def test_accounting_and_efficiency(backend: LocalBackend) -> None:
    burn = "i=0\nwhile [ $i -lt 150000 ]; do i=$((i+1)); done\necho burnt\n"
    sub = make_submission(backend, burn, resources=Resources(cpus_per_task=1, mem="100M"))
    native = await backend.submit(sub)
    await wait_for(backend, native, ENDED)
    (record,) = (await backend.accounting(native)).records
    assert record.job_id == native
    assert record.state == "COMPLETED"
    assert record.exit_code == 0
    assert record.elapsed_seconds is not None
    assert record.total_cpu_seconds is not None
    assert record.total_cpu_seconds > 0.1
    assert record.max_rss_bytes is not None
    assert record.max_rss_bytes > 1024 * 1024
    assert record.req_mem_bytes == 100 * 1024 * 1024
    assert record.alloc_cpus == 1
    assert record.start
    assert record.end
    assert record.submit
    eff = await backend.efficiency(await backend.accounting(native))
    assert eff.source == "local"
    assert eff.cpu_efficiency is not None
    assert 0.05 < eff.cpu_efficiency <= 1.2  # loose: a busy machine slows the loop
    assert eff.core_walltime_seconds is not None
    assert eff.core_walltime_seconds > 0
    assert eff.memory_efficiency is not None
    assert eff.memory_efficiency == record.max_rss_bytes / (100 * 1024 * 1024)

    # Two cores asked, one used: half the efficiency; no memory asked: no memory efficiency.
    sub2 = make_submission(backend, burn, resources=Resources(cpus_per_task=2))
    native2 = await backend.submit(sub2)
    await wait_for(backend, native2, ENDED)
    eff2 = await backend.efficiency(await backend.accounting(native2))
    assert eff2.cpu_efficiency is not None
    assert eff2.cpu_efficiency < 0.6
    assert eff2.memory_efficiency is None
    assert eff2.memory_requested_bytes is None


async def test_secrets_are_stripped_from_the_job_environment(
    backend: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = {
        "MY_API_TOKEN": "t",
        "db_password": "p",
        "SSH_KEY_PASSPHRASE": "k",
        "CLIENT_SECRET": "s",
        "SIGNING_Key_FILE": "f",
        "CLOUDHPC_AGENT_SETTING": "c",
        "AWS_REGION": "eu-north-1",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PLAIN_SETTING", "kept")
    sub = make_submission(backend, "env -0\n")
    native = await backend.submit(sub)
    await wait_for(backend, native, ENDED)
    entries = (await backend.read_output(sub.job_id)).decode().split("\0")
    seen = dict(entry.split("=", 1) for entry in entries if "=" in entry)
    assert not set(secrets) & set(seen)
    assert seen["PLAIN_SETTING"] == "kept"
    assert seen["CLOUDHPC_JOB_ID"] == str(sub.job_id)  # set by the batch script itself
    assert "PATH" in seen
    assert set(job_environment({"A_TOKEN": "x", "aws_x": "y", "HOME": "/h"})) == {"HOME"}


# --- LocalRunner -------------------------------------------------------------------------------


async def test_runner_passes_arguments_literally(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    runner = LocalRunner(home=tmp_path)
    args = [s.replace("/tmp/pwned", str(marker)) for s in HOSTILE_STRINGS]
    result = await runner.run(["printf", "%s\\0", *args])
    assert result.ok
    assert result.stdout.split("\0")[:-1] == args
    with_prelude = await runner.run(["printf", "%s\\0", *args], prelude="export GREETING=hi")
    assert with_prelude.stdout.split("\0")[:-1] == args
    greeting = await runner.run(["/bin/sh", "-c", 'echo "$GREETING"'], prelude="export GREETING=hi")
    assert greeting.stdout == "hi\n"
    assert not marker.exists()


async def test_runner_status_stdin_cwd_and_missing_program(tmp_path: Path) -> None:
    runner = LocalRunner(home=tmp_path)
    assert (await runner.run(["cat"], stdin="in put")).stdout == "in put"
    assert (await runner.run(["pwd"])).stdout.strip() == str(tmp_path)
    failed = await runner.run(["sh", "-c", "echo e >&2; exit 4"])
    assert (failed.exit_status, failed.stderr, failed.ok) == (4, "e\n", False)
    missing = await runner.run(["cloudhpc-no-such-program"])
    assert missing.exit_status == 127


async def test_runner_timeout_kills_the_command(tmp_path: Path) -> None:
    runner = LocalRunner(home=tmp_path)
    started = time.monotonic()
    with pytest.raises(CommandTimeout):
        await runner.run(["sh", "-c", f"sleep 5 & echo $! > {tmp_path}/bg; wait"], timeout=0.5)
    assert time.monotonic() - started < 2
    await asyncio.sleep(0.1)
    assert not process_alive(int((tmp_path / "bg").read_text()))


async def test_runner_files(tmp_path: Path) -> None:
    runner = LocalRunner(home=tmp_path)
    assert await runner.home() == str(tmp_path)
    await runner.write_file("a/b/c.txt", b"0123456789", mode=0o600)
    target = tmp_path / "a" / "b" / "c.txt"
    assert target.read_bytes() == b"0123456789"
    assert target.stat().st_mode & 0o777 == 0o600
    assert not [p for p in target.parent.iterdir() if p.name != "c.txt"]  # no temporary left
    assert await runner.read_file(str(target), offset=2, length=3) == b"234"
    assert await runner.read_file("a/b/c.txt", offset=10) == b""
    assert await runner.size("a/b/c.txt") == 10
    assert await runner.size("a/b/missing") is None
    assert await runner.exists("a/b")
    assert not await runner.exists("nope")
    with pytest.raises(RemoteFileError):
        await runner.read_file("a/b/missing")
    await runner.makedirs("d/e", mode=0o700)
    assert (tmp_path / "d" / "e").is_dir()


def test_workdir_resolution(tmp_path: Path) -> None:
    runner = LocalRunner(home=tmp_path)
    assert LocalBackend("l", workdir="rel/dir", runner=runner).workdir == str(tmp_path / "rel/dir")
    assert LocalBackend("l", workdir="~/w", runner=runner).workdir == str(tmp_path / "w")
    assert LocalBackend("l", workdir="/abs/w", runner=runner).workdir == "/abs/w"
    job = UUID(int=1)
    assert LocalBackend("l", workdir="/abs/w", runner=runner).paths(job).jobdir == f"/abs/w/jobs/{job}"
