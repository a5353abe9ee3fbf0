"""A job's `env` values reach the job and nothing else (issue 12: secrets in `job.sh` and `spec.json`).

A batch job on the testbed's SLURM (porter and the agent as processes) gets an API-key-like value
with shell metacharacters. The job sees it exactly (it prints its SHA-256, never the value) from a
0600 file; afterwards no stored artifact, no API answer, no log of porter or the agent and no file
left in the job's directory on the cluster (its `job.sh` included) holds the value, and the env
file is gone.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cloudhpc.domain.redaction import REDACTED
from cloudhpc.domain.states import JobState
from cloudhpc.hpc.jobscript import ENV_FILE
from tests.e2e.harness import Deployment, running
from tests.testbed import Testbed

HPC_WORKDIR = Path("/home/hpcuser/.cloudhpc")
"""The testbed cluster's `workdir` (`~/.cloudhpc` of the SSH user), read here as root."""


@pytest.fixture
def deployment(tmp_path: Path, testbed: Testbed) -> Iterator[Deployment]:
    with running(Deployment(tmp_path / "deploy", testbed, f"sqlite:///{tmp_path / 'state.db'}")) as dep:
        yield dep


def files_holding(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


@pytest.mark.timeout(180)
def test_env_values_reach_the_job_and_no_artifact_answer_or_script(deployment: Deployment) -> None:
    secret = f"sk-{secrets.token_hex(16)} $(touch /tmp/x) 'q' \"dq\" `id`"
    needle = secret.encode()
    spec = {
        "name": "secret-env",
        "cluster": "testbed",
        "env": {"API_KEY": secret, "PLAIN": "visible"},
        "script": (
            f'printf %s "$API_KEY" | sha256sum\nstat -c \'mode %a\' {ENV_FILE}\necho "plain=$PLAIN"\n'
        ),
    }
    headers = {"Authorization": f"Bearer {deployment.user_token}"}
    api = f"{deployment.url}/api/v1/jobs"
    answers: list[str] = []
    submitted = httpx.post(api, json=spec, headers=headers, timeout=30)
    assert submitted.status_code == 201, submitted.text
    answers.append(submitted.text)
    assert submitted.json()["spec"]["env"] == {"API_KEY": REDACTED, "PLAIN": REDACTED}
    job_id = submitted.json()["id"]

    with deployment.client() as client:
        final = client.wait(job_id, timeout=120)
        assert final.state == JobState.COMPLETED, deployment.log("submitter")[-3000:]
        output = client.logs(final).data.decode()
        assert hashlib.sha256(needle).hexdigest() in output, output  # the job saw the exact value
        assert "mode 600" in output, output
        assert "plain=visible" in output
        deadline = time.monotonic() + 30
        while not {"output.log", "sacct.json"} <= {a.name for a in client.artifacts(final)}:
            assert time.monotonic() < deadline, "artifacts never stored"
            time.sleep(0.2)
        names = {a.name for a in client.artifacts(final)}

    answers.append(httpx.get(f"{api}/{job_id}", headers=headers, timeout=30).text)
    answers.append(httpx.get(f"{api}/{job_id}?wait=1", headers=headers, timeout=30).text)
    answers.append(httpx.post(f"{api}/{job_id}/cancel", headers=headers, timeout=30).text)
    answers.append(httpx.get(api, headers=headers, timeout=30).text)
    for answer in answers:
        assert secret not in answer
    assert {"spec.json", "job.sh"} <= names

    objects = deployment.root / "objects"
    assert files_holding(objects, needle) == []
    stored_spec = json.loads(next(objects.rglob("spec.json")).read_text())
    assert stored_spec["env"] == {"API_KEY": REDACTED, "PLAIN": REDACTED}  # the names are kept
    for role in ("porter", "submitter"):
        assert secret not in deployment.log(role), role

    jobdir = HPC_WORKDIR / "jobs" / job_id
    deadline = time.monotonic() + 10
    while (jobdir / ENV_FILE).exists():  # the agent deletes it once the job has ended
        assert time.monotonic() < deadline, f"{jobdir / ENV_FILE} outlived the job"
        time.sleep(0.1)
    assert files_holding(jobdir, needle) == []
    assert f"{ENV_FILE}" in (jobdir / ".cloudhpc" / "job.sh").read_text()
