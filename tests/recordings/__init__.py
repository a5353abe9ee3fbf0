"""Real SLURM exchanges captured from the testbed by `scripts/capture_recordings.py`.

Each `<name>.json` holds the argv our command classes built, what the login node printed and the
exit status, plus how and against which SLURM version it was captured. Tests load them through
`load_recording` only, so the file format lives in one place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cloudhpc.hpc.backend import CommandResult

__all__ = ["RECORDINGS", "load_recording", "recording_meta", "recording_names"]

RECORDINGS = Path(__file__).resolve().parent


def recording_meta(name: str) -> dict[str, Any]:
    """The whole JSON document of one recording (description, captured_with, slurm_version...)."""
    path = RECORDINGS / f"{name}.json"
    if not path.exists():
        known = ", ".join(recording_names())
        raise FileNotFoundError(f"no recording {name!r} in {RECORDINGS}; known: {known}")
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def load_recording(name: str) -> CommandResult:
    data = recording_meta(name)
    return CommandResult(
        argv=tuple(data["argv"]),
        exit_status=int(data["exit_status"]),
        stdout=data["stdout"],
        stderr=data["stderr"],
    )


def recording_names() -> list[str]:
    return sorted(p.stem for p in RECORDINGS.glob("*.json"))
