"""The public surface: `import cloudhpc` gives the SDK a notebook needs, and nothing heavier."""

from __future__ import annotations

import subprocess
import sys

import pytest

import cloudhpc
from cloudhpc import client, exceptions

# What a notebook needs first (issue #10); the rest of `__all__` follows the lazy table.
NOTEBOOK = {"Client", "JobSpec", "Job", "JobState", "Resources", "ApiError", "CloudHPCError", "ConfigError"}
EXPECTED = sorted({*cloudhpc._HOME_OF, "__version__"})


def test_all_is_sorted_and_is_the_sdk() -> None:
    assert cloudhpc.__all__ == sorted(cloudhpc.__all__)
    assert cloudhpc.__all__ == EXPECTED, "__all__ and the lazy table (_HOMES) disagree"
    assert set(cloudhpc.__all__) >= NOTEBOOK


@pytest.mark.parametrize("name", [n for n in EXPECTED if n != "__version__"])
def test_each_name_is_the_object_of_its_home_module(name: str) -> None:
    value = getattr(cloudhpc, name)
    assert value.__module__.startswith(
        (
            "cloudhpc.client",
            "cloudhpc.domain.",
            "cloudhpc.exceptions",
            "cloudhpc.executor",
            "cloudhpc.sessions",
        )
    )
    home = sys.modules[value.__module__]
    assert getattr(home, name) is value
    assert name in dir(cloudhpc)


def test_the_exported_errors_are_the_hierarchy_roots_a_user_catches() -> None:
    assert issubclass(cloudhpc.ApiError, cloudhpc.CloudHPCError)
    assert cloudhpc.CloudHPCError is exceptions.CloudHPCError
    assert cloudhpc.Client is client.Client


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from cloudhpc import *", namespace)  # noqa: S102 - the statement a notebook runs
    assert sorted(k for k in namespace if k != "__builtins__") == sorted(EXPECTED)


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = cloudhpc.Nope  # type: ignore[attr-defined]


def test_importing_the_package_loads_no_third_party_module() -> None:
    """`python -m cloudhpc.hpc.local_supervisor` (every local job) runs `cloudhpc/__init__.py`:
    it must stay standard library only; the SDK is loaded on first use of a name."""
    code = (
        "import sys, cloudhpc.hpc.local_supervisor, cloudhpc;"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'httpx', 'pydantic', 'yaml', 'typer'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
