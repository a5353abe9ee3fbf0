"""How well a job used what it asked for: seff's report where the site has it, else the same
numbers computed from sacct's rows."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from cloudhpc.exceptions import AccountingUnavailable, ParseError
from cloudhpc.hpc.backend import AccountingRecord, CommandResult, Efficiency
from cloudhpc.hpc.slurm.commands import _require_ok
from cloudhpc.hpc.slurm.ids import check_native_id
from cloudhpc.hpc.slurm.states import normalize_state
from cloudhpc.hpc.slurm.values import _UNITS, parse_duration

__all__ = ["Seff", "compute_efficiency"]

_SEFF_MEM = re.compile(r"^(?P<num>[0-9.]+) (?P<unit>[KMGTP]?B)")
_SEFF_PERCENT = re.compile(r"^(?P<pct>[0-9.]+)% of (?P<rest>.+)$")


def _seff_bytes(text: str) -> int | None:
    match = _SEFF_MEM.match(text.strip())
    if match is None:
        return None
    return int(float(match["num"]) * _UNITS[match["unit"][:-1]])


@dataclass(frozen=True)
class Seff:
    """seff's text report, for sites that have it (it is a contrib script, often missing)."""

    native_id: str

    name = "seff"

    def argv(self) -> list[str]:
        return ["seff", check_native_id(self.native_id)]

    @staticmethod
    def parse(result: CommandResult) -> Efficiency:
        _require_ok(result, "seff could not answer", AccountingUnavailable)
        fields: dict[str, str] = {}
        for line in result.stdout.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        if "State" not in fields:
            raise ParseError(f"seff printed {result.stdout!r}; expected `Key: value` lines with a State")
        state = normalize_state(fields["State"])
        cpu_used = parse_duration(fields.get("CPU Utilized"))
        cpu_eff = _SEFF_PERCENT.match(fields.get("CPU Efficiency", ""))
        core_wall = parse_duration(cpu_eff["rest"].split()[0]) if cpu_eff else None
        mem_used = _seff_bytes(fields.get("Memory Utilized", ""))
        mem_eff = _SEFF_PERCENT.match(fields.get("Memory Efficiency", ""))
        mem_req = _seff_bytes(mem_eff["rest"]) if mem_eff else None
        return Efficiency(
            state=state,
            cpu_efficiency=float(cpu_eff["pct"]) / 100 if cpu_eff else None,
            memory_efficiency=float(mem_eff["pct"]) / 100 if mem_eff else None,
            cpu_utilized_seconds=cpu_used,
            core_walltime_seconds=core_wall,
            memory_utilized_bytes=mem_used,
            memory_requested_bytes=mem_req,
            source="seff",
        )


def compute_efficiency(records: Sequence[AccountingRecord]) -> Efficiency:
    """seff's numbers from sacct rows: CPU = TotalCPU / (Elapsed x AllocCPUS) of the allocation;
    memory = the largest MaxRSS of any step / the allocation's total ReqMem. For an array (one
    allocation row per task) the tasks' CPU times and core-walltimes add up, the memory is the
    largest peak against the largest request (each task has its own), the state is the first
    task's that did not complete (else COMPLETED)."""
    allocations = [r for r in records if r.step is None]
    if not allocations:
        raise ParseError(f"no allocation row among {len(records)} sacct rows; cannot compute efficiency")
    walls = [
        float(a.elapsed_seconds * a.alloc_cpus)
        for a in allocations
        if a.elapsed_seconds is not None and a.alloc_cpus is not None
    ]
    core_wall = sum(walls) if walls else None
    used = [a.total_cpu_seconds for a in allocations if a.total_cpu_seconds is not None]
    cpu_used = sum(used) if used else None
    peaks = [r.max_rss_bytes for r in records if r.max_rss_bytes is not None]
    mem_used = max(peaks) if peaks else 0
    requests = [a.req_mem_bytes for a in allocations if a.req_mem_bytes is not None]
    mem_req = max(requests) if requests else None
    states = [normalize_state(a.state) for a in allocations]
    return Efficiency(
        state=next((s for s in states if s != "COMPLETED"), states[0]),
        cpu_efficiency=cpu_used / core_wall if cpu_used is not None and core_wall else 0.0,
        memory_efficiency=mem_used / mem_req if mem_req else None,
        cpu_utilized_seconds=cpu_used,
        core_walltime_seconds=core_wall,
        memory_utilized_bytes=mem_used,
        memory_requested_bytes=mem_req,
        source="sacct",
    )
