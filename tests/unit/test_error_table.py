"""Every exception cloudhpc defines lives in `cloudhpc.exceptions`, is drawn in its tree and has a
deliberate HTTP answer (only a bug may become a 500), or is allowed elsewhere for a written reason.

Like httpx's test that every transport exception is mapped: the scan imports every module of the
package, so an exception class added anywhere under `src/` fails here until it is placed.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import pkgutil
import re
from pathlib import Path
from types import ModuleType

import pytest

import cloudhpc
from cloudhpc import exceptions
from cloudhpc.porter.errors import status_for

EXPECTED = {
    "CloudHPCError": 500,
    "ConfigError": 500,
    "BridgesNotConfigured": 422,
    "InvalidTransition": 409,
    "HttpProblem": None,  # carries its own status
    "JobFileError": None,  # an HttpProblem: its own status (403, 404, 422)
    "ChannelError": 500,
    "SSHError": 502,
    "SSHConnectError": 502,
    "HostKeyError": 502,
    "CommandTimeout": 504,
    "OutputTooLarge": 502,
    "RemoteFileError": 502,
    "SchedulerError": 500,
    "SchedulerCommandError": 500,
    "SubmitRejected": 400,
    "QuotaExceeded": 403,
    "AccountingUnavailable": 500,
    "JobNotFound": 404,
    "ParseError": 500,
    "StagingError": 500,
    "EnvironmentBuildError": 500,
    "StoreError": 503,
    "BridgePortsExhausted": 503,
    "IdempotencyConflict": 409,
    "UnknownJob": 404,
    "StorageError": 502,
    "ObjectNotFound": 404,
    "KubernetesError": 502,
    "PipelineError": 500,
    "JobFailed": 500,
    "QualityGateFailed": 500,
    "StepTerminated": 500,
    "ExecutorError": 500,
    "PythonVersionMismatch": 500,
    "RemoteCallError": 500,
    "NoResult": 500,
    "RaySessionError": 500,
    "SessionNotActive": 500,
    "RayJobsError": 500,
}

ALLOWED_ELSEWHERE = {
    "cloudhpc.client.ApiError": (
        "the SDK's view of porter's error answer (status, code, details as received); it belongs to "
        "the client, which works without porter installed, and is a CloudHPCError so one except "
        "clause catches everything"
    ),
    "cloudhpc.storage.mailbox_seal.Refused": (
        "a verdict on one S3 mailbox object (skip it, log and count it), raised and caught inside the "
        "mailbox modules; it never reaches a caller, porter's error table or a user"
    ),
}
"""Exception classes defined outside `cloudhpc.exceptions`, each with the reason it may be."""

NOT_IMPORTED = {"cloudhpc.__main__": "importing it runs the CLI (`python -m cloudhpc`)"}


def _optional_distributions() -> set[str]:
    """Distributions that only an extra of cloudhpc installs (normalised names)."""
    requirements = importlib.metadata.requires("cloudhpc") or []
    names = (re.match(r"[A-Za-z0-9._-]+", r) for r in requirements if "extra ==" in r)
    return {re.sub(r"[-_.]+", "-", m.group(0)).lower() for m in names if m}


def _needs_missing_extra(error: ModuleNotFoundError) -> bool:
    top = (error.name or "").partition(".")[0]
    if top in ("", "cloudhpc"):
        return False  # a broken import inside the package is a bug, never a missing extra
    dists = importlib.metadata.packages_distributions().get(top, [top])
    optional = _optional_distributions()
    return any(re.sub(r"[-_.]+", "-", d).lower() in optional for d in dists)


def _import_all() -> tuple[list[ModuleType], dict[str, str]]:
    """Every module of the package, and those left out because an optional extra is missing."""
    modules: list[ModuleType] = [cloudhpc]
    skipped: dict[str, str] = {}
    for info in pkgutil.walk_packages(cloudhpc.__path__, "cloudhpc."):
        if info.name in NOT_IMPORTED:
            continue
        try:
            modules.append(importlib.import_module(info.name))
        except ModuleNotFoundError as error:
            if not _needs_missing_extra(error):
                raise
            skipped[info.name] = f"needs {error.name}, from an extra that is not installed"
    return modules, skipped


MODULES, SKIPPED = _import_all()


def _subclasses(root: type[BaseException]) -> set[type[BaseException]]:
    found: set[type[BaseException]] = set()
    todo = [root]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                todo.append(sub)
    return found


def defined_in_cloudhpc() -> list[type[BaseException]]:
    """Every exception class whose code is in the package: module-level, nested or made at import."""
    ours = [c for c in _subclasses(BaseException) if c.__module__.partition(".")[0] == "cloudhpc"]
    return sorted(ours, key=lambda c: f"{c.__module__}.{c.__qualname__}")


def all_exceptions() -> list[type[exceptions.CloudHPCError]]:
    return [
        cls
        for _, cls in inspect.getmembers(exceptions, inspect.isclass)
        if issubclass(cls, exceptions.CloudHPCError)
    ]


def test_every_module_was_scanned() -> None:
    assert len(MODULES) > 50  # the walk found the package, not an empty path
    if SKIPPED:
        pytest.skip(f"not scanned: {SKIPPED}")


def test_every_exception_class_lives_in_exceptions_or_has_a_reason() -> None:
    placed = {f"{c.__module__}.{c.__qualname__}" for c in defined_in_cloudhpc()}
    outside = {name for name in placed if not name.startswith("cloudhpc.exceptions.")}
    assert outside == set(ALLOWED_ELSEWHERE), (
        "move these into cloudhpc/exceptions.py (and porter's table), or allow them with a reason: "
        f"{sorted(outside - set(ALLOWED_ELSEWHERE))}; allowed but gone: "
        f"{sorted(set(ALLOWED_ELSEWHERE) - outside)}"
    )


def test_no_exception_class_hides_inside_a_function() -> None:
    """The import scan sees only classes made at import; this reads the source for the others
    (a KFP component's body, a class made inside a function), by the names of their bases."""
    src = Path(cloudhpc.__file__).parent
    allowed = {name.rsplit(".", 1)[1] for name in ALLOWED_ELSEWHERE}
    found = []
    for path in sorted(src.rglob("*.py")):
        if path.name == "exceptions.py" and path.parent == src:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ClassDef) or node.name in allowed:
                continue
            bases = [ast.unparse(base).rsplit(".", 1)[-1] for base in node.bases]
            if any(b.endswith(("Error", "Exception")) or b in ("Exit", "Abort") for b in bases):
                found.append(f"{path.relative_to(src)}:{node.lineno} {node.name}({', '.join(bases)})")
    assert found == []


def test_every_exception_is_in_this_table() -> None:
    inside = [c for c in defined_in_cloudhpc() if c.__module__ == "cloudhpc.exceptions"]
    assert sorted(c.__name__ for c in inside) == sorted(EXPECTED)
    assert sorted(c.__name__ for c in all_exceptions()) == sorted(EXPECTED)


@pytest.mark.parametrize("cls", all_exceptions(), ids=lambda c: c.__name__)
def test_status(cls: type[exceptions.CloudHPCError]) -> None:
    if issubclass(cls, exceptions.HttpProblem):
        assert status_for(cls(418, "teapot", "x")) == (418, "teapot")
        return
    error = cls.__new__(cls)
    Exception.__init__(error, "x")
    assert status_for(error)[0] == EXPECTED[cls.__name__]


def test_every_exception_is_exported_and_drawn() -> None:
    for cls in all_exceptions():
        assert cls.__name__ in exceptions.__all__
        assert cls.__name__ in (exceptions.__doc__ or "")


def _drawn_tree() -> dict[str, str | None]:
    """The tree atop exceptions.py as {class: parent}, read from its indentation."""
    lines = (exceptions.__doc__ or "").splitlines()
    start = lines.index("    CloudHPCError")
    parents: dict[str, str | None] = {"CloudHPCError": None}
    path = ["CloudHPCError"]
    for line in lines[start + 1 :]:
        match = re.fullmatch(r"    ((?:[│ ]   )*)[├└]── (\w+)", line)
        if match is None:
            break
        depth = len(match.group(1)) // 4 + 1
        path[depth:] = [match.group(2)]
        parents[match.group(2)] = path[depth - 1]
    return parents


def test_the_drawn_tree_is_the_class_tree() -> None:
    actual: dict[str, str | None] = {}
    for cls in all_exceptions():
        (base,) = cls.__bases__  # one parent each, or the drawing could not show it
        actual[cls.__name__] = None if cls is exceptions.CloudHPCError else base.__name__
    assert _drawn_tree() == actual


def test_docs_draw_the_same_tree() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "exceptions.md").read_text()
    drawn = doc.split("```\n", 2)[1].split("\n```", 1)[0]
    lines = (exceptions.__doc__ or "").splitlines()
    start = lines.index("    CloudHPCError")
    tree = [line[4:] for line in lines[start : start + len(_drawn_tree())]]
    assert drawn.splitlines() == tree
    for name in EXPECTED:
        assert f"| `{name}` |" in doc, f"docs/exceptions.md has no row for {name}"
