"""The job specification a user submits, and the job record everyone reads.

Validation lives here, once, so that porter (422 on bad input), the SDK (errors before a request
is sent) and the agent (defence in depth before anything reaches a shell) all apply the same rules.
Every model forbids unknown fields so a typo is reported with the field named instead of ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Self
from uuid import UUID

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from cloudhpc.domain.arrays import (
    DEPENDENCY_NEVER_SATISFIED,
    ArraySpec,
    Dependency,
    TaskObservation,
    derive_array_state,
)
from cloudhpc.domain.checkpoint import CheckpointSpec
from cloudhpc.domain.job_files import MAX_OUTPUT_PATTERNS, OutputPattern
from cloudhpc.domain.signals import SIGNALS
from cloudhpc.domain.states import JobState

__all__ = [
    "AUTO_PARTITION",
    "MAIL_TYPES",
    "MAX_AFTER",
    "MEMORY_UNITS",
    "RAY_STOP_SIGNALS",
    "RESERVED_PREFIX",
    "Bridge",
    "ClusterLimits",
    "Environment",
    "ExposedPort",
    "ImportedService",
    "Job",
    "JobKind",
    "JobSpec",
    "JobSummary",
    "Name",
    "Observation",
    "PartitionLimits",
    "PythonCall",
    "RaySpec",
    "Resources",
    "check_requirement",
    "import_variable",
    "is_object_url",
    "parse_mem",
    "parse_slurm_time",
]

NAME_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
"""A job, cluster, partition or account name: safe in file names, job names and log lines."""

AUTO_PARTITION = "auto"
"""`resources.partition: auto`: the agent submits to the allowed partition where SLURM predicts the
earliest start (`domain/billing.choose_earliest`); the limits are then checked per candidate."""

RAY_STOP_SIGNALS = frozenset({"TERM", "INT"})
"""Signals a Ray job's batch script traps to stop its cluster (a cancel): not a checkpoint warning."""

RESERVED_PREFIX = ".cloudhpc"
"""Top-level name inside a job directory that belongs to cloudhpc (script, wrapper, output)."""

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_MODULE = re.compile(r"^[A-Za-z0-9_+][A-Za-z0-9._+-]*(?:/[A-Za-z0-9_+][A-Za-z0-9._+-]*)*$")
"""A module name (`pytorch`, `pytorch/2.13`, `gcc/11.2.0`), at most 128 characters: no segment starts
with `-` (`module load` would take it as an option, quoting does not help) or `.` (no `..`, no hidden
file), no empty segment."""
_MEM = re.compile(r"^[1-9][0-9]{0,8}[KMGT]?$")
_TIME = re.compile(
    r"^(?:(?P<d>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
    r"|(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)"
    r"|(?P<mm>\d+)(?::(?P<ss>\d+))?)$"
)
_OBJECT_URL = re.compile(r"^(?:s3|file)://[^\s]+$")

# Caps on every list and map of a spec, so that one job stays a small row (its spec is stored and
# sent to the agent whole) and a request can never make porter or the agent hold an unbounded
# amount of memory. Inputs larger than MAX_FILES_BYTES belong in the object store (s3:// URLs).
MAX_FILES = 1000
MAX_FILES_BYTES = 4 << 20
"""Total UTF-8 size of the inline `files` contents (URLs count by their length)."""
MAX_ENV = 256
MAX_ENV_VALUE = 32 << 10
MAX_ENV_BYTES = 1 << 20
"""Total size of `env` names and values: what the job's processes can exec with (ARG_MAX)."""
MAX_MODULES = 64
MAX_PACKAGES = 256
MAX_PORTS = 16
"""Per list: `ray.expose`, `ray.import`."""
MAX_AFTER = 32
"""Jobs one job may wait for (`after`)."""

MEMORY_UNITS = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}
"""SLURM's size suffixes, all binary (`16G` is 16 GiB), in requests and in what sacct and seff print."""


def parse_mem(mem: str) -> int:
    """Bytes in SLURM's memory request syntax (`Resources.mem`): a bare number is megabytes."""
    unit = mem[-1].upper()
    if unit in MEMORY_UNITS:
        return int(mem[:-1]) * MEMORY_UNITS[unit]
    return int(mem) * MEMORY_UNITS["M"]


def parse_slurm_time(value: str) -> int:
    """Seconds in a SLURM time limit (`MM`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`, `D-HH:MM:SS`)."""
    match = _TIME.match(value)
    if match is None:
        raise ValueError(
            f"{value!r} is not a SLURM time limit; use MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
        )
    g = {k: int(v) for k, v in match.groupdict().items() if v is not None}
    if "d" in g:
        return ((g["d"] * 24 + g["dh"]) * 60 + g.get("dm", 0)) * 60 + g.get("ds", 0)
    if "h" in g:
        return (g["h"] * 60 + g["m"]) * 60 + g["s"]
    return g["mm"] * 60 + g.get("ss", 0)


def _check_time(value: str | None) -> str | None:
    if value is not None and parse_slurm_time(value) <= 0:
        raise ValueError("the time limit must be positive")
    return value


def is_object_url(value: str) -> bool:
    """True when a `files` value names an object-store object rather than holding inline content."""
    return "\n" not in value and _OBJECT_URL.match(value) is not None


def _check_relative_path(path: str) -> str:
    """Reject every path that could leave the job directory or clash with cloudhpc's own files."""
    if not path or len(path) > 1024:
        raise ValueError("a file path must have 1 to 1024 characters")
    if "\x00" in path or "\\" in path:
        raise ValueError(f"file path {path!r} contains a NUL byte or a backslash")
    if path.startswith("/"):
        raise ValueError(f"file path {path!r} must be relative to the job directory")
    parts = path.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise ValueError(f"file path {path!r} has an empty, '.' or '..' component")
        if len(part) > 255:
            raise ValueError(f"file path {path!r} has a component longer than 255 characters")
    if parts[0].startswith(RESERVED_PREFIX):
        raise ValueError(f"file path {path!r}: names starting with {RESERVED_PREFIX!r} are reserved")
    return path


_CONSTRAINT = re.compile(r"^[A-Za-z0-9_.,&|*()\[\]:-]{1,256}$")
_GRES_ITEM = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}(?::[A-Za-z0-9_.-]{1,64})?(?::[1-9][0-9]{0,5})?$")
_GPUS = re.compile(r"^(?:[A-Za-z0-9_.-]{1,64}:)?[0-9]{1,5}$")
_LICENSE_ITEM = re.compile(r"^[A-Za-z0-9_.-]{1,64}(?:@[A-Za-z0-9_.-]{1,64})?(?::[1-9][0-9]{0,5})?$")
_MAIL_USER = re.compile(r"^[A-Za-z0-9._%+-]{1,64}(?:@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})+)?$")
MAIL_TYPES = frozenset(
    {
        "NONE",
        "BEGIN",
        "END",
        "FAIL",
        "REQUEUE",
        "ALL",
        "INVALID_DEPEND",
        "STAGE_OUT",
        "TIME_LIMIT",
        "TIME_LIMIT_90",
        "TIME_LIMIT_80",
        "TIME_LIMIT_50",
        "ARRAY_TASKS",
    }
)
"""What sbatch --mail-type takes (SLURM 22.05)."""
_BEGIN = re.compile(
    r"^(?:now(?:\+[0-9]{1,7}(?:seconds?|minutes?|hours?|days?|weeks?)?)?"
    r"|midnight|noon|elevenses|fika|teatime|today|tomorrow"
    r"|(?P<date>[0-9]{4}-[0-9]{2}-[0-9]{2})(?:T(?P<time>[0-9]{2}:[0-9]{2}(?::[0-9]{2})?))?"
    r"|(?P<clock>[0-9]{1,2}:[0-9]{2}(?::[0-9]{2})?)(?:AM|PM)?)$"
)
_SIGNAL = re.compile(
    r"^(?:(?P<where>R|B|RB|BR):)?(?P<sig>[0-9]{1,2}|(?:SIG)?[A-Z][A-Z0-9]{1,7})(?:@(?P<sec>[0-9]{1,5}))?$"
)


def _int_as_str(value: Any) -> Any:
    """`gpus: 4` in JSON means the count `"4"`; booleans are not counts."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _check_gpus(value: str | None) -> str | None:
    if value is not None and not _GPUS.match(value):
        raise ValueError(f"{value!r} is not a GPU request; use a count (4) or type:count (a100:4)")
    return value


def _comma_items(value: str, item: re.Pattern[str], what: str, example: str) -> None:
    items = value.split(",")
    if len(value) > 1024 or len(items) > 32 or not all(item.match(i) for i in items):
        raise ValueError(f"{value!r} is not a {what} list; use {example}")


def _check_gres(value: str | None) -> str | None:
    if value is not None:
        _comma_items(value, _GRES_ITEM, "generic resource", "name[:type][:count],... e.g. gpu:a100:4")
    return value


def _check_licenses(value: str | None) -> str | None:
    if value is not None:
        _comma_items(value, _LICENSE_ITEM, "license", "name[@server][:count],... e.g. matlab:2")
    return value


def _check_mail_type(value: str | None) -> str | None:
    if value is None:
        return None
    types = [t.strip().upper() for t in value.split(",")]
    unknown = [t for t in types if t not in MAIL_TYPES]
    if unknown or len(types) > len(MAIL_TYPES):
        raise ValueError(
            f"mail type {', '.join(unknown) or value!r} unknown; use some of {', '.join(sorted(MAIL_TYPES))}"
        )
    return ",".join(types)


def _check_begin(value: str | None) -> str | None:
    if value is None:
        return None
    match = _BEGIN.match(value)
    if match is None:
        raise ValueError(
            f"{value!r} is not a SLURM start time; use now+60, now+1hour, 16:00, 2027-01-31 or 2027-01-31T08:00"
        )
    try:
        if match["date"]:
            datetime.fromisoformat(match["date"] + "T" + (match["time"] or "00:00"))
        if match["clock"]:
            hour, minute, *_ = (int(p) for p in match["clock"].split(":"))
            if hour > 23 or minute > 59:
                raise ValueError
    except ValueError:
        raise ValueError(f"{value!r} is not a real date or time of day") from None
    return value


def _check_signal(value: str | None) -> str | None:
    if value is None:
        return None
    match = _SIGNAL.match(value)
    sig = match["sig"].removeprefix("SIG") if match else ""
    if match is None or not (sig in SIGNALS or (sig.isdigit() and 1 <= int(sig) <= 64)):
        raise ValueError(f"{value!r} is not a SLURM signal; use [R|B:]SIGNAL[@seconds], e.g. B:USR1@120")
    if match["sec"] is not None and int(match["sec"]) > 65535:
        raise ValueError(f"{value!r}: at most 65535 seconds before the time limit")
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JobKind(StrEnum):
    BATCH = "batch"
    RAY_CLUSTER = "ray-cluster"
    RAY_JOB = "ray-job"
    PYTHON = "python"


class Resources(_Model):
    """What SLURM is asked for. Unset fields fall back to the cluster's configured defaults.

    Each field is one sbatch option (`--<name with dashes>`), validated here so that a bad value is
    a 422 naming the field, not a SLURM rejection after the job was accepted."""

    nodes: int | None = Field(default=None, ge=1, le=10_000)
    ntasks: int | None = Field(default=None, ge=1, le=1_000_000, description="tasks in all (sbatch -n)")
    ntasks_per_node: int | None = Field(default=None, ge=1, le=1024)
    cpus_per_task: int | None = Field(default=None, ge=1, le=1024)
    gpus_per_node: int | None = Field(default=None, ge=0, le=64)
    gpus: Annotated[str | None, BeforeValidator(_int_as_str), AfterValidator(_check_gpus)] = Field(
        default=None, description="GPUs of the whole job, `[type:]count`: 4, a100:4 (sbatch -G)"
    )
    gres: Annotated[str | None, AfterValidator(_check_gres)] = Field(
        default=None, description="generic resources per node, `name[:type][:count],...`: gpu:a100:4"
    )
    mem: Annotated[str, StringConstraints(pattern=_MEM.pattern)] | None = Field(
        default=None, description="memory per node, SLURM syntax: 4000 (MB), 16G"
    )
    mem_per_cpu: Annotated[str, StringConstraints(pattern=_MEM.pattern)] | None = Field(
        default=None, description="memory per allocated CPU, SLURM syntax: 2000 (MB), 2G; not with `mem`"
    )
    time: Annotated[str | None, AfterValidator(_check_time)] = Field(
        default=None, description="time limit, SLURM syntax: 30, 01:00:00, 1-12"
    )
    partition: Name | None = None
    account: Name | None = None
    qos: Name | None = Field(default=None, description="quality of service (sbatch -q)")
    constraint: Annotated[str, StringConstraints(pattern=_CONSTRAINT.pattern)] | None = Field(
        default=None, description="node features, SLURM syntax: a100, intel&ib, [rack1|rack2] (sbatch -C)"
    )
    exclusive: bool | None = Field(default=None, description="no other job on the allocated nodes")
    reservation: Name | None = None
    mail_type: Annotated[str | None, AfterValidator(_check_mail_type)] = Field(
        default=None, description="events mailed to mail_user, comma-separated: END,FAIL"
    )
    mail_user: Annotated[str, StringConstraints(pattern=_MAIL_USER.pattern)] | None = None
    begin: Annotated[str | None, AfterValidator(_check_begin)] = Field(
        default=None, description="earliest start, SLURM syntax: now+1hour, 16:00, 2027-01-31T08:00"
    )
    signal: Annotated[str | None, AfterValidator(_check_signal)] = Field(
        default=None, description="signal sent before the time limit, `[R|B:]SIG[@seconds]`: B:USR1@120"
    )
    licenses: Annotated[str | None, AfterValidator(_check_licenses)] = Field(
        default=None, description="licenses, `name[@server][:count],...`: matlab:2 (sbatch -L)"
    )

    @model_validator(mode="after")
    def _one_memory_request(self) -> Self:
        if self.mem is not None and self.mem_per_cpu is not None:
            raise ValueError("mem and mem_per_cpu exclude each other (SLURM takes one memory request)")
        return self

    @property
    def mem_bytes(self) -> int | None:
        """`mem` in bytes, None when unset."""
        return parse_mem(self.mem) if self.mem else None

    def with_defaults(self, defaults: Resources) -> Resources:
        """These resources, with every unset field taken from `defaults` (a default memory request
        is not taken when the job makes the other one: `mem` and `mem_per_cpu` exclude each other)."""
        mine = self.model_dump(exclude_none=True)
        theirs = defaults.model_dump(exclude_none=True)
        if mine.keys() & {"mem", "mem_per_cpu"}:
            theirs = {k: v for k, v in theirs.items() if k not in ("mem", "mem_per_cpu")}
        return Resources(**(theirs | mine))


class PartitionLimits(_Model):
    """What one partition allows, as the site set it: checked before submission (422) instead of
    learnt from a SLURM rejection after the job was accepted."""

    max_time: Annotated[str | None, AfterValidator(_check_time)] = Field(
        default=None, description="the longest time limit a job may ask for, SLURM syntax: 3-00:00:00"
    )
    max_nodes: int | None = Field(default=None, ge=1, description="the most nodes a job may ask for")


class ClusterLimits(PartitionLimits):
    """A cluster's limits (`clusters.<name>.limits`): `max_time`/`max_nodes` for every partition,
    `partitions` per partition (and, when given, the only partitions a job may name), `qos` the only
    QOS a job may name. Empty: no limits besides SLURM's own."""

    partitions: dict[Name, PartitionLimits] = Field(
        default_factory=dict,
        description="per partition: max_time, max_nodes; when not empty, the only partitions allowed",
    )
    qos: list[Name] = Field(default_factory=list, description="when not empty, the only QOS allowed")

    def problems(self, resources: Resources) -> list[tuple[str, str]]:
        """(`resources.<field>`, message) for each limit `resources` break; `resources` are complete
        (the cluster's defaults applied), so a job naming no partition is checked as SLURM's default."""
        out: list[tuple[str, str]] = []
        # `auto` is no partition yet: each candidate is checked with its own limits when it is chosen
        partition = None if resources.partition == AUTO_PARTITION else resources.partition
        if self.partitions and partition is not None and partition not in self.partitions:
            allowed = ", ".join(sorted(self.partitions))
            out.append(
                ("resources.partition", f"partition {partition!r} is not one of this cluster's: {allowed}")
            )
        if self.qos and resources.qos is not None and resources.qos not in self.qos:
            out.append(
                (
                    "resources.qos",
                    f"qos {resources.qos!r} is not one of this cluster's: {', '.join(self.qos)}",
                )
            )
        for scope, limits in (
            ("the cluster", self),
            (f"partition {partition}", self.partitions.get(partition or "")),
        ):
            if limits is None:
                continue
            if (
                limits.max_time
                and resources.time
                and parse_slurm_time(resources.time) > parse_slurm_time(limits.max_time)
            ):
                out.append(
                    ("resources.time", f"{resources.time} is over the limit of {scope}: {limits.max_time}")
                )
            if limits.max_nodes and resources.nodes and resources.nodes > limits.max_nodes:
                out.append(
                    (
                        "resources.nodes",
                        f"{resources.nodes} nodes is over the limit of {scope}: {limits.max_nodes}",
                    )
                )
        return out


_REQ_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_REQ_VERSION = r"(?:===|==|!=|~=|<=|>=|<|>)\s*[A-Za-z0-9_.*+!-]+"
_REQ_VERSIONS = rf"{_REQ_VERSION}(?:\s*,\s*{_REQ_VERSION})*"
_REQUIREMENT = re.compile(
    rf"^\s*(?P<name>{_REQ_NAME})\s*"
    rf"(?:\[\s*(?:{_REQ_NAME}(?:\s*,\s*{_REQ_NAME})*)?\s*\]\s*)?"
    rf"(?:\(\s*{_REQ_VERSIONS}\s*\)|{_REQ_VERSIONS})?\s*"
    r"(?:;(?P<marker>.*))?$",
    re.DOTALL,
)
_MARKER_TOKEN = re.compile(
    r"\s+|[()]|===|==|!=|~=|<=|>=|<|>"
    r"|'[A-Za-z0-9 ._+*!,:=<>~()-]*'|\"[A-Za-z0-9 ._+*!,:=<>~()-]*\""
    r"|(?:and|or|not|in|extra|python_version|python_full_version|os_name|sys_platform"
    r"|platform_release|platform_system|platform_version|platform_machine"
    r"|platform_python_implementation|implementation_name|implementation_version)\b"
)
# pip takes a name ending like this for a file to install, not a project on the index
_ARCHIVE_SUFFIXES = (".whl", ".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tar.xz", ".txz")


def check_requirement(spec: str) -> str:
    """Accept only a plain PEP 508 requirement: a project name, extras, version specifiers and an
    environment marker. pip reads the packages from a requirements file, where a direct reference
    (`name @ URL`), a URL or path (`git+https://...`, `./dir`) or an option (`-e`, `--index-url`,
    even after the name) would fetch code from anywhere or change where pip looks; those are
    refused, with the reason. (`packaging` is not a dependency of the light install, so this is
    the grammar as a regular expression, checked against `packaging` in the tests.)"""
    if not spec.strip() or len(spec) > 512:
        raise ValueError("a package specifier must have 1 to 512 characters")
    match = _REQUIREMENT.match(spec)
    if match is None or any(word.startswith("-") for word in spec.split()):
        raise ValueError(
            f"{spec!r} is not a plain requirement specifier (name[extras] version; marker): "
            "URLs, paths, `name @ URL` and pip options are refused"
        )
    if match["name"].lower().endswith(_ARCHIVE_SUFFIXES):
        raise ValueError(f"{spec!r} names a file (pip would install it from a path), not a project")
    marker = match["marker"]
    if marker is not None and (not marker.strip() or "".join(_MARKER_TOKEN.findall(marker)) != marker):
        raise ValueError(f"{spec!r}: the environment marker after `;` is not one pip reads as a marker")
    return spec


class Environment(_Model):
    """A Python environment on the cluster: modules to load, a Python, pip packages."""

    modules: list[Annotated[str, StringConstraints(pattern=_MODULE.pattern, max_length=128)]] = Field(
        default_factory=list,
        max_length=MAX_MODULES,
        description="site modules loaded (in this order) before the venv, e.g. `pytorch/2.13`; a venv "
        "built on top of them sees their packages (--system-site-packages)",
    )
    python: Annotated[str, StringConstraints(pattern=_MODULE.pattern, max_length=128)] | None = Field(
        default=None, description="a Python version (3.11) or a module providing it"
    )
    packages: list[str] = Field(
        default_factory=list, max_length=MAX_PACKAGES, description="pip requirement specifiers"
    )

    @field_validator("packages")
    @classmethod
    def _packages_are_requirements(cls, value: list[str]) -> list[str]:
        for spec in value:
            check_requirement(spec)
        return value

    @property
    def is_empty(self) -> bool:
        return not (self.modules or self.python or self.packages)


_WELL_KNOWN_PORTS = {"dashboard": 8265, "client": 10001, "metrics": 8080}


class ExposedPort(_Model):
    """A port of the job made reachable from the cloud (HPC -> cloud)."""

    name: Name
    port: int = Field(ge=1, le=65535)


class ImportedService(_Model):
    """A cloud service made reachable from the job (cloud -> HPC)."""

    name: Name
    host: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9.-]{1,253}$")]
    port: int = Field(ge=1, le=65535)


MIN_IDLE_TIMEOUT = 10
MAX_IDLE_TIMEOUT = 7 * 24 * 3600
"""Bounds of `ray.idle_timeout`, seconds: shorter than Ray's own start-up would end a session before
its first job; a week is beyond any cluster's time limit."""

_RAY_HEAD_FIELDS = frozenset({"cpus_per_task", "gpus_per_node", "mem"})
_RAY_WORKER_FIELDS = _RAY_HEAD_FIELDS | {"nodes"}


def import_variable(name: str) -> str:
    """The environment variable that gives a job the local address of an imported service."""
    return "CLOUDHPC_IMPORT_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


class RaySpec(_Model):
    """A Ray cluster on SLURM: the head on the first node, one worker per other node.

    `head`/`workers` size each Ray node (`cpus_per_task` -> Ray's --num-cpus, `gpus_per_node` ->
    --num-gpus, `mem` -> what Ray may use, 30 % of it for the object store); `workers.nodes` is the
    number of worker nodes. `expose` names ports of the head made reachable from the cloud,
    `import` cloud services made reachable from the job.
    """

    entrypoint: str | None = Field(default=None, max_length=8192)
    session: Name | None = Field(
        default=None,
        description="ray-job only: the id or name of a running ray-cluster of the same owner and "
        "cluster (a warm session, docs/ray.md) to run the entrypoint on, instead of a cluster of its own",
    )
    idle_timeout: int | None = Field(
        default=None,
        ge=MIN_IDLE_TIMEOUT,
        le=MAX_IDLE_TIMEOUT,
        description="ray-cluster only: seconds with no Ray job pending or running after which the "
        "cluster ends itself (completed), so an idle session is not billed until its time limit",
    )
    head: Resources = Field(default_factory=Resources)
    workers: Resources = Field(default_factory=Resources)
    expose: list[ExposedPort] = Field(default_factory=list, max_length=MAX_PORTS)
    import_: list[ImportedService] = Field(default_factory=list, max_length=MAX_PORTS, alias="import")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("expose", mode="before")
    @classmethod
    def _expand_port_names(cls, value: Any) -> Any:
        """Let users write `expose: [dashboard]` for the well-known Ray ports."""
        if not isinstance(value, list):
            return value
        out: list[Any] = []
        for item in value:
            if isinstance(item, str):
                if item not in _WELL_KNOWN_PORTS:
                    known = ", ".join(sorted(_WELL_KNOWN_PORTS))
                    raise ValueError(f"unknown port name {item!r}; use one of {known} or {{name, port}}")
                out.append({"name": item, "port": _WELL_KNOWN_PORTS[item]})
            else:
                out.append(item)
        return out

    @model_validator(mode="after")
    def _unique_names(self) -> Self:
        for label, items in (("expose", self.expose), ("import", self.import_)):
            names = [i.name for i in items]
            if len(names) != len(set(names)):
                raise ValueError(f"ray.{label} names must be unique")
        variables = [import_variable(i.name) for i in self.import_]
        if len(variables) != len(set(variables)):
            raise ValueError(
                "ray.import names must stay distinct as environment variables "
                f"({', '.join(variables)}): '.', '-' and '_' are the same there, and case is ignored"
            )
        ports = [e.port for e in self.expose]
        if len(ports) != len(set(ports)):
            raise ValueError("ray.expose ports must be unique")
        return self

    @model_validator(mode="after")
    def _node_resources(self) -> Self:
        """`head` and `workers` describe Ray nodes, not the SLURM allocation (that is `resources`)."""
        for role, allowed in (("head", _RAY_HEAD_FIELDS), ("workers", _RAY_WORKER_FIELDS)):
            resources: Resources = getattr(self, role)
            extra = sorted(resources.model_dump(exclude_none=True).keys() - allowed)
            if extra:
                raise ValueError(
                    f"ray.{role}: {', '.join(extra)} not used here; ray.{role} takes "
                    f"{', '.join(sorted(allowed))} (time, partition, account... go in `resources`)"
                )
        return self


_PYTHON_VERSION = re.compile(r"^3\.[0-9]{1,2}$")


class PythonCall(_Model):
    """A `python` job's payload: one pickled Python call (`cloudhpc.Executor`), run by a small
    runner shipped with the job, which writes the result or the exception (with its traceback) for
    the agent to store as the job's `result.pkl` artifact (`tasks/<i>/result.pkl` in an array)."""

    call: str = Field(
        description="the job-relative path, a key of `files`, of the pickled call (cloudpickle): "
        "(function, args, kwargs), or for an array (function, [(args, kwargs), ...]) picked by task index"
    )
    version: Annotated[str, StringConstraints(pattern=_PYTHON_VERSION.pattern)] = Field(
        description="the Python minor version (3.11) that pickled the call: the runner refuses "
        "another one with a clear error instead of failing somewhere inside unpickling"
    )


class JobSpec(_Model):
    """The POST body of a job: what to run, where, with which resources."""

    name: Name
    cluster: Name
    kind: JobKind = JobKind.BATCH
    script: str | None = Field(default=None, max_length=1_000_000)
    ray: RaySpec | None = None
    python: PythonCall | None = None
    resources: Resources = Field(default_factory=Resources)
    environment: Environment = Field(default_factory=Environment)
    files: dict[str, str] = Field(default_factory=dict, max_length=MAX_FILES)
    env: dict[str, str] = Field(default_factory=dict, max_length=MAX_ENV)
    array: ArraySpec | None = Field(
        default=None, description="a job array, sbatch --array syntax: 0-99%10, 1,3,5-7, 0-20:5"
    )
    after: list[Dependency] = Field(
        default_factory=list,
        max_length=MAX_AFTER,
        description="jobs of the same owner and cluster this one waits for: [{job: <id>, on: ok|any|notok}]",
    )
    checkpoint: CheckpointSpec | None = Field(
        default=None,
        description="warn the job before its time limit and run it again: "
        "{warn_before: 30s, signal: USR1, max_restarts: 2}; needs resources.time",
    )

    @model_validator(mode="after")
    def _checkpoint_needs_time_limit(self) -> Self:
        """The warning is timed from the limit, so the job must set one (a cluster default could
        change under it); the job's own `resources.signal` would be a second --signal."""
        if self.checkpoint is None:
            return self
        if self.kind not in (JobKind.BATCH, JobKind.RAY_JOB) or self.array is not None:
            raise ValueError("`checkpoint` is for batch jobs and ray-jobs that are not arrays")
        if self.kind == JobKind.RAY_JOB and self.checkpoint.signal in RAY_STOP_SIGNALS:
            raise ValueError(
                f"checkpoint.signal: a ray-job stops its Ray cluster on SIG{self.checkpoint.signal} "
                "(a cancel): use USR1 or USR2"
            )
        time = self.resources.time or self._script_time()
        if time is None:
            raise ValueError(
                "`checkpoint` needs resources.time (or the script's #SBATCH --time): the warning is "
                "sent before the time limit"
            )
        if self.resources.signal is not None:
            raise ValueError("`checkpoint` sends the warning signal: leave resources.signal unset")
        self.checkpoint.check_time_limit(parse_slurm_time(time))
        return self

    def _script_time(self) -> str | None:
        """The time limit of the script's last `#SBATCH --time`, which porter merges into the spec
        (None when there is none, or the directives are refused: their own 422 says why)."""
        if not self.script:
            return None
        from cloudhpc.domain.directives import parse_directives  # it imports this module

        try:
            times = [d.value for d in parse_directives(self.script) if d.field == "time"]
        except ValueError:
            return None
        return str(times[-1]) if times else None

    outputs: list[OutputPattern] = Field(
        default_factory=list,
        max_length=MAX_OUTPUT_PATTERNS,
        description="glob patterns relative to the job directory (`results/*.csv`, `**/*.pt`): the "
        "files they match are collected as artifacts `outputs/<path>` when the job ends",
    )

    @field_validator("after")
    @classmethod
    def _after_unique(cls, value: list[Dependency]) -> list[Dependency]:
        jobs = [d.job for d in value]
        if len(jobs) != len(set(jobs)):
            raise ValueError("each job may be named once in `after`")
        return value

    @field_validator("files")
    @classmethod
    def _files_stay_inside(cls, value: dict[str, str]) -> dict[str, str]:
        for path in value:
            _check_relative_path(path)
        total = sum(len(content.encode()) for content in value.values())
        if total > MAX_FILES_BYTES:
            raise ValueError(
                f"the files' contents total {total} bytes, over the limit of {MAX_FILES_BYTES}: "
                "put large inputs in the object store and name them by s3:// URL"
            )
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, val in value.items():
            if not _ENV_NAME.match(name):
                raise ValueError(f"environment variable name {name!r} must match [A-Za-z_][A-Za-z0-9_]*")
            if name.startswith(("CLOUDHPC_", "SLURM_")):
                raise ValueError(
                    f"environment variable {name!r}: the CLOUDHPC_ and SLURM_ prefixes are reserved"
                )
            if "\x00" in val or len(val) > MAX_ENV_VALUE:
                raise ValueError(f"environment variable {name!r}: value has a NUL byte or is over 32 KiB")
        total = sum(len(name) + len(val.encode()) for name, val in value.items())
        if total > MAX_ENV_BYTES:
            raise ValueError(f"env totals {total} bytes, over the limit of {MAX_ENV_BYTES}")
        return value

    @model_validator(mode="after")
    def _kind_matches_payload(self) -> Self:
        if self.array is not None and self.kind not in (JobKind.BATCH, JobKind.PYTHON):
            raise ValueError("`array` is for batch and python jobs (a Ray cluster is one allocation)")
        if (self.python is not None) != (self.kind == JobKind.PYTHON):
            raise ValueError("a python job needs a `python` section, and only a python job takes one")
        if self.kind == JobKind.PYTHON:
            assert self.python is not None
            if self.script or self.ray is not None:
                raise ValueError("a python job takes `python`, not `script` or `ray`")
            if self.python.call not in self.files:
                raise ValueError(f"python.call: {self.python.call!r} is not one of the job's `files`")
            return self
        if self.kind == JobKind.BATCH:
            if not self.script:
                raise ValueError("a batch job needs a non-empty `script`")
            if self.ray is not None:
                raise ValueError("`ray` is only for kinds ray-cluster and ray-job")
        else:
            if self.ray is None:
                raise ValueError(f"a {self.kind.value} job needs a `ray` section")
            if self.kind == JobKind.RAY_JOB and not self.ray.entrypoint:
                raise ValueError("a ray-job needs `ray.entrypoint`")
            if self.kind == JobKind.RAY_CLUSTER and self.ray.entrypoint:
                raise ValueError(
                    "`ray.entrypoint` is for kind ray-job; a ray-cluster takes Ray jobs from the cloud"
                )
            if self.script:
                raise ValueError(f"a {self.kind.value} job takes `ray`, not `script`")
            self._session_rules(self.ray)
            workers = self.ray.workers.nodes
            if workers is not None and self.resources.nodes not in (None, workers + 1):
                raise ValueError(
                    f"resources.nodes ({self.resources.nodes}) must be ray.workers.nodes + 1 "
                    f"({workers + 1}): the head takes one node"
                )
        return self

    def _session_rules(self, ray: RaySpec) -> None:
        """`ray.session` runs a ray-job on a cluster that exists already: everything that describes
        a cluster of its own (its size, ports, environment, SLURM allocation) belongs to the session
        and is refused here with the field named, instead of being silently ignored."""
        if self.kind == JobKind.RAY_CLUSTER:
            if ray.session is not None:
                raise ValueError("`ray.session` is for kind ray-job: a ray-cluster is a session itself")
            return
        if ray.idle_timeout is not None:
            raise ValueError(
                "`ray.idle_timeout` is for kind ray-cluster (a session); a ray-job ends with its entrypoint"
            )
        if ray.session is None:
            return
        taken = [
            f"ray.{name}" for name in ("head", "workers") if getattr(ray, name).model_dump(exclude_none=True)
        ]
        taken += ["ray.expose"] * bool(ray.expose) + ["ray.import"] * bool(ray.import_)
        taken += ["resources"] * bool(self.resources.model_dump(exclude_none=True))
        taken += ["environment"] * (not self.environment.is_empty)
        taken += [name for name in ("outputs", "after", "checkpoint") if getattr(self, name)]
        if taken:
            raise ValueError(
                f"a ray-job on a session (ray.session) runs on the session's cluster, with its "
                f"environment and allocation: leave out {', '.join(taken)}"
            )


class Observation(_Model):
    """What a backend saw of a job at one poll: the observed half of the job record."""

    state: JobState
    native_state: str = Field(description="the scheduler's own word, e.g. PENDING or OUT_OF_MEMORY")
    reason: str | None = None
    exit_code: int | None = None
    submitted_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    tasks: tuple[TaskObservation, ...] | None = Field(
        default=None, description="an array's tasks, by index; None for a job that is not an array"
    )
    owner: UUID | None = Field(
        default=None,
        description="the cloudhpc job the scheduler's record belongs to (SLURM: its job name), None "
        "where the backend cannot tell: a scheduler that lost a job may give its id to another one",
    )

    def lost_to(self, native_id: str) -> Observation:
        """What a job whose scheduler id `native_id` now names job `self.owner` is: failed, as lost
        by the scheduler (a controller restarted from a state saved before it accepted the job hands
        its id out again). Never the other job's state, output or exit code."""
        return Observation(
            state=JobState.FAILED,
            native_state="LOST",
            reason=f"lost by the scheduler: its job {native_id} is now another job's ({self.owner}); "
            "the controller restarted from a state saved before it had accepted this one",
        )

    @classmethod
    def of_array(cls, tasks: Iterable[TaskObservation]) -> Observation:
        """An array job as a whole, from its tasks: the state by `derive_array_state`, the first
        submission and start, the last end, and (once ended) the highest task exit code; the
        reason names the first task that did not complete."""
        ordered = tuple(sorted(tasks, key=lambda t: t.index))
        state = derive_array_state(t.state for t in ordered)
        starts = [t.started_at for t in ordered if t.started_at is not None]
        ends = [t.ended_at for t in ordered if t.ended_at is not None]
        codes = [t.exit_code for t in ordered if t.exit_code is not None]
        bad = next((t for t in ordered if t.state.terminal and t.state != JobState.COMPLETED), None)
        reason = None
        if state.terminal and bad is not None:
            reason = f"task {bad.index}: {bad.reason or bad.native_state}"
        elif not state.terminal:
            reason = next((t.reason for t in ordered if t.reason == DEPENDENCY_NEVER_SATISFIED), None)
        return cls(
            state=state,
            native_state="ARRAY",
            reason=reason,
            exit_code=max(codes) if state.terminal and codes else None,
            started_at=min(starts) if starts and state != JobState.QUEUED else None,
            ended_at=max(ends) if ends and state.terminal else None,
            tasks=ordered,
        )


class Bridge(_Model):
    """One exposed port of a job, reachable from the cloud at `bridge_host:bridge_port` (and, when
    porter publishes to Kubernetes, at `service_dns:remote_port`). `ready` means porter's last probe
    got an answer through the tunnel."""

    name: Name
    remote_port: int
    bridge_host: str
    bridge_port: int
    url: str | None = None
    service_dns: str | None = None
    ready: bool = False


class JobSummary(_Model):
    """A job as `GET /jobs` lists it: the record without its spec, bridges and artifacts, so that a
    page of 500 jobs stays small whatever the jobs carry. `GET /jobs/{id}` gives the whole `Job`."""

    id: UUID
    name: str
    owner: str
    cluster: str
    kind: JobKind
    state: JobState
    reason: str | None = None
    cancel_requested: bool = False
    slurm_job_id: str | None = None
    exit_code: int | None = None
    restarts: int = Field(
        default=0, ge=0, description="times SLURM ran the job again (requeue, preemption), 0 at first"
    )
    created_at: datetime
    submitted_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None


class Job(JobSummary):
    """The job record as the API returns it."""

    spec: JobSpec
    dependency: str | None = Field(
        default=None,
        description="while the job has not reached SLURM: the --dependency it would be submitted with "
        "now, from the SLURM ids of the jobs it waits for (null once submitted)",
    )
    cancel_tasks: list[int] = Field(
        default_factory=list, description="array tasks whose cancellation is asked for and not yet done"
    )
    bridges: list[Bridge] = Field(default_factory=list)
    artifacts: list[str] = Field(default_factory=list)
