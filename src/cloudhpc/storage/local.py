"""Objects as files under one directory: the embedded default, and what tests can read directly.

A key maps to the file `<root>/<key>`. Writes go to a temporary file first and are renamed into
place, so a reader never sees half an object, even when porter is killed mid-write. The objects are
every user's job files and logs: files are 0600 and the directories this store creates 0700.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from cloudhpc.exceptions import ObjectNotFound, StorageError
from cloudhpc.private_files import make_private_dirs, open_private_file
from cloudhpc.storage.base import check_key, check_prefix

__all__ = ["LocalObjectStore"]

TMP_DIR = ".cloudhpc-tmp"
"""Top-level directory of half-written files; never listed, and not usable as a key."""


@contextlib.contextmanager
def _os_errors(action: str, key: str) -> Iterator[None]:
    """The one place where filesystem errors become `StorageError`s."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as exc:
        raise ObjectNotFound(f"no object {key!r}") from exc
    except (IsADirectoryError, NotADirectoryError, FileExistsError) as exc:
        raise StorageError(
            f"cannot {action} {key!r}: the key is both an object and a prefix of other keys, "
            "which a directory cannot represent"
        ) from exc
    except OSError as exc:
        raise StorageError(f"cannot {action} {key!r}: {exc.strerror or exc}") from exc


class LocalObjectStore:
    """`LocalObjectStore(".cloudhpc/objects")`: the directory is created if needed.

    Two limits that S3 does not have: a key cannot also be the prefix of another key (`a` and
    `a/b`), and `content_type` is not kept.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()
        try:
            make_private_dirs(self.root / TMP_DIR)
        except OSError as exc:
            raise StorageError(f"cannot create the object store directory {self.root}: {exc}") from exc
        self._real_root = self.root.resolve()

    def __repr__(self) -> str:
        return f"LocalObjectStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        check_key(key)
        if key.split("/", 1)[0] == TMP_DIR:
            raise StorageError(f"object key {key!r}: the top-level name {TMP_DIR} is reserved")
        path = self.root / key
        # A symlink inside the root could still point outside it: compare the resolved path.
        if not path.resolve().is_relative_to(self._real_root):
            raise StorageError(f"object key {key!r} resolves outside the store's root {self.root}")
        return path

    def _tmp(self) -> Path:
        return self.root / TMP_DIR / uuid.uuid4().hex

    def _install(self, tmp: Path, path: Path) -> None:
        """Rename a finished temporary file into place, creating parent directories."""
        for attempt in range(3):
            make_private_dirs(path.parent)
            try:
                os.replace(tmp, path)
                return
            except FileNotFoundError:
                # A concurrent delete pruned the parent directory between mkdir and rename.
                if attempt == 2 or not tmp.exists():
                    raise

    def put(self, key: str, data: bytes, *, content_type: str | None = None) -> None:
        path = self._path(key)
        tmp = self._tmp()
        with _os_errors("store", key):
            try:
                with os.fdopen(open_private_file(tmp, os.O_WRONLY | os.O_EXCL), "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                self._install(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)

    def upload_file(self, key: str, path: Path, *, content_type: str | None = None) -> None:
        target = self._path(key)
        tmp = self._tmp()
        with _os_errors("upload", key):
            if not Path(path).is_file():
                raise StorageError(f"cannot upload {path} as {key!r}: not a regular file")
            try:
                with (
                    open(path, "rb") as source,
                    os.fdopen(open_private_file(tmp, os.O_WRONLY | os.O_EXCL), "wb") as handle,
                ):
                    shutil.copyfileobj(source, handle, 1 << 20)
                    handle.flush()
                    os.fsync(handle.fileno())
                self._install(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)

    def get(self, key: str) -> bytes:
        path = self._path(key)
        with _os_errors("read", key):
            if path.is_dir():
                raise ObjectNotFound(f"no object {key!r} (it is only a prefix of other keys)")
            return path.read_bytes()

    def iter_bytes(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        path = self._path(key)
        with _os_errors("read", key):
            if path.is_dir():
                raise ObjectNotFound(f"no object {key!r} (it is only a prefix of other keys)")
            handle = open(path, "rb")  # noqa: SIM115 (closed by the generator below)
        return self._chunks(handle, key, chunk_size)

    @staticmethod
    def _chunks(handle: BinaryIO, key: str, chunk_size: int) -> Iterator[bytes]:
        with handle, _os_errors("read", key):
            while chunk := handle.read(chunk_size):
                yield chunk

    def delete(self, key: str) -> None:
        path = self._path(key)
        with _os_errors("delete", key):
            try:
                path.unlink()
            except FileNotFoundError:
                return
            except IsADirectoryError:
                return
        # Prune directories left empty, so listings stay fast and the tree mirrors the keys.
        parent = path.parent
        while parent != self.root and parent.is_relative_to(self.root):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def list(
        self, prefix: str = "", *, start_after: str | None = None, limit: int = 1000
    ) -> builtins.list[str]:
        check_prefix(prefix)
        if limit <= 0:
            return []
        head = prefix.rpartition("/")[0]
        base = self.root / head if head else self.root
        keys: builtins.list[str] = []
        for key in self._walk(base, f"{head}/" if head else "", prefix, start_after):
            keys.append(key)
            if len(keys) >= limit:
                break
        return keys

    def _walk(self, directory: Path, dir_key: str, prefix: str, start_after: str | None) -> Iterator[str]:
        """Keys under `directory` in lexicographic order, skipping whole subtrees when possible.

        A directory `d` sorts as `d/`: every key below it starts with that, and no sibling's keys
        do, so visiting entries in that order yields keys in exactly the order S3 lists them.
        """
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise StorageError(f"cannot list {directory}: {exc.strerror or exc}") from exc
        named: builtins.list[tuple[str, os.DirEntry[str], bool]] = []
        for entry in entries:
            is_dir = entry.is_dir(follow_symlinks=False)
            if not is_dir and not entry.is_file(follow_symlinks=False):
                continue  # symlinks and special files are never objects
            if not dir_key and entry.name == TMP_DIR:
                continue
            named.append((dir_key + entry.name + ("/" if is_dir else ""), entry, is_dir))
        named.sort(key=lambda item: item[0])
        for name, entry, is_dir in named:
            if is_dir:
                # Skip a subtree when no key in it can start with `prefix` or come after `start_after`.
                if not (name.startswith(prefix) or prefix.startswith(name)):
                    continue
                if start_after is not None and name < start_after and not start_after.startswith(name):
                    continue
                yield from self._walk(Path(entry.path), name, prefix, start_after)
            elif name.startswith(prefix) and (start_after is None or name > start_after):
                yield name

    def url(self, key: str, expires: int = 3600) -> str:
        return self._path(key).absolute().as_uri()
