"""hpc/ssh/ without a server: command-line quoting, error translation, secrets kept out of sight."""

from __future__ import annotations

import ast
import shlex
import warnings
from pathlib import Path

import asyncssh
import pytest

from cloudhpc.config import SSHConfig
from cloudhpc.exceptions import (
    HostKeyError,
    RemoteFileError,
    SSHConnectError,
    SSHError,
)
from cloudhpc.hpc import ssh
from cloudhpc.hpc.backend import CommandRunner, FileTransfer
from cloudhpc.hpc.ssh import SSHConnection, build_command_line, command_name
from cloudhpc.hpc.ssh import errors as ssh_errors
from tests.conftest import HOSTILE_STRINGS

SECRET = "pa55-VERY-secret-phrase"


def _config(tmp_path: Path, **extra: object) -> SSHConfig:
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 2222,
        "user": "someone",
        "key_file": tmp_path / "id_ed25519",
        "known_hosts": tmp_path / "known_hosts",
    }
    values.update(extra)
    return SSHConfig.model_validate(values)


# --------------------------------------------------------------------------- command lines


@pytest.mark.parametrize("hostile", HOSTILE_STRINGS)
def test_command_line_round_trips_hostile_arguments(hostile: str) -> None:
    argv = ["printf", "%s", hostile, "", f"--name={hostile}"]
    assert shlex.split(build_command_line(argv)) == argv


@pytest.mark.parametrize("hostile", HOSTILE_STRINGS)
def test_prelude_comes_first_and_alone_is_unquoted(hostile: str) -> None:
    prelude = "source /appl/profile/zz-csc-env.sh"
    line = build_command_line(["squeue", "--name", hostile], prelude)
    head, _, rest = line.partition("\n")
    assert head == prelude
    assert shlex.split(rest) == ["squeue", "--name", hostile]


def test_command_line_without_prelude_is_just_the_joined_argv() -> None:
    assert build_command_line(["sacct", "-j", "12"]) == "sacct -j 12"
    assert build_command_line(["sacct", "-j", "12"], "") == "sacct -j 12"


@pytest.mark.parametrize(
    ("argv", "error"),
    [([], ValueError), ("squeue -u me", TypeError), (["echo", "a\0b"], ValueError), (["echo", 3], TypeError)],
)
def test_command_line_refuses_what_cannot_be_quoted(argv: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        build_command_line(argv)  # type: ignore[arg-type]


def test_command_name_is_the_program_basename() -> None:
    assert command_name(["/usr/bin/sbatch", "--parsable"]) == "sbatch"
    assert command_name(["squeue"]) == "squeue"
    assert command_name([]) == "?"
    assert command_name(["env", "SLURM_TIME_FORMAT=%s", "squeue", "-h"]) == "squeue"
    assert command_name(["/usr/bin/env", "A=1", "B=2", "/usr/bin/sacct"]) == "sacct"
    assert command_name(["env"]) == "env"


# --------------------------------------------------------------------------- error translation


def _asyncssh_exception_types() -> set[type[BaseException]]:
    found: set[type[BaseException]] = set()
    todo: list[type[BaseException]] = [asyncssh.Error, asyncssh.KeyImportError, asyncssh.KeyEncryptionError]
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith("asyncssh") and cls not in found:
            found.add(cls)
            todo.extend(cls.__subclasses__())
    return found


def test_every_asyncssh_exception_maps_to_our_hierarchy() -> None:
    types = _asyncssh_exception_types()
    assert len(types) > 30  # the walk really found asyncssh's tree
    for cls in types:
        rule = ssh_errors._rule_for(cls.__new__(cls))
        assert rule is not None, f"{cls.__qualname__} is not mapped"
        assert issubclass(rule.target, SSHError)


def test_exception_types_named_in_ssh_py_are_in_the_table() -> None:
    """Any asyncssh exception the package mentions (except clauses, suppress) must be translatable."""
    named = {
        getattr(asyncssh, node.attr)
        for path in sorted(Path(ssh.__file__).parent.glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "asyncssh"
    }
    exceptions = {obj for obj in named if isinstance(obj, type) and issubclass(obj, BaseException)}
    assert asyncssh.ChannelOpenError in exceptions
    for cls in exceptions:
        assert any(issubclass(cls, rule.source) for rule in ssh_errors._ERROR_TABLE), (
            f"asyncssh.{cls.__name__}"
        )


def test_no_rule_is_shadowed_by_an_earlier_one() -> None:
    rules = ssh_errors._ERROR_TABLE
    for i, earlier in enumerate(rules):
        for later in rules[i + 1 :]:
            assert not issubclass(later.source, earlier.source), (
                f"{later.source.__name__} can never match: {earlier.source.__name__} comes first"
            )
    assert tuple(rule.source for rule in rules) == ssh_errors._CAUGHT


def _instance(cls: type[BaseException]) -> BaseException:
    if issubclass(cls, asyncssh.Error):
        # Subclasses fix the code in their own constructors; the base one sets every attribute.
        exc = cls.__new__(cls)
        asyncssh.Error.__init__(exc, 1, "boom")
        return exc
    return cls("boom")


@pytest.mark.parametrize(
    ("source", "target", "transient"),
    [
        (asyncssh.HostKeyNotVerifiable, HostKeyError, False),
        (asyncssh.PermissionDenied, SSHConnectError, False),
        (asyncssh.KeyEncryptionError, SSHConnectError, False),
        (asyncssh.KeyImportError, SSHConnectError, False),
        (asyncssh.ConnectionLost, SSHConnectError, True),
        (asyncssh.ProtocolError, SSHConnectError, True),
        (asyncssh.ChannelOpenError, SSHConnectError, False),
        (asyncssh.SFTPConnectionLost, SSHConnectError, True),
        (asyncssh.SFTPNoConnection, SSHConnectError, True),
        (asyncssh.SFTPNoSuchFile, RemoteFileError, False),
        (asyncssh.SFTPNoSuchPath, RemoteFileError, False),
        (asyncssh.SFTPPermissionDenied, RemoteFileError, False),
        (asyncssh.SFTPFailure, RemoteFileError, False),
        (asyncssh.SFTPError, RemoteFileError, False),
        (asyncssh.Error, SSHError, False),
        (TimeoutError, SSHConnectError, True),
        (ConnectionRefusedError, SSHConnectError, True),
        (OSError, SSHConnectError, True),
    ],
)
def test_translation_table(source: type[BaseException], target: type[SSHError], transient: bool) -> None:
    original = _instance(source)
    with pytest.raises(SSHError) as caught, ssh_errors._translate_errors("doing something on cluster c"):
        raise original
    assert type(caught.value) is target
    assert caught.value.__cause__ is original
    assert str(caught.value).startswith("doing something on cluster c: ")
    assert ssh_errors._is_transient(caught.value) is transient


def test_translation_leaves_other_errors_alone() -> None:
    with pytest.raises(KeyError), ssh_errors._translate_errors("x"):
        raise KeyError("not ours to translate")


def test_explain_replaces_the_generic_hint() -> None:
    with (
        pytest.raises(HostKeyError, match=r"cluster c: precise advice$"),
        ssh_errors._translate_errors("cluster c", lambda exc: "precise advice"),
    ):
        raise asyncssh.HostKeyNotVerifiable("Host key is not trusted")


# --------------------------------------------------------------------------- secrets and setup


def test_passphrase_never_shows_in_repr_or_str(tmp_path: Path) -> None:
    conn = SSHConnection(_config(tmp_path), cluster="c", passphrase=SECRET)
    assert SECRET not in repr(conn)
    assert SECRET not in str(conn)
    assert SECRET not in repr(vars(conn))
    assert "c" in repr(conn)
    assert "someone@127.0.0.1:2222" in repr(conn)


def _write_encrypted_key(tmp_path: Path) -> Path:
    key = asyncssh.generate_private_key("ssh-ed25519")
    path = tmp_path / "id_ed25519"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # bcrypt frowns on 1 round; speed matters here
        key.write_private_key(path, passphrase=SECRET, rounds=1)
    return path


async def test_wrong_passphrase_is_a_clear_error_without_the_passphrase(tmp_path: Path) -> None:
    _write_encrypted_key(tmp_path)
    wrong = "not-the-right-one-123"
    (tmp_path / "pass").write_text(wrong + "\n")
    conn = SSHConnection(_config(tmp_path, passphrase_file=tmp_path / "pass"), cluster="c")
    with pytest.raises(SSHConnectError) as caught:
        await conn._load_key()
    message = str(caught.value)
    assert "passphrase" in message
    assert "wrong" in message
    assert "ssh.passphrase_file" in message
    assert wrong not in message
    assert SECRET not in message
    assert not ssh_errors._is_transient(caught.value)


async def test_passphrase_sources_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_encrypted_key(tmp_path)
    monkeypatch.setenv(ssh.PASSPHRASE_ENV, SECRET)
    assert await SSHConnection(_config(tmp_path), cluster="c")._load_key() is not None
    (tmp_path / "pass").write_text(SECRET)  # no newline at the end: also fine
    cfg = _config(tmp_path, passphrase_file=tmp_path / "pass")
    monkeypatch.setenv(ssh.PASSPHRASE_ENV, "wrong")
    assert await SSHConnection(cfg, cluster="c")._load_key() is not None  # the file wins over the env
    with pytest.raises(SSHConnectError, match="passphrase argument"):
        await SSHConnection(cfg, cluster="c", passphrase="wrong")._load_key()  # the argument wins


async def test_encrypted_key_without_passphrase(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_encrypted_key(tmp_path)
    monkeypatch.delenv(ssh.PASSPHRASE_ENV, raising=False)
    with pytest.raises(SSHConnectError, match="encrypted and no passphrase was given"):
        await SSHConnection(_config(tmp_path), cluster="c")._load_key()


async def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(SSHConnectError, match=r"cannot read SSH key .*id_ed25519"):
        await SSHConnection(_config(tmp_path), cluster="c")._load_key()


async def test_missing_passphrase_file(tmp_path: Path) -> None:
    _write_encrypted_key(tmp_path)
    conn = SSHConnection(_config(tmp_path, passphrase_file=tmp_path / "nope"), cluster="c")
    with pytest.raises(SSHConnectError, match=r"cannot read ssh.passphrase_file .*nope: No such file"):
        await conn._load_key()


def test_missing_known_hosts_is_a_host_key_error_with_the_fix(tmp_path: Path) -> None:
    conn = SSHConnection(_config(tmp_path), cluster="c")
    with pytest.raises(HostKeyError, match=r"ssh-keyscan -p 2222 127\.0\.0\.1 >> "):
        conn._check_known_hosts_file()


def test_trust_on_first_use_creates_the_known_hosts_file(tmp_path: Path) -> None:
    cfg = _config(tmp_path, trust_on_first_use=True, known_hosts=tmp_path / "sub" / "known_hosts")
    SSHConnection(cfg, cluster="c")._check_known_hosts_file()
    assert (tmp_path / "sub" / "known_hosts").read_text() == ""


def test_implements_the_backend_protocols(tmp_path: Path) -> None:
    conn = SSHConnection(_config(tmp_path), cluster="c")
    runner: CommandRunner = conn
    files: FileTransfer = conn
    assert isinstance(runner, CommandRunner)
    assert isinstance(files, FileTransfer)
