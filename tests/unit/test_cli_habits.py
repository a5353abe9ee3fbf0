"""What operators expect of any CLI, run as the installed `cloudhpc` command in a subprocess (the
way a shell sees it): `--version`, shell completion, a default configuration file in the XDG place
with `--config` and `CLOUDHPC_CONFIG` winning over it, a token from a file (never from the command
line), and the exit codes docs/cli.md documents. The codes against a real porter (3 for an API error,
69 for an unreachable one) are in tests/integration/test_cli.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cloudhpc import __version__
from cloudhpc.cli.options import ExitCode, config_path, default_config_path

CLOUDHPC = Path(sys.executable).with_name("cloudhpc")


def run(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """The console script, with an environment of its own: no CLOUDHPC_* of the caller's."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDHPC_", "XDG_", "_CLOUDHPC"))}
    return subprocess.run(
        [str(CLOUDHPC), *args],
        env=base | {"COLUMNS": "400"} | (env or {}),  # Rich would wrap error boxes at 80
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"cloudhpc {__version__}\n"


def test_completion_completes_commands_and_options() -> None:
    """Typer's completion: the script `--show-completion` prints, and the completions it asks for."""
    script = run("--show-completion", "bash")
    assert script.returncode == 0, script.stderr
    assert "complete -o default -F _cloudhpc_completion cloudhpc" in script.stdout

    def complete(words: str) -> list[str]:
        env = {
            "_CLOUDHPC_COMPLETE": "complete_bash",
            "COMP_WORDS": words,
            "COMP_CWORD": str(len(words.split()) - 1),
        }
        result = run(env=env)
        assert result.returncode == 0, result.stderr
        return result.stdout.split()

    assert complete("cloudhpc jo") == ["jobs"]
    assert "submit" in complete("cloudhpc jobs s")
    assert "--token-file" in complete("cloudhpc jobs list --tok")


def test_default_config_path_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_config_path() == tmp_path / ".config" / "cloudhpc" / "config.yaml"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert default_config_path() == tmp_path / "xdg" / "cloudhpc" / "config.yaml"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/dir")  # invalid by the XDG rule: ignored
    assert default_config_path() == tmp_path / ".config" / "cloudhpc" / "config.yaml"


def test_config_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--config, else CLOUDHPC_CONFIG, else the default file if it exists, else none."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("CLOUDHPC_CONFIG", raising=False)
    assert config_path(None) is None  # no file: the embedded defaults
    default = tmp_path / "cloudhpc" / "config.yaml"
    default.parent.mkdir()
    default.write_text("{}\n")
    assert config_path(None) == default
    monkeypatch.setenv("CLOUDHPC_CONFIG", str(tmp_path / "env.yaml"))
    assert config_path(None) == tmp_path / "env.yaml"
    assert config_path(tmp_path / "flag.yaml") == tmp_path / "flag.yaml"


def _config_with_database(path: Path, database: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"porter": {"database": f"sqlite:///{database}"}}))


def test_the_cli_reads_the_default_config_file_and_the_env_var_wins(tmp_path: Path) -> None:
    """`tokens create` opens porter's database as the configuration names it: the default file's,
    unless CLOUDHPC_CONFIG names another, unless --config does."""
    home = tmp_path / "home"
    _config_with_database(home / ".config" / "cloudhpc" / "config.yaml", tmp_path / "default.db")
    _config_with_database(tmp_path / "env.yaml", tmp_path / "env.db")
    _config_with_database(tmp_path / "flag.yaml", tmp_path / "flag.db")
    work = tmp_path / "work"
    work.mkdir()
    env = {"HOME": str(home)}

    made = run("tokens", "create", "--user", "u1", env=env, cwd=work)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "default.db").exists()

    made = run("tokens", "create", "--user", "u2", env=env | {"CLOUDHPC_CONFIG": str(tmp_path / "env.yaml")})
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "env.db").exists()

    made = run(
        "tokens",
        "create",
        "--user",
        "u3",
        "--config",
        str(tmp_path / "flag.yaml"),
        env=env | {"CLOUDHPC_CONFIG": str(tmp_path / "env.yaml")},
    )
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "flag.db").exists()
    assert not (work / ".cloudhpc").exists(), "nothing fell back to the embedded defaults"

    # A broken default file is reported by its path and key, exit 2.
    (home / ".config" / "cloudhpc" / "config.yaml").write_text("porter:\n  databse: x\n")
    broken = run("tokens", "list", env=env)
    assert broken.returncode == ExitCode.USAGE
    assert "porter.databse" in broken.stderr


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "No such file or directory"), ("", "one token on one line"), ("a\nb\n", "one token on one line")],
)
def test_a_bad_token_file_is_a_usage_error_naming_it(
    tmp_path: Path, content: str | None, expected: str
) -> None:
    """Refused before anything is sent (exit 2; the URL here answers nothing, which would be 69)."""
    token_file = tmp_path / "token"
    if content is not None:
        token_file.write_text(content)
    result = run("jobs", "list", "--url", "http://127.0.0.1:9", "--token-file", str(token_file))
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert str(token_file) in result.stderr
    assert expected in result.stderr


def test_there_is_no_token_option_taking_the_secret_itself() -> None:
    """A token on the command line is readable by every user of the machine (/proc/PID/cmdline)."""
    result = run("jobs", "list", "--token", "chpc_x")
    assert result.returncode == ExitCode.USAGE
    assert "No such option: --token" in result.stderr


def test_exit_codes_are_distinct() -> None:
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 69]
    unreachable = run("clusters", "list", "--url", "http://127.0.0.1:9")  # port 9 (discard): refused
    assert unreachable.returncode == ExitCode.UNAVAILABLE, unreachable.stderr
    assert "cannot reach porter at http://127.0.0.1:9" in unreachable.stderr
    assert run("jobs", "list", "--no-such-option").returncode == ExitCode.USAGE


def test_every_command_with_json_output_has_yaml_too() -> None:
    """`-o yaml` (#14 item 8) wherever `-o` is offered: every command's `output` parameter is the
    one shared option (`cli.options.Output`), whose choices are table, json and yaml."""
    import typing

    import typer

    from cloudhpc.cli.main import app
    from cloudhpc.cli.options import Output

    def callbacks(group: typer.Typer, path: str) -> list[tuple[str, typing.Any]]:
        found = [(f"{path} {c.name or c.callback.__name__}", c.callback) for c in group.registered_commands]
        for sub in group.registered_groups:
            assert sub.typer_instance is not None
            found += callbacks(sub.typer_instance, f"{path} {sub.name}")
        return found

    with_output = []
    for path, callback in callbacks(app, "cloudhpc"):
        hints = typing.get_type_hints(callback, include_extras=True)
        if "output" in hints:
            with_output.append(path)
            assert typing.get_args(hints["output"])[0] is Output, path
    assert {o.value for o in Output} == {"table", "json", "yaml"}
    assert {
        "cloudhpc jobs get",
        "cloudhpc jobs list",
        "cloudhpc clusters list",
        "cloudhpc bridge list",
    } <= set(with_output)
