"""Site modules (Lmod) on the testbed's SLURM, through porter and the agent (issue 13 item 7).

The testbed has Lmod, a profile its cluster prelude sources (as Mahti's prelude sources CSC's) and a
`pytorch/<version>` module whose prebuilt Python has torch and Ray (scripts/testbed.sh). A job whose
environment names the module imports torch from the module and an extra package from its cached
venv, which is built on top of the module with --system-site-packages and so holds no torch of its
own. A name `module load` could misread is refused with a 422; a module that does not exist fails
the job with Lmod's own words, both when only modules are asked for (the job ends at its
`module load`) and when a venv is to be built on top (the build fails before submission).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cloudhpc.domain.states import JobState
from tests.e2e.harness import Deployment, running
from tests.testbed import Testbed

MODULES_DIR = Path("/opt/chpc-modules")
HPC_ENVS = Path("/home/hpcuser/.cloudhpc/envs")
"""The testbed cluster's cached environments (`workdir` ~/.cloudhpc of the SSH user), read as root."""
EXTRA = "tomli==2.4.1"
"""A small package the module does not have: it must come from the cached venv."""


def pytorch_module() -> tuple[str, str]:
    """The testbed's pytorch module (`pytorch/2.13`) and the prefix its modulefile names."""
    files = sorted((MODULES_DIR / "pytorch").glob("*.lua"))
    assert files, f"no pytorch module in {MODULES_DIR}: run scripts/testbed.sh up (it builds it)"
    match = re.search(r'^local prefix = "([^"]+)"$', files[-1].read_text(), re.MULTILINE)
    assert match is not None, files[-1].read_text()
    return f"pytorch/{files[-1].stem}", match.group(1)


@pytest.fixture
def deployment(tmp_path: Path, testbed: Testbed) -> Iterator[Deployment]:
    with running(Deployment(tmp_path / "deploy", testbed, f"sqlite:///{tmp_path / 'state.db'}")) as dep:
        yield dep


PROBE = """\
import sys, torch, ray, tomli
print("prefix", sys.prefix)
print("torch", torch.__file__, torch.__version__)
print("ray", ray.__file__)
print("tomli", tomli.__file__)
"""


@pytest.mark.timeout(600)
def test_environment_on_a_site_module(deployment: Deployment) -> None:
    module, prefix = pytorch_module()
    headers = {"Authorization": f"Bearer {deployment.user_token}"}
    api = f"{deployment.url}/api/v1/jobs"
    base = {"cluster": "testbed", "resources": {"time": "00:05:00"}}

    # A name `module load` would take as an option, or a path out of the module tree: 422, naming it.
    for bad in ["--force", "pytorch/../../etc"]:
        refused = httpx.post(
            api,
            json={**base, "name": "bad", "script": "true\n", "environment": {"modules": [bad]}},
            headers=headers,
        )
        assert refused.status_code == 422, refused.text
        assert "environment.modules" in refused.text, refused.text

    with deployment.client() as client:
        good = client.submit(
            {
                **base,
                "name": "on-module",
                "script": f"python - <<'EOF'\n{PROBE}EOF\n",
                "environment": {"modules": [module], "packages": [EXTRA]},
            }
        )
        missing = client.submit(
            {**base, "name": "no-module", "script": "echo ran\n", "environment": {"modules": ["pytorch/0.0"]}}
        )
        missing_built = client.submit(
            {
                **base,
                "name": "no-module-venv",
                "script": "echo ran\n",
                "environment": {"modules": ["pytorch/0.0"], "packages": [EXTRA]},
            }
        )

        ended = client.wait(good.id, timeout=500)
        output = client.logs(ended).data.decode()
        assert ended.state == JobState.COMPLETED, (ended.reason, output, deployment.log("submitter")[-3000:])
        keys = {"prefix", "torch", "ray", "tomli"}
        seen = dict(line.split(" ", 1) for line in output.splitlines() if line.split(" ")[0] in keys)
        venv = seen["prefix"]
        assert venv.startswith(f"{HPC_ENVS}/"), output
        assert venv.endswith("/venv"), output
        assert seen["torch"].startswith(f"{prefix}/"), output  # torch from the module
        assert seen["ray"].startswith(f"{prefix}/"), output  # and Ray
        assert seen["tomli"].startswith(f"{venv}/"), output  # the extra package from the cached venv
        site = list(Path(venv).glob("lib/python3*/site-packages"))
        assert len(site) == 1, site
        own = {p.name.split("-")[0].lower() for p in site[0].iterdir()}
        assert "tomli" in own
        assert not {"torch", "ray"} & own, sorted(own)  # only the extra packages were installed

        # Only modules: nothing is built, the job ends at its `module load` with Lmod's words.
        failed = client.wait(missing.id, timeout=120)
        text = client.logs(failed).data.decode()
        assert failed.state == JobState.FAILED, (failed, text)
        assert failed.exit_code == 97, failed
        assert "cloudhpc: module load pytorch/0.0 failed" in text, text
        assert "pytorch/0.0" in text.split("cloudhpc: module load")[0], text  # Lmod's own message first
        assert "ran" not in text.splitlines(), text

        # Modules and packages: the venv's build fails before sbatch, the reason says why.
        failed = client.wait(missing_built.id, timeout=120)
        assert failed.state == JobState.FAILED, failed
        assert failed.slurm_job_id is None, failed
        assert failed.reason is not None
        assert "module load pytorch/0.0 failed" in failed.reason, failed.reason
        assert "unknown" in failed.reason, failed.reason  # Lmod: "The following module(s) are unknown"
