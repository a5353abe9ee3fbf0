"""The cells of SLURM's tables: timestamps, durations, sizes, exit codes, counts and TRES lists.

Each parser takes the raw cell and returns a typed value or None for SLURM's many spellings of
"nothing" (`None`, `N/A`, `Unknown`, `UNLIMITED`...); anything else unreadable is a `ParseError`
that quotes the cell.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from cloudhpc.domain.jobs import MEMORY_UNITS
from cloudhpc.exceptions import ParseError

__all__ = ["parse_duration", "parse_exit_code", "parse_size", "parse_timestamp"]

_EMPTY = frozenset(
    {"", "None", "NONE", "N/A", "(null)", "Unknown", "UNLIMITED", "Partition_Limit", "INVALID"}
)


def _empty(value: str | None) -> bool:
    return value is None or value.strip() in _EMPTY


def parse_timestamp(value: str | None) -> datetime | None:
    """A tz-aware UTC datetime from an epoch cell; ISO cells (SLURM_TIME_FORMAT ignored) are read as UTC."""
    if _empty(value):
        return None
    assert value is not None
    text = value.strip()
    if text.isdigit():
        seconds = int(text)
        return None if seconds == 0 else datetime.fromtimestamp(seconds, tz=UTC)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ParseError(f"{value!r} is not a timestamp (expected epoch seconds or ISO 8601)") from exc
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def parse_duration(value: str | None) -> float | None:
    """Seconds in a reported duration: `MM:SS.mmm`, `HH:MM:SS`, `D-HH:MM:SS` (sacct, seff)."""
    if _empty(value):
        return None
    assert value is not None
    text = value.strip()
    days = 0
    if "-" in text:
        head, text = text.split("-", 1)
        if not head.isdigit():
            raise ParseError(f"{value!r} is not a duration")
        days = int(head)
    parts = text.split(":")
    try:
        if len(parts) == 3:
            hours, minutes, seconds = int(parts[0]), int(parts[1]), float(parts[2])
        elif len(parts) == 2:
            hours, minutes, seconds = 0, int(parts[0]), float(parts[1])
        elif len(parts) == 1:
            hours, minutes, seconds = 0, 0, float(parts[0])
        else:
            raise ValueError(value)
    except ValueError as exc:
        raise ParseError(f"{value!r} is not a duration (expected [D-][HH:]MM:SS[.mmm])") from exc
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


_UNITS = {"": 1, **MEMORY_UNITS}
"""sacct and seff print bare numbers as bytes, unlike a memory request (megabytes)."""
_SIZE = re.compile(r"^(?P<num>[0-9]+(?:\.[0-9]+)?)(?P<unit>[KMGTP]?)(?P<per>[cn]?)$")


def parse_size(value: str | None, *, alloc_cpus: int | None = None, nodes: int | None = None) -> int | None:
    """Bytes in a sacct size (`1234K`, `256M`, `1.50G`, `0`). The `c`/`n` suffixes of older ReqMem
    cells (`256Mc` per CPU, `4Gn` per node) are multiplied out to a total when counts are given."""
    if _empty(value):
        return None
    assert value is not None
    match = _SIZE.match(value.strip())
    if match is None:
        raise ParseError(f"{value!r} is not a size (expected a number with an optional K/M/G/T suffix)")
    size = int(float(match["num"]) * _UNITS[match["unit"]])
    if match["per"] == "c" and alloc_cpus:
        size *= alloc_cpus
    elif match["per"] == "n" and nodes:
        size *= nodes
    return size


def parse_exit_code(value: str | None) -> tuple[int | None, int | None]:
    """(exit status, signal) from sacct's `N:S`."""
    if _empty(value):
        return None, None
    assert value is not None
    status, _, signal = value.strip().partition(":")
    if not status.isdigit() or (signal and not signal.isdigit()):
        raise ParseError(f"{value!r} is not an exit code (expected N:S)")
    return int(status), int(signal) if signal else None


def _int_or_none(value: str | None) -> int | None:
    if _empty(value):
        return None
    assert value is not None
    try:
        return int(value.strip())
    except ValueError as exc:
        raise ParseError(f"{value!r} is not an integer") from exc


def _tres_item(tres: str | None, name: str) -> str | None:
    """The text of TRES `name` (`256M` for `mem` in `billing=1,cpu=1,mem=256M,node=1`), if present."""
    if _empty(tres):
        return None
    assert tres is not None
    for item in tres.split(","):
        key, _, val = item.partition("=")
        if key == name:
            return val
    return None


def _tres_value(tres: str | None, name: str) -> float | None:
    val = _tres_item(tres, name)
    if val is None:
        return None
    try:
        return float(val)
    except ValueError:
        return None


def _tres_size(tres: str | None, name: str = "mem") -> int | None:
    """Bytes of a size-valued TRES (`mem=256M` in `billing=1,cpu=1,mem=256M,node=1`)."""
    val = _tres_item(tres, name)
    return None if val is None else parse_size(val)
