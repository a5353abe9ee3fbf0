"""`cloudhpc testbed`: the thin wrapper over scripts/testbed.sh, against the running testbed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cloudhpc.cli.main import app
from cloudhpc.cli.testbed import find_testbed_script
from cloudhpc.exceptions import ConfigError
from tests.testbed import Testbed

ROOT = Path(__file__).resolve().parents[2]


def test_status_runs_the_checkouts_script_and_reports_the_running_testbed(testbed: Testbed) -> None:
    # a real process, so that the script's own output (not captured by CliRunner) is seen
    result = subprocess.run(
        [sys.executable, "-m", "cloudhpc.cli.main", "testbed", "status"],
        cwd=ROOT / "docs",  # found from a subdirectory of the checkout
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "testbed: up" in result.stdout
    assert f"127.0.0.1:{testbed.ssh_port}" in result.stdout


def test_the_script_is_found_from_anywhere_inside_the_checkout() -> None:
    assert find_testbed_script(start=ROOT / "src" / "cloudhpc") == ROOT / "scripts" / "testbed.sh"
    assert find_testbed_script(repo=ROOT) == ROOT / "scripts" / "testbed.sh"


def test_a_directory_without_the_script_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--repo"):
        find_testbed_script(repo=tmp_path)
    result = CliRunner().invoke(app, ["testbed", "status", "--repo", str(tmp_path)])
    assert result.exit_code == 2
    assert "cloudhpc checkout" in result.output
    assert CliRunner().invoke(app, ["testbed", "restart"]).exit_code == 2
