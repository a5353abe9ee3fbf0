"""Files over the session's one SFTP client: read, write, upload, download, atomically.

Every file operation here is idempotent (writes go to a fresh temporary name, then rename), so each
is retried once on a new connection if the old one dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import posixpath
import secrets
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import IO, TypeVar, cast

import asyncssh

from cloudhpc.domain.job_files import EntryType
from cloudhpc.domain.paths import resolve_path
from cloudhpc.exceptions import RemoteFileError, SSHConnectError, SSHError
from cloudhpc.hpc.job_files import Stat, entry_type
from cloudhpc.hpc.ssh.errors import _is_transient, _translate_errors
from cloudhpc.hpc.ssh.session import _CHANNEL_OPEN_TRIES, _Session

# The package logs under one name, the one it had as a single module.
logger = logging.getLogger(__package__)

_COPY_CHUNK = 1024 * 1024
_T = TypeVar("_T")


class _SftpFiles(_Session):
    """`FileTransfer` over the SFTP client of the current connection."""

    _home: str | None

    async def _sftp_client(self, conn: asyncssh.SSHClientConnection) -> asyncssh.SFTPClient:
        async with self._sftp_lock:
            if self._sftp is not None and self._sftp_conn is conn:
                return self._sftp
            refusals = 0
            while True:
                try:
                    with _translate_errors(f"starting SFTP on cluster {self.cluster}"):
                        sftp = await conn.start_sftp_client()
                    break
                except SSHError as exc:
                    refusals += 1
                    refused = isinstance(exc.__cause__, asyncssh.ChannelOpenError) and not conn.is_closed()
                    if not refused or refusals >= _CHANNEL_OPEN_TRIES:
                        raise
                    await self._pause_after_refusal(refusals)
            self._sftp, self._sftp_conn = sftp, conn
            return sftp

    async def _sftp_op(self, what: str, op: Callable[[asyncssh.SFTPClient], Awaitable[_T]]) -> _T:
        """Run one SFTP operation, retried once on a new connection if the old one dropped.

        Every file operation here is idempotent (writes go to a fresh temporary name, then rename).
        """
        generation = self._generation
        for attempt in (1, 2):
            conn = await self._connection()
            try:
                sftp = await self._sftp_client(conn)
                with _translate_errors(f"{what} on cluster {self.cluster}"):
                    return await op(sftp)
            except SSHError as exc:
                if self._generation != generation:
                    raise
                dropped = _is_transient(exc) or (isinstance(exc, SSHConnectError) and conn.is_closed())
                if not dropped or attempt == 2:
                    raise
                self._discard(conn)
                logger.info("ssh[%s]: connection dropped during SFTP (%s); retrying once", self.cluster, what)
        raise AssertionError("unreachable")

    async def home(self) -> str:
        if self._home is None:
            self._home = await self._sftp_op("resolving the home directory", lambda sftp: sftp.realpath("."))
        return self._home

    async def _resolve(self, path: str) -> str:
        if not path:
            raise ValueError("remote path must not be empty")
        if path.startswith("/"):
            return path
        return resolve_path(path, await self.home())

    async def makedirs(self, path: str, *, mode: int = 0o700) -> None:
        full = await self._resolve(path)
        await self._sftp_op(f"creating directory {full!r}", lambda sftp: _makedirs(sftp, full, mode))

    async def chmod(self, path: str, mode: int) -> None:
        full = await self._resolve(path)
        await self._sftp_op(f"setting the mode of {full!r}", lambda sftp: sftp.chmod(full, mode))

    async def exists(self, path: str) -> bool:
        full = await self._resolve(path)
        return await self._sftp_op(f"checking {full!r}", lambda sftp: sftp.exists(full))

    async def size(self, path: str) -> int | None:
        full = await self._resolve(path)

        async def op(sftp: asyncssh.SFTPClient) -> int | None:
            try:
                attrs = await sftp.stat(full)
            except (asyncssh.SFTPNoSuchFile, asyncssh.SFTPNoSuchPath):
                return None
            return attrs.size

        return await self._sftp_op(f"checking the size of {full!r}", op)

    async def realpath(self, path: str) -> str | None:
        """The server resolves the symlinks (OpenSSH's sftp-server: realpath(3)); None if missing."""
        full = await self._resolve(path)

        async def op(sftp: asyncssh.SFTPClient) -> str | None:
            try:
                real = await sftp.realpath(full)
                await sftp.lstat(real)  # some servers resolve a missing last component
            except (asyncssh.SFTPNoSuchFile, asyncssh.SFTPNoSuchPath):
                return None
            return str(real)

        return await self._sftp_op(f"resolving {full!r}", op)

    async def lstat(self, path: str) -> Stat | None:
        full = await self._resolve(path)

        async def op(sftp: asyncssh.SFTPClient) -> Stat | None:
            try:
                return _stat(await sftp.lstat(full))
            except (asyncssh.SFTPNoSuchFile, asyncssh.SFTPNoSuchPath):
                return None

        return await self._sftp_op(f"checking {full!r}", op)

    async def listdir(self, path: str, *, limit: int | None = None) -> list[tuple[str, Stat]]:
        """Entries with the attributes readdir carries (OpenSSH: lstat's), read batch by batch and
        no more than `limit` of them (a directory of millions of files is not read whole)."""
        full = await self._resolve(path)

        async def op(sftp: asyncssh.SFTPClient) -> list[tuple[str, Stat]]:
            found: list[tuple[str, Stat]] = []
            # an async generator (typed as an iterator): aclosing closes the handle when we stop early
            scan = cast(AsyncGenerator[asyncssh.SFTPName, None], sftp.scandir(full))
            async with contextlib.aclosing(scan) as names:
                async for n in names:
                    if n.filename in (".", ".."):
                        continue
                    if limit is not None and len(found) >= limit:
                        break
                    found.append((str(n.filename), _stat(n.attrs)))
            return found

        return await self._sftp_op(f"listing {full!r}", op)

    async def read_file(self, path: str, *, offset: int = 0, length: int | None = None) -> bytes:
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must not be negative")
        full = await self._resolve(path)

        async def op(sftp: asyncssh.SFTPClient) -> bytes:
            # stat first: sftp-server's open() of a FIFO a job put there (as its output or its
            # result.pkl) blocks until a writer comes, and every SFTP call of the cluster with it
            attrs = await sftp.stat(full)
            if entry_type(attrs.permissions or 0) != EntryType.FILE:
                raise RemoteFileError(f"reading {full!r} on cluster {self.cluster}: not a regular file")
            async with sftp.open(full, "rb") as file:
                end = attrs.size or 0
                count = end - offset if length is None else min(length, end - offset)
                if count <= 0:
                    return b""
                data: bytes = await file.read(count, offset)
                return data

        return await self._sftp_op(f"reading {full!r}", op)

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        full = await self._resolve(path)

        async def op(sftp: asyncssh.SFTPClient) -> None:
            async def fill(file: asyncssh.SFTPClientFile) -> None:
                await file.write(data)

            await self._write_atomic(sftp, full, mode, fill)

        await self._sftp_op(f"writing {full!r}", op)

    async def upload(self, local_path: str | os.PathLike[str], remote: str, *, mode: int = 0o644) -> int:
        """Copy a local file to `remote` atomically (temporary name, then rename); returns its size."""
        full = await self._resolve(remote)
        local = await asyncio.to_thread(Path(local_path).open, "rb")
        try:

            async def op(sftp: asyncssh.SFTPClient) -> int:
                copied = 0

                async def fill(file: asyncssh.SFTPClientFile) -> None:
                    nonlocal copied
                    copied = 0
                    local.seek(0)
                    while chunk := await asyncio.to_thread(local.read, _COPY_CHUNK):
                        await file.write(chunk)
                        copied += len(chunk)

                await self._write_atomic(sftp, full, mode, fill)
                return copied

            return await self._sftp_op(f"uploading to {full!r}", op)
        finally:
            local.close()

    async def download(self, remote: str, local_path: str | os.PathLike[str]) -> int:
        """Copy `remote` to a local file (written beside it, then renamed); returns its size."""
        full = await self._resolve(remote)
        target = Path(local_path)
        partial = target.with_name(f"{target.name}.tmp-{secrets.token_hex(4)}")
        local: IO[bytes] = await asyncio.to_thread(partial.open, "wb")
        write: Callable[[bytes], object] = local.write
        try:

            async def op(sftp: asyncssh.SFTPClient) -> int:
                local.seek(0)
                local.truncate()
                copied = 0
                async with sftp.open(full, "rb") as file:
                    while True:
                        chunk: bytes = await file.read(_COPY_CHUNK)
                        if not chunk:
                            break
                        await asyncio.to_thread(write, chunk)
                        copied += len(chunk)
                return copied

            copied = await self._sftp_op(f"downloading {full!r}", op)
            local.close()
            await asyncio.to_thread(os.replace, partial, target)
            return copied
        finally:
            local.close()
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()

    async def _write_atomic(
        self,
        sftp: asyncssh.SFTPClient,
        full: str,
        mode: int,
        fill: Callable[[asyncssh.SFTPClientFile], Awaitable[None]],
    ) -> None:
        """Readers (a job starting, a log tail) must never see half a file: write aside, then rename."""
        partial = f"{full}.tmp-{secrets.token_hex(6)}"
        try:
            try:
                file = await sftp.open(partial, "wb", asyncssh.SFTPAttrs(permissions=mode))
            except (asyncssh.SFTPNoSuchFile, asyncssh.SFTPNoSuchPath):
                # the parent is missing: made only now, as the existing parent is the common case
                await _makedirs(sftp, posixpath.dirname(full), 0o700)
                file = await sftp.open(partial, "wb", asyncssh.SFTPAttrs(permissions=mode))
            async with file:
                # the mode again on the handle (the server's umask may have narrowed it), sent
                # along with the data: no round trip of its own
                await asyncio.gather(file.chmod(mode), fill(file))
            try:
                await sftp.posix_rename(partial, full)
            except asyncssh.SFTPOpUnsupported:
                # Plain SFTP rename refuses to replace; not atomic, but only on servers without the
                # posix-rename extension (OpenSSH has it).
                with contextlib.suppress(asyncssh.SFTPNoSuchFile):
                    await sftp.remove(full)
                await sftp.rename(partial, full)
        except BaseException:
            with contextlib.suppress(Exception):
                await sftp.remove(partial)
            raise


async def _makedirs(sftp: asyncssh.SFTPClient, path: str, mode: int) -> None:
    """`mkdir -p` in round trips that do not grow with the path's depth when it exists: one stat,
    then one stat and one mkdir per missing level. asyncssh's `makedirs` walks from `/` with a mkdir
    and a stat per level (about 10 round trips for a job's directory), which over a site's WAN link
    (20 ms round trip) made every file written cost 0.3 s."""
    missing: list[str] = []
    current = path
    while current and current != "/":
        try:
            attrs = await sftp.stat(current)
        except (asyncssh.SFTPNoSuchFile, asyncssh.SFTPNoSuchPath):
            missing.append(current)
            current = posixpath.dirname(current)
            continue
        if attrs.type != asyncssh.FILEXFER_TYPE_DIRECTORY:
            raise asyncssh.SFTPFailure(f"{current} is not a directory")
        break
    for directory in reversed(missing):
        try:
            await sftp.mkdir(directory, asyncssh.SFTPAttrs(permissions=mode))
        except (asyncssh.SFTPFailure, asyncssh.SFTPFileAlreadyExists):
            if not await sftp.isdir(directory):  # made by a concurrent writer: fine; else the error
                raise


def _stat(attrs: asyncssh.SFTPAttrs) -> Stat:
    return Stat(type=entry_type(attrs.permissions or 0), size=attrs.size or 0, mtime=float(attrs.mtime or 0))
