"""The porter/submitter image installs only hash-pinned dependencies (issue 12: pip without hashes).

`deploy/docker/cloudhpc-requirements.txt` is generated from pyproject.toml by
`deploy/docker/lock-requirements.sh` (PyPI, pip-compile --generate-hashes). These checks fail when
pyproject.toml gains or changes a dependency of the image that the lock does not satisfy (re-run
the script), when an entry has no hash, or when the Dockerfile stops installing from the lock.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "deploy" / "docker"
LOCK = DOCKER / "cloudhpc-requirements.txt"
IMAGE_EXTRAS = ("server", "postgres", "kubernetes")
"""What cloudhpc.Dockerfile installs: the extras of porter and the submitter."""


def locked() -> dict[str, tuple[Version, list[str]]]:
    """name -> (version, hashes) for every entry of the lock."""
    entries: dict[str, tuple[Version, list[str]]] = {}
    text = re.sub(r"\\\n", " ", LOCK.read_text())
    for line in text.splitlines():
        if not line or line[0] in "# ":
            continue
        match = re.fullmatch(r"(?P<name>[A-Za-z0-9_.-]+)==(?P<version>\S+)(?P<rest>.*)", line)
        assert match, f"{LOCK.name}: not a pinned entry: {line[:80]}"
        hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", match["rest"])
        entries[canonicalize_name(match["name"])] = (Version(match["version"]), hashes)
    return entries


def image_requirements() -> list[Requirement]:
    """The image's direct requirements in pyproject.toml, and the build backend's."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = pyproject["project"]
    texts = list(project["dependencies"]) + list(pyproject["build-system"]["requires"])
    for extra in IMAGE_EXTRAS:
        texts += project["optional-dependencies"][extra]
    return [r for r in map(Requirement, texts) if canonicalize_name(r.name) != "cloudhpc"]


def test_every_locked_entry_is_pinned_with_hashes() -> None:
    entries = locked()
    assert len(entries) > 30
    assert [name for name, (_, hashes) in entries.items() if not hashes] == []


def test_the_lock_satisfies_pyproject() -> None:
    entries = locked()
    problems = []
    for requirement in image_requirements():
        name = canonicalize_name(requirement.name)
        if name not in entries:
            problems.append(f"{requirement} is not in the lock")
        elif not requirement.specifier.contains(entries[name][0], prereleases=True):
            problems.append(f"{requirement}: the lock has {entries[name][0]}")
    assert not problems, "; ".join(problems) + ": run deploy/docker/lock-requirements.sh"


def test_the_image_installs_from_the_lock_only() -> None:
    text = re.sub(r"\\\n", " ", (DOCKER / "cloudhpc.Dockerfile").read_text())
    installs = [line for line in text.splitlines() if "pip install" in line and not line.startswith("#")]
    assert installs, "no pip install"
    assert "--require-hashes --no-deps -r cloudhpc-requirements.txt" in installs[0]
    for line in installs[1:]:  # the project itself: no dependency, index or build environment fetched
        assert {"--no-deps", "--no-build-isolation", "--no-index"} <= set(line.split()), line
    assert "COPY deploy/docker/cloudhpc-requirements.txt" in text
    ignore = (DOCKER / "cloudhpc.Dockerfile.dockerignore").read_text().splitlines()
    assert "!deploy/docker/cloudhpc-requirements.txt" in ignore
