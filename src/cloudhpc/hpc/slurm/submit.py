"""sbatch: the resource flags of a job and the submission of its wrapper script.

A refusal is told apart from a quota or policy limit (`QuotaExceeded`), which the user fixes
differently from a bad request (`SubmitRejected`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from uuid import UUID

from cloudhpc.domain.arrays import check_array
from cloudhpc.domain.checkpoint import CheckpointSpec
from cloudhpc.domain.jobs import Resources
from cloudhpc.exceptions import ParseError, QuotaExceeded, SchedulerCommandError, SubmitRejected
from cloudhpc.hpc.backend import CommandResult, JobPaths
from cloudhpc.hpc.slurm.commands import _require_ok
from cloudhpc.hpc.slurm.ids import comment_for, job_name_for

__all__ = ["Sbatch", "resource_flags"]

_QUOTA = re.compile(
    r"QOSMax\w*|QOSGrp\w*|AssocMax\w*|AssocGrp\w*|MaxSubmitJob\w*|accounting/QOS policy|"
    r"job submit limit|Job violates accounting",
    re.IGNORECASE,
)

_UNREACHABLE = re.compile(
    r"Unable to contact slurm controller|Socket timed out on send/recv|Zero Bytes were transmitted|"
    r"Communication connection failure|Slurm backup controller in standby mode",
    re.IGNORECASE,
)
"""sbatch's words when the controller was down or did not answer (slurmctld restarting, a failover):
transient, unlike a refusal. The fault suite saw a job failed for good on the first of them."""

_FLAG_FIELDS = (
    "nodes",
    "ntasks",
    "ntasks_per_node",
    "cpus_per_task",
    "gpus_per_node",
    "gpus",
    "gres",
    "mem",
    "mem_per_cpu",
    "time",
    "partition",
    "account",
    "qos",
    "constraint",
    "exclusive",
    "reservation",
    "mail_type",
    "mail_user",
    "begin",
    "signal",
    "licenses",
)
"""The `Resources` fields sbatch is given, in this order, each as `--<name with dashes>=<value>`
(`exclusive` as the bare flag), each one argv element: sbatch never sees a value split or expanded."""


def resource_flags(resources: Resources) -> list[str]:
    """`--flag=value` argv elements for the set fields, each value re-validated by the domain model
    (defence in depth: a `model_construct`ed Resources never bypasses the patterns)."""
    checked = Resources.model_validate(resources.model_dump())
    flags: list[str] = []
    for name in _FLAG_FIELDS:
        value = getattr(checked, name)
        if value is None or (name in ("gpus_per_node", "exclusive") and not value):  # 0 GPUs: no flag
            continue
        option = f"--{name.replace('_', '-')}"
        flags.append(option if value is True else f"{option}={value}")
    return flags


_DEPENDENCY = re.compile(
    r"^after(?:ok|any|notok)(?::[0-9]{1,12})+(?:,after(?:ok|any|notok)(?::[0-9]{1,12})+)*$"
)


@dataclass(frozen=True)
class Sbatch:
    """Submit the wrapper script of one job; `parse` returns the SLURM job id (of the whole array,
    for an array job: each task writes its own output file, `output-<index>.log`)."""

    job_id: UUID
    paths: JobPaths
    resources: Resources = field(default_factory=Resources)
    array: str | None = None
    dependency: str | None = None
    """`afterok:12:13,afterany:14`, built by `domain.arrays.dependency_option` from SLURM ids."""
    checkpoint: CheckpointSpec | None = None
    """Warn before the time limit (`--signal`) and make the job requeueable (`--requeue`)."""

    name = "sbatch"

    def argv(self) -> list[str]:
        extra: list[str] = []
        if self.array is not None:
            extra.append(f"--array={check_array(self.array)}")
        if self.dependency is not None:
            if not _DEPENDENCY.match(self.dependency):
                raise ValueError(f"{self.dependency!r} is not a dependency cloudhpc builds")
            extra.append(f"--dependency={self.dependency}")
        if self.checkpoint is not None:
            checked = CheckpointSpec.model_validate(self.checkpoint.model_dump())
            extra += [f"--signal={checked.slurm_signal()}", "--requeue"]
        output = self.paths.task_output_pattern if self.array is not None else self.paths.output
        return [
            "sbatch",
            "--parsable",
            f"--comment={comment_for(self.job_id)}",
            f"--job-name={job_name_for(self.job_id)}",
            f"--chdir={self.paths.jobdir}",
            f"--output={output}",
            # SLURM truncates the output when it runs a job again (a requeue: the job's own, an
            # operator's, a preemption) unless told to append: appended, every byte the agent
            # collected by offset stays where it was (the job's directory is new: no old file)
            "--open-mode=append",
            *resource_flags(self.resources),
            *extra,
            self.paths.batch_script,
        ]

    @staticmethod
    def parse(result: CommandResult) -> str:
        if not result.ok and _UNREACHABLE.search(result.stderr):
            # not a refusal: the job stays to be submitted (the agent finds it by id first, in case
            # the controller took it before the answer was lost)
            _require_ok(result, "sbatch could not reach the SLURM controller", SchedulerCommandError)
        _require_ok(
            result,
            "sbatch refused the job",
            QuotaExceeded if _QUOTA.search(result.stderr) else SubmitRejected,
        )
        lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
        match = re.match(r"^([0-9]+)(?:;\S+)?$", lines[-1]) if lines else None
        if match is None:
            raise ParseError(
                f"sbatch --parsable printed {result.stdout!r} (stderr {result.stderr!r}); "
                "expected a job id such as `123` or `123;cluster`"
            )
        return match.group(1)
