"""Estimates on the agent's side: which partitions a job may go to, SLURM's predicted start on each
(`JobBackend.estimate`, `sbatch --test-only`), their cost from the cluster's rates, and the choice
for `partition: auto`; and the units a job was billed after its end, from its sacct rows.

The agent holds the cluster's whole configuration (defaults, limits, billing), so porter's
estimate route and the agent's submission of an `auto` job ask the same function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from uuid import UUID

from cloudhpc.config import ClusterConfig
from cloudhpc.domain.billing import (
    AUTO_PARTITION,
    BilledUnits,
    Estimate,
    PartitionEstimate,
    UsageRow,
    allowed_partitions,
    billed_units,
    choose_earliest,
    with_costs,
)
from cloudhpc.domain.jobs import JobSpec, Resources
from cloudhpc.exceptions import HttpProblem, StagingError
from cloudhpc.hpc.backend import AccountingRecord, JobBackend, JobSubmission

__all__ = ["billed_from_accounting", "choose_partition", "estimate_spec", "estimate_submission"]


def _candidates(config: ClusterConfig, resources: Resources) -> list[str | None]:
    """The partitions to ask about: every allowed one the job fits (its limits), or, where the
    configuration names none, the job's own (None: the cluster's default)."""
    allowed = allowed_partitions(config.limits, config.billing)
    if not allowed:
        if resources.partition == AUTO_PARTITION:
            raise HttpProblem(
                422,
                "invalid_request",
                "invalid request: resources.partition: `auto` needs the partitions jobs may use in the "
                "cluster's configuration (clusters.<name>.limits.partitions or billing.partitions)",
                [{"field": "resources.partition", "message": "no partitions configured to choose from"}],
            )
        return [resources.partition]
    fits: list[str | None] = [
        p for p in allowed if not config.limits.problems(resources.model_copy(update={"partition": p}))
    ]
    if not fits:
        raise HttpProblem(
            422,
            "invalid_request",
            f"invalid request: resources: over the limits of every partition ({', '.join(allowed)})",
            [{"field": "resources", "message": "over the limits of every allowed partition"}],
        )
    return fits


async def estimate_submission(
    backend: JobBackend, config: ClusterConfig, cluster: str, submission: JobSubmission
) -> Estimate:
    """SLURM's predicted start and the cost on each partition `submission` may go to."""
    resources = submission.resources
    predictions = await backend.estimate(submission, _candidates(config, resources))
    estimates = with_costs(resources, submission.spec.array, predictions, config.billing)
    earliest = choose_earliest(estimates)
    return Estimate(
        cluster=cluster,
        unit=config.billing.unit if config.billing is not None else None,
        partitions=estimates,
        earliest=earliest.partition if earliest is not None else None,
        requested=resources.partition,
    )


async def estimate_spec(backend: JobBackend, config: ClusterConfig, spec: JobSpec, job_id: UUID) -> Estimate:
    """The estimate of a job not submitted (`POST /jobs:estimate`): its resources with the cluster's
    defaults, as the stager applies them, under a fresh id that names no job."""
    resources = spec.resources.with_defaults(config.defaults.as_resources())
    return await estimate_submission(
        backend, config, spec.cluster, JobSubmission(job_id=job_id, spec=spec, resources=resources)
    )


def _describe(choice: PartitionEstimate, others: Sequence[PartitionEstimate], unit: str | None) -> str:
    def one(e: PartitionEstimate) -> str:
        start = e.start.strftime("%Y-%m-%dT%H:%M:%SZ") if e.start is not None else f"refused ({e.error})"
        cost = f", {e.cost:g} {unit}" if e.cost is not None and unit else ""
        return f"{e.partition} {start}{cost}"

    return f"partition auto: {choice.partition}, the earliest predicted start of " + "; ".join(
        one(e) for e in others
    )


async def choose_partition(
    backend: JobBackend, config: ClusterConfig, cluster: str, submission: JobSubmission
) -> tuple[JobSubmission, str]:
    """`submission` (its resources naming `auto`) sent to the partition with the earliest predicted
    start, and the reason saying which and why; a StagingError when SLURM would take it on none."""
    try:
        estimate = await estimate_submission(backend, config, cluster, submission)
    except HttpProblem as exc:
        raise StagingError(exc.message) from exc
    choice = choose_earliest(estimate.partitions)
    if choice is None or choice.partition is None:
        refusals = "; ".join(f"{e.partition}: {e.error}" for e in estimate.partitions)
        raise StagingError(f"partition auto: SLURM would start the job on no allowed partition ({refusals})")
    resources = submission.resources.model_copy(update={"partition": choice.partition})
    reason = _describe(choice, estimate.partitions, estimate.unit)
    return dataclasses.replace(submission, resources=resources), reason[:2000]


def billed_from_accounting(records: Sequence[AccountingRecord], config: ClusterConfig) -> BilledUnits | None:
    """The units a job was billed, from its allocation rows (an array: one per task)."""
    rows = [
        UsageRow(
            partition=r.partition,
            elapsed_seconds=r.elapsed_seconds,
            alloc_cpus=r.alloc_cpus,
            nodes=r.nodes,
            mem_bytes=r.req_mem_bytes,
            alloc_tres=r.alloc_tres,
            billing=r.billing,
        )
        for r in records
        if r.step is None
    ]
    return billed_units(rows, config.billing)
