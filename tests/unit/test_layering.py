"""The layering of `src/cloudhpc`, checked by reading every import statement (lazy ones inside
functions and `TYPE_CHECKING` ones included), so that a new upward import fails here, not in review.

A unit is a top-level module or package of cloudhpc. Each sits in one layer and imports only units
of lower layers (docs/architecture.md draws the same picture); the few imports within a layer are
listed with their reason, and a few downward imports are forbidden outright.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "cloudhpc"

LAYERS: list[set[str]] = [
    {"exceptions", "retries"},
    {"domain"},
    # settings and the SDK: both importable with the light install (no server extra); the modes
    # of cloudhpc's private files, which the store, the object store and the token files share
    {"config", "config_checks", "client", "executor", "sessions", "private_files"},
    # libraries, one per external system or concern; none of them knows a role
    {"store", "storage", "hpc", "ray", "bridges", "metrics", "port_forwards", "secrets_json", "config_docs"},
    # the roles, and the pipelines (which talk to porter through the SDK only)
    {"porter", "submitter", "pipelines"},
    # process startup: the only unit that knows every role
    {"runtime"},
    # the outer layer
    {"cli", "__main__"},
]

# Imports within one layer, and why they are allowed.
SIDEWAYS: dict[tuple[str, str], str] = {
    ("ray", "hpc"): "a Ray job's batch script is built from hpc's job script pieces",
    ("ray", "bridges"): "the Ray script starts the bridges' supervised tunnel",
    ("bridges", "hpc"): "the bridge CA signs with hpc.ssh, the only package that imports the SSH library",
    ("metrics", "store"): "porter's /metrics is computed from the job store at scrape time",
    ("secrets_json", "config"): "maps the original secrets.json onto the settings",
    ("config_docs", "config"): "generates the configuration reference from the settings model",
    ("config", "config_checks"): "the settings' validators apply its value rules (addresses, pip, bridges)",
    ("__main__", "cli"): "`python -m cloudhpc` runs the CLI",
    ("executor", "client"): "the Executor runs Python functions through the SDK's calls",
    ("sessions", "client"): "a warm Ray session is a ray-cluster job opened and used through the SDK",
}

# Downward imports that the layers alone would allow, but that would mix concerns.
FORBIDDEN: dict[tuple[str, str], str] = {
    ("submitter", "store"): "the agent learns everything from porter through its channel",
    ("porter", "hpc"): "porter never talks to SLURM or SSH: the agent does",
    ("client", "config"): "the SDK takes a URL and a token, not porter's settings",
    ("pipelines", "store"): "pipeline steps talk to porter through the SDK",
    ("pipelines", "hpc"): "pipeline steps talk to porter through the SDK",
    ("cli", "porter"): "the CLI starts porter through cloudhpc.runtime and talks to it through the SDK",
    ("cli", "submitter"): "the CLI starts the agent through cloudhpc.runtime",
}

# Packages inside a unit that another unit must not import, though it may import the unit.
FORBIDDEN_MODULES: dict[tuple[str, str], str] = {
    ("submitter", "cloudhpc.hpc.slurm"): (
        "the agent speaks the backend protocol (hpc.backend); the backend interprets SLURM's states "
        "(whether accounting is final, which runs ended); runtime alone picks SlurmBackend"
    ),
}

# `from cloudhpc import __version__` (the root package) is allowed everywhere; it loads nothing.
ROOT = "__init__"


def _layer_of(unit: str) -> int:
    for index, layer in enumerate(LAYERS):
        if unit in layer:
            return index
    raise AssertionError(f"cloudhpc.{unit} is in no layer of tests/unit/test_layering.py: place it")


def _units() -> set[str]:
    return {p.stem if p.is_file() else p.name for p in SRC.iterdir() if p.suffix == ".py" or p.is_dir()} - {
        ROOT,
        "__pycache__",
    }


def _unit_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    """(line, imported module: `cloudhpc.hpc.slurm.accounting`) for every import of cloudhpc in `path`."""
    package = ".".join(("cloudhpc", *path.relative_to(SRC).with_suffix("").parts))
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            # `from cloudhpc import runtime` imports the unit `runtime`
            modules = [f"{base}.{alias.name}" for alias in node.names] if base == "cloudhpc" else [base]
        else:
            continue
        for module in modules:
            if module.split(".")[0] == "cloudhpc":
                yield node.lineno, module


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, imported unit) for every import of cloudhpc in `path`."""
    for line, module in _imported_modules(path):
        parts = module.split(".")
        unit = parts[1] if len(parts) > 1 else ROOT
        yield line, unit if unit in _units() else ROOT


def _edges() -> list[tuple[str, str, str]]:
    edges = []
    for path in sorted(SRC.rglob("*.py")):
        if "migrations" in path.parts:
            continue
        source = _unit_of(path)
        for line, target in _imports(path):
            if target != source:
                edges.append((source, target, f"{path.relative_to(SRC.parent)}:{line}"))
    return edges


def test_every_unit_has_a_layer() -> None:
    for unit in _units():
        _layer_of(unit)


def test_imports_go_down_the_layers() -> None:
    wrong = []
    for source, target, where in _edges():
        if ROOT in (source, target):
            continue  # the root: `__version__`, and the SDK names (test_the_package_root_exports_only_the_sdk)
        if _layer_of(target) < _layer_of(source):
            continue
        if (source, target) in SIDEWAYS:
            continue
        wrong.append(f"{where}: {source} imports {target}")
    assert not wrong, "upward or sideways imports:\n" + "\n".join(wrong)


def test_forbidden_downward_imports() -> None:
    wrong = [
        f"{where}: {source} imports {target} ({FORBIDDEN[source, target]})"
        for source, target, where in _edges()
        if (source, target) in FORBIDDEN
    ]
    assert not wrong, "\n".join(wrong)


def test_the_package_root_exports_only_the_sdk() -> None:
    targets = {target for source, target, _ in _edges() if source == ROOT}
    assert targets <= {"client", "domain", "exceptions", "executor", "sessions"}


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ("submitter", "porter"),
        ("porter", "submitter"),
        ("cli", "porter"),
        ("cli", "submitter"),
        ("domain", "config"),
    ],
)
def test_the_rules_catch_what_the_issue_names(source: str, target: str) -> None:
    """The rules themselves: each of these imports would be refused."""
    assert (source, target) not in SIDEWAYS
    assert _layer_of(target) >= _layer_of(source) or (source, target) in FORBIDDEN


def test_the_runtime_is_what_the_cli_starts_servers_with() -> None:
    edges = {(source, target) for source, target, _ in _edges()}
    assert ("cli", "runtime") in edges
    assert ("submitter", "porter") not in edges
    assert ("submitter", "store") not in edges


def test_forbidden_module_imports() -> None:
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        source = _unit_of(path)
        for line, module in _imported_modules(path):
            for (unit, package), why in FORBIDDEN_MODULES.items():
                if source == unit and (module == package or module.startswith(package + ".")):
                    wrong.append(f"{path.relative_to(SRC.parent)}:{line}: {source} imports {module} ({why})")
    assert not wrong, "\n".join(wrong)
