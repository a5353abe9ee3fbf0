"""hpc/slurm/ and hpc/ssh/ were single modules: their names stay importable from the package, each
defined once in a submodule, and asyncssh stays inside hpc/ssh/."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from types import ModuleType

import pytest

from cloudhpc.hpc import slurm, ssh

SRC = Path(__file__).resolve().parents[2] / "src" / "cloudhpc"

# What `from cloudhpc.hpc.slurm import X` and `from cloudhpc.hpc.ssh import X` gave when they were modules.
SLURM_NAMES = [
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
SSH_NAMES = [
    "DEFAULT_MAX_OUTPUT",
    "PASSPHRASE_ENV",
    "CommandHook",
    "Outcome",
    "SSHConnection",
    "build_command_line",
    "command_name",
]


def _submodules(package: ModuleType) -> list[ModuleType]:
    folder = Path(package.__file__ or "").parent
    return [
        importlib.import_module(f"{package.__name__}.{path.stem}")
        for path in sorted(folder.glob("*.py"))
        if path.name != "__init__.py"
    ]


@pytest.mark.parametrize(("package", "names"), [(slurm, SLURM_NAMES), (ssh, SSH_NAMES)])
def test_the_package_exports_what_the_module_did(package: ModuleType, names: list[str]) -> None:
    assert package.__all__ == names
    homes = {
        name: [m.__name__ for m in _submodules(package) if name in getattr(m, "__all__", ())]
        for name in names
    }
    for name, modules in homes.items():
        assert len(modules) == 1, f"{package.__name__}.{name} is in the __all__ of {modules}"
        assert getattr(package, name) is getattr(importlib.import_module(modules[0]), name)


def test_only_hpc_ssh_imports_asyncssh() -> None:
    importers = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module or ""]
            else:
                continue
            if any(module.split(".")[0] == "asyncssh" for module in modules):
                importers.add(path.relative_to(SRC).parts[:2])
    assert importers == {("hpc", "ssh")}
