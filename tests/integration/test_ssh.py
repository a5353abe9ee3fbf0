"""SSHConnection against the testbed's real sshd (127.0.0.1:2222, MaxSessions 10, user hpcuser)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import asyncssh
import pytest

from cloudhpc.config import SSHConfig
from cloudhpc.exceptions import CommandTimeout, HostKeyError, OutputTooLarge, RemoteFileError, SSHConnectError
from cloudhpc.hpc.ssh import SSHConnection
from tests.conftest import HOSTILE_STRINGS

if TYPE_CHECKING:
    from tests.testbed import Testbed

pytestmark = pytest.mark.testbed


# --------------------------------------------------------------------------- helpers


def _with(config: SSHConfig, **changes: object) -> SSHConfig:
    return config.model_copy(update=changes)


def _ppids() -> dict[int, int]:
    table: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields start after the last ')'.
        table[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
    return table


def _socket_inodes(pid: int | str) -> set[str]:
    inodes: set[str] = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def _tcp_table() -> list[tuple[int, int, str, str]]:
    """(local port, remote port, state, inode) of every IPv4/IPv6 TCP socket."""
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local = int(fields[1].rsplit(":", 1)[1], 16)
            remote = int(fields[2].rsplit(":", 1)[1], 16)
            rows.append((local, remote, fields[3], fields[9]))
    return rows


def _drop_server_side(testbed: Testbed, conn: SSHConnection) -> int:
    """Kill the sshd processes serving `conn` (a child of the listener and its descendants).

    Only the children of the pid in $TESTBED_SSHD_PIDFILE that hold the server end of our own TCP
    connection, so other users of the testbed keep theirs; never the listener.
    """
    assert conn._conn is not None
    our_port = conn._conn.get_extra_info("sockname")[1]
    server_ends = {
        inode for local, remote, _, inode in _tcp_table() if (local, remote) == (testbed.ssh_port, our_port)
    }
    listener = int(testbed.sshd_pidfile.read_text().split()[0])
    ppids = _ppids()
    todo = [pid for pid, ppid in ppids.items() if ppid == listener and _socket_inodes(pid) & server_ends]
    assert todo, "no sshd child serves our connection"
    victims: list[int] = []
    while todo:
        pid = todo.pop()
        victims.append(pid)
        todo.extend(child for child, ppid in ppids.items() if ppid == pid)
    for pid in victims:
        assert pid != listener
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(victims)


def _our_tcp_connections_to(port: int) -> int:
    """ESTABLISHED TCP connections from this process to `port`, as the kernel sees them."""
    ours = _socket_inodes("self")
    return sum(
        1 for _, remote, state, inode in _tcp_table() if remote == port and state == "01" and inode in ours
    )


@pytest.fixture
async def conn(testbed_ssh: SSHConfig) -> AsyncIterator[SSHConnection]:
    async with SSHConnection(testbed_ssh, cluster="testbed") as connection:
        yield connection


@pytest.fixture
async def scratch(conn: SSHConnection) -> AsyncIterator[str]:
    """A fresh directory under hpcuser's home, removed afterwards."""
    path = f"~/.cloudhpc-test/{uuid.uuid4()}"
    await conn.makedirs(path)
    yield path
    home = await conn.home()
    result = await conn.run(["rm", "-rf", "--", path.replace("~", home, 1)])
    assert result.ok, result.stderr


# --------------------------------------------------------------------------- commands


async def test_run_exit_status_stdout_stderr_and_stdin(conn: SSHConnection) -> None:
    result = await conn.run(
        ["sh", "-c", 'echo out; echo err >&2; read line; echo "got:$line"; exit 7'], stdin="hi\n"
    )
    assert (result.exit_status, result.stdout, result.stderr) == (7, "out\ngot:hi\n", "err\n")
    assert not result.ok
    assert (await conn.run(["true"])).ok
    assert (await conn.run(["whoami"])).stdout == "hpcuser\n"
    # No stdin given: the command sees EOF at once rather than waiting forever.
    assert (await conn.run(["cat"], timeout=5)).stdout == ""


async def test_prelude_runs_before_the_command(conn: SSHConnection) -> None:
    result = await conn.run(
        ["sh", "-c", 'echo "$CLOUDHPC_PRELUDE_MARK"'], prelude="export CLOUDHPC_PRELUDE_MARK=x1"
    )
    assert result.stdout == "x1\n"


async def test_hostile_arguments_reach_the_command_literally(conn: SSHConnection, testbed: Testbed) -> None:
    marker = f"/tmp/pwned-{uuid.uuid4()}"
    hostile = [s.replace("/tmp/pwned", marker) for s in HOSTILE_STRINGS]
    for text in hostile:
        result = await conn.run(["printf", "%s", text], prelude="set -e")
        assert result.stdout == text
    everything = await conn.run(["printf", "%s\\n", *hostile], stdin="$(touch " + marker + ")")
    assert everything.stdout == "".join(f"{s}\n" for s in hostile)
    assert (await conn.run(["cat"], stdin=hostile[0])).stdout == hostile[0]
    assert (await conn.run(["test", "-e", marker])).exit_status == 1
    assert not await asyncio.to_thread(os.path.exists, marker)  # the testbed is local: look from outside too


async def test_a_command_that_reads_no_input_is_not_a_dropped_connection(conn: SSHConnection) -> None:
    """`true` exits before its (large) stdin is sent: the channel closes under the write. That is
    the command's choice, not a broken connection (before: "the connection dropped while `true` was
    running; it may or may not have taken effect", 2 runs in 40 on this testbed)."""
    for _ in range(40):
        result = await conn.run(["true"], stdin="x" * 3_000_000)
        assert result.exit_status == 0


async def test_thirty_concurrent_runs_share_one_connection(testbed_ssh: SSHConfig, testbed: Testbed) -> None:
    # 10 = the testbed's MaxSessions: 9 command channels + 1 SFTP channel must all fit.
    config = _with(testbed_ssh, max_channels=10)
    async with SSHConnection(config, cluster="testbed") as conn:
        home = await conn.home()  # opens the SFTP channel first, so it competes with the runs
        slots = f"{home}/.cloudhpc-test/{uuid.uuid4()}"
        # Each command registers itself in `slots`, counts who else is running, then leaves:
        # the server's own view of how many of our commands run at once.
        script = 'mkdir -p "$1" && touch "$1/$$" && ls "$1" | wc -l && sleep 0.3 && rm "$1/$$"'
        started = time.monotonic()
        try:
            results = await asyncio.gather(*(conn.run(["sh", "-c", script, "sh", slots]) for _ in range(30)))
        finally:
            await conn.run(["rm", "-rf", "--", slots])
        elapsed = time.monotonic() - started
        assert all(r.ok for r in results), [r.stderr for r in results if not r.ok]
        concurrent = [int(r.stdout) for r in results]
        assert 2 <= max(concurrent) <= config.max_channels - 1
        assert elapsed < 15
        assert conn._connect_count == 1
        assert _our_tcp_connections_to(testbed.ssh_port) == 1
    assert _our_tcp_connections_to(testbed.ssh_port) == 0


async def test_timeout_raises_and_stops_the_remote_command(conn: SSHConnection) -> None:
    tag = f"{uuid.uuid4().int % 1000}.{uuid.uuid4().int % 1000:03d}"  # a unique sleep duration
    started = time.monotonic()
    with pytest.raises(CommandTimeout, match=r"`sleep` .* within 0.5s"):
        await conn.run(["sleep", f"9{tag}"], timeout=0.5)
    assert time.monotonic() - started < 3
    assert (await conn.run(["echo", "still usable"])).stdout == "still usable\n"
    for _ in range(20):
        left = await conn.run(["pgrep", "-u", "hpcuser", "-f", f"^sleep 9{tag}$"])
        if left.exit_status == 1:
            break
        await asyncio.sleep(0.1)
    assert left.exit_status == 1, f"the timed-out command still runs: {left.stdout}"


async def test_output_cap(testbed_ssh: SSHConfig) -> None:
    async with SSHConnection(testbed_ssh, cluster="testbed", max_output=10_000) as conn:
        with pytest.raises(OutputTooLarge, match="more than 10000 bytes"):
            await conn.run(["head", "-c", "1000000", "/dev/zero"])
        assert len((await conn.run(["head", "-c", "9000", "/dev/zero"])).stdout) == 9000
        assert conn._connect_count == 1


async def test_on_command_hook_sees_every_outcome(testbed_ssh: SSHConfig) -> None:
    seen: list[tuple[str, str, str, float]] = []
    async with SSHConnection(testbed_ssh, cluster="hooked", on_command=lambda *a: seen.append(a)) as conn:
        await conn.run(["/bin/true"])
        await conn.run(["false"])
        with pytest.raises(CommandTimeout):
            await conn.run(["sleep", "5"], timeout=0.2)
    assert [(c, n, o) for c, n, o, _ in seen] == [
        ("hooked", "true", "ok"),
        ("hooked", "false", "error"),
        ("hooked", "sleep", "timeout"),
    ]
    assert all(seconds >= 0 for *_, seconds in seen)


# --------------------------------------------------------------------------- connection loss


async def test_idempotent_run_reconnects_after_the_server_drops_us(
    conn: SSHConnection, testbed: Testbed
) -> None:
    assert (await conn.run(["true"])).ok
    assert _drop_server_side(testbed, conn) >= 1
    result = await conn.run(["echo", "back"], idempotent=True)
    assert result.stdout == "back\n"
    assert conn.reconnects == 1
    assert conn._connect_count == 2

    # Dropped while the command runs: an idempotent one is re-run on a new connection.
    task = asyncio.create_task(conn.run(["sh", "-c", "sleep 0.6; echo done"], idempotent=True))
    await asyncio.sleep(0.3)
    assert _drop_server_side(testbed, conn) >= 1
    assert (await task).stdout == "done\n"
    assert conn.reconnects == 2


async def test_non_idempotent_run_during_a_drop_is_not_retried(conn: SSHConnection, testbed: Testbed) -> None:
    seen: list[str] = []
    conn._on_command = lambda cluster, name, outcome, seconds: seen.append(outcome)
    task = asyncio.create_task(conn.run(["sh", "-c", "sleep 0.6; echo done"]))
    await asyncio.sleep(0.3)
    assert _drop_server_side(testbed, conn) >= 1
    with pytest.raises(SSHConnectError, match="may or may not have taken effect"):
        await task
    assert seen == ["disconnect"]
    # The next command gets a new connection.
    assert (await conn.run(["echo", "again"])).stdout == "again\n"
    assert conn.reconnects == 1


async def test_close_during_a_run_does_not_reconnect(testbed_ssh: SSHConfig, testbed: Testbed) -> None:
    conn = SSHConnection(testbed_ssh, cluster="tb")
    assert (await conn.run(["true"])).ok
    task = asyncio.create_task(conn.run(["sleep", "3"], idempotent=True))
    await asyncio.sleep(0.3)
    await conn.close()
    with pytest.raises(SSHConnectError):
        await task
    assert not conn.connected
    assert conn.reconnects == 0
    assert _our_tcp_connections_to(testbed.ssh_port) == 0


async def test_unreachable_server_is_retried_with_backoff_then_reported(testbed_ssh: SSHConfig) -> None:
    # Port 1 on loopback: nothing listens there, so every attempt is refused at once.
    conn = SSHConnection(_with(testbed_ssh, port=1), cluster="tb", connect_attempts=3, backoff_base=0.05)
    started = time.monotonic()
    with pytest.raises(
        SSHConnectError, match=r"connecting to hpcuser@127\.0\.0\.1:1 for cluster tb: .*refused"
    ):
        await conn.run(["true"], idempotent=True)
    assert time.monotonic() - started < 2
    assert conn._connect_count == 0


async def test_sftp_survives_a_drop(conn: SSHConnection, scratch: str, testbed: Testbed) -> None:
    await conn.write_file(f"{scratch}/a", b"one")
    _drop_server_side(testbed, conn)
    assert await conn.read_file(f"{scratch}/a") == b"one"
    assert conn.reconnects == 1


# --------------------------------------------------------------------------- host keys


def _other_key_line(testbed: Testbed) -> str:
    key = asyncssh.generate_private_key("ssh-ed25519")
    public = key.export_public_key("openssh").decode().split()
    return f"[{testbed.ssh_host}]:{testbed.ssh_port} {public[0]} {public[1]}\n"


async def test_changed_host_key_is_refused(testbed_ssh: SSHConfig, testbed: Testbed, tmp_path: Path) -> None:
    known = tmp_path / "known hosts; $(x)"
    line = _other_key_line(testbed)
    known.write_text(line)
    for tofu in (False, True):  # trust-on-first-use never overrides a recorded key
        conn = SSHConnection(_with(testbed_ssh, known_hosts=known, trust_on_first_use=tofu), cluster="tb")
        with pytest.raises(HostKeyError) as caught:
            await conn.run(["true"])
        message = str(caught.value)
        assert "CHANGED" in message
        assert "SHA256:" in message
        assert f"ssh-keyscan -p {testbed.ssh_port} {testbed.ssh_host} >> " in message
        assert "ssh-keygen -R" in message
        assert conn._connect_count == 0
        await conn.close()
    assert known.read_text() == line


async def test_unknown_host_key_is_refused(testbed_ssh: SSHConfig, testbed: Testbed, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    conn = SSHConnection(_with(testbed_ssh, known_hosts=known), cluster="tb")
    started = time.monotonic()
    with pytest.raises(HostKeyError, match=r"is not in .*ssh-keyscan -p 2222 127\.0\.0\.1 >> ") as caught:
        await conn.run(["true"])
    assert "SHA256:" in str(caught.value)
    assert time.monotonic() - started < 2  # refused at once: never retried with backoff
    assert known.read_text() == ""
    await conn.close()


async def test_trust_on_first_use_records_the_key(
    testbed_ssh: SSHConfig, testbed: Testbed, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    caplog.set_level(logging.WARNING, logger="cloudhpc.hpc.ssh")
    async with SSHConnection(
        _with(testbed_ssh, known_hosts=known, trust_on_first_use=True), cluster="tb"
    ) as conn:
        assert (await conn.run(["true"])).ok
    recorded = known.read_text().splitlines()
    assert len(recorded) == 1
    assert recorded[0] in testbed.known_hosts.read_text().splitlines()  # the testbed's real key
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "first use" in r.getMessage()]
    assert len(warnings) == 1
    assert "SHA256:" in warnings[0].getMessage()
    # Now pinned: a strict connection accepts it, and nothing more is appended.
    async with SSHConnection(_with(testbed_ssh, known_hosts=known), cluster="tb") as conn:
        assert (await conn.run(["true"])).ok
    assert known.read_text().splitlines() == recorded


# --------------------------------------------------------------------------- keys with a passphrase


async def test_key_with_passphrase_file(testbed_ssh: SSHConfig, testbed: Testbed) -> None:
    config = _with(testbed_ssh, key_file=testbed.ssh_key_pass, passphrase_file=testbed.passphrase_file)
    async with SSHConnection(config, cluster="tb") as conn:
        assert (await conn.run(["whoami"])).stdout == "hpcuser\n"


async def test_key_with_passphrase_argument(testbed_ssh: SSHConfig, testbed: Testbed) -> None:
    passphrase = testbed.passphrase_file.read_text().strip()
    config = _with(testbed_ssh, key_file=testbed.ssh_key_pass)
    async with SSHConnection(config, cluster="tb", passphrase=passphrase) as conn:
        assert (await conn.run(["true"])).ok
        assert passphrase not in repr(conn)


async def test_wrong_passphrase_is_a_clear_error(testbed_ssh: SSHConfig, testbed: Testbed) -> None:
    config = _with(testbed_ssh, key_file=testbed.ssh_key_pass)
    conn = SSHConnection(config, cluster="tb", passphrase="definitely-wrong-77")
    with pytest.raises(SSHConnectError, match=r"passphrase for SSH key .* is wrong") as caught:
        await conn.run(["true"])
    assert "definitely-wrong-77" not in str(caught.value)
    assert not isinstance(caught.value, HostKeyError)
    await conn.close()


# --------------------------------------------------------------------------- keys held by an ssh-agent


@pytest.fixture
def ssh_agent(tmp_path: Path, testbed: Testbed) -> Iterator[Path]:
    """A real ssh-agent of our own (stopped by its PID) holding the testbed's passphrase key."""
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline, "ssh-agent did not start"
            time.sleep(0.05)
        askpass = tmp_path / "askpass.sh"  # ssh-add reads the passphrase from this, not a terminal
        askpass.write_text(f"#!/bin/sh\ncat {testbed.passphrase_file}\n")
        askpass.chmod(0o700)
        env = {
            **os.environ,
            "SSH_AUTH_SOCK": str(sock),
            "SSH_ASKPASS": str(askpass),
            "SSH_ASKPASS_REQUIRE": "force",
        }
        subprocess.run(
            ["ssh-add", str(testbed.ssh_key_pass)], env=env, check=True, capture_output=True, timeout=30
        )
        yield sock
    finally:
        agent.terminate()
        agent.wait(timeout=10)


async def test_key_from_an_ssh_agent(
    testbed_ssh: SSHConfig, ssh_agent: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # no key file, no passphrase: the agent signs; and only the agent is asked (no ~/.ssh defaults)
    monkeypatch.setenv("HOME", "/nonexistent")
    config = _with(testbed_ssh, key_file=None, agent_socket=ssh_agent)
    async with SSHConnection(config, cluster="tb") as conn:
        assert (await conn.run(["whoami"])).stdout == "hpcuser\n"
    # SSH_AUTH_SOCK is the default socket
    monkeypatch.setenv("SSH_AUTH_SOCK", str(ssh_agent))
    async with SSHConnection(_with(testbed_ssh, key_file=None), cluster="tb") as conn:
        assert (await conn.run(["true"])).ok


async def test_no_key_and_no_agent_is_a_clear_error(
    testbed_ssh: SSHConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    conn = SSHConnection(_with(testbed_ssh, key_file=None), cluster="tb")
    with pytest.raises(SSHConnectError, match=r"no SSH key: set ssh.key_file, or run an ssh-agent"):
        await conn.run(["true"])
    await conn.close()
    gone = SSHConnection(_with(testbed_ssh, key_file=None, agent_socket=tmp_path / "none.sock"), cluster="tb")
    with pytest.raises(SSHConnectError, match=r"ssh-agent socket .*none.sock does not exist"):
        await gone.run(["true"])
    await gone.close()


# --------------------------------------------------------------------------- files


async def test_home_and_path_resolution(conn: SSHConnection, scratch: str) -> None:
    home = await conn.home()
    assert home == "/home/hpcuser"
    await conn.write_file(f"{scratch}/x.txt", b"x")
    relative = scratch.removeprefix("~/") + "/x.txt"
    assert await conn.read_file(relative) == b"x"
    assert await conn.read_file(scratch.replace("~", home, 1) + "/x.txt") == b"x"


@pytest.mark.parametrize("index", range(len(HOSTILE_STRINGS)))
async def test_files_with_hostile_names(conn: SSHConnection, scratch: str, index: int) -> None:
    name = HOSTILE_STRINGS[index]
    path = f"{scratch}/one/two/d {index}/{name}"  # deep enough that `../../x` stays inside scratch
    data = bytes(range(256)) * 40
    await conn.write_file(path, data, mode=0o600)
    assert await conn.exists(path)
    assert await conn.size(path) == len(data)
    assert await conn.read_file(path) == data
    assert await conn.read_file(path, offset=100, length=50) == data[100:150]
    assert await conn.read_file(path, offset=len(data) - 10) == data[-10:]
    assert await conn.read_file(path, offset=len(data)) == b""
    assert await conn.read_file(path, offset=len(data) + 100, length=5) == b""
    # The shell sees the same name when it comes quoted from an argv.
    full = path.replace("~", await conn.home(), 1)
    stat = await conn.run(["stat", "-c", "%a %s", full])
    assert stat.stdout == f"600 {len(data)}\n"
    await conn.write_file(path, b"replaced")
    assert await conn.read_file(path) == b"replaced"
    listing = await conn.run(["ls", "-A", str(Path(full).parent)])
    assert ".tmp-" not in listing.stdout  # the temporary file was renamed, not left behind


async def test_missing_files(conn: SSHConnection, scratch: str) -> None:
    missing = f"{scratch}/nope"
    assert not await conn.exists(missing)
    assert await conn.size(missing) is None
    with pytest.raises(RemoteFileError, match="no such file"):
        await conn.read_file(missing)
    await conn.makedirs(f"{scratch}/a/b/c")
    await conn.makedirs(f"{scratch}/a/b/c")  # exists already: fine
    assert await conn.exists(f"{scratch}/a/b/c")
    mode = await conn.run(["stat", "-c", "%a", (await conn.home()) + scratch[1:] + "/a/b/c"])
    assert mode.stdout == "700\n"


async def test_a_file_in_the_way_of_a_directory_is_an_error(conn: SSHConnection, scratch: str) -> None:
    """mkdir -p and a write whose parents are missing create only what is missing, and refuse to go
    through a file (the creation walks up with stat, not down from /)."""
    await conn.write_file(f"{scratch}/plain", b"file")
    with pytest.raises(RemoteFileError, match="plain"):
        await conn.makedirs(f"{scratch}/plain/sub")
    with pytest.raises(RemoteFileError):
        await conn.write_file(f"{scratch}/plain/sub/x", b"x")
    await conn.write_file(f"{scratch}/new/deeper/still/x", b"x")  # three levels made on the way
    assert await conn.read_file(f"{scratch}/new/deeper/still/x") == b"x"
    assert await conn.read_file(f"{scratch}/plain") == b"file"


async def test_upload_and_download(conn: SSHConnection, scratch: str, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    local = tmp_path / "in $(x); 'q'"
    local.write_bytes(data)
    remote = f"{scratch}/sub dir/up 'load'"
    assert await conn.upload(local, remote) == len(data)
    assert await conn.size(remote) == len(data)
    back = tmp_path / "out\nname"
    assert await conn.download(remote, back) == len(data)
    assert back.read_bytes() == data
    assert sorted(os.listdir(tmp_path)) == sorted([local.name, back.name])  # no partial file left
    with pytest.raises(RemoteFileError):
        await conn.download(f"{scratch}/missing", tmp_path / "never")
    assert not (tmp_path / "never").exists()


async def test_runs_and_files_concurrently(conn: SSHConnection, scratch: str) -> None:
    async def one(i: int) -> None:
        await conn.write_file(f"{scratch}/f{i}", str(i).encode())
        assert (await conn.run(["cat", (await conn.home()) + scratch[1:] + f"/f{i}"])).stdout == str(i)

    await asyncio.gather(*(one(i) for i in range(20)))
    assert conn._connect_count == 1
