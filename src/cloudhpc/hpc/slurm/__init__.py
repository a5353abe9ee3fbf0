"""Everything SLURM-specific: command builders paired with their parsers, and the SLURM backend.

This package is the only place that speaks SLURM (as submitit's `slurm/slurm.py` is). Outside it,
SLURM appears only as text in a rendered job script (`srun` in `ray/script.py`) and as
`sinfo --version`, the reachability probe of `hpc/cluster_check.py`.

Each command is an object pairing `argv()` with a pure `parse(result)` (`commands.py` says what they
share); one module per command family holds the builder beside its parser:

- `submit.py`: sbatch and the resource flags of a job;
- `queue.py`: squeue, the state of many jobs in one call;
- `accounting.py`: sacct, the record of ended jobs and their steps;
- `efficiency.py`: seff, or the same numbers computed from sacct;
- `cancel.py`: scancel.

They share the reading of SLURM's output: `ids.py` (our job names and SLURM's job ids, array tasks,
steps), `values.py` (the cells: times, durations, sizes, exit codes), `tables.py` (header-keyed
tables) and `states.py` (the one table from SLURM's job states to ours). `backend.py` holds
`SlurmBackend`, which runs the commands over a connection it is handed.

The names below are the package's interface; import them from `cloudhpc.hpc.slurm`.
"""

from cloudhpc.hpc.slurm.accounting import SACCT_FIELDS, Sacct, SacctRow
from cloudhpc.hpc.slurm.backend import CommandObserver, SlurmBackend, SlurmConnection
from cloudhpc.hpc.slurm.cancel import Scancel
from cloudhpc.hpc.slurm.efficiency import Seff, compute_efficiency
from cloudhpc.hpc.slurm.ids import (
    COMMENT_PREFIX,
    JOB_NAME_PREFIX,
    SlurmJobId,
    allocation_ids,
    check_native_id,
    comment_for,
    expand_array_tasks,
    is_step_row,
    job_name_for,
    parse_job_id,
)
from cloudhpc.hpc.slurm.queue import SQUEUE_FIELDS, Squeue, SqueueRow
from cloudhpc.hpc.slurm.states import SLURM_STATES, map_state, normalize_state
from cloudhpc.hpc.slurm.submit import Sbatch, resource_flags
from cloudhpc.hpc.slurm.tables import parse_table
from cloudhpc.hpc.slurm.values import parse_duration, parse_exit_code, parse_size, parse_timestamp

__all__ = [
    "COMMENT_PREFIX",
    "JOB_NAME_PREFIX",
    "SACCT_FIELDS",
    "SLURM_STATES",
    "SQUEUE_FIELDS",
    "CommandObserver",
    "Sacct",
    "SacctRow",
    "Sbatch",
    "Scancel",
    "Seff",
    "SlurmBackend",
    "SlurmConnection",
    "SlurmJobId",
    "Squeue",
    "SqueueRow",
    "allocation_ids",
    "check_native_id",
    "comment_for",
    "compute_efficiency",
    "expand_array_tasks",
    "is_step_row",
    "job_name_for",
    "map_state",
    "normalize_state",
    "parse_duration",
    "parse_exit_code",
    "parse_job_id",
    "parse_size",
    "parse_table",
    "parse_timestamp",
    "resource_flags",
]
