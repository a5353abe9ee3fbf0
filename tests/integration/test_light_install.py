"""`pip install cloudhpc` without extras: the SDK and the CLI for a notebook or a pipeline step, with
no web server, database, SSH or S3 library; server commands name the extra that brings them.

A real install into a fresh venv (its light dependencies come from pip's cache or the index), from
a copy of the sources as the Dockerfile makes one, so that no build output lands in the checkout.
"""

from __future__ import annotations

import shutil
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVER_ONLY = ("fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic", "asyncssh", "boto3")


def _run(argv: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def light(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `bin` directory of a venv with `pip install cloudhpc` (no extras) in it."""
    root = tmp_path_factory.mktemp("light")
    source = root / "cloudhpc"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    venv.create(root / "venv", with_pip=True)
    bin_dir = root / "venv" / "bin"
    done = _run(
        [str(bin_dir / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(source)],
        cwd=root,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return bin_dir


def test_the_server_libraries_are_not_installed(light: Path) -> None:
    code = (
        "import importlib.util, sys;"
        f"print([m for m in {SERVER_ONLY!r} if importlib.util.find_spec(m) is not None])"
    )
    result = _run([str(light / "python"), "-c", code], cwd=light)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_sdk_imports_and_builds_a_client(light: Path) -> None:
    code = """
import sys
import cloudhpc
from cloudhpc import *  # what a notebook does
client = cloudhpc.Client("http://127.0.0.1:9", token="secret")
assert "secret" not in repr(client)
spec = cloudhpc.JobSpec(name="hello", cluster="local", script="echo hi")
assert spec.kind == cloudhpc.JobKind.BATCH
try:
    client.get("00000000-0000-0000-0000-000000000000")
except cloudhpc.ApiError as exc:
    assert exc.status == 0, exc  # nothing listens there: an ApiError, not an import error
try:  # the Executor imports, and says which extra pickles functions when it is missing
    cloudhpc.Executor(cluster="local", client=client).submit(print, 1)
    raise AssertionError("submitted without cloudpickle")
except ModuleNotFoundError as exc:
    assert "pip install 'cloudhpc[executor]'" in str(exc), exc
client.close()
import cloudhpc.config, cloudhpc.cli.main
print(sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[1:]))
"""
    result = _run([str(light / "python"), "-c", code, *SERVER_ONLY], cwd=light)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [["--help"], ["jobs", "--help"], ["clusters", "--help"]])
def test_the_cli_answers(light: Path, argv: list[str]) -> None:
    result = _run([str(light / "cloudhpc"), *argv], cwd=light)
    assert result.returncode == 0, result.stderr
    assert "Usage: cloudhpc" in result.stdout


@pytest.mark.parametrize("argv", [["serve", "all"], ["tokens", "list"], ["demo", "--batch"]])
def test_server_commands_name_the_extra(light: Path, argv: list[str], tmp_path: Path) -> None:
    result = _run([str(light / "cloudhpc"), *argv], cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "pip install 'cloudhpc[server]'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / ".cloudhpc").exists(), "nothing is started or written before the check"


def test_sdk_errors_without_a_server_are_the_documented_exit_code(light: Path, tmp_path: Path) -> None:
    result = _run([str(light / "cloudhpc"), "jobs", "list", "--url", "http://127.0.0.1:9"], cwd=tmp_path)
    assert result.returncode == 69  # EX_UNAVAILABLE: porter unreachable (docs/cli.md)
    assert result.stderr.startswith("ApiError: cannot reach porter")
