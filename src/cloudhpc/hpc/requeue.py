"""The job script's part of checkpoint and requeue (`spec.checkpoint`), and SLURM's restart count.

SLURM sends the warning (`--signal=B:<SIG>@<secs>`) to the batch shell only, so the wrapper runs the
user's program in the background, in its own session (`setsid`: its process group is the program and
everything it started, so a `python` under the user's bash script gets the signal too), and traps the
signal: it forwards it to that group, waits for the program to end, and then

- exit status 0: the program finished its work; the job completes;
- any other status (the signal's default action kills with 128+N, or the program saved its state and
  exited non-zero): `scontrol requeue "$SLURM_JOB_ID"` while `CLOUDHPC_RESTART_COUNT` (SLURM's
  `SLURM_RESTART_COUNT`, 0 on the first run) is below `max_restarts`.

At `max_restarts` the signal is not forwarded and the time limit ends the job (`timeout`). Only
values cloudhpc computed reach this text (a signal name from a fixed list, integers, paths through
`shlex.quote`): nothing a user typed.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from cloudhpc.domain.checkpoint import CHECKPOINT_DIR, CheckpointSpec
from cloudhpc.domain.paths import JobPaths

__all__ = ["CountsRestarts", "checkpoint_lines"]


@runtime_checkable
class CountsRestarts(Protocol):
    """A backend that can say how many times its scheduler ran jobs again (SLURM's RestartCnt)."""

    async def restart_counts(self, native_ids: Sequence[str]) -> Mapping[str, int]:
        """Restart count by native id, for the jobs the scheduler still knows."""
        ...


def checkpoint_lines(paths: JobPaths, checkpoint: CheckpointSpec, body: Sequence[str]) -> list[str]:
    """The wrapper's lines that run `body` (the lines that run the user's program, the last one
    `exec <command>`) under the warning trap described in the module docstring."""
    *setup, last = body
    if not last.startswith("exec "):
        raise ValueError("the body of a checkpointed job must end with `exec <command>`")
    command = last.removeprefix("exec ")
    sig = checkpoint.signal  # validated against a fixed list of names by CheckpointSpec
    most = int(checkpoint.max_restarts)
    return [
        "# checkpoint and requeue (spec.checkpoint): the same directory on every run",
        f"export CLOUDHPC_CHECKPOINT_DIR={shlex.quote(paths.file(CHECKPOINT_DIR))}",
        'export CLOUDHPC_RESTART_COUNT="${SLURM_RESTART_COUNT:-0}"',
        'mkdir -p -- "$CLOUDHPC_CHECKPOINT_DIR" || exit 97',
        "_chpc_warned=0",
        "_chpc_warn() {",
        f'  if [ "$CLOUDHPC_RESTART_COUNT" -ge {most} ]; then',
        f'    echo "cloudhpc: SIG{sig} before the time limit; max_restarts ({most}) reached: not requeued" >&2',
        "    return",
        "  fi",
        "  _chpc_warned=1",
        f'  kill -{sig} -- "-$_chpc_child" 2>/dev/null || kill -{sig} "$_chpc_child" 2>/dev/null',
        "}",
        f"trap _chpc_warn {sig}",
        *setup,
        f"setsid {command} &",
        "_chpc_child=$!",
        "# `wait` returns early when the trap runs: wait again while the program lives",
        'while kill -0 "$_chpc_child" 2>/dev/null; do wait "$_chpc_child"; done',
        'wait "$_chpc_child"; _chpc_status=$?',
        'if [ "$_chpc_warned" = 1 ] && [ "$_chpc_status" != 0 ]; then',
        '  echo "cloudhpc: run $CLOUDHPC_RESTART_COUNT ended (status $_chpc_status) after'
        f' SIG{sig}: requeued" >&2',
        "  # SLURM ends this run itself (`CANCELLED ... DUE TO JOB REQUEUE`): wait for it",
        '  scontrol requeue "$SLURM_JOB_ID" && exec sleep 3600',
        "fi",
        'exit "$_chpc_status"',
    ]
