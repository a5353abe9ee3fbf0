"""A job directory's files on the cluster: list and read them for a files query, and find the
files a job's `outputs` patterns match, never leaving the job directory.

Paths are resolved where the files are (SFTP's `realpath`, or the local file system's), because
only there is a symlink known: a path whose resolved form is not inside the job directory's own
resolved form is refused, as is anything under `.cloudhpc/` (the job's secrets). Both backends
(SLURM over SSH and local) run this same code over their `DirectoryAccess`.

Output collection does not follow directory symlinks at all and takes a symlinked file only when
it resolves to a regular file inside the job directory; the walk and the total size are bounded,
and whatever is left out is reported with the reason (`OutputsReport.skipped`).

Weak spot, stated: between the check and the read a process of the job could swap a checked file
for a symlink. The job runs as the cluster account that reads, so this gives it nothing it could
not read itself, but it could show one job's files in another's answer.
"""

from __future__ import annotations

import base64
import os
import posixpath
import stat as stat_mode
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

from cloudhpc.domain.job_files import (
    CONTROL_DIRECTORY,
    MAX_FILE_READ,
    MAX_LISTING,
    EntryType,
    FileEntry,
    FilesAnswer,
    OutputsReport,
    SkippedOutput,
    check_browse_path,
    name_matches,
    pattern_segments,
)
from cloudhpc.exceptions import JobFileError

__all__ = [
    "MAX_LISTING_SCAN",
    "MAX_WALK_DEPTH",
    "MAX_WALK_ENTRIES",
    "DirectoryAccess",
    "FoundOutput",
    "Stat",
    "browse",
    "entry_type",
    "find_outputs",
]

MAX_WALK_ENTRIES = 100_000
"""Directory entries one output collection looks at before it stops (and says so)."""
MAX_LISTING_SCAN = 20_000
"""Entries of one directory a files query reads before it stops (the answer is then `truncated`,
its first `MAX_LISTING` by name among those read). Reading them all held a job's directory of
200,000 files in the agent (120 MB, 5.5 s per request, 8 requests per user at once)."""
MAX_WALK_DEPTH = 128
"""Directory levels below the job directory one output collection enters. The walk recurses once
per level: a job that made a tree deeper than Python's recursion limit (1,500 nested `a/`) made the
agent's collection raise RecursionError, so the job's `outputs.json` was never written."""


@dataclass(frozen=True)
class Stat:
    """What `lstat` tells: the entry's own type (a symlink is a symlink), size and mtime."""

    type: EntryType
    size: int
    mtime: float


def entry_type(mode: int) -> EntryType:
    """The type of an entry from its mode bits (`lstat`'s, or SFTP's, whose v3 has no type field)."""
    if stat_mode.S_ISLNK(mode):
        return EntryType.SYMLINK
    if stat_mode.S_ISDIR(mode):
        return EntryType.DIRECTORY
    if stat_mode.S_ISREG(mode):
        return EntryType.FILE
    return EntryType.OTHER


@runtime_checkable
class DirectoryAccess(Protocol):
    """The file system of the machine that has the job directories (absolute paths)."""

    async def realpath(self, path: str) -> str | None:
        """`path` with every symlink resolved, or None when it (or a part of it) does not exist."""

    async def lstat(self, path: str) -> Stat | None:
        """The entry itself (not a symlink's target), or None when it does not exist."""

    async def listdir(self, path: str, *, limit: int | None = None) -> list[tuple[str, Stat]]:
        """A directory's entries (without `.` and `..`), each with its `lstat`; at most `limit` of
        them, in the order the file system gives, when it is set."""

    async def read_file(self, path: str, *, offset: int = 0, length: int | None = None) -> bytes: ...

    async def download(self, remote: str, local_path: str | os.PathLike[str]) -> int:
        """Copy the file `remote` to the agent's machine; returns its size."""


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _relative(path: str, root: str) -> str:
    return "" if path == root else path[len(root.rstrip("/")) + 1 :]


def _time(mtime: float) -> datetime:
    return datetime.fromtimestamp(mtime, UTC)


async def _job_root(access: DirectoryAccess, jobdir: str) -> str:
    root = await access.realpath(jobdir)
    if root is None:
        raise JobFileError(404, "not_found", "the job directory does not exist (not staged yet, or removed)")
    return root


async def _resolve_inside(access: DirectoryAccess, root: str, relative: str) -> str:
    """The resolved path of `relative` under `root`, refused when it leads outside the job
    directory or into `.cloudhpc/`."""
    real = await access.realpath(posixpath.join(root, relative) if relative else root)
    if real is None:
        raise JobFileError(404, "not_found", f"no file or directory {relative!r} in the job directory")
    if not _inside(real, root):
        raise JobFileError(
            403,
            "outside_job_directory",
            f"{relative!r} resolves outside the job directory (a symlink): refused",
        )
    if _inside(real, posixpath.join(root, CONTROL_DIRECTORY)):
        raise JobFileError(
            403,
            "outside_job_directory",
            f"{relative!r} leads into {CONTROL_DIRECTORY}/, cloudhpc's own files: refused",
        )
    return real


async def browse(
    access: DirectoryAccess, jobdir: str, path: str, *, offset: int = 0, length: int | None = None
) -> FilesAnswer:
    """List the directory or read (part of) the file `path` names in the job directory."""
    path = check_browse_path(path)
    if offset < 0 or (length is not None and length < 0):
        raise JobFileError(422, "invalid_request", "offset and length must not be negative")
    length = MAX_FILE_READ if length is None else min(length, MAX_FILE_READ)
    root = await _job_root(access, jobdir)
    real = await _resolve_inside(access, root, path)
    stat = await access.lstat(real)
    if stat is None:
        raise JobFileError(404, "not_found", f"{path!r} disappeared while it was being read")
    if stat.type == EntryType.DIRECTORY:
        listed = await access.listdir(real, limit=MAX_LISTING_SCAN + 1)
        entries = [
            FileEntry(
                name=name,
                type=entry.type,
                size=entry.size if entry.type == EntryType.FILE else None,
                mtime=_time(entry.mtime),
            )
            for name, entry in listed[:MAX_LISTING_SCAN]
            if not (real == root and name == CONTROL_DIRECTORY)
        ]
        entries.sort(key=lambda e: e.name)
        return FilesAnswer(
            path=path,
            type=EntryType.DIRECTORY,
            entries=entries[:MAX_LISTING],
            truncated=len(entries) > MAX_LISTING or len(listed) > MAX_LISTING_SCAN,
            mtime=_time(stat.mtime),
        )
    if stat.type != EntryType.FILE:
        # a FIFO would block the read, a device is not the job's
        raise JobFileError(422, "not_a_file", f"{path!r} is neither a regular file nor a directory")
    # past the end nothing is read: a seek far beyond it (offset 2**62) is EINVAL locally, which
    # answered the user 502 for a valid request
    data = (
        await access.read_file(real, offset=offset, length=length) if length and offset < stat.size else b""
    )
    return FilesAnswer(
        path=path,
        type=EntryType.FILE,
        size=stat.size,
        mtime=_time(stat.mtime),
        offset=offset,
        content=base64.b64encode(data).decode(),
        eof=offset + len(data) >= stat.size,
    )


@dataclass(frozen=True)
class FoundOutput:
    relative: str
    """The path as matched, relative to the job directory (the artifact's name)."""
    real: str
    """Where to read it (a symlink resolved)."""
    size: int


@dataclass
class _Walk:
    """One collection's directory listings: each directory listed once (a `**` pattern and the
    patterns after it ask again), all of them together at most `MAX_WALK_ENTRIES` entries."""

    access: DirectoryAccess
    root: str
    seen: int = 0
    stopped: bool = False
    too_deep: bool = False
    listed: dict[str, list[tuple[str, Stat]]] = field(default_factory=dict)

    async def entries(self, directory: str) -> list[tuple[str, Stat]]:
        if directory in self.listed:
            return self.listed[directory]
        if self.stopped:
            return []
        # never more than the walk may still look at (plus one, to know it stopped): one directory
        # of millions of files is not read whole
        left = MAX_WALK_ENTRIES - self.seen
        listed = sorted(await self.access.listdir(directory, limit=left + 1))
        self.seen += len(listed)
        if self.seen > MAX_WALK_ENTRIES:
            self.stopped = True
            listed = listed[: max(left, 0)]
        self.listed[directory] = listed
        return listed


async def find_outputs(
    access: DirectoryAccess,
    jobdir: str,
    patterns: list[str],
    *,
    max_bytes: int,
    max_files: int,
) -> tuple[list[FoundOutput], OutputsReport]:
    """The regular files `patterns` match, in pattern order without repeats, within `max_files`
    and `max_bytes` in all; the report names every match left out and every pattern that matched
    nothing."""
    root = await _job_root(access, jobdir)
    walk = _Walk(access, root)
    matched: dict[str, Stat] = {}
    unmatched: list[str] = []
    for pattern in patterns:
        if not await _expand(walk, root, pattern_segments(pattern), matched):
            unmatched.append(pattern)
    found: list[FoundOutput] = []
    skipped: list[SkippedOutput] = []
    total = 0
    for relative, stat in matched.items():
        real = posixpath.join(root, relative)
        if stat.type == EntryType.SYMLINK:
            resolved = await access.realpath(real)
            target = await access.lstat(resolved) if resolved is not None else None
            control = posixpath.join(root, CONTROL_DIRECTORY)
            if resolved is None or not _inside(resolved, root) or _inside(resolved, control):
                skipped.append(
                    SkippedOutput(path=relative, reason="a symlink that leads outside the job directory")
                )
                continue
            if target is None or target.type != EntryType.FILE:
                skipped.append(
                    SkippedOutput(path=relative, reason="a symlink to something other than a regular file")
                )
                continue
            real, stat = resolved, target
        elif stat.type != EntryType.FILE:
            skipped.append(SkippedOutput(path=relative, reason=f"not a regular file ({stat.type.value})"))
            continue
        if len(found) >= max_files:
            skipped.append(SkippedOutput(path=relative, reason=f"over the limit of {max_files} files"))
        elif total + stat.size > max_bytes:
            skipped.append(
                SkippedOutput(
                    path=relative,
                    reason=f"{stat.size} bytes would take the outputs over their limit of {max_bytes} bytes",
                )
            )
        else:
            found.append(FoundOutput(relative=relative, real=real, size=stat.size))
            total += stat.size
    if walk.stopped:
        skipped.append(
            SkippedOutput(path="", reason=f"the search stopped after {MAX_WALK_ENTRIES} directory entries")
        )
    if walk.too_deep:
        skipped.append(
            SkippedOutput(
                path="", reason=f"directories more than {MAX_WALK_DEPTH} levels deep were not searched"
            )
        )
    report = OutputsReport(
        patterns=list(patterns),
        collected=[f.relative for f in found],
        bytes=total,
        skipped=skipped,
        unmatched=unmatched,
    )
    return found, report


async def _expand(
    walk: _Walk, directory: str, segments: list[str], matched: dict[str, Stat], depth: int = 0
) -> int:
    """Match `segments` below `directory` (a real directory inside the job's, `depth` levels below
    it), adding to `matched`; returns how many entries matched (an earlier pattern's among them).

    Directories are entered only when they are directories themselves (`lstat`): a symlinked
    directory is never followed, so the walk cannot leave the job directory or loop; nor deeper
    than `MAX_WALK_DEPTH` levels, so it cannot exhaust the agent's stack."""
    if depth > MAX_WALK_DEPTH:
        walk.too_deep = True
        return 0
    head, rest = segments[0], segments[1:]
    at_root = directory == walk.root
    entries = await walk.entries(directory)
    visible = [(n, s) for n, s in entries if not (at_root and n == CONTROL_DIRECTORY)]
    count = 0
    if head == "**":
        count += await _expand(walk, directory, rest, matched, depth)  # zero directories
        for name, stat in visible:
            if stat.type == EntryType.DIRECTORY and not name.startswith("."):
                count += await _expand(walk, posixpath.join(directory, name), segments, matched, depth + 1)
        return count
    for name, stat in visible:
        if not name_matches(head, name):
            continue
        path = posixpath.join(directory, name)
        if rest:
            if stat.type == EntryType.DIRECTORY:
                count += await _expand(walk, path, rest, matched, depth + 1)
        else:
            matched.setdefault(_relative(path, walk.root), stat)
            count += 1
    return count
