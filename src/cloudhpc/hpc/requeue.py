"""The job script's part of checkpoint and requeue (`spec.checkpoint`), and SLURM's restart count.

SLURM sends the warning (`--signal=B:<SIG>@<secs>`) to the batch shell only (on a multi-node job:
the first node's; a `ray-job`'s entrypoint driver runs there too), so the wrapper runs the
user's program in the background, in its own session (`setsid`: its process group is the program and
everything it started, so a `python` under the user's bash script gets the signal too), and traps the
signal: it forwards it to that group, waits for the program to end, and then

- exit status 0: the program finished its work; the job completes;
- any other status (the signal's default action kills with 128+N, or the program saved its state and
  exited non-zero): `scontrol requeue "$SLURM_JOB_ID"` while `CLOUDHPC_RESTART_COUNT` (SLURM's
  `SLURM_RESTART_COUNT`, 0 on the first run) is below `max_restarts`.

A `ray-job` (ray/script.py) runs its entrypoint this way, stops its Ray cluster (the head here, the
workers' `srun` step) once the entrypoint ended, and then requeues; its Ray Train driver resumes
from `CLOUDHPC_CHECKPOINT_DIR` on the next run. The pieces (`checkpoint_setup_lines`,
`checkpoint_run_lines`, `checkpoint_requeue_lines`) are shared by both scripts.

The same signal comes at a preemption where the site sets `preempt_send_user_signal` (SLURM 22.05:
`SlurmctldParameters`; 23.02 on: `PreemptParameters=send_user_signal`): SLURM sends it to the batch
shell as soon as it picks the job to preempt, then waits for the partition's `GraceTime`, so the
program saves and the wrapper requeues as above, before SLURM would requeue it itself (seen on the
testbed: tests/e2e/test_preemption.py).

At `max_restarts` the signal is not forwarded and the time limit ends the job (`timeout`); a
preemption then ends the run at its grace time, and the agent cancels the job SLURM queued again. Only
values cloudhpc computed reach this text (a signal name from a fixed list, integers, paths through
`shlex.quote`): nothing a user typed.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from cloudhpc.domain.checkpoint import CHECKPOINT_DIR, CheckpointSpec
from cloudhpc.domain.paths import JobPaths

__all__ = [
    "PRESTART_SETTLE_SECONDS",
    "CountsRestarts",
    "checkpoint_lines",
    "checkpoint_requeue_lines",
    "checkpoint_run_lines",
    "checkpoint_setup_lines",
]


PRESTART_SETTLE_SECONDS = 2
"""A warning that came before the program started is forwarded this long after its start: sent at
once, it would meet a program that has not yet installed its handler (a Python interpreter still
starting, `train.py` before its first line) and end it by the signal's default action, with no
checkpoint saved. The default action still ends a program that does not catch it."""


@runtime_checkable
class CountsRestarts(Protocol):
    """A backend that can say how many times its scheduler ran jobs again (SLURM's RestartCnt)."""

    async def restart_counts(self, native_ids: Sequence[str]) -> Mapping[str, int]:
        """Restart count by native id, for the jobs the scheduler still knows."""
        ...


def checkpoint_setup_lines(paths: JobPaths, checkpoint: CheckpointSpec) -> list[str]:
    """The checkpoint's environment and the warning trap, set before anything of the job starts (a
    warning that comes before the program does is kept, and forwarded once it runs): the trap
    forwards the signal to the process group of `$_chpc_child`, the program `checkpoint_run_lines`
    starts."""
    sig = checkpoint.signal  # validated against a fixed list of names by CheckpointSpec
    most = int(checkpoint.max_restarts)
    return [
        "# checkpoint and requeue (spec.checkpoint): the same directory on every run",
        f"export CLOUDHPC_CHECKPOINT_DIR={shlex.quote(paths.file(CHECKPOINT_DIR))}",
        'export CLOUDHPC_RESTART_COUNT="${SLURM_RESTART_COUNT:-0}"',
        f"export CLOUDHPC_CHECKPOINT_SIGNAL={sig}  # the program may catch it to save and stop",
        'mkdir -p -- "$CLOUDHPC_CHECKPOINT_DIR" || exit 97',
        "_chpc_warned=0 _chpc_child=",
        "_chpc_forward() {",
        '  [ -n "$_chpc_child" ] || return 0  # not started yet: forwarded when it starts',
        "  # just started, it may not lead its own session yet: a signal between bash's fork and its",
        "  # exec would meet bash's trap in the child and be lost, so wait (1 s at most) for setsid",
        "  local _chpc_i",
        "  for _chpc_i in 1 2 3 4 5 6 7 8 9 10; do",
        '    [ "$(ps -o pgid= -p "$_chpc_child" 2>/dev/null | tr -d " ")" = "$_chpc_child" ] && break',
        "    sleep 0.1",
        "  done",
        f'  kill -{sig} -- "-$_chpc_child" 2>/dev/null || kill -{sig} "$_chpc_child" 2>/dev/null',
        "}",
        "_chpc_warn() {",
        f'  if [ "$CLOUDHPC_RESTART_COUNT" -ge {most} ]; then',
        f'    echo "cloudhpc: SIG{sig} (time limit or preemption); max_restarts ({most}) reached: not requeued" >&2',
        "    return",
        "  fi",
        "  _chpc_warned=1",
        "  _chpc_forward",
        "}",
        f"trap _chpc_warn {sig}",
    ]


def checkpoint_run_lines(command: str, on_start: Sequence[str] = ()) -> list[str]:
    """Run `command` in its own session (its process group: everything it starts gets the warning)
    and wait for it while the trap may interrupt `wait`; its status ends in `$_chpc_status`.
    `on_start`: lines run once it started (`$_chpc_child` is its pid)."""
    return [
        f"setsid {command} &",
        "_chpc_child=$!",
        *on_start,
        "# warned while it was starting: give the program a moment to install its handler first",
        f'[ "$_chpc_warned" = 1 ] && {{ sleep {PRESTART_SETTLE_SECONDS}; _chpc_forward; }}',
        "# `wait` returns early when the trap runs: wait again while the program lives",
        'while kill -0 "$_chpc_child" 2>/dev/null; do wait "$_chpc_child"; done',
        'wait "$_chpc_child"; _chpc_status=$?',
    ]


def checkpoint_requeue_lines(checkpoint: CheckpointSpec) -> list[str]:
    """After the program ended: requeue the job when the program was warned and did not finish
    (a non-zero status); otherwise fall through, for the caller to exit with `$_chpc_status`."""
    return [
        'if [ "$_chpc_warned" = 1 ] && [ "$_chpc_status" != 0 ]; then',
        '  echo "cloudhpc: run $CLOUDHPC_RESTART_COUNT ended (status $_chpc_status) after'
        f' SIG{checkpoint.signal}: requeued" >&2',
        "  # SLURM ends this run itself (`CANCELLED ... DUE TO JOB REQUEUE`): wait for it",
        '  scontrol requeue "$SLURM_JOB_ID" && exec sleep 3600',
        "fi",
    ]


def checkpoint_lines(paths: JobPaths, checkpoint: CheckpointSpec, body: Sequence[str]) -> list[str]:
    """The wrapper's lines that run `body` (the lines that run the user's program, the last one
    `exec <command>`) under the warning trap described in the module docstring."""
    *setup, last = body
    if not last.startswith("exec "):
        raise ValueError("the body of a checkpointed job must end with `exec <command>`")
    return [
        *checkpoint_setup_lines(paths, checkpoint),
        *setup,
        *checkpoint_run_lines(last.removeprefix("exec ")),
        *checkpoint_requeue_lines(checkpoint),
        'exit "$_chpc_status"',
    ]
