"""Signal names, once for the two places that take them: `resources.signal` (sbatch's `--signal`)
and `checkpoint.signal` (the warning the job's wrapper traps and forwards)."""

from __future__ import annotations

__all__ = ["SIGNALS", "UNTRAPPABLE"]

SIGNALS = frozenset(
    {
        "HUP",
        "INT",
        "QUIT",
        "ABRT",
        "KILL",
        "ALRM",
        "TERM",
        "USR1",
        "USR2",
        "URG",
        "CONT",
        "STOP",
        "TSTP",
        "TTIN",
        "TTOU",
        "XCPU",
        "XFSZ",
        "VTALRM",
        "PROF",
        "WINCH",
        "PWR",
        "SYS",
        "IO",
        "POLL",
    }
)
"""Signal names SLURM's --signal takes (with or without SIG)."""

UNTRAPPABLE = frozenset({"KILL", "STOP"})
"""Signals a shell cannot trap: no use as a warning to save a checkpoint."""
