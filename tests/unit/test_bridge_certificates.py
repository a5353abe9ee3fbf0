"""Per-job bridge credentials as the submitter stages them, and the principals line the bridge sshd
gets for a certificate (the testbed's sshd runs them: tests/integration/test_bridge_certificates.py)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import asyncssh
import pytest

from cloudhpc.bridges.authorized_key import NO_DESTINATION, NO_LISTEN
from cloudhpc.bridges.certificates import (
    MARGIN,
    MAX_PORTS,
    NO_TIME_LIMIT,
    BridgeCA,
    format_key_id,
    parse_key_id,
)
from cloudhpc.bridges.principals import parse_port_range, principals_line, sshd_config_lines
from cloudhpc.config import BridgeConfig, ClusterConfig
from cloudhpc.domain.jobs import Bridge, Job, JobSpec
from cloudhpc.exceptions import ConfigError, StagingError
from cloudhpc.hpc.backend import JobPaths
from cloudhpc.ray.script import CERTIFICATE_FILE, KEY_FILE, render_ray_job
from cloudhpc.submitter.staging import Stager
from tests.jobs import job_from

JOB = "12345678-1234-5678-1234-567812345678"


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "bridge_ca"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def test_the_key_id_names_the_job_and_its_ports_and_nothing_else() -> None:
    assert format_key_id(JOB, [19501, 19500]) == f"cloudhpc:{JOB}:19500,19501"
    assert parse_key_id(f"cloudhpc:{JOB}:19500,19501") == (JOB, (19500, 19501))
    assert parse_key_id(format_key_id(JOB, [])) == (JOB, ())
    for bad in (
        f"cloudhpc:{JOB}:19500 19501",
        f"cloudhpc:{JOB}:*",
        f"cloudhpc:{JOB}:70000",
        "cloudhpc:not-a-job:19500",
        f'cloudhpc:{JOB}:19500,permitlisten="*"',
        "alice",
    ):
        with pytest.raises(ValueError, match=r"key id|outside"):
            parse_key_id(bad)


def test_the_principals_line_allows_the_certificates_ports_only() -> None:
    key_id = format_key_id(JOB, [19500, 19507])
    line = principals_line(
        key_id, bind_address="10.0.0.9", port_range=(19500, 19599), permit_open=["10.0.0.5:5000"]
    )
    assert line == (
        'restrict,port-forwarding,command="/bin/false",permitlisten="10.0.0.9:19500",'
        f'permitlisten="10.0.0.9:19507",permitopen="10.0.0.5:5000" {key_id}'
    )
    # a job that only imports listens nowhere, and one with no import opens nothing
    only_imports = principals_line(format_key_id(JOB, []), bind_address="10.0.0.9", port_range=(19500, 19599))
    assert f'permitlisten="10.0.0.9:{NO_LISTEN}"' in only_imports
    assert f'permitopen="{NO_DESTINATION}"' in only_imports
    with pytest.raises(ValueError, match=r"outside the bridge range 19500-19599"):
        principals_line(format_key_id(JOB, [19500, 22]), bind_address="10.0.0.9", port_range=(19500, 19599))
    assert parse_port_range("19500-19599") == (19500, 19599)
    with pytest.raises(ValueError, match="port range"):
        parse_port_range("19599-19500")


def test_sshd_config_lines_refuse_words_sshd_would_misread() -> None:
    lines = sshd_config_lines(
        ssh_user="chpcbridge",
        ca_public_key_file="/etc/ssh/ca.pub",
        cloudhpc="/opt/cloudhpc/bin/cloudhpc",
        bind_address="10.0.0.9",
        port_range=(19500, 19599),
        permit_open=["10.0.0.5:5000"],
    )
    assert lines[2:] == [
        "Match User chpcbridge",
        "    TrustedUserCAKeys /etc/ssh/ca.pub",
        "    AuthorizedPrincipalsCommand /opt/cloudhpc/bin/cloudhpc bridge principals --bind-address 10.0.0.9 "
        "--port-range 19500-19599 --permit-open 10.0.0.5:5000 %i",
        "    AuthorizedPrincipalsCommandUser nobody",
    ]
    for bad in ({"cloudhpc": "cloudhpc"}, {"ssh_user": "a b"}, {"cloudhpc": "/x/%u"}):
        args = {
            "ssh_user": "u",
            "ca_public_key_file": "/ca.pub",
            "cloudhpc": "/c",
            "bind_address": "10.0.0.9",
            "port_range": (1, 2),
            **bad,
        }
        with pytest.raises(ValueError, match="sshd"):
            sshd_config_lines(**args)  # type: ignore[arg-type]


def test_an_unusable_ca_file_is_named_without_its_content(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"porter\.bridge\.ca_key_file: .* does not exist; create it with"):
        BridgeCA.from_file(tmp_path / "missing")
    garbage = tmp_path / "ca"
    garbage.write_text("SECRET-BYTES")
    with pytest.raises(ConfigError, match=r"not an OpenSSH private key") as caught:
        BridgeCA.from_file(garbage)
    assert "SECRET" not in str(caught.value)


def ray_job(ports: list[int], time_limit: str | None) -> Job:
    names = ["dashboard", "client", "metrics"][: len(ports)]
    spec = JobSpec.model_validate(
        {
            "name": "r",
            "cluster": "c",
            "kind": "ray-job",
            "ray": {"entrypoint": "true", "expose": names},
            "resources": {"time": time_limit} if time_limit else {},
        }
    )
    bridges = [
        Bridge(name=n, remote_port=1000 + i, bridge_host="127.0.0.1", bridge_port=p, url=None)
        for i, (n, p) in enumerate(zip(names, ports, strict=True))
    ]
    return job_from(spec, bridges=bridges)


def describe(certificate: bytes, tmp_path: Path) -> dict[str, str]:
    """`ssh-keygen -L` of a certificate: what OpenSSH itself reads in it."""
    path = tmp_path / "cert.pub"
    path.write_bytes(certificate)
    text = subprocess.run(
        ["ssh-keygen", "-L", "-f", str(path)], capture_output=True, text=True, check=True
    ).stdout
    fields: dict[str, str] = {}
    lines = text.splitlines()[1:]
    for i, line in enumerate(lines):
        name, sep, value = line.strip().partition(":")
        if sep and line.startswith("        ") and not line.startswith("                "):
            # a field's value is on its line, or indented on the next one(s)
            more = [ln.strip() for ln in lines[i + 1 :] if ln.startswith("                ")][:1]
            fields[name] = value.strip() or (more[0] if more else "")
    return fields


def fingerprint(public_key: Path) -> str:
    return subprocess.run(
        ["ssh-keygen", "-l", "-f", str(public_key)], capture_output=True, text=True, check=True
    ).stdout.split()[1]


def valid_until(described: dict[str, str]) -> float:
    """The end of `Valid: from 2026-12-05T13:00:00 to 2026-12-05T16:10:00` (local time), as Unix time."""
    end = described["Valid"].rsplit(" to ", 1)[1]
    return time.mktime(time.strptime(end, "%Y-%m-%dT%H:%M:%S"))


def stager(bridge: BridgeConfig, cluster: ClusterConfig | None = None) -> Stager:
    """The submitter's staging for a cluster (its default time limit: 10 minutes)."""
    return Stager(
        cluster or ClusterConfig(backend="local"), envs=None, workdir="/w", bridge=bridge, fetch_file=None
    )


def test_each_job_gets_a_key_and_certificate_of_its_own(tmp_path: Path, ca_file: Path) -> None:
    shared, known = tmp_path / "shared_key", tmp_path / "known_hosts"
    shared.write_bytes(b"THE-SHARED-KEY")
    known.write_text("h")
    config = BridgeConfig(
        host="86.50.1.2",
        ssh_user="u",
        ca_key_file=ca_file,
        key_file=shared,
        known_hosts=known,
        certificate_queue_time=3600,
    )
    job = ray_job([19500, 19503], "02:00:00")
    before = time.time()
    access = stager(config).tunnel_access(job)
    other = stager(config).tunnel_access(ray_job([19501], None))
    assert access.key != b"THE-SHARED-KEY"
    assert b"OPENSSH PRIVATE KEY" in access.key
    assert "PRIVATE KEY" not in repr(access)  # whatever logs it
    assert access.key != other.key
    assert access.certificate is not None
    described = describe(access.certificate, tmp_path)
    assert described["Key ID"] == f'"cloudhpc:{job.id}:19500,19503"'
    assert described["Principals"] == f"cloudhpc:{job.id}:19500,19503"
    assert described["Critical Options"] == "force-command /bin/false"
    assert described["Extensions"] == "permit-port-forwarding"
    assert described["Signing CA"].split()[1] == fingerprint(ca_file.with_suffix(".pub"))
    assert BridgeCA.from_file(ca_file).fingerprint == fingerprint(ca_file.with_suffix(".pub"))
    # the job's own key, valid through the queue allowance, the time limit and the margin
    certificate = asyncssh.import_certificate(access.certificate)
    assert certificate.key.public_data == asyncssh.import_private_key(access.key).public_data
    expected = before + 3600 + 2 * 3600 + MARGIN
    assert expected - 5 <= valid_until(described) <= expected + 5
    assert other.certificate is not None
    # no time limit in the job: the cluster's default; none there either: NO_TIME_LIMIT
    default_limit = valid_until(describe(other.certificate, tmp_path))
    assert before + 3600 + 600 + MARGIN - 5 <= default_limit <= time.time() + 3600 + 600 + MARGIN + 5
    unlimited = stager(config, ClusterConfig.model_validate({"backend": "local", "defaults": {"time": None}}))
    certificate = unlimited.tunnel_access(ray_job([19501], None)).certificate
    assert certificate is not None
    no_limit = valid_until(describe(certificate, tmp_path))
    assert (
        before + 3600 + NO_TIME_LIMIT + MARGIN - 5
        <= no_limit
        <= time.time() + 3600 + NO_TIME_LIMIT + MARGIN + 5
    )


def test_without_a_ca_the_shared_key_is_staged(tmp_path: Path) -> None:
    shared, known = tmp_path / "shared_key", tmp_path / "known_hosts"
    shared.write_bytes(b"THE-SHARED-KEY")
    known.write_text("h")
    config = BridgeConfig(host="86.50.1.2", ssh_user="u", key_file=shared, known_hosts=known)
    access = stager(config).tunnel_access(ray_job([19500], None))
    assert (access.key, access.certificate) == (b"THE-SHARED-KEY", None)
    broken = config.model_copy(update={"ca_key_file": tmp_path / "missing"})
    with pytest.raises(StagingError, match=r"porter\.bridge\.ca_key_file: .*missing does not exist"):
        stager(broken).tunnel_access(ray_job([19500], None))


def test_the_job_script_stages_the_certificate_as_a_secret(ca_file: Path, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("h")
    config = BridgeConfig(host="86.50.1.2", ssh_user="u", ca_key_file=ca_file, known_hosts=known)
    job = ray_job([19500], "10")
    access = stager(config).tunnel_access(job)
    rendered = render_ray_job(
        job_id=job.id,
        spec=job.spec,
        paths=JobPaths("/w", job.id),
        resources=job.spec.resources,
        bridges=list(job.bridges),
        tunnel=access,
    )
    assert rendered.files[CERTIFICATE_FILE] == access.certificate
    assert rendered.modes[CERTIFICATE_FILE] == rendered.modes[KEY_FILE] == 0o600
    assert {KEY_FILE, CERTIFICATE_FILE} <= set(rendered.secret_files)
    # named to ssh, by path
    paths = JobPaths("/w", job.id)
    body = "\n".join(rendered.body)
    assert f"CertificateFile={paths.file(CERTIFICATE_FILE)}" in body
    assert f"-i {paths.file(KEY_FILE)}" in body


def test_the_submitter_refuses_to_start_with_an_unusable_ca(tmp_path: Path) -> None:
    """At startup, naming the key: not later, at each Ray job's staging."""
    from cloudhpc.config import Settings
    from cloudhpc.runtime.agents import open_agents

    known = tmp_path / "known_hosts"
    known.write_text("h")
    bad = tmp_path / "ca"
    bad.write_text("not a key")
    bridge = {"host": "h", "ssh_user": "u", "ca_key_file": str(bad), "known_hosts": str(known)}
    settings = Settings.model_validate({"porter": {"bridge": bridge}})

    async def start() -> None:
        async with open_agents(settings, channel={}):
            raise AssertionError("the agents started")

    with pytest.raises(ConfigError, match=r"porter\.bridge\.ca_key_file: .* not an OpenSSH private key"):
        asyncio.run(start())


def test_a_job_with_more_ports_than_a_certificate_names_fails_at_staging(
    tmp_path: Path, ca_file: Path
) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("h")
    config = BridgeConfig(host="86.50.1.2", ssh_user="u", ca_key_file=ca_file, known_hosts=known)
    job = ray_job([19500], None)
    many = [job.bridges[0].model_copy(update={"bridge_port": 19500 + i}) for i in range(MAX_PORTS + 1)]
    with pytest.raises(StagingError, match=r"^ray\.expose: no bridge certificate"):
        stager(config).tunnel_access(job.model_copy(update={"bridges": many}))
