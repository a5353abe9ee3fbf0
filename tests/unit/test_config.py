from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic_settings import InitSettingsSource, YamlConfigSettingsSource

from cloudhpc.config import Settings, load_settings
from cloudhpc.config_docs import render_reference
from cloudhpc.exceptions import ConfigError
from cloudhpc.secrets_json import apply_secrets_json

ROOT = Path(__file__).resolve().parents[2]

CONTRACT = """\
porter:    {listen: "127.0.0.1:5555", database: "sqlite:///.cloudhpc/state.db", object_store: "file://.cloudhpc/objects"}
submitter: {porter_url: "http://127.0.0.1:5555", token_file: ".cloudhpc/agent-token", channel: http, listen: "127.0.0.1:5556"}
clusters:
  testbed:
    backend: slurm            # or: local
    ssh: {host: 127.0.0.1, port: 2222, user: hpcuser, key_file: /k, passphrase_file: null, known_hosts: /kh}
    workdir: "~/.cloudhpc"    # on the cluster
    prelude: ""
    defaults: {partition: debug, account: null, time: "00:10:00"}
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("CLOUDHPC_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cloudhpc.yaml"
    path.write_text(text)
    return path


def test_the_documented_contract_loads(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, CONTRACT))
    cluster = settings.clusters["testbed"]
    assert cluster.ssh is not None
    assert (cluster.ssh.host, cluster.ssh.port, cluster.ssh.user) == ("127.0.0.1", 2222, "hpcuser")
    assert cluster.defaults.partition == "debug"
    assert settings.submitter.channel == "http"
    assert settings.porter.listen == "127.0.0.1:5555"


def test_no_file_gives_the_embedded_default() -> None:
    settings = load_settings()
    assert list(settings.clusters) == ["local"]
    assert settings.clusters["local"].backend == "local"
    assert settings.porter.database.startswith("sqlite:///")


def test_environment_overrides_every_level(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOUDHPC_PORTER__LISTEN", "127.0.0.1:6000")
    monkeypatch.setenv("CLOUDHPC_CLUSTERS__TESTBED__SSH__PORT", "2299")
    monkeypatch.setenv("CLOUDHPC_CONFIG", str(write(tmp_path, CONTRACT)))
    settings = load_settings()
    assert settings.porter.listen == "127.0.0.1:6000"
    assert settings.porter.database == "sqlite:///.cloudhpc/state.db"  # untouched siblings stay
    assert settings.clusters["testbed"].ssh is not None
    assert settings.clusters["testbed"].ssh.port == 2299


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("porter: {lisen: x}", "porter.lisen"),
        ("clusters: {c: {backend: slurm}}", "clusters.c"),
        ("clusters: {c: {backend: pbs}}", "clusters.c.backend"),
        ("submitter: {channel: kafka}", "submitter.channel"),
        ("clusters: {'bad name': {backend: local}}", "clusters.bad name"),
        ("clusters: {c: {backend: local, poll: {fast_interval: 60, slow_interval: 1}}}", "clusters.c.poll"),
    ],
)
def test_invalid_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(write(tmp_path, text))
    assert f"  {key}" in str(exc.value)
    assert "docs/configuration.md" in str(exc.value)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(write(tmp_path, "porter: [unclosed"))
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(write(tmp_path, "- a list"))


def test_the_file_is_read_by_pydantic_settings_yaml_source(tmp_path: Path) -> None:
    """#14 item 10: the library's source, not a hand-written one; the environment and a
    constructor's values (a command's flags) still come first."""
    bound = type("Bound", (Settings,), {"_yaml_file": write(tmp_path, CONTRACT)})
    given = InitSettingsSource(bound, {})
    sources = bound.settings_customise_sources(bound, given, given, given, given)
    assert isinstance(sources[-1], YamlConfigSettingsSource)
    assert sources[-1]()["porter"]["listen"] == "127.0.0.1:5555"


def test_precedence_file_then_environment_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, CONTRACT)
    assert load_settings(path).porter.listen == "127.0.0.1:5555"  # the file over the default
    monkeypatch.setenv("CLOUDHPC_PORTER__LISTEN", "127.0.0.1:6000")
    from_env = load_settings(path)
    assert from_env.porter.listen == "127.0.0.1:6000"  # the environment over the file
    assert from_env.porter.database == "sqlite:///.cloudhpc/state.db"  # the file's siblings stay
    bound = type("Bound", (Settings,), {"_yaml_file": path})
    flagged = bound(porter={"listen": "127.0.0.1:7000"})
    assert flagged.porter.listen == "127.0.0.1:7000"  # a flag (a constructor value) over both


def test_secrets_json_becomes_the_mahti_cluster(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets.json"
    secrets.write_text(
        json.dumps(
            {
                "CSC_USER": "alice",
                "MAHTI_NODE_ADDRESS": "mahti.example.org",
                "MAHTI_PRIVATE_KEY_PATH": "/keys/mahti",
                "MAHTI_PRIVATE_KEY_PASSPHRASE": "s3cr3t-phrase",
                "BRIDGE_PRIVATE_KEY_PATH": "/keys/bridge",
            }
        )
    )
    settings = apply_secrets_json(load_settings(), secrets)
    mahti = settings.clusters["mahti"]
    assert mahti.backend == "slurm"
    assert mahti.ssh is not None
    assert (mahti.ssh.user, mahti.ssh.host, str(mahti.ssh.key_file)) == (
        "alice",
        "mahti.example.org",
        "/keys/mahti",
    )
    assert mahti.ssh.passphrase is not None
    assert mahti.ssh.passphrase.get_secret_value() == "s3cr3t-phrase"
    assert "s3cr3t-phrase" not in repr(settings)
    assert "s3cr3t-phrase" not in str(settings.model_dump())
    secrets.write_text(json.dumps({"CSC_USER": "alice"}))
    with pytest.raises(ConfigError, match="MAHTI_NODE_ADDRESS"):
        apply_secrets_json(load_settings(), secrets)


def test_configuration_reference_is_in_sync() -> None:
    assert (ROOT / "docs" / "configuration-reference.md").read_text() == render_reference(), (
        "regenerate with: python -m cloudhpc.config_docs > docs/configuration-reference.md"
    )
