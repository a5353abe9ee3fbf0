"""Cached Python environments on the cluster: built once per spec, then reused for a directory check.

The original system ran `pip install` in every job (about 195 s per run). Here an environment spec
(modules, a Python, pip packages, and the cluster prelude that shapes them) hashes to a directory
`<workdir>/envs/<hash>/`. The first job that needs it builds it; every later job only checks that
`<envdir>/.ready` exists (one SFTP stat) and gets the lines that activate it in its batch script.

The build is one bash script written over SFTP with the requirements beside it as a file, so a
package specifier never reaches a shell; where pip takes the packages from (an index, a directory of
wheels) is the cluster's `pip` configuration, the operator's choice, passed to pip as quoted options, and it runs under an exclusive `flock` on
`<workdir>/envs/<hash>.lock`: two agents, or two jobs of one agent, never build the same
environment together; the second waits and then finds it ready.

The venv is built in place, in `<envdir>` itself, rather than in a temporary directory renamed at
the end: a venv records its absolute path in `bin/activate` and in the `#!` line of every script
pip installs, so a renamed venv activates the wrong directory and its scripts do not start. The
all-or-nothing guarantee comes instead from the `.ready` marker, written last under the lock: a
failed or interrupted build never has one, and the next build (under the same lock) removes what
it left before starting again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import re
import secrets
import shlex
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from cloudhpc.config import PipConfig
from cloudhpc.domain.jobs import Environment
from cloudhpc.domain.paths import resolve_path
from cloudhpc.exceptions import CloudHPCError, CommandTimeout, EnvironmentBuildError
from cloudhpc.hpc.backend import CommandRunner, FileTransfer

__all__ = [
    "RESULT_MARKER",
    "EnvSpec",
    "EnvironmentCache",
    "RunnerAndTransfer",
    "activation_lines",
    "normalise_requirement",
    "pip_source_args",
    "render_build_script",
]

SPEC_FORMAT = 1
"""Part of every hash: bump it when the build recipe changes so old environments are not reused."""

LAUNCHERS_FORMAT = 1
"""Part of the hash of a venv on a module (`system_site_packages`) since it gets launchers for the
module's console scripts (`_LAUNCHERS`): such venvs built before are not reused."""

_LAUNCHERS = r"""
import importlib.metadata, os, re, sys
bindir = os.path.dirname(sys.executable)
done = set()
eps = importlib.metadata.entry_points()
eps = eps.select(group="console_scripts") if hasattr(eps, "select") else eps.get("console_scripts", [])
for ep in eps:
    module, _, attr = ep.value.partition(":")
    attr = attr.split("[")[0].strip()
    ok = re.fullmatch(r"[A-Za-z0-9_.-]+", ep.name) and re.fullmatch(r"[A-Za-z_][\w.]*", module.strip())
    if not ok or not re.fullmatch(r"[A-Za-z_][\w.]*", attr) or ep.name in done:
        continue
    done.add(ep.name)
    target = os.path.join(bindir, ep.name)
    if os.path.lexists(target):
        continue
    with open(target, "w") as f:
        f.write(
            f"#!{sys.executable}\n# cloudhpc: {ep.name} of the module, run by this venv's Python\n"
            f"import sys\nfrom {module.strip()} import {attr.split('.')[0]}\nsys.exit({attr}())\n"
        )
    os.chmod(target, 0o755)
"""
"""Run by a venv on a module: for each console script of the packages it sees (the module's) that
the venv has not got, a launcher in `venv/bin` that runs it with the venv's Python. The module's own
scripts (`ray`, `torchrun`) start the module's Python, which does not see the venv's packages; Ray
starts its workers with the Python that ran `ray start` (`sys.executable`), so a `ray-job` on a
module saw none of the packages installed on top of it (and pip installs no script for a package the
module already has). Names are those of installed packages' metadata, checked before use."""

RESULT_MARKER = "CLOUDHPC-ENV-RESULT"
"""The build script's last word on stdout: `built <hash>`, `reused <hash>` or `failed <status>`."""

_VERSION = re.compile(r"^[0-9]+(?:\.[0-9]+){0,2}$")
_REQ_NAME = re.compile(r"^([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)(.*)$", re.DOTALL)
_LOG_TAIL_LINES = 40
_STAGE_CLEANUP_SECONDS = 10.0

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@runtime_checkable
class RunnerAndTransfer(CommandRunner, FileTransfer, Protocol):
    """What the cache needs from a cluster connection: `SSHConnection` and `LocalRunner` are both."""


def normalise_requirement(spec: str) -> str:
    """A pip requirement in a canonical spelling, so equivalent spellings hash alike.

    The project name follows PEP 503 (`Foo_Bar` is `foo-bar`), extras are lower-cased, whitespace
    in the version part goes, and a marker (after `;`) keeps single spaces. What is not a plain
    `name...` requirement (a URL, a path) only has its whitespace collapsed.
    """
    text = spec.strip()
    match = _REQ_NAME.match(text)
    if match is None:
        return " ".join(text.split())
    name, rest = match.groups()
    requirement, sep, marker = rest.partition(";")
    requirement = "".join(requirement.split())
    if requirement.startswith("["):
        extras, bracket, tail = requirement[1:].partition("]")
        if bracket:
            requirement = "[" + ",".join(sorted(e.lower() for e in extras.split(",") if e)) + "]" + tail
    canonical = re.sub(r"[-_.]+", "-", name).lower() + requirement
    if sep:
        canonical += "; " + " ".join(marker.split())
    return canonical


def pip_source_args(pip: PipConfig) -> list[str]:
    """pip's options for where packages come from, one list item per argument, from the cluster's
    configuration only (a job's spec has no say: its packages are plain requirements)."""
    args = ["--no-index"] if pip.no_index else []
    if pip.index_url:
        args += ["--index-url", pip.index_url]
    for url in pip.extra_index_urls:
        args += ["--extra-index-url", url]
    for link in pip.find_links:
        args += ["--find-links", link]
    return args


def _without_credentials(url: str) -> str:
    """A URL without its `user:password@`: a rotated mirror token is the same source."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _canonical_pip(pip: PipConfig) -> dict[str, Any]:
    return {
        "index_url": _without_credentials(pip.index_url) if pip.index_url else None,
        "extra_index_urls": [_without_credentials(u) for u in pip.extra_index_urls],
        "find_links": [_without_credentials(u) for u in pip.find_links],
        "no_index": pip.no_index,
    }


def _normalise_prelude(prelude: str) -> str:
    lines = [line.rstrip() for line in prelude.replace("\r\n", "\n").split("\n")]
    return "\n".join(lines).strip("\n")


@dataclass(frozen=True)
class EnvSpec:
    """What an environment is made of. Two specs with the same `spec_hash()` share one directory.

    Module order is kept (loading `a` then `b` may differ from `b` then `a`); packages are a set
    for pip, so they are deduplicated and sorted by their canonical spelling. `pip` is the cluster's
    package source (its configuration, never the job's); it is in the hash only when set, so the
    environments of a cluster without one keep their hashes.
    """

    modules: list[str] = field(default_factory=list)
    python: str | None = None
    packages: list[str] = field(default_factory=list)
    prelude: str = ""
    pip: PipConfig = field(default_factory=PipConfig)

    @classmethod
    def from_environment(cls, env: Environment, prelude: str = "", pip: PipConfig | None = None) -> EnvSpec:
        by_key: dict[str, str] = {}
        for spec in env.packages:
            by_key.setdefault(normalise_requirement(spec), spec.strip())
        return cls(
            modules=[m.strip() for m in env.modules],
            python=env.python.strip() if env.python else None,
            packages=[by_key[k] for k in sorted(by_key)],
            prelude=_normalise_prelude(prelude),
            pip=pip if pip is not None else PipConfig(),
        )

    @property
    def is_empty(self) -> bool:
        return not (self.modules or self.python or self.packages)

    @property
    def needs_venv(self) -> bool:
        """Modules alone need nothing built: loading them is the whole environment."""
        return bool(self.python or self.packages)

    @property
    def python_module(self) -> str | None:
        """The module that provides Python, when `python` names one rather than a version."""
        return self.python if self.python and not _VERSION.match(self.python) else None

    @property
    def interpreter(self) -> str:
        """The command that creates the venv: `python3.11` for a version, else `python3`."""
        if self.python and _VERSION.match(self.python):
            return f"python{self.python}"
        return "python3"

    @property
    def system_site_packages(self) -> bool:
        """A module's Python (or a module stack) often ships packages the user means to use."""
        return bool(self.python_module or self.modules)

    @property
    def modules_to_load(self) -> list[str]:
        return [*self.modules, *([self.python_module] if self.python_module else [])]

    def canonical(self) -> dict[str, Any]:
        canonical: dict[str, Any] = {
            "format": SPEC_FORMAT,
            "modules": [m.strip() for m in self.modules],
            "python": self.python.strip() if self.python else None,
            "packages": sorted({normalise_requirement(p) for p in self.packages}),
            "prelude": _normalise_prelude(self.prelude),
        }
        if not self.pip.is_default:
            canonical["pip"] = _canonical_pip(self.pip)
        if self.system_site_packages:
            canonical["launchers"] = LAUNCHERS_FORMAT
        return canonical

    def canonical_json(self) -> str:
        return json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    def spec_hash(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]

    def requirements_txt(self) -> str:
        """The packages as pip reads them from a file: one per line, exactly as the user wrote them."""
        return "".join(f"{p}\n" for p in self.packages)

    def summary(self) -> str:
        parts = []
        if self.modules_to_load:
            parts.append("modules " + " ".join(self.modules_to_load))
        parts.append(self.interpreter if not self.python_module else f"python from {self.python_module}")
        if self.packages:
            count = len(self.packages)
            parts.append(f"pip install {count} package{'s' if count != 1 else ''}")
        return ", ".join(parts)


def activation_lines(spec: EnvSpec, envdir: str | None) -> list[str]:
    """Batch-script lines that put a job in the environment: modules, then the venv (if any).

    A module that does not load ends the job at once (exit 97, like the wrapper's other setup
    failures) with a line saying which, after Lmod's own message: running on without it would fail
    later and less clearly (or, worse, with another Python). A modules-only environment is never
    built in advance, so this is where a misspelt module shows.
    """
    lines = [
        f"module load {shlex.quote(m)} || "
        f"{{ echo {shlex.quote(f'cloudhpc: module load {m} failed (see above)')} >&2; exit 97; }}"
        for m in spec.modules_to_load
    ]
    if envdir is not None and spec.needs_venv:
        lines.append(f"source {shlex.quote(envdir.rstrip('/') + '/venv/bin/activate')}")
    return lines


def render_build_script(spec: EnvSpec, *, envs_dir: str, stage: str) -> str:
    """The one script that builds (or, after waiting on the lock, reuses) the environment.

    Every value is a `shlex.quote`d literal; the packages are read by pip from
    `<stage>/requirements.txt`, and `spec.json` is copied from the stage as well. pip's source
    options (`pip_source_args`) come from the cluster's configuration, one quoted word each.
    """
    h = spec.spec_hash()
    q = shlex.quote
    envdir = f"{envs_dir.rstrip('/')}/{h}"

    def fail(message: str) -> str:
        return f"fail {q(message)}"

    steps: list[str] = ['fail() { echo "cloudhpc: $1" >&2; exit 1; }']
    if spec.prelude:
        steps += ["# cluster prelude", spec.prelude]
    if spec.modules_to_load:
        steps.append(
            "type module >/dev/null 2>&1 || "
            + fail(
                "modules were asked for, but the `module` command is not available here "
                "(the cluster prelude may need to set up the module system)"
            )
        )
        steps += [f"module load {q(m)} || {fail(f'module load {m} failed')}" for m in spec.modules_to_load]
    py = spec.interpreter
    steps.append(
        f"command -v {q(py)} >/dev/null 2>&1 || "
        + fail(
            f"{py} is not on PATH (after the prelude and modules): ask for a Python version installed "
            "on this host, or for a module that provides one"
        )
    )
    venv_flags = " --system-site-packages" if spec.system_site_packages else ""
    steps.append(f'{q(py)} -m venv{venv_flags} "$envdir/venv" || {fail(f"{py} -m venv failed")}')
    if spec.packages:
        sources = "".join(f"{q(arg)} " for arg in pip_source_args(spec.pip))
        steps.append(
            '"$envdir/venv/bin/python" -m pip install --disable-pip-version-check --no-input '
            f'{sources}--requirement "$stage/requirements.txt" || {fail("pip install failed")}'
        )
    if spec.system_site_packages:
        steps += [
            "# the module's console scripts (ray, torchrun) run by this venv's Python (_LAUNCHERS)",
            f"\"$envdir/venv/bin/python\" - <<'CHPC_LAUNCHERS' || {fail('launchers for the module scripts failed')}",
            _LAUNCHERS.strip("\n"),
            "CHPC_LAUNCHERS",
        ]

    # Not indented: the prelude is the cluster's own text and may hold a here-document.
    body = "\n".join(steps)
    return f"""#!/bin/bash
# cloudhpc: build of cached Python environment {h}; rendered by cloudhpc, do not edit.
# Every value here is quoted; package specifiers are only in requirements.txt, read by pip.
envdir={q(envdir)}
stage={q(stage)}
log={q(envdir + ".log")}
trap 'rm -rf "$stage"' EXIT
result() {{ echo "{RESULT_MARKER} $*"; }}
command -v flock >/dev/null 2>&1 || {{ result failed 2; echo "cloudhpc: flock is not installed here"; exit 2; }}
exec 9>>{q(envdir + ".lock")} || {{ result failed 2; echo "cloudhpc: cannot open the lock file"; exit 2; }}
flock -x 9 || {{ result failed 2; echo "cloudhpc: cannot take the lock"; exit 2; }}
if [ -f "$envdir/.ready" ]; then
  result reused {h}
  exit 0
fi
# One line per build attempt: how often this environment had to be built, and where.
printf '%s %s %s\\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "${{HOSTNAME:-unknown}}" "$$" >> {q(envdir + ".builds")}
rm -rf "$envdir"
mkdir -p "$envdir" || {{ result failed 2; echo "cloudhpc: cannot create $envdir"; exit 2; }}
(
{body}
) </dev/null >"$log" 2>&1 9>&-
status=$?
if [ "$status" -eq 0 ]; then
  cp "$stage/spec.json" "$stage/requirements.txt" "$envdir/" && touch "$envdir/.ready" || status=3
fi
if [ "$status" -ne 0 ]; then
  rm -rf "$envdir"
  result failed "$status"
  tail -n {_LOG_TAIL_LINES} "$log"
  exit 1
fi
result built {h}
"""


class EnvironmentCache:
    """Builds environments on one cluster, at most once per spec, and returns how to activate them.

    `runner` is the cluster connection (`SSHConnection`, or `LocalRunner` for the local backend).
    `workdir` is cloudhpc's directory on the cluster (relative or `~/...` means under the home
    directory); `prelude` is the cluster's prelude, part of every spec because it decides which
    Python and modules a build sees; `pip` is where the cluster's pip takes packages from, part of
    every spec for the same reason.
    """

    def __init__(
        self,
        runner: RunnerAndTransfer,
        *,
        workdir: str,
        prelude: str = "",
        pip: PipConfig | None = None,
        build_timeout: float = 3600.0,
    ) -> None:
        self._runner = runner
        self._workdir = workdir
        self._prelude = prelude
        self._pip = pip if pip is not None else PipConfig()
        self._build_timeout = build_timeout
        self._envs_dir: str | None = None
        self._builds: dict[str, _SharedBuild] = {}

    def spec(self, env: Environment) -> EnvSpec:
        return EnvSpec.from_environment(env, self._prelude, self._pip)

    async def envs_dir(self) -> str:
        """`<workdir>/envs` as an absolute path (the batch script must not depend on its cwd)."""
        if self._envs_dir is None:
            home = "" if self._workdir.startswith("/") else await self._runner.home()
            self._envs_dir = f"{resolve_path(self._workdir, home).rstrip('/')}/envs"
        return self._envs_dir

    async def envdir(self, env: Environment) -> str:
        return f"{await self.envs_dir()}/{self.spec(env).spec_hash()}"

    async def ensure(self, env: Environment, *, progress: Progress | None = None) -> list[str]:
        """Make sure the environment exists on the cluster; return its activation lines.

        Already built: one remote call (an SFTP stat of `.ready`). Empty, or modules only: no
        remote call at all. Raises `EnvironmentBuildError` (with the build log's tail) on failure.
        """
        spec = self.spec(env)
        if spec.is_empty:
            return []
        if not spec.needs_venv:
            return activation_lines(spec, None)
        envs = await self.envs_dir()
        h = spec.spec_hash()
        envdir = f"{envs}/{h}"
        lines = activation_lines(spec, envdir)
        if await self._runner.exists(f"{envdir}/.ready"):
            return lines
        await self._wait_for_build(spec, envs, progress)
        return lines

    async def _wait_for_build(self, spec: EnvSpec, envs: str, progress: Progress | None) -> None:
        """Wait for the build of `spec`: one per spec in this process, started by the first caller
        and shared by the others (other processes are kept out by the remote flock).

        A caller that is cancelled (its job was cancelled while its environment was being built)
        stops waiting at once. When no caller waits any more the build itself is cancelled, which
        stops the remote build script and the pip under it (`CommandRunner.run` signals a command
        it gives up on); a build that another job still waits for goes on.
        """
        h = spec.spec_hash()
        build = self._builds.get(h)
        if build is None or build.task.done():
            build = _SharedBuild(asyncio.create_task(self._build_unless_ready(spec, envs, progress)))
            self._builds[h] = build
            build.task.add_done_callback(functools.partial(self._forget_build, h, build))
        build.waiters += 1
        try:
            await asyncio.shield(build.task)
        finally:
            build.waiters -= 1
            if build.waiters == 0 and not build.task.done():
                log.info("environment %s: no job waits for it any more; stopping its build", h)
                build.task.cancel()

    async def _remove_stage(self, stage: str) -> None:
        try:
            await self._runner.run(["rm", "-rf", stage], timeout=_STAGE_CLEANUP_SECONDS)
        except CloudHPCError as exc:
            log.warning("could not remove the stage %s of a stopped build: %s", stage, exc)

    def _forget_build(self, h: str, build: _SharedBuild, _task: asyncio.Task[None]) -> None:
        if self._builds.get(h) is build:
            del self._builds[h]

    async def _build_unless_ready(self, spec: EnvSpec, envs: str, progress: Progress | None) -> None:
        if not await self._runner.exists(f"{envs}/{spec.spec_hash()}/.ready"):
            await self._build(spec, envs, progress)

    async def _build(self, spec: EnvSpec, envs: str, progress: Progress | None) -> None:
        h = spec.spec_hash()
        stage = f"{envs}/.stage-{h}-{secrets.token_hex(4)}"
        await self._runner.makedirs(stage, mode=0o700)
        await self._runner.write_file(
            f"{stage}/requirements.txt", spec.requirements_txt().encode(), mode=0o600
        )
        spec_json = json.dumps({**spec.canonical(), "hash": h}, indent=1, sort_keys=True) + "\n"
        await self._runner.write_file(f"{stage}/spec.json", spec_json.encode(), mode=0o600)
        script = render_build_script(spec, envs_dir=envs, stage=stage)
        await self._runner.write_file(f"{stage}/build.sh", script.encode(), mode=0o700)

        _tell(progress, f"building environment {h[:8]} ({spec.summary()})")
        started = time.monotonic()
        try:
            result = await self._runner.run(["/bin/bash", f"{stage}/build.sh"], timeout=self._build_timeout)
        except CommandTimeout as exc:
            raise EnvironmentBuildError(
                f"building environment {h} ({spec.summary()}) took more than {self._build_timeout:.0f} s; "
                f"see {envs}/{h}.log on the cluster"
            ) from exc
        except asyncio.CancelledError:
            # Stopped (no job waits for it any more). The script removes its stage itself when it
            # is signalled, but not when it is killed outright (the local runner's SIGKILL). Bounded:
            # when the whole process is shutting down, a new command may never get its answer.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._remove_stage(stage), _STAGE_CLEANUP_SECONDS)
            raise
        outcome, tail = _parse_result(result.stdout)
        took = time.monotonic() - started
        if result.exit_status == 0 and outcome == "built":
            _tell(progress, f"environment {h[:8]} ready (built in {took:.1f} s)")
            return
        if result.exit_status == 0 and outcome == "reused":
            _tell(progress, f"environment {h[:8]} ready (built meanwhile by another job)")
            return
        evidence = tail or result.stderr.strip() or result.stdout.strip() or "(no output)"
        raise EnvironmentBuildError(
            f"building environment {h} ({spec.summary()}) failed (exit {result.exit_status}); "
            f"last lines of {envs}/{h}.log:\n{evidence}"
        )


@dataclass
class _SharedBuild:
    """One running build and how many `ensure` calls wait for it."""

    task: asyncio.Task[None]
    waiters: int = 0


def _tell(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


def _parse_result(stdout: str) -> tuple[str | None, str]:
    """The build's outcome word and whatever it printed after it (the log tail, on failure)."""
    lines = stdout.splitlines()
    for index in range(len(lines) - 1, -1, -1):
        if lines[index].startswith(RESULT_MARKER + " "):
            words = lines[index].split()
            return (words[1] if len(words) > 1 else None), "\n".join(lines[index + 1 :]).strip()
    return None, ""
