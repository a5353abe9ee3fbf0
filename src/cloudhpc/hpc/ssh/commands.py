"""Commands on exec channels of the session, with the retry rules and an output cap.

Why the retry rules: a command whose connection died before we saw its exit status may or may not
have run. Re-running `squeue` is harmless; re-running `sbatch` could submit a job twice. So only
commands the caller marks `idempotent=True` are retried; for the others `SSHConnectError` tells the
caller to reconcile (look the job up) first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import time
from collections.abc import Callable, Sequence
from typing import Literal

import asyncssh

from cloudhpc.exceptions import CommandTimeout, OutputTooLarge, SSHConnectError, SSHError
from cloudhpc.hpc.backend import CommandResult
from cloudhpc.hpc.ssh.command_line import build_command_line, command_name
from cloudhpc.hpc.ssh.errors import _is_transient, _translate_errors
from cloudhpc.hpc.ssh.session import _CHANNEL_OPEN_TRIES, _Session

__all__ = ["DEFAULT_MAX_OUTPUT", "CommandHook", "Outcome"]

# The package logs under one name, the one it had as a single module.
logger = logging.getLogger(__package__)

Outcome = Literal["ok", "error", "timeout", "disconnect"]
CommandHook = Callable[[str, str, Outcome, float], None]
"""`on_command(cluster, command_name, outcome, seconds)`, called once per `run()` (for metrics)."""

DEFAULT_MAX_OUTPUT = 16 * 1024 * 1024
_READ_CHUNK = 64 * 1024


class _CommandChannels(_Session):
    """`run()`: one exec channel per command, at most `ssh.max_channels - 1` at a time."""

    _on_command: CommandHook | None
    _max_output: int

    async def run(
        self,
        argv: Sequence[str],
        *,
        stdin: str | None = None,
        timeout: float | None = None,
        idempotent: bool = False,
        prelude: str = "",
    ) -> CommandResult:
        """Run `argv` on the login node. A non-zero exit is a result, not an exception.

        `idempotent=True` allows one transparent retry on a new connection when the connection
        drops before the exit status arrives. `timeout` defaults to ssh.command_timeout.
        """
        command = build_command_line(argv, prelude)
        args = tuple(argv)
        name = command_name(args)
        budget = self._config.command_timeout if timeout is None else timeout
        started = time.monotonic()
        outcome: Outcome = "error"
        status: int | None = None
        try:
            async with self._channels:
                result = await self._run_retrying(args, command, stdin, budget, idempotent)
            status = result.exit_status
            outcome = "ok" if result.ok else "error"
            return result
        except CommandTimeout:
            outcome = "timeout"
            raise
        except SSHConnectError:
            outcome = "disconnect"
            raise
        finally:
            elapsed = time.monotonic() - started
            logger.debug(
                "ssh[%s]: %s -> %s in %.3fs",
                self.cluster,
                shlex.join(args),
                status if status is not None else outcome,
                elapsed,
            )
            if self._on_command is not None:
                try:
                    self._on_command(self.cluster, name, outcome, elapsed)
                except Exception:
                    logger.exception("ssh[%s]: on_command hook failed", self.cluster)

    async def _run_retrying(
        self, argv: tuple[str, ...], command: str, stdin: str | None, budget: float, idempotent: bool
    ) -> CommandResult:
        name = command_name(argv)
        generation = self._generation
        drops = refusals = 0
        while True:
            conn = await self._connection()
            try:
                return await self._run_once(conn, argv, command, stdin, budget)
            except SSHError as exc:
                if self._generation != generation:
                    raise  # close() was called meanwhile: do not open a new connection behind its back
                # A channel that never opened never carried the command: safe to retry for any command.
                never_sent = isinstance(exc.__cause__, asyncssh.ChannelOpenError)
                if never_sent and not conn.is_closed():
                    refusals += 1
                    if refusals >= _CHANNEL_OPEN_TRIES:
                        raise
                    await self._pause_after_refusal(refusals)
                    continue
                if not (_is_transient(exc) or (isinstance(exc, SSHConnectError) and conn.is_closed())):
                    raise
                self._discard(conn)
                if not (idempotent or never_sent):
                    raise SSHConnectError(
                        f"the connection to cluster {self.cluster} dropped while `{name}` was running; it may "
                        f"or may not have taken effect, so it was not retried: check its effect before running "
                        f"it again ({exc})"
                    ) from exc
                drops += 1
                if drops >= 2:
                    raise
                logger.info("ssh[%s]: connection dropped during `%s`; retrying it once", self.cluster, name)

    async def _run_once(
        self,
        conn: asyncssh.SSHClientConnection,
        argv: tuple[str, ...],
        command: str,
        stdin: str | None,
        budget: float,
    ) -> CommandResult:
        name = command_name(argv)
        proc: asyncssh.SSHClientProcess[bytes] | None = None
        finished = False
        try:
            async with asyncio.timeout(budget):
                with _translate_errors(f"running `{name}` on cluster {self.cluster}"):
                    proc = await conn.create_process(command, encoding=None)
                    try:
                        if stdin:
                            proc.stdin.write(stdin.encode("utf-8"))
                        proc.stdin.write_eof()
                    except BrokenPipeError:
                        # The command closed the channel before taking all its input (`true`, `printf`
                        # read none). As with `... | ssh host cmd`, that is no fault of the connection:
                        # its output and exit status below say what happened.
                        if conn.is_closed():
                            raise
                    stdout, stderr = await self._collect(proc, name)
                    await proc.wait_closed()
                    finished = True
                    status = proc.returncode
                    if status is None:
                        if conn.is_closed():
                            raise asyncssh.ConnectionLost("the channel closed without an exit status")
                        status = 255  # what OpenSSH's client reports when the server sends none
        except TimeoutError as exc:
            raise CommandTimeout(
                f"`{name}` on cluster {self.cluster} did not finish within {budget:g}s; its channel was closed"
            ) from exc
        finally:
            if proc is not None and not finished:
                # Ask sshd to signal the command (OpenSSH honours "signal" requests), then drop the
                # channel: without a pty, closing alone would leave it running on the login node.
                with contextlib.suppress(Exception):
                    proc.terminate()
                proc.close()
        return CommandResult(
            argv=argv,
            exit_status=status,
            stdout=stdout.decode("utf-8", errors="replace"),
            stderr=stderr.decode("utf-8", errors="replace"),
        )

    async def _collect(self, proc: asyncssh.SSHClientProcess[bytes], name: str) -> tuple[bytes, bytes]:
        """Both output streams, read concurrently (a full stderr pipe must not stall stdout), capped."""
        out, err = bytearray(), bytearray()
        total = 0

        async def drain(reader: asyncssh.SSHReader[bytes], sink: bytearray) -> None:
            nonlocal total
            while chunk := await reader.read(_READ_CHUNK):
                total += len(chunk)
                if total > self._max_output:
                    raise OutputTooLarge(
                        f"`{name}` on cluster {self.cluster} printed more than {self._max_output} bytes; "
                        f"its channel was closed"
                    )
                sink += chunk

        tasks = [asyncio.create_task(drain(proc.stdout, out)), asyncio.create_task(drain(proc.stderr, err))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return bytes(out), bytes(err)
