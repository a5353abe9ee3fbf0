"""A bridge setup that cannot work is refused with a message naming the key (porter.bridge).

- with Kubernetes publishing on, the EndpointSlice holds the bridges' address: a loopback
  `bind_address` would point pods at themselves, a host name gives an `FQDN` EndpointSlice that
  kube-proxy does not route;
- porter alone needs no bridge key (it never reads it); the side that stages jobs (the submitter)
  needs the key and the VM's host key, and says so at startup;
- a `porter.bridge` on one side and not the other: porter answers 422 naming `ray.expose` or
  `ray.import`; a submitter without one warns at startup and fails the job at staging with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cloudhpc.bridges.allocation import plan_bridges
from cloudhpc.config import BridgeConfig, ClusterConfig, Settings, check_job_bridge, load_settings
from cloudhpc.domain.jobs import Bridge, Job, JobSpec
from cloudhpc.exceptions import BridgesNotConfigured, ConfigError, StagingError
from cloudhpc.submitter.agent import Agent
from tests.jobs import job_from


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("CLOUDHPC_"):
            monkeypatch.delenv(name)


def bridge(**extra: Any) -> BridgeConfig:
    return BridgeConfig.model_validate({"host": "86.50.1.2", "ssh_user": "ubuntu", **extra})


K8S = {"kubernetes": {"enabled": True, "namespace": "cloudhpc-bridges"}}


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.1.1", "::1", "localhost"])
def test_loopback_bind_address_with_kubernetes_is_refused(address: str) -> None:
    with pytest.raises(ValueError, match=r"porter\.bridge\.bind_address: .* is loopback") as exc:
        bridge(bind_address=address, **K8S)
    assert "EndpointSlice" in str(exc.value)
    assert bridge(bind_address=address).bind_address == address  # fine without Kubernetes


def test_a_host_name_would_be_an_fqdn_endpointslice() -> None:
    with pytest.raises(ValueError, match=r"porter\.bridge\.bind_address: 'vm\.internal' is a host name"):
        bridge(bind_address="vm.internal", **K8S)
    # a wildcard bind shows `host`: then `host` is the key to fix
    with pytest.raises(ValueError, match=r"porter\.bridge\.host: 'vm\.example\.org' is a host name") as exc:
        bridge(host="vm.example.org", bind_address="0.0.0.0", **K8S)
    assert "FQDN" in str(exc.value)
    assert bridge(bind_address="192.168.1.10", **K8S).public_host == "192.168.1.10"
    assert bridge(bind_address="0.0.0.0", **K8S).public_host == "86.50.1.2"
    assert bridge(bind_address="fd00::5", **K8S).public_host == "fd00::5"
    assert bridge(host="vm.example.org", bind_address="vm.internal").public_host == "vm.internal"


def test_the_refusal_names_the_key_when_loaded_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As porter's Deployment gets it: the ConfigMap porter-bridge as CLOUDHPC_PORTER__BRIDGE__*."""
    config = tmp_path / "cloudhpc.yaml"
    config.write_text("porter: {listen: '0.0.0.0:5555'}\n")
    for key, value in {
        "HOST": "86.50.1.2",
        "SSH_USER": "ubuntu",
        "BIND_ADDRESS": "127.0.0.1",
        "KUBERNETES__ENABLED": "true",
        "KUBERNETES__NAMESPACE": "cloudhpc-bridges",
    }.items():
        monkeypatch.setenv(f"CLOUDHPC_PORTER__BRIDGE__{key}", value)
    with pytest.raises(ConfigError, match=r"porter\.bridge\.bind_address: '127\.0\.0\.1' is loopback"):
        load_settings(config)
    monkeypatch.setenv("CLOUDHPC_PORTER__BRIDGE__BIND_ADDRESS", "192.168.1.10")
    settings = load_settings(config)
    assert settings.porter.bridge is not None
    # porter's side: no key, no known_hosts (it never reads them)
    assert (settings.porter.bridge.key_file, settings.porter.bridge.known_hosts) == (None, None)


def slurm_settings(bridge_section: dict[str, Any] | None) -> Settings:
    porter = {"bridge": bridge_section} if bridge_section is not None else {}
    return Settings.model_validate(
        {
            "porter": porter,
            "clusters": {
                "mahti": {
                    "backend": "slurm",
                    "ssh": {"host": "mahti.csc.fi", "user": "alice", "key_file": "/k"},
                }
            },
        }
    )


def test_the_staging_side_needs_the_key_and_the_host_key(tmp_path: Path) -> None:
    section = {"host": "86.50.1.2", "ssh_user": "ubuntu"}
    with pytest.raises(
        ConfigError,
        match=r"porter\.bridge\.ca_key_file \(or key_file\) and porter\.bridge\.known_hosts not set",
    ):
        check_job_bridge(slurm_settings(section))
    key, known = tmp_path / "bridge_key", tmp_path / "known_hosts"
    with pytest.raises(ConfigError, match=r"porter\.bridge\.key_file: .*bridge_key is not a readable file"):
        check_job_bridge(slurm_settings({**section, "key_file": str(key), "known_hosts": str(known)}))
    key.write_text("k")
    known.write_text("h")
    assert (
        check_job_bridge(slurm_settings({**section, "key_file": str(key), "known_hosts": str(known)})) is None
    )


def test_a_submitter_without_porter_bridge_says_so_at_startup() -> None:
    note = check_job_bridge(slurm_settings(None))
    assert note is not None
    assert "no porter.bridge section" in note
    assert "ray.expose" in note
    assert "BRIDGE_PRIVATE_KEY_PATH" in note
    # the embedded default (a `local` cluster, no bridge VM anywhere) stays quiet
    assert check_job_bridge(Settings()) is None


def test_porter_without_porter_bridge_names_the_field() -> None:
    base = {"name": "r", "cluster": "c", "kind": "ray-job", "ray": {"entrypoint": "true"}}
    expose = JobSpec.model_validate({**base, "ray": {"entrypoint": "true", "expose": ["dashboard"]}})
    imports = JobSpec.model_validate(
        {
            **base,
            "ray": {"entrypoint": "true", "import": [{"name": "mlflow", "host": "10.0.0.5", "port": 5000}]},
        }
    )
    with pytest.raises(BridgesNotConfigured, match=r"^ray\.expose: "):
        plan_bridges(expose, None)
    with pytest.raises(BridgesNotConfigured, match=r"^ray\.import: "):
        plan_bridges(imports, None)
    assert plan_bridges(JobSpec.model_validate(base), None) is None


def ray_job(bridge_host: str) -> Job:
    spec = JobSpec.model_validate(
        {
            "name": "r",
            "cluster": "c",
            "kind": "ray-job",
            "ray": {"entrypoint": "true", "expose": ["dashboard"]},
        }
    )
    return job_from(
        spec,
        bridges=[
            Bridge(name="dashboard", remote_port=8265, bridge_host=bridge_host, bridge_port=19500, url=None)
        ],
    )


def agent(section: BridgeConfig | None) -> Agent:
    config = ClusterConfig(backend="local")
    return Agent("c", config, backend=None, channel=None, workdir="/w", bridge=section)  # type: ignore[arg-type]


def test_staging_says_what_is_missing_or_different(tmp_path: Path) -> None:
    with pytest.raises(StagingError, match=r"the submitter has no porter\.bridge section"):
        agent(None).staging.tunnel_access(ray_job("192.168.1.10"))
    key, known = tmp_path / "bridge_key", tmp_path / "known_hosts"
    key.write_text("k")
    known.write_text("h")
    here = bridge(bind_address="192.168.1.20", key_file=str(key), known_hosts=str(known))
    with pytest.raises(
        StagingError, match=r"porter\.bridge\.bind_address: porter publishes .* 192\.168\.1\.10"
    ):
        agent(here).staging.tunnel_access(ray_job("192.168.1.10"))
    with pytest.raises(
        StagingError,
        match=r"porter\.bridge\.ca_key_file \(or key_file\) and porter\.bridge\.known_hosts not set",
    ):
        agent(bridge(bind_address="192.168.1.10")).staging.tunnel_access(ray_job("192.168.1.10"))
    narrow = here.model_copy(update={"bind_address": "192.168.1.10", "port_range": (19600, 19699)})
    with pytest.raises(
        StagingError, match=r"porter\.bridge\.port_range: .* \[19500\], outside .*\[19600, 19699\]"
    ):
        agent(narrow).staging.tunnel_access(ray_job("192.168.1.10"))
    same = here.model_copy(update={"bind_address": "192.168.1.10"})
    access = agent(same).staging.tunnel_access(ray_job("192.168.1.10"))
    assert (access.host, access.bind_address, access.key) == ("86.50.1.2", "192.168.1.10", b"k")
