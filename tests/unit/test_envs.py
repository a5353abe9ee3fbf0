"""EnvSpec hashing and normalisation, activation lines, the rendered build script (no servers)."""

from __future__ import annotations

import hashlib
import re
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from pydantic import ValidationError

from cloudhpc.config import ClusterConfig, PipConfig
from cloudhpc.domain.jobs import Environment, check_requirement
from cloudhpc.hpc.backend import CommandResult
from cloudhpc.hpc.envs import (
    _LAUNCHERS,
    LAUNCHERS_FORMAT,
    EnvironmentCache,
    EnvSpec,
    activation_lines,
    normalise_requirement,
    pip_source_args,
    render_build_script,
)
from tests.conftest import HOSTILE_STRINGS


def spec(prelude: str = "", **fields: object) -> EnvSpec:
    return EnvSpec.from_environment(Environment.model_validate(fields), prelude)


def test_hash_is_stable_across_releases() -> None:
    # A change here silently rebuilds every user's environments: bump SPEC_FORMAT on purpose only.
    s = spec(python="3.11", packages=["six==1.16.0"])
    assert (
        s.canonical_json()
        == '{"format":1,"modules":[],"packages":["six==1.16.0"],"prelude":"","python":"3.11"}'
    )
    assert s.spec_hash() == hashlib.sha256(s.canonical_json().encode()).hexdigest()[:16] == "d6385325fb3085b7"
    assert len(spec(packages=["six"]).spec_hash()) == 16


def test_package_order_and_spelling_do_not_matter() -> None:
    a = spec(packages=["numpy>=1.26", "Six", "ray[default,Client]==2.9"])
    b = spec(packages=[" six ", "ray[client, default] == 2.9", "numpy >= 1.26", "six"])
    assert a.spec_hash() == b.spec_hash()
    assert a.packages == ["numpy>=1.26", "ray[default,Client]==2.9", "Six"]  # sorted by canonical name
    assert spec(packages=["Foo_Bar.baz"]).spec_hash() == spec(packages=["foo-bar-baz"]).spec_hash()


def test_what_changes_the_environment_changes_the_hash() -> None:
    base = spec(modules=["gcc/11", "openmpi"], python="3.11", packages=["six"])
    assert (
        spec(modules=["openmpi", "gcc/11"], python="3.11", packages=["six"]).spec_hash() != base.spec_hash()
    )
    assert (
        spec(modules=["gcc/11", "openmpi"], python="3.12", packages=["six"]).spec_hash() != base.spec_hash()
    )
    assert (
        spec(modules=["gcc/11", "openmpi"], python="3.11", packages=["six<2"]).spec_hash() != base.spec_hash()
    )
    with_prelude = spec(
        "source /appl/profile.sh", modules=["gcc/11", "openmpi"], python="3.11", packages=["six"]
    )
    assert with_prelude.spec_hash() != base.spec_hash()
    same_prelude = spec(
        "source /appl/profile.sh  \r\n\n", modules=["gcc/11", "openmpi"], python="3.11", packages=["six"]
    )
    assert same_prelude.spec_hash() == with_prelude.spec_hash()


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("Six", "six"),
        ("  six >= 1.0 , <2 ", "six>=1.0,<2"),
        ("Foo_Bar.Baz[B, a]==1", "foo-bar-baz[a,b]==1"),
        ('pkg ; python_version  <  "3.12"', 'pkg; python_version < "3.12"'),
        ("pkg @ https://example.org/pkg-1.0.tar.gz", "pkg@https://example.org/pkg-1.0.tar.gz"),
        ("./local dir", "./local dir"),
    ],
)
def test_normalise_requirement(raw: str, canonical: str) -> None:
    assert normalise_requirement(raw) == canonical


def test_python_version_or_module() -> None:
    version = spec(python="3.11")
    assert (version.interpreter, version.python_module, version.system_site_packages) == (
        "python3.11",
        None,
        False,
    )
    module = spec(python="python-data/3.10-23.07")
    assert (module.interpreter, module.python_module, module.system_site_packages) == (
        "python3",
        "python-data/3.10-23.07",
        True,
    )
    assert spec(packages=["six"]).interpreter == "python3"
    assert spec(modules=["pytorch/2.0"], packages=["six"]).system_site_packages


def test_activation_lines_are_quoted() -> None:
    s = spec(modules=["gcc/11.2", "openmpi"], python="python-data/3.10", packages=["six"])
    envdir = "/home/u s/it's $(here)/envs/abc"
    lines = activation_lines(s, envdir)
    assert lines == [
        *(load(m) for m in ["gcc/11.2", "openmpi", "python-data/3.10"]),
        f"source {shlex.quote(envdir + '/venv/bin/activate')}",
    ]
    assert shlex.split(lines[-1]) == ["source", envdir + "/venv/bin/activate"]
    assert activation_lines(spec(modules=["gcc"]), None) == [load("gcc")]


def load(module: str) -> str:
    """The activation line of one module: a module that does not load ends the job, saying which."""
    return f"module load {module} || {{ echo 'cloudhpc: module load {module} failed (see above)' >&2; exit 97; }}"


def test_a_module_that_does_not_load_ends_the_job_saying_which() -> None:
    # `module` here is a stand-in that fails like Lmod does for an unknown module (exit 1).
    lines = activation_lines(spec(modules=["pytorch/9.9"]), None)
    script = "\n".join(['module() { echo "Lmod: unknown $2" >&2; return 1; }', *lines, "echo still running"])
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert done.returncode == 97
    assert done.stdout == ""
    assert done.stderr == "Lmod: unknown pytorch/9.9\ncloudhpc: module load pytorch/9.9 failed (see above)\n"


@pytest.mark.parametrize(
    "name", ["-f", "--force", "a/-x", "../x", "a/../b", ".hidden", "a//b", "/abs", "a/", "a b", "x" * 129]
)
def test_module_names_that_module_load_could_misread_are_refused(name: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Environment(modules=[name])
    assert caught.value.errors()[0]["loc"][0] == "modules"
    with pytest.raises(ValidationError):
        Environment(python=name)


def _is_requirement(text: str) -> bool:
    try:
        check_requirement(text)
    except ValueError:
        return False
    return True


def test_build_script_never_holds_package_specs() -> None:
    # Hostile text in a marker is refused by the spec now (`check_requirement`); what a marker may
    # still hold (quotes, parentheses, `<`, `>`, `!`, `*`, `~`) must stay out of the script too.
    hostile = [f"pkg{i} ; python_version > '{h}'" for i, h in enumerate(HOSTILE_STRINGS) if "\n" not in h]
    packages = [p for p in hostile if _is_requirement(p)] + [
        "pkg-a[x,y] (>=1,<2) ; python_version < '3.99' and os_name != 'nt'",
        "pkg_b!=1.*,~=2.0 ; platform_machine == \"x86_64\" or extra == 'a (b) <c>'",
    ]
    s = spec(python="3.11", packages=packages)
    script = render_build_script(s, envs_dir="/w/envs dir", stage="/w/envs dir/.stage-x")
    for package in s.packages:
        assert package not in script
    assert '--requirement "$stage/requirements.txt"' in script
    assert s.requirements_txt().splitlines() == s.packages
    assert f"envdir={shlex.quote('/w/envs dir/' + s.spec_hash())}" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # it parses


def test_build_script_loads_modules_and_uses_system_site_packages() -> None:
    s = spec(modules=["gcc/11"], python="python-data/3.10", packages=["six"])
    script = render_build_script(s, envs_dir="/w/envs", stage="/w/envs/.stage")
    assert "module load gcc/11 ||" in script
    assert "module load python-data/3.10 ||" in script
    assert "python3 -m venv --system-site-packages" in script
    plain = render_build_script(spec(python="3.11"), envs_dir="/w/envs", stage="/w/envs/.stage")
    assert "module load" not in plain
    assert 'python3.11 -m venv "$envdir/venv"' in plain
    assert "pip install" not in plain


def test_a_venv_on_a_module_runs_the_module_scripts_with_its_own_python(tmp_path: Path) -> None:
    """The launchers step: a console script the module provides (here a package on PYTHONPATH, as a
    module's Python sees its site-packages) gets a launcher in the venv that runs the venv's Python,
    so `ray start` (and the Ray workers it starts with `sys.executable`) see the venv's packages.
    Only venvs on a module get the step, and only their hash changes with it."""
    site = tmp_path / "module-site"
    (site / "modtool").mkdir(parents=True)
    (site / "modtool" / "__init__.py").write_text("import sys\ndef main():\n    print(sys.executable)\n")
    dist = site / "modtool-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: modtool\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[console_scripts]\nmodtool = modtool:main\nbad;name = modtool:main\nodd = os:system; x\n"
    )
    venv = tmp_path / "venv"
    subprocess.run(
        ["/usr/bin/python3", "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True
    )
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    subprocess.run([str(venv / "bin" / "python"), "-"], input=_LAUNCHERS, text=True, env=env, check=True)
    made = {p.name for p in (venv / "bin").iterdir()}
    assert "modtool" in made
    assert not {"bad;name", "odd"} & made  # names and targets that are not plain are skipped
    ran = subprocess.run([str(venv / "bin" / "modtool")], capture_output=True, text=True, env=env, check=True)
    assert ran.stdout.strip() == str(venv / "bin" / "python")

    on_module = spec(modules=["pytorch/2.13"], packages=["tomli"])
    assert "CHPC_LAUNCHERS" in render_build_script(on_module, envs_dir="/w/envs", stage="/w/s")
    assert on_module.canonical()["launchers"] == LAUNCHERS_FORMAT
    plain = spec(python="3.11", packages=["tomli"])
    assert "CHPC_LAUNCHERS" not in render_build_script(plain, envs_dir="/w/envs", stage="/w/s")
    assert "launchers" not in plain.canonical()


class _RefusingRunner:
    """Fails the test on any remote call: an empty or modules-only environment needs none."""

    async def run(
        self, argv: Sequence[str], *, stdin: str | None = None, timeout: float | None = None
    ) -> CommandResult:
        raise AssertionError(f"unexpected command {argv}")

    async def home(self) -> str:
        raise AssertionError("unexpected home()")

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        raise AssertionError("unexpected write")

    async def read_file(self, path: str, *, offset: int = 0, length: int | None = None) -> bytes:
        raise AssertionError("unexpected read")

    async def exists(self, path: str) -> bool:
        raise AssertionError("unexpected exists()")

    async def size(self, path: str) -> int | None:
        raise AssertionError("unexpected size()")

    async def makedirs(self, path: str, *, mode: int = 0o700) -> None:
        raise AssertionError("unexpected makedirs()")


async def test_empty_and_module_only_environments_cost_no_remote_call() -> None:
    cache = EnvironmentCache(_RefusingRunner(), workdir="~/.cloudhpc", prelude="source /x")
    assert await cache.ensure(Environment()) == []
    assert await cache.ensure(Environment(modules=["gcc/11"])) == [load("gcc/11")]


# ---------------------------------------------------------------- where pip takes packages from

MIRROR = PipConfig(
    index_url="https://mirror.example.org/simple?a=$(id);b='x'`uname`",
    extra_index_urls=["https://extra.example.org/simple"],
    find_links=["/opt/site wheels", "~/wheels", "https://wheels.example.org/list.html"],
)


def _pip_argv(script: str) -> list[str]:
    """The pip command of a rendered build script, as bash would split it."""
    (line,) = [line for line in script.splitlines() if "-m pip install" in line]
    argv = shlex.split(line.partition(" || ")[0])
    return argv[argv.index("install") + 1 :]


def test_pip_arguments_come_from_the_cluster_config_only() -> None:
    cluster = ClusterConfig.model_validate({"backend": "local", "pip": MIRROR.model_dump()})
    assert pip_source_args(cluster.pip) == [
        "--index-url",
        "https://mirror.example.org/simple?a=$(id);b='x'`uname`",
        "--extra-index-url",
        "https://extra.example.org/simple",
        "--find-links",
        "/opt/site wheels",
        "--find-links",
        "~/wheels",
        "--find-links",
        "https://wheels.example.org/list.html",
    ]
    assert pip_source_args(PipConfig(no_index=True, find_links=["/w"])) == [
        "--no-index",
        "--find-links",
        "/w",
    ]
    assert pip_source_args(PipConfig()) == []

    # The cache gives every spec the cluster's sources; the script passes them as separate, quoted
    # words before the requirements file (bash splits the line back into exactly these arguments).
    cache = EnvironmentCache(_RefusingRunner(), workdir="~/.cloudhpc", pip=cluster.pip)
    s = cache.spec(Environment(packages=["six"]))
    assert s.pip == cluster.pip
    script = render_build_script(s, envs_dir="/w/envs", stage="/w/envs/.stage")
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert _pip_argv(script) == [
        "--disable-pip-version-check",
        "--no-input",
        *pip_source_args(cluster.pip),
        "--requirement",
        "$stage/requirements.txt",
    ]
    assert "--index-url 'https://mirror.example.org/simple?a=$(id);b='\"'\"'x'\"'\"'`uname`'" in script
    # Without a pip section the command is what it always was.
    plain = render_build_script(spec(packages=["six"]), envs_dir="/w/envs", stage="/w/envs/.stage")
    assert _pip_argv(plain) == [
        "--disable-pip-version-check",
        "--no-input",
        "--requirement",
        "$stage/requirements.txt",
    ]

    # A job has no say: its environment has no such field, and pip options as packages are refused.
    with pytest.raises(ValidationError):
        Environment.model_validate({"packages": ["six"], "pip": {"index_url": "https://evil.example/simple"}})
    for option in (
        "--index-url https://evil.example/simple",
        "-f /tmp",
        "six --find-links=/tmp",
        "--no-index",
    ):
        with pytest.raises(ValidationError):
            Environment(packages=[option])


def test_pip_sources_are_in_the_hash() -> None:
    six = Environment(packages=["six"])
    none = EnvSpec.from_environment(six)
    assert "pip" not in none.canonical()  # a cluster without a pip section keeps its hashes
    assert EnvSpec.from_environment(six, pip=PipConfig()).spec_hash() == none.spec_hash()
    local = EnvSpec.from_environment(six, pip=PipConfig(find_links=["/opt/wheels"]))
    assert local.canonical()["pip"] == {
        "index_url": None,
        "extra_index_urls": [],
        "find_links": ["/opt/wheels"],
        "no_index": False,
    }
    offline = EnvSpec.from_environment(six, pip=PipConfig(find_links=["/opt/wheels"], no_index=True))
    mirror = EnvSpec.from_environment(six, pip=PipConfig(index_url="https://mirror.example.org/simple"))
    other = EnvSpec.from_environment(six, pip=PipConfig(find_links=["/opt/other-wheels"]))
    hashes = {s.spec_hash() for s in (none, local, offline, mirror, other)}
    assert len(hashes) == 5

    # A mirror's credentials are not the source: a rotated token reuses the environments, and
    # spec.json (written on the cluster from the canonical form) does not hold them.
    with_token = EnvSpec.from_environment(
        six, pip=PipConfig(index_url="https://alice:s3cret@mirror.example.org/simple")
    )
    assert with_token.spec_hash() == mirror.spec_hash()
    assert "s3cret" not in with_token.canonical_json()
    ported = PipConfig(index_url="https://tok@mirror.example.org:8443/simple")
    assert EnvSpec.from_environment(six, pip=ported).canonical()["pip"]["index_url"] == (
        "https://mirror.example.org:8443/simple"
    )
    # ... but the build itself uses them.
    assert "alice:s3cret@" in render_build_script(with_token, envs_dir="/w/envs", stage="/w/envs/.stage")


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"index_url": "mirror.example.org/simple"}, "must be an http(s):// or file:// URL"),
        ({"index_url": "/opt/simple"}, "must be an http(s):// or file:// URL"),
        ({"extra_index_urls": ["--trusted-host=x"]}, "must be an http(s):// or file:// URL"),
        ({"find_links": ["wheels"]}, "or an absolute path"),
        ({"find_links": ["-f/tmp"]}, "or an absolute path"),
        ({"index_url": "https://m.example/simple --pre"}, "a URL has no spaces"),
        ({"find_links": ["file:///opt/my wheels"]}, "a URL has no spaces"),
        ({"find_links": ["/opt/wheels\n"]}, "no control characters"),
        ({"find_links": [" /opt/wheels"]}, "no leading or trailing spaces"),
        ({"no_index": True}, "pip.no_index needs find_links"),
        (
            {"no_index": True, "find_links": ["/w"], "index_url": "https://m.example/simple"},
            "would be ignored",
        ),
        ({"trusted_host": "x"}, "Extra inputs are not permitted"),
    ],
)
def test_pip_config_is_checked_when_loaded(section: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        ClusterConfig.model_validate({"backend": "local", "pip": section})
