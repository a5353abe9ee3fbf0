"""`cloudhpc jobs submit` sets the #13 fields without a spec file (`--qos`, `--constraint`, `--gres`,
`--checkpoint-*`, `--max-restarts`, `--outputs`): a bad value exits 2 naming the spec's field before
anything is sent; good values pass the spec's checks and reach the network (exit 69 from an
unreachable porter). What porter stores from them is checked in tests/integration/test_cli.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cloudhpc.cli.main import app

UNREACHABLE = "http://127.0.0.1:9"


def submit(tmp_path: Path, *options: str) -> tuple[int, str]:
    script = tmp_path / "job.sh"
    script.write_text("echo hi\n")
    result = CliRunner().invoke(
        app,
        ["jobs", "submit", "--name", "opts", "--cluster", "testbed", "--script", str(script), *options],
        env={"CLOUDHPC_URL": UNREACHABLE, "CLOUDHPC_TOKEN": "x", "COLUMNS": "400"},
    )
    return result.exit_code, result.stderr


def test_valid_options_pass_the_spec_checks(tmp_path: Path) -> None:
    code, stderr = submit(
        tmp_path,
        *("--qos", "normal", "--constraint", "a100|v100", "--gres", "gpu:a100:4", "-r", "time=10"),
        *("--checkpoint-warn-before", "1m30s", "--checkpoint-signal", "usr2", "--max-restarts", "3"),
        *("--outputs", "results/*.csv", "--outputs", "model.pt"),
    )
    assert code == 69, stderr  # reached the (absent) porter: the spec was accepted here


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (("--qos", "a b"), "resources.qos"),
        (("--gres", "gpu:a100:x"), "resources.gres"),
        (("--constraint", "a;b"), "resources.constraint"),
        (("-r", "time=10", "--checkpoint-warn-before", "soon"), "checkpoint.warn_before"),
        (("-r", "time=10", "--checkpoint-signal", "KILL"), "checkpoint.signal"),
        (("-r", "time=10", "--max-restarts", "1000"), "checkpoint.max_restarts"),
        (("--max-restarts", "1"), "needs resources.time"),
        (("--outputs", "../escape"), "outputs.0"),
    ],
)
def test_bad_values_exit_2_naming_the_field(tmp_path: Path, options: tuple[str, ...], field: str) -> None:
    code, stderr = submit(tmp_path, *options)
    assert code == 2, stderr
    assert field in stderr
