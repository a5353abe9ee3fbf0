"""#13 items 1 and 2 end to end: through porter's API (#SBATCH directives merged into what
`GET /jobs/{id}` shows, a 422 naming the line or the field for each refusal, the cluster's limits
before submission) and on the testbed's SLURM (what `scontrol show job` reports for the merged
directives and the typed options; sbatch's own refusal for the options the testbed has nothing for,
which shows the flag reached it)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cloudhpc.client import ApiError, Client
from cloudhpc.config import ClusterConfig, ClusterDefaults, Settings, SSHConfig
from cloudhpc.domain.directives import apply_directives
from cloudhpc.domain.jobs import ClusterLimits, JobSpec, Resources
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import SubmitRejected
from cloudhpc.hpc.slurm import SlurmBackend
from cloudhpc.hpc.ssh import SSHConnection
from cloudhpc.porter.app import create_app
from cloudhpc.store import Store
from tests.slurm_jobs import make_submission
from tests.testbed import Testbed

SCRIPT = (
    "#!/bin/bash\n"
    "# train.sh, as it ran on the login node\n"
    "\n"
    "#SBATCH --ntasks=2 -c 1\n"
    "#SBATCH -t 3 --qos normal   # the spec's time wins\n"
    "#SBATCH --mail-type=END,FAIL --mail-user=hpcuser@example.org\n"
    "#SBATCH --exclusive\n"
    "srun hostname\n"
    "#SBATCH --nodes=5\n"  # after the first command: a comment
)


class Api:
    def __init__(self, client: TestClient, store: Store) -> None:
        self.client = client
        self.token = store.create_token("alice", "user")
        store.create_token("alice", "agent", ["local"])  # alice may use `local`

    def submit(self, **spec: Any) -> Any:
        body = {"name": "opts", "cluster": "local", "script": "echo hi"} | spec
        return self.client.post("/api/v1/jobs", json=body, headers={"Authorization": f"Bearer {self.token}"})


@pytest.fixture
def api(store: Store) -> Iterator[Api]:
    limits = ClusterLimits(
        max_time="1-00:00:00",
        partitions={"debug": {"max_time": "30", "max_nodes": 2}, "long": {}},
        qos=["normal"],
    )
    local = ClusterConfig(
        backend="local", defaults=ClusterDefaults(partition="debug", time="10"), limits=limits
    )
    settings = Settings(clusters={"local": local})
    with TestClient(create_app(settings, store=store), raise_server_exceptions=False) as client:
        yield Api(client, store)


def refusal(response: Any) -> tuple[list[str], str]:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    return [d["field"] for d in error["details"]], error["message"]


def test_directives_are_merged_into_what_the_api_shows(api: Api) -> None:
    response = api.submit(script=SCRIPT, resources={"time": "20"})
    assert response.status_code == 201, response.text
    created = response.json()
    shown = api.client.get(f"/api/v1/jobs/{created['id']}", headers={"Authorization": f"Bearer {api.token}"})
    resources = {k: v for k, v in shown.json()["spec"]["resources"].items() if v is not None}
    assert resources == {
        "ntasks": 2,
        "cpus_per_task": 1,
        "time": "20",
        "qos": "normal",
        "mail_type": "END,FAIL",
        "mail_user": "hpcuser@example.org",
        "exclusive": True,
    }
    assert shown.json()["spec"]["script"] == SCRIPT
    # the same request again (a retry with the key) is the same job
    again = api.client.post(
        "/api/v1/jobs",
        json={"name": "opts", "cluster": "local", "script": SCRIPT, "resources": {"time": "20"}},
        headers={"Authorization": f"Bearer {api.token}", "Idempotency-Key": "k1"},
    )
    assert again.status_code == 201
    retry = api.client.post(
        "/api/v1/jobs",
        json={"name": "opts", "cluster": "local", "script": SCRIPT, "resources": {"time": "20"}},
        headers={"Authorization": f"Bearer {api.token}", "Idempotency-Key": "k1"},
    )
    assert retry.status_code == 200
    assert retry.json()["id"] == again.json()["id"]


def test_the_sdk_merges_and_refuses_before_sending(api: Api) -> None:
    # the TestClient's in-process transport: the SDK talks to this porter without a socket
    sdk = Client("http://testserver", api.token, transport=api.client._transport)
    job = sdk.submit(
        JobSpec(name="sdk", cluster="local", script=SCRIPT, resources=Resources(gres="gpu:a100:4"))
    )
    assert (job.spec.resources.ntasks, job.spec.resources.gres, job.spec.resources.time) == (
        2,
        "gpu:a100:4",
        "3",
    )
    nowhere = Client("http://127.0.0.1:9", "x")  # nothing listens: a request would be a connection error
    with pytest.raises(ValueError, match=r"line 2 .*--chdir is set by cloudhpc"):
        nowhere.submit(JobSpec(name="sdk", cluster="local", script="#!/bin/bash\n#SBATCH --chdir=/\necho\n"))
    with pytest.raises(ApiError) as refused:
        sdk.submit({"name": "sdk", "cluster": "local", "script": "echo", "resources": {"signal": "NOPE"}})
    assert refused.value.status == 422
    assert [d["field"] for d in refused.value.details] == ["resources.signal"]


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("#SBATCH --output=/tmp/x", "--output is set by cloudhpc"),
        ("#SBATCH -e /tmp/x", "--error is set by cloudhpc"),
        ("#SBATCH --comment=x", "--comment is set by cloudhpc"),
        ("#SBATCH --parsable", "--parsable is set by cloudhpc"),
        ("#SBATCH -D /tmp", "--chdir is set by cloudhpc"),
        ("#SBATCH --wrap='touch /tmp/pwned'", "--wrap is set by cloudhpc"),
        ("#SBATCH --export=ALL", "'--export' is not an option cloudhpc takes"),
        # --array is taken since #13 item 3: its value is checked
        ("#SBATCH --array=0-9%0", "--array: array '0-9%0': the limit after % must be"),
        ("#SBATCH --dependency=afterok:1", "--dependency is set by cloudhpc"),
        ("#SBATCH --nodes=$(id)", "--nodes: Input should be a valid integer"),
        # requeue options: the message points to the spec's `checkpoint`
        (
            "#SBATCH --requeue",
            "--requeue is not taken (cloudhpc requeues a job itself, from its `checkpoint`)",
        ),
        ("#SBATCH --open-mode=truncate", "`checkpoint: {warn_before: 2m, signal: USR1, max_restarts: 3}`"),
    ],
)
def test_a_refused_directive_is_a_422_naming_the_line(api: Api, line: str, words: str) -> None:
    fields, message = refusal(api.submit(script=f"#!/bin/bash\n#SBATCH -t 5\n{line}\necho hi\n"))
    assert fields == ["script"]
    assert "line 3 " in message
    assert words in message


BAD_VALUES: dict[str, Any] = {
    "ntasks": 0,
    "gpus": "a100:",
    "gres": "gpu::4",
    "mem_per_cpu": "1.5G",
    "qos": "$(id)",
    "constraint": "a;b",
    "exclusive": "maybe",
    "reservation": "../x",
    "mail_type": "SOMETIMES",
    "mail_user": "a b@example.org",
    "begin": "2027-02-30",
    "signal": "B:USR1@70000",
    "licenses": "lic:0",
}


@pytest.mark.parametrize(("field", "value"), BAD_VALUES.items(), ids=BAD_VALUES.keys())
def test_each_option_with_a_bad_value_is_a_422_naming_it(api: Api, field: str, value: Any) -> None:
    fields, _ = refusal(api.submit(resources={field: value}))
    assert fields == [f"resources.{field}"]


@pytest.mark.parametrize(
    ("resources", "script", "field"),
    [
        ({"time": "31"}, "echo", "resources.time"),  # over debug's 30 (debug is the default partition)
        ({}, "#SBATCH -t 45\necho", "resources.time"),  # a directive is checked like the spec
        ({"partition": "long", "time": "2-00:00:00"}, "echo", "resources.time"),  # the cluster's 1 day
        ({"nodes": 3}, "echo", "resources.nodes"),
        ({"partition": "gpu"}, "echo", "resources.partition"),
        ({"qos": "high"}, "echo", "resources.qos"),
    ],
)
def test_the_clusters_limits_are_a_422_before_submission(
    api: Api, resources: dict[str, Any], script: str, field: str
) -> None:
    fields, message = refusal(api.submit(resources=resources, script=script))
    assert fields == [field], message
    assert (
        api.client.get("/api/v1/jobs", headers={"Authorization": f"Bearer {api.token}"}).json()["jobs"] == []
    )
    ok = api.submit(resources={"partition": "long", "time": "1-00:00:00", "qos": "normal", "nodes": 3})
    assert ok.status_code == 201, ok.text


# ------------------------------------------------------------------------- on the testbed's SLURM


@pytest.fixture
async def slurm(
    testbed_ssh: SSHConfig, testbed: Testbed
) -> AsyncIterator[tuple[SlurmBackend, SSHConnection]]:
    conn = SSHConnection(testbed_ssh, cluster="testbed")
    backend = SlurmBackend("testbed", conn, workdir="~/.cloudhpc-test")
    yield backend, conn
    await backend.close()


async def scontrol(conn: SSHConnection, native_id: str) -> dict[str, str]:
    result = await conn.run(["scontrol", "show", "job", native_id])
    assert result.exit_status == 0, result.stderr
    return dict(re.findall(r"(\S+?)=(\S*)", result.stdout))


@pytest.mark.testbed
async def test_merged_directives_and_typed_options_are_what_slurm_reports(
    slurm: tuple[SlurmBackend, SSHConnection], testbed: Testbed
) -> None:
    backend, conn = slurm
    spec = apply_directives(
        JobSpec(
            name="opts",
            cluster="testbed",
            script=SCRIPT,
            resources=Resources(
                time="4",
                partition=testbed.partition,
                mem_per_cpu="100M",
                begin="now+3600",  # stays pending: what is asked is what scontrol shows
                signal="B:USR1@60",
            ),
        )
    )
    submission = make_submission(await backend.workdir(), SCRIPT, resources=spec.resources)
    native_id = await backend.submit(submission)
    try:
        job = await scontrol(conn, native_id)
    finally:
        await backend.cancel(native_id)
    assert job["TimeLimit"] == "00:04:00"  # the spec's, not the directive's 3
    assert job["NumTasks"] == "2"
    assert job["CPUs/Task"] == "1"
    assert job["NumNodes"] == "1"  # the #SBATCH --nodes=5 after `srun` is a comment
    assert job["QOS"] == "normal"
    assert job["OverSubscribe"] == "NO"  # --exclusive
    assert job["MailUser"] == "hpcuser@example.org"
    assert job["MailType"] == "END,FAIL"
    assert job["MinMemoryCPU"] == "100M"
    assert job["Reason"] == "BeginTime"
    assert job["Partition"] == testbed.partition


@pytest.mark.testbed
@pytest.mark.parametrize(
    ("resources", "sbatch_says"),
    [
        (Resources(constraint="nosuchfeature"), "Invalid feature specification"),
        (Resources(licenses="nosuchlicense:1"), "Invalid license specification"),
        (Resources(reservation="nosuchreservation"), "Requested reservation is invalid"),
        (Resources(gres="gpu:1"), "Invalid generic resource"),
        (Resources(gpus="1"), "Invalid generic resource"),
    ],
)
async def test_options_the_testbed_has_nothing_for_reach_sbatch(
    slurm: tuple[SlurmBackend, SSHConnection], resources: Resources, sbatch_says: str
) -> None:
    """The testbed has no features, licenses, reservations or GRES: sbatch refusing the
    name is the proof that the option reached it as one argument."""
    backend, _ = slurm
    submission = make_submission(await backend.workdir(), "echo hi", resources=resources)
    with pytest.raises(SubmitRejected, match=sbatch_says):
        await backend.submit(submission)


@pytest.mark.testbed
async def test_signal_is_sent_before_the_time_limit(slurm: tuple[SlurmBackend, SSHConnection]) -> None:
    """`signal` (not shown by scontrol in 22.05) checked by its effect: the job's script, which the
    wrapper execs, gets SIGUSR1 before its 1-minute limit (SLURM sends it up to 60 s early)."""
    backend, _ = slurm
    script = (
        'trap \'echo "got USR1"; exit 0\' USR1\nfor i in $(seq 120); do sleep 1; done\necho "no signal"\n'
    )
    submission = make_submission(
        await backend.workdir(), script, resources=Resources(time="1", signal="B:USR1@55")
    )
    native_id = await backend.submit(submission)
    deadline = time.monotonic() + 90
    while True:
        observation = (await backend.poll([native_id])).get(native_id)
        if observation is not None and observation.state.terminal:
            break
        assert time.monotonic() < deadline, f"job {native_id} still {observation}"
        await asyncio.sleep(1)
    assert observation.state == JobState.COMPLETED, observation
    assert b"got USR1" in await backend.read_output(submission.job_id)
