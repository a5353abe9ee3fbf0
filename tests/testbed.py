"""Access to the real testbed started by `scripts/testbed.sh up`.

Tests that need it take the `testbed` fixture. When the testbed is missing they fail (never skip):
CI must prove every claim against real SLURM, sshd, S3 and PostgreSQL.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

ROOT = Path(__file__).resolve().parent.parent
ENV_FILE = ROOT / ".testbed" / "env.sh"


@dataclass(frozen=True)
class Testbed:
    __test__ = False  # not a test class, whatever its name says

    ssh_host: str
    ssh_port: int
    ssh_user: str
    ssh_key: Path
    ssh_key_pass: Path
    passphrase_file: Path
    known_hosts: Path
    sshd_pidfile: Path
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    s3_bucket: str
    pg_dsn: str
    partition: str
    config_file: Path
    prometheus_url: str = "http://127.0.0.1:19090"
    prometheus_targets: Path = ROOT / ".testbed" / "prometheus" / "targets"
    """Prometheus file_sd directory: `porter-*.json` and `submitter-*.json` are scraped every second."""
    mlflow_url: str = "http://127.0.0.1:19700"
    """MLflow tracking server (PostgreSQL backend, artifacts proxied to the S3 bucket `mlflow`)."""

    def s3_client(self) -> S3Client:
        """A boto3 client of the testbed's S3 server, with the testbed's keys."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            aws_access_key_id=self.s3_access_key,
            aws_secret_access_key=self.s3_secret_key,
            region_name="us-east-1",
        )


def read_env_file(path: Path = ENV_FILE) -> dict[str, str]:
    """Parse the `export NAME=value` lines of env.sh without running a shell."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("export "):
            name, _, raw = line[len("export ") :].partition("=")
            parts = shlex.split(raw)
            values[name] = parts[0] if parts else ""
    return values


def load_testbed() -> Testbed:
    if not ENV_FILE.exists():
        pytest.fail(
            f"the testbed is not up ({ENV_FILE} is missing): run `make testbed-up` "
            "(or `scripts/testbed.sh up`) first",
            pytrace=False,
        )
    env = {**read_env_file(), **{k: v for k, v in os.environ.items() if k.startswith("TESTBED_")}}
    return Testbed(
        ssh_host=env["TESTBED_SSH_HOST"],
        ssh_port=int(env["TESTBED_SSH_PORT"]),
        ssh_user=env["TESTBED_SSH_USER"],
        ssh_key=Path(env["TESTBED_SSH_KEY"]),
        ssh_key_pass=Path(env["TESTBED_SSH_KEY_PASS"]),
        passphrase_file=Path(env["TESTBED_SSH_PASSPHRASE_FILE"]),
        known_hosts=Path(env["TESTBED_KNOWN_HOSTS"]),
        sshd_pidfile=Path(env["TESTBED_SSHD_PIDFILE"]),
        s3_endpoint=env["TESTBED_S3_ENDPOINT"],
        s3_access_key=env["TESTBED_S3_ACCESS_KEY"],
        s3_secret_key=env["TESTBED_S3_SECRET_KEY"],
        s3_bucket=env["TESTBED_S3_BUCKET"],
        pg_dsn=env["TESTBED_PG_DSN"],
        partition=env.get("TESTBED_SLURM_PARTITION", "debug"),
        config_file=ENV_FILE.parent / "cloudhpc.yaml",
        prometheus_url=env.get("TESTBED_PROMETHEUS_URL", "http://127.0.0.1:19090"),
        prometheus_targets=Path(
            env.get("TESTBED_PROMETHEUS_TARGETS", ROOT / ".testbed" / "prometheus" / "targets")
        ),
        mlflow_url=env.get("TESTBED_MLFLOW_URL", "http://127.0.0.1:19700"),
    )
