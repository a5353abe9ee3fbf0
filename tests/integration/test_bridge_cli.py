"""`cloudhpc bridge authorized-key` and `cloudhpc doctor bridge-host` against the testbed's sshd (the
bridge VM of the tests), in-process through the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from typer.testing import CliRunner

from cloudhpc.cli.main import app
from tests.testbed import Testbed

runner = CliRunner()


def config_with_bridge(tmp_path: Path, testbed: Testbed, **changes: Any) -> Path:
    """The testbed's porter.bridge with `changes`, at the sshd `testbed` names. The shared-key mode
    unless `ca_key_file` is given (the testbed's configuration names both)."""
    base = yaml.safe_load(testbed.config_file.read_text())
    here = {"host": testbed.ssh_host, "ssh_port": testbed.ssh_port, "known_hosts": str(testbed.known_hosts)}
    bridge = {**base["porter"]["bridge"], **here, "ca_key_file": None, **changes}
    path = tmp_path / "cloudhpc.yaml"
    path.write_text(
        yaml.safe_dump({"porter": {"database": f"sqlite:///{tmp_path / 'none.db'}", "bridge": bridge}})
    )
    return path


def test_authorized_key_is_the_line_the_testbed_installed(tmp_path: Path, testbed: Testbed) -> None:
    config = config_with_bridge(tmp_path, testbed)
    authorized = (Path("/home") / testbed.ssh_user / ".ssh" / "authorized_keys").read_text().splitlines()
    blob = yaml.safe_load(testbed.config_file.read_text())["porter"]["bridge"]["key_file"]
    blob = Path(f"{blob}.pub").read_text().split()[1]
    # exactly one bridge line, and it carries this checkout's bridge key
    (installed,) = [line for line in authorized if line.endswith(" cloudhpc-bridge")]
    assert f" {blob} " in installed
    # the services the testbed lets jobs import (its S3 server, and whatever else it runs)
    permitted = re.findall(r'permitopen="([^"]+)"', installed)
    assert f"127.0.0.1:{testbed.s3_endpoint.rsplit(':', 1)[1]}" in permitted
    argv = ["bridge", "authorized-key", "--config", str(config)]
    for target in permitted:
        argv += ["--permit-open", target]
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    line = result.stdout.strip()
    assert line.startswith('restrict,port-forwarding,command="/bin/false",permitlisten="127.0.0.1:19500"')
    assert line == installed
    bad = runner.invoke(app, ["bridge", "authorized-key", "--config", str(config), "--permit-open", "nohost"])
    assert bad.exit_code == 2


def test_doctor_passes_on_the_testbed(tmp_path: Path, testbed: Testbed) -> None:
    config = config_with_bridge(tmp_path, testbed)
    result = runner.invoke(app, ["doctor", "bridge-host", "--config", str(config), "-o", "json"])
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    assert result.exit_code == 0, result.stdout
    assert set(checks) == {
        "key", "host key", "port range", "forwarding", "restricted: no command", "restricted: listen",
        "restricted: open",
    }  # fmt: skip
    assert all(c["ok"] for c in checks.values())


def test_doctor_catches_an_unrestricted_key(tmp_path: Path, testbed: Testbed) -> None:
    """The testbed's login key is authorized without restrictions: exactly what doctor must refuse."""
    key = tmp_path / "key"
    key.write_bytes(testbed.ssh_key.read_bytes())
    key.chmod(0o600)
    config = config_with_bridge(tmp_path, testbed, key_file=str(key))
    result = runner.invoke(app, ["doctor", "bridge-host", "--config", str(config), "-o", "json"])
    assert result.exit_code == 1
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    assert checks["forwarding"]["ok"]
    assert not checks["restricted: no command"]["ok"]
    assert not checks["restricted: listen"]["ok"]
    assert not checks["restricted: open"]["ok"]


def test_doctor_refuses_an_unusable_key(tmp_path: Path, testbed: Testbed) -> None:
    key = tmp_path / "key"
    key.write_bytes(testbed.ssh_key_pass.read_bytes())  # has a passphrase: useless for a batch job
    key.chmod(0o600)
    result = runner.invoke(
        app,
        [
            "doctor",
            "bridge-host",
            "--config",
            str(config_with_bridge(tmp_path, testbed, key_file=str(key))),
            "-o",
            "json",
        ],
    )
    assert result.exit_code == 1
    (check,) = json.loads(result.stdout)
    assert check["name"] == "key"
    assert "passphrase" in check["detail"]
