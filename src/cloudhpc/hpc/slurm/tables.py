"""Reading SLURM's tabular output by the names in its header row.

Tabular output is always read by the names in its header row, never by position or width,
because SLURM's column order and widths depend on the format string and its version.
"""

from __future__ import annotations

from collections.abc import Sequence

from cloudhpc.exceptions import ParseError

__all__ = ["parse_table"]


def parse_table(text: str, *, expected: Sequence[str], delimiter: str = "|") -> list[dict[str, str]]:
    """Rows of a delimited table as dicts keyed by its header. A row with more cells than the header
    has the delimiter inside its last (free-text) column, so the surplus is joined back into it."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ParseError("expected a header row, got no output at all")
    header = lines[0].split(delimiter)
    missing = [name for name in expected if name not in header]
    if missing:
        raise ParseError(f"header row {lines[0]!r} lacks the columns {missing}")
    rows: list[dict[str, str]] = []
    for line in lines[1:]:
        cells = line.split(delimiter)
        if len(cells) > len(header):
            cells = [*cells[: len(header) - 1], delimiter.join(cells[len(header) - 1 :])]
        if len(cells) != len(header):
            raise ParseError(
                f"row {line!r} has {len(cells)} cells, the header {lines[0]!r} has {len(header)}"
            )
        rows.append(dict(zip(header, cells, strict=True)))
    return rows
