"""Files of a job's directory as users name them: `outputs` glob patterns, the `path` of a files
query, the answers about them, and how an output's path becomes an artifact name.

Pure rules, applied by porter (a 422 naming the field), the SDK and the agent alike. The cluster
side (`hpc/job_files.py`) resolves paths where the files are, which these rules cannot: a symlink
is only known there.
"""

from __future__ import annotations

import fnmatch
import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Final

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

__all__ = [
    "CONTROL_DIRECTORY",
    "MAX_FILE_READ",
    "MAX_LISTING",
    "MAX_OUTPUT_PATTERN",
    "MAX_OUTPUT_PATTERNS",
    "OUTPUTS_PREFIX",
    "EntryType",
    "FileEntry",
    "FilesAnswer",
    "OutputPattern",
    "OutputsReport",
    "SkippedOutput",
    "check_browse_path",
    "check_output_pattern",
    "name_matches",
    "output_artifact_name",
    "pattern_segments",
]

CONTROL_DIRECTORY: Final = ".cloudhpc"
"""cloudhpc's own files in a job directory (the batch script, the `env` file, a bridge key): never
listed, read or collected."""
MAX_OUTPUT_PATTERNS: Final = 64
MAX_OUTPUT_PATTERN: Final = 1024
"""Characters in one pattern (as for `files` paths)."""
MAX_LISTING: Final = 1000
"""Entries in one directory listing; a larger directory is listed in part (`truncated`)."""
MAX_FILE_READ: Final = 1 << 20
"""Bytes of one file read (`length` defaults to it and may not exceed it)."""
OUTPUTS_PREFIX: Final = "outputs/"
"""Collected output files are artifacts `outputs/<path>`."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _check_relative(value: str, what: str, limit: int, *, any_name: bool = False) -> list[str]:
    """The segments of a relative path that stays inside a job directory, or ValueError saying why.
    `any_name`: every character a file name may hold (a newline, a backslash), all but NUL."""
    if len(value) > limit:
        raise ValueError(f"{what} {value[:60]!r}... is longer than {limit} characters")
    if "\x00" in value:
        raise ValueError(f"{what} {value!r} holds a NUL character")
    if not any_name and (_CONTROL.search(value) or "\\" in value):
        raise ValueError(f"{what} {value!r} holds a control character or a backslash")
    if value.startswith("/"):
        raise ValueError(f"{what} {value!r} is absolute: it must be relative to the job directory")
    segments = value.split("/")
    for segment in segments:
        if segment in ("", ".", ".."):
            raise ValueError(
                f"{what} {value!r} has an empty, '.' or '..' segment: it must stay inside the job directory"
            )
        if len(segment) > 255:
            raise ValueError(f"{what} {value!r} has a segment longer than 255 characters")
    if segments[0] == CONTROL_DIRECTORY:
        raise ValueError(
            f"{what} {value!r}: {CONTROL_DIRECTORY}/ holds cloudhpc's own files (the job's secrets)"
        )
    return segments


def check_output_pattern(pattern: str) -> str:
    """An `outputs` pattern: relative, no `..`, `**` only as a whole segment."""
    if not pattern:
        raise ValueError("an output pattern must not be empty")
    for segment in _check_relative(pattern, "output pattern", MAX_OUTPUT_PATTERN):
        if "**" in segment and segment != "**":
            raise ValueError(f"output pattern {pattern!r}: `**` must be a whole segment (`a/**/b`)")
    if pattern.split("/")[-1] == "**":
        raise ValueError(f"output pattern {pattern!r} must end with a file name pattern (`**/*`)")
    return pattern


OutputPattern = Annotated[str, AfterValidator(check_output_pattern)]


def check_browse_path(path: str) -> str:
    """The `path` of a files query: empty (the job directory) or a relative path inside it, of any
    characters a file name may hold (a newline too). A trailing `/` is accepted and dropped."""
    path = path.rstrip("/") if path != "/" else path
    if path:
        _check_relative(path, "path", 4096, any_name=True)
    return path


def pattern_segments(pattern: str) -> list[str]:
    return pattern.split("/")


def name_matches(segment: str, name: str) -> bool:
    """Whether one directory entry `name` matches one pattern segment, as a shell glob would: `*`,
    `?` and `[...]` within the name, and a leading `.` only when the pattern spells it."""
    if name.startswith(".") and not segment.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, segment)


def _escape(text: str) -> str:
    """`%XX` for the bytes of what an object key cannot hold (control characters, `\\`) and for `%`
    itself, so that the original name is always recoverable (`urllib.parse.unquote`)."""
    out = []
    for char in text:
        if char == "%" or char == "\\" or _CONTROL.match(char):
            out.append("".join(f"%{byte:02X}" for byte in char.encode()))
        else:
            out.append(char)
    return "".join(out)


def output_artifact_name(relative: str) -> str:
    """The artifact name of a collected output file: `outputs/<path>` with `%`, `\\` and control
    characters percent-encoded (a file name may hold a newline; an object key may not)."""
    return OUTPUTS_PREFIX + _escape(relative)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EntryType(StrEnum):
    FILE = "file"
    DIRECTORY = "directory"
    SYMLINK = "symlink"
    OTHER = "other"


class FileEntry(_Model):
    name: str
    type: EntryType
    size: int | None = Field(default=None, description="bytes, for a file")
    mtime: datetime | None = None


class FilesAnswer(_Model):
    """What a files query answers: a directory's entries, or a part of a file (base64)."""

    path: str = Field(description="relative to the job directory; empty for the directory itself")
    type: EntryType
    entries: list[FileEntry] | None = Field(default=None, description="a directory's, sorted by name")
    truncated: bool = Field(default=False, description="a directory with more entries than listed")
    size: int | None = Field(default=None, description="a file's size in bytes")
    mtime: datetime | None = None
    offset: int | None = Field(default=None, description="where `content` starts in the file")
    content: str | None = Field(default=None, description="the bytes read, base64")
    eof: bool | None = Field(default=None, description="`content` reaches the end of the file")


class SkippedOutput(_Model):
    path: str
    reason: str


class OutputsReport(_Model):
    """Which output files were collected, and which were not and why (`outputs.json`)."""

    patterns: list[str]
    collected: list[str] = Field(default_factory=list)
    bytes: int = 0
    skipped: list[SkippedOutput] = Field(default_factory=list)
    unmatched: list[str] = Field(default_factory=list, description="patterns that matched nothing")
