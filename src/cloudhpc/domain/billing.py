"""What a job costs in a site's billing units, and when SLURM predicts it would start.

A site bills in its own units, per partition, from what a job holds for how long: CSC's billing
units (BU) are the documented example (docs/hpc-site.md): on Puhti a core-hour is 1 BU, a GiB-hour
of memory 0.1 BU and a GPU-hour 60 BU. The rates live in the cluster's configuration
(`clusters.<name>.billing`), so that porter's estimate, the agent's choice for `partition: auto` and
the units billed after the end all read one table, and the arithmetic is here, once.

Pure: the SLURM side (`sbatch --test-only`, sacct) turns its output into the numbers taken here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from cloudhpc.domain.arrays import array_indices
from cloudhpc.domain.jobs import (
    AUTO_PARTITION,
    MEMORY_UNITS,
    ClusterLimits,
    Name,
    Resources,
    parse_slurm_time,
)

__all__ = [
    "AUTO_PARTITION",
    "BilledUnits",
    "BillingConfig",
    "Estimate",
    "PartitionEstimate",
    "PartitionRates",
    "PredictedStart",
    "Usage",
    "UsageRow",
    "allowed_partitions",
    "array_size",
    "billed_units",
    "choose_earliest",
    "requested_usage",
    "with_costs",
]

_GIB = MEMORY_UNITS["G"]
_GPU_COUNT = re.compile(r"^(?:[A-Za-z0-9_.-]{1,64}:)?([0-9]{1,5})$")
_GRES_GPU = re.compile(r"^gpu(?::[A-Za-z0-9_.-]{1,64})?(?::([0-9]{1,6}))?$")
_TRES_GPU = re.compile(r"(?:^|,)gres/gpu=([0-9]+)(?:,|$)")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PartitionRates(_Model):
    """Units per hour of what a job holds on one partition; the hourly cost is their sum."""

    cpu_hour: float = Field(default=0.0, ge=0, description="units per allocated CPU core per hour")
    gpu_hour: float = Field(default=0.0, ge=0, description="units per allocated GPU per hour")
    mem_gib_hour: float = Field(default=0.0, ge=0, description="units per GiB of memory per hour")
    node_hour: float = Field(
        default=0.0, ge=0, description="units per node per hour (partitions that bill whole nodes)"
    )


class BillingConfig(_Model):
    """A cluster's billing (`clusters.<name>.billing`): the unit's name, the rates per partition,
    and how sacct's billing TRES converts to units after the end."""

    unit: Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9 _.-]{0,31}$")] = Field(
        default="BU", description="the name of the site's unit, shown next to every figure (CSC: BU)"
    )
    partitions: dict[Name, PartitionRates] = Field(
        description="rates per partition: {small: {cpu_hour: 1, mem_gib_hour: 0.1}, gpu: {gpu_hour: 60}}"
    )
    billing_tres_hour: float | None = Field(
        default=None,
        ge=0,
        description="units per hour of SLURM's billing TRES (`billing=` in sacct's AllocTRES): when set and "
        "the site's sacct reports it, a job's billed units are that TRES x elapsed hours x this; unset: "
        "always the rates x what the job held x elapsed hours",
    )

    @model_validator(mode="after")
    def _some_partition(self) -> Self:
        if not self.partitions:
            raise ValueError("billing.partitions: name at least one partition and its rates")
        return self

    def rates_for(self, partition: str | None) -> PartitionRates | None:
        """The rates of `partition`; with one partition configured, that one's for a job naming none."""
        if partition is None:
            return next(iter(self.partitions.values())) if len(self.partitions) == 1 else None
        return self.partitions.get(partition)


@dataclass(frozen=True)
class Usage:
    """What a job holds (or asks for): the quantities the rates multiply."""

    cpus: int
    gpus: int
    mem_bytes: int
    nodes: int
    seconds: float

    def cost(self, rates: PartitionRates) -> float:
        hourly = (
            self.cpus * rates.cpu_hour
            + self.gpus * rates.gpu_hour
            + self.mem_bytes / _GIB * rates.mem_gib_hour
            + self.nodes * rates.node_hour
        )
        return hourly * self.seconds / 3600.0


def _requested_gpus(resources: Resources, nodes: int) -> int:
    if resources.gpus is not None:
        match = _GPU_COUNT.match(resources.gpus)
        return int(match.group(1)) if match else 0
    if resources.gpus_per_node:
        return resources.gpus_per_node * nodes
    for item in (resources.gres or "").split(","):
        match = _GRES_GPU.match(item)
        if match:
            return int(match.group(1) or 1) * nodes
    return 0


def requested_usage(resources: Resources) -> Usage | None:
    """What `resources` (the cluster's defaults applied) ask for during their whole time limit, as
    sbatch counts it: one task per node unless told otherwise, memory per node (`mem`) or per CPU
    (`mem_per_cpu`); None without a time limit (nothing to multiply). Memory the job does not ask
    for is the site's default, unknown here, and counted as 0."""
    if resources.time is None:
        return None
    nodes = resources.nodes or 1
    per_task = resources.cpus_per_task or 1
    if resources.ntasks is not None:
        cpus = resources.ntasks * per_task
    else:
        cpus = nodes * (resources.ntasks_per_node or 1) * per_task
    if resources.mem is not None:
        mem = (resources.mem_bytes or 0) * nodes
    elif resources.mem_per_cpu is not None:
        mem = Resources(mem=resources.mem_per_cpu).mem_bytes or 0
        mem *= cpus
    else:
        mem = 0
    return Usage(
        cpus=cpus,
        gpus=_requested_gpus(resources, nodes),
        mem_bytes=mem,
        nodes=nodes,
        seconds=float(parse_slurm_time(resources.time)),
    )


def array_size(array: str | None) -> int:
    """Tasks of an `array` value (1 for a job that is not an array): each is billed as a job."""
    return 1 if array is None else len(array_indices(array))


def allowed_partitions(limits: ClusterLimits, billing: BillingConfig | None) -> list[str]:
    """The partitions a job may be sent to, in the configuration's order: the limits' partitions
    when the site lists them (the only ones a job may name), else the billing's; empty when the
    configuration names none (then only the job's own or the default partition is known)."""
    if limits.partitions:
        return list(limits.partitions)
    return list(billing.partitions) if billing is not None else []


class PredictedStart(_Model):
    """SLURM's answer for one partition (`sbatch --test-only`): when the job would start, or why not."""

    partition: str | None = Field(description="the partition asked about; null: the cluster's default")
    start: datetime | None = Field(default=None, description="the predicted start (UTC)")
    processors: int | None = None
    nodes: str | None = Field(default=None, description="the nodes SLURM would use")
    error: str | None = Field(default=None, description="why SLURM would not take the job there")


class PartitionEstimate(PredictedStart):
    cost: float | None = Field(
        default=None, description="units the job costs there if it runs to its time limit (null: no rates)"
    )


class Estimate(_Model):
    """The answer of `POST /api/v1/jobs:estimate`."""

    cluster: str
    unit: str | None = Field(description="the site's billing unit (null: the cluster has no rates)")
    partitions: list[PartitionEstimate]
    earliest: str | None = Field(
        description="the partition with the earliest predicted start (ties: the cheaper, then the first)"
    )
    requested: str | None = Field(description="the partition the job names (`auto`, or null for the default)")


def choose_earliest(estimates: Sequence[PartitionEstimate]) -> PartitionEstimate | None:
    """The estimate with the earliest start (ties: the lower cost, then the configuration's order);
    None when SLURM would start the job on none of them."""
    ranked = [
        (e.start, e.cost if e.cost is not None else float("inf"), i, e)
        for i, e in enumerate(estimates)
        if e.start is not None and e.error is None
    ]
    return min(ranked, key=lambda r: r[:3])[3] if ranked else None


def with_costs(
    resources: Resources,
    array: str | None,
    predictions: Iterable[PredictedStart],
    billing: BillingConfig | None,
) -> list[PartitionEstimate]:
    """Each prediction with the cost of `resources` (run to the time limit) on its partition."""
    usage = requested_usage(resources)
    tasks = array_size(array)
    out: list[PartitionEstimate] = []
    for p in predictions:
        rates = billing.rates_for(p.partition) if billing is not None else None
        cost = None if rates is None or usage is None else round(usage.cost(rates) * tasks, 6)
        out.append(PartitionEstimate(**p.model_dump(), cost=cost))
    return out


@dataclass(frozen=True)
class UsageRow:
    """One allocation as sacct reports it after the end (an array: one per task)."""

    partition: str | None
    elapsed_seconds: int | None
    alloc_cpus: int | None
    nodes: int | None
    mem_bytes: int | None
    alloc_tres: str | None
    billing: float | None
    """SLURM's billing TRES of the allocation (`billing=` in AllocTRES), when the site reports it."""


class BilledUnits(_Model):
    """What a job cost after the end, in the site's unit, and where the figure comes from."""

    units: float = Field(ge=0)
    unit: str
    source: Literal["sacct", "rates"] = Field(
        description="`sacct`: SLURM's billing TRES x elapsed hours; `rates`: the configured rates"
    )


def billed_units(rows: Sequence[UsageRow], billing: BillingConfig | None) -> BilledUnits | None:
    """The units a finished job was billed: sacct's billing TRES x elapsed hours x
    `billing_tres_hour` where the site reports it for every allocation and the configuration says
    how it converts, else the partition's rates x what each allocation held x its elapsed time.
    None without a billing configuration, or when an allocation has no rates or no elapsed time."""
    if billing is None or not rows or any(r.elapsed_seconds is None for r in rows):
        return None
    hours = [(r.elapsed_seconds or 0) / 3600.0 for r in rows]
    if billing.billing_tres_hour is not None and all(r.billing is not None for r in rows):
        total = sum(
            (r.billing or 0.0) * h * billing.billing_tres_hour for r, h in zip(rows, hours, strict=True)
        )
        return BilledUnits(units=round(total, 6), unit=billing.unit, source="sacct")
    total = 0.0
    for row in rows:
        rates = billing.rates_for(row.partition)
        if rates is None:
            return None
        gpus = _TRES_GPU.search(row.alloc_tres or "")
        usage = Usage(
            cpus=row.alloc_cpus or 0,
            gpus=int(gpus.group(1)) if gpus else 0,
            mem_bytes=row.mem_bytes or 0,
            nodes=row.nodes or 0,
            seconds=float(row.elapsed_seconds or 0),
        )
        total += usage.cost(rates)
    return BilledUnits(units=round(total, 6), unit=billing.unit, source="rates")
