"""The agent's session jobs (`submitter/ray_sessions.py`) against a small server that speaks the
part of Ray's job-submission REST API the agent uses and really runs each job's package (unzipped,
`/bin/bash .cloudhpc/run`), and a channel that records what would reach porter. Real Ray and SLURM:
tests/e2e/test_ray_sessions.py."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from uuid import UUID, uuid4

import pytest

from cloudhpc.domain.jobs import Bridge, Job, JobSpec
from cloudhpc.domain.reports import Reconciliation
from cloudhpc.domain.states import JobState
from cloudhpc.submitter.ray_sessions import SessionJobs


class FakeRay:
    """Ray's job API as far as the agent uses it; each job runs for real in its own directory."""

    def __init__(self) -> None:
        self.packages: dict[str, bytes] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.posts = 0
        self.lock = threading.Lock()

    def status(self, sid: str) -> dict[str, Any]:
        job = self.jobs[sid]
        proc: subprocess.Popen[bytes] = job["proc"]
        code = proc.poll()
        if job.get("stopped"):
            status = "STOPPED"
        elif code is None:
            status = "RUNNING"
        else:
            status = "SUCCEEDED" if code == 0 else "FAILED"
        return {"status": status, "driver_exit_code": code, "start_time": 1_700_000_000_000, "message": None}

    def start(self, body: dict[str, Any]) -> bool:
        with self.lock:
            self.posts += 1
            sid = body["submission_id"]
            if sid in self.jobs:
                return False
            data = self.packages[body["runtime_env"]["working_dir"].split("://", 1)[1]]
            where = tempfile.mkdtemp(prefix="fake-ray-")
            zipfile.ZipFile(io.BytesIO(data)).extractall(where)
            proc = subprocess.Popen(
                body["entrypoint"].split(), cwd=where, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            self.jobs[sid] = {"proc": proc, "out": bytearray()}
            threading.Thread(target=self._read, args=(sid,), daemon=True).start()
            return True

    def _read(self, sid: str) -> None:
        proc = self.jobs[sid]["proc"]
        assert proc.stdout is not None
        for line in proc.stdout:
            self.jobs[sid]["out"] += line


def serve(ray: FakeRay) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self, code: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def do_GET(self) -> None:
            parts = self.path.strip("/").split("/")
            if parts[:2] == ["api", "packages"]:
                self._answer(200 if parts[3] in ray.packages else 404, {})
            elif self.path == "/api/jobs/":
                self._answer(200, [ray.status(s) for s in ray.jobs])
            elif len(parts) == 3 and parts[2] in ray.jobs:
                self._answer(200, ray.status(parts[2]))
            elif len(parts) == 4 and parts[3] == "logs" and parts[2] in ray.jobs:
                self._answer(200, {"logs": bytes(ray.jobs[parts[2]]["out"]).decode()})
            else:
                self._answer(404, {})

        def do_PUT(self) -> None:
            ray.packages[self.path.rsplit("/", 1)[1]] = self._body()
            self._answer(200, {})

        def do_POST(self) -> None:
            parts = self.path.strip("/").split("/")
            if self.path == "/api/jobs/":
                started = ray.start(json.loads(self._body()))
                self._answer(200 if started else 400, {})
            elif len(parts) == 4 and parts[3] == "stop" and parts[2] in ray.jobs:
                ray.jobs[parts[2]]["stopped"] = True
                ray.jobs[parts[2]]["proc"].kill()
                self._answer(200, {"stopped": True})
            else:
                self._answer(404, {})

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class Channel:
    """Records output and reports; answers reconciliation with the jobs it is given."""

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs
        self.output = bytearray()
        self.reports: list[tuple[JobState, dict[str, Any]]] = []

    async def reconciliation(self, cluster: str) -> Reconciliation:
        return Reconciliation(jobs=self.jobs)

    async def upload_output(self, job_id: UUID, offset: int, data: bytes) -> int:
        self.output[offset:] = data
        return len(self.output)


def job(spec: dict[str, Any], state: JobState = JobState.PENDING, **fields: Any) -> Job:
    return Job(
        id=fields.pop("id", uuid4()),
        name=spec["name"],
        owner=fields.pop("owner", "alice"),
        cluster="c",
        kind=spec["kind"],
        state=state,
        created_at=datetime.now(UTC),
        spec=JobSpec.model_validate(spec),
        **fields,
    )


@pytest.fixture
def ray() -> Iterator[tuple[FakeRay, int]]:
    fake = FakeRay()
    server = serve(fake)
    try:
        yield fake, server.server_address[1]
    finally:
        server.shutdown()
        for entry in fake.jobs.values():
            entry["proc"].kill()


def session(port: int, owner: str = "alice") -> Job:
    spec = {
        "name": "dev",
        "cluster": "c",
        "kind": "ray-cluster",
        "ray": {"expose": ["dashboard"], "idle_timeout": 60},
    }
    bridge = Bridge(name="dashboard", remote_port=8265, bridge_host="127.0.0.1", bridge_port=port)
    return job(spec, JobState.RUNNING, owner=owner, bridges=[bridge], slurm_job_id="7")


def on(entrypoint: str, name: str = "dev", **fields: Any) -> Job:
    return job(
        {
            "name": "step",
            "cluster": "c",
            "kind": "ray-job",
            "ray": {"session": name, "entrypoint": entrypoint},
            **fields,
        }
    )


def runner(channel: Channel, cancel: set[UUID] | None = None) -> SessionJobs:
    async def report(job_id: UUID, state: JobState, **fields: Any) -> None:
        channel.reports.append((state, fields))

    async def content(value: str, _job: Job) -> bytes:
        return value.encode()

    async def no_token(_job_id: UUID, _path: str) -> bytes:
        return b""

    asked = cancel if cancel is not None else set()
    return SessionJobs(
        "c",
        channel,  # type: ignore[arg-type]
        report=report,
        file_content=content,
        read_session_file=no_token,
        cancel_asked=asked.__contains__,
        status_interval=0.05,
        log_interval=0.1,
    )


def states(channel: Channel) -> list[JobState]:
    return [state for state, _ in channel.reports]


def test_a_job_runs_on_the_session_with_its_files_env_and_exit_status(ray: tuple[FakeRay, int]) -> None:
    fake, port = ray
    work = on('cat in.txt; echo "v=$V"; exit 3', files={"in.txt": "hello\n"}, env={"V": "a b"})
    channel = Channel([session(port), work])
    asyncio.run(runner(channel).run(work))
    assert states(channel)[0] == JobState.PREPARING
    final, fields = channel.reports[-1]
    assert fields.get("started_at") is not None, channel.reports
    assert final == JobState.FAILED
    assert fields["exit_code"] == 3
    assert channel.output.decode().splitlines() == ["hello", "v=a b"]
    assert list(fake.jobs) == [str(work.id)], "the Ray job's submission id is the cloudhpc job id"


def test_a_completed_job_and_the_newest_session_of_that_name(ray: tuple[FakeRay, int]) -> None:
    _, port = ray
    work = on("echo done")
    older = session(1)  # a port nothing listens on: if it were chosen, the job could not run
    newer = session(port)
    channel = Channel([older, newer, session(1, owner="mallory")])
    asyncio.run(runner(channel).run(work))
    assert channel.reports[-1][0] == JobState.COMPLETED
    assert channel.reports[-1][1]["exit_code"] == 0
    assert channel.output == b"done\n"


def test_cancel_stops_the_ray_job(ray: tuple[FakeRay, int]) -> None:
    fake, port = ray
    work = on("echo started; sleep 60")
    channel = Channel([session(port), work])
    asked: set[UUID] = set()

    async def scenario() -> None:
        task = asyncio.create_task(runner(channel, asked).run(work))
        while JobState.RUNNING not in states(channel):  # noqa: ASYNC110 -- the runner's reports
            await asyncio.sleep(0.05)
        asked.add(work.id)
        await asyncio.wait_for(task, 10)

    asyncio.run(scenario())
    assert channel.reports[-1][0] == JobState.CANCELLED
    assert fake.jobs[str(work.id)]["stopped"]


def test_no_such_session_fails_the_job_with_the_reason(ray: tuple[FakeRay, int]) -> None:
    _, port = ray
    work = on("echo never", name="other")
    channel = Channel([session(port), session(port, owner="mallory").model_copy(update={"name": "other"})])
    asyncio.run(runner(channel).run(work))
    assert states(channel) == [JobState.PREPARING, JobState.FAILED]
    reason = channel.reports[-1][1]["reason"]
    assert "ray.session 'other'" in reason
    assert "does not exist or has ended" in reason


def test_a_restarted_agent_reattaches_instead_of_running_it_twice(ray: tuple[FakeRay, int]) -> None:
    fake, port = ray
    work = on("echo once; sleep 0.5")
    first = Channel([session(port), work])
    asyncio.run(runner(first).run(work))
    adopted = work.model_copy(update={"state": JobState.RUNNING})
    again = Channel([session(port), adopted])
    asyncio.run(runner(again).run(adopted))
    assert fake.posts == 2
    assert len(fake.jobs) == 1
    assert again.reports[-1][0] == JobState.COMPLETED
    assert JobState.PREPARING not in states(again)
    assert again.output == b"once\n"


def test_cancelled_before_it_was_submitted_runs_nothing(ray: tuple[FakeRay, int]) -> None:
    fake, port = ray
    work = on("echo never").model_copy(update={"cancel_requested": True})
    channel = Channel([session(port), work])
    asyncio.run(runner(channel).run(work))
    assert states(channel) == [JobState.CANCELLED]
    assert fake.posts == 0
