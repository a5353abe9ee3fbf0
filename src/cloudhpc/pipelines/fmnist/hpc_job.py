"""What the training job asks the cluster for: one structure, one set of defaults.

The cloud-HPC pipeline, its train component and `steps.train_on_hpc` take the job's `resources`
and `environment` as one dict, shaped as in a job spec (a KFP parameter must be JSON), and
validate it here into the domain's `Resources` and `Environment`, so a typo or a bad time limit
fails the step before anything is submitted, with the field named. `HPC_JOB` is that dict's
default and the only place the defaults are written.

`resources.nodes` is the number of Ray nodes (the head and one worker per other node) and
`resources.cpus_per_task` the CPUs of each, which Ray Train's workers share; `time`, `partition`,
`account`, `mem`, `gpus_per_node` go to SLURM as they are (unset: the cluster's defaults).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cloudhpc.domain.checkpoint import CheckpointSpec
from cloudhpc.domain.jobs import Environment, Resources

__all__ = ["HPC_JOB", "HpcJob"]

_DEFAULT_RESOURCES = Resources(nodes=2, cpus_per_task=4, time="00:30:00")
_DEFAULT_ENVIRONMENT = Environment(packages=["ray[default,train]", "torch", "mlflow-skinny", "numpy"])


class HpcJob(BaseModel):
    """The training job's `resources`, `environment` and `checkpoint`. A section given replaces its
    default field by field for `resources` (unset fields keep theirs) and whole for `environment` (a
    package list given is the package list); `checkpoint` is off unless given."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resources: Resources = Field(default=_DEFAULT_RESOURCES)
    environment: Environment = Field(default=_DEFAULT_ENVIRONMENT)
    checkpoint: CheckpointSpec | None = Field(
        default=None,
        description="warn the training before its time limit and requeue it, as a job spec's "
        "`checkpoint` ({warn_before: 2m, max_restarts: 2}): it resumes from its last epoch",
    )

    @classmethod
    def from_parameter(cls, value: Mapping[str, Any] | None) -> HpcJob:
        """Validate a pipeline parameter (pydantic's ValidationError names the bad field)."""
        job = cls.model_validate(dict(value or {}))
        return job.model_copy(update={"resources": job.resources.with_defaults(_DEFAULT_RESOURCES)})

    @property
    def nodes(self) -> int:
        return self.resources.nodes or 1

    @property
    def cpus_per_node(self) -> int:
        return self.resources.cpus_per_task or 1

    def as_parameter(self) -> dict[str, Any]:
        """The JSON a KFP parameter holds (unset fields left out)."""
        return self.model_dump(mode="json", exclude_none=True)


HPC_JOB: dict[str, Any] = HpcJob().as_parameter()
"""The default of every `hpc_job` parameter: 2 Ray nodes of 4 CPUs for 30 minutes, with Ray Train,
PyTorch, the MLflow client and numpy in the cached environment."""
