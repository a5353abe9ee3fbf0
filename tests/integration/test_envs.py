"""Cached environments built for real: on the testbed's login node over SSH, and on this machine.

Each test gets its own work directory (`~/.cloudhpc-test/<uuid>` on the testbed, a pytest tmp dir
locally) and removes it afterwards. Remote calls are counted by a thin wrapper that forwards every
call to the real connection, to prove what the fast path costs.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import shlex
import uuid
import zipfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from cloudhpc.config import PipConfig, SSHConfig
from cloudhpc.domain.jobs import Environment
from cloudhpc.exceptions import EnvironmentBuildError
from cloudhpc.hpc.backend import CommandResult
from cloudhpc.hpc.envs import EnvironmentCache, RunnerAndTransfer
from cloudhpc.hpc.local import LocalRunner
from cloudhpc.hpc.ssh import SSHConnection

SIX = Environment(packages=["six"])
BROKEN = Environment(packages=["cloudhpc-no-such-package-zzz"])


class CountingRunner:
    """Forwards to a real runner and counts the calls that reach the cluster."""

    def __init__(self, inner: RunnerAndTransfer) -> None:
        self.inner = inner
        self.calls: list[str] = []

    async def run(
        self, argv: Sequence[str], *, stdin: str | None = None, timeout: float | None = None
    ) -> CommandResult:
        self.calls.append(f"run {shlex.join(argv)}")
        return await self.inner.run(argv, stdin=stdin, timeout=timeout)

    async def home(self) -> str:
        self.calls.append("home")
        return await self.inner.home()

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        self.calls.append(f"write {path}")
        await self.inner.write_file(path, data, mode=mode)

    async def read_file(self, path: str, *, offset: int = 0, length: int | None = None) -> bytes:
        self.calls.append(f"read {path}")
        return await self.inner.read_file(path, offset=offset, length=length)

    async def exists(self, path: str) -> bool:
        self.calls.append(f"exists {path}")
        return await self.inner.exists(path)

    async def size(self, path: str) -> int | None:
        self.calls.append(f"size {path}")
        return await self.inner.size(path)

    async def makedirs(self, path: str, *, mode: int = 0o700) -> None:
        self.calls.append(f"makedirs {path}")
        await self.inner.makedirs(path, mode=mode)


@dataclass
class Site:
    """A cluster connection and a fresh, absolute work directory on it."""

    runner: RunnerAndTransfer
    workdir: str

    def cache(self, runner: RunnerAndTransfer | None = None) -> EnvironmentCache:
        return EnvironmentCache(runner or self.runner, workdir=self.workdir, build_timeout=300)

    async def text(self, path: str) -> str:
        return (await self.runner.read_file(path)).decode()

    async def listing(self, path: str) -> list[str]:
        result = await self.runner.run(["ls", "-A", path])
        assert result.ok, result
        return result.stdout.split()


@pytest.fixture(params=["ssh", "local"])
async def site(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Site]:
    if request.param == "local":
        yield Site(LocalRunner(home=tmp_path), str(tmp_path / "work dir"))
        return
    testbed_ssh: SSHConfig = request.getfixturevalue("testbed_ssh")
    async with SSHConnection(testbed_ssh, cluster="testbed") as ssh:
        workdir = f"{await ssh.home()}/.cloudhpc-test/{uuid.uuid4()} dir"
        try:
            yield Site(ssh, workdir)
        finally:
            await ssh.run(["rm", "-rf", workdir])


async def test_first_ensure_builds_then_one_call_suffices(site: Site) -> None:
    messages: list[str] = []
    cache = site.cache()
    lines = await cache.ensure(SIX, progress=messages.append)
    envdir = await cache.envdir(SIX)
    assert lines == [f"source {shlex.quote(envdir + '/venv/bin/activate')}"]
    assert messages[0].startswith(f"building environment {envdir[-16:][:8]} (python3, pip install 1 package)")
    assert "ready (built in" in messages[-1]
    assert {".ready", "spec.json", "requirements.txt", "venv"} <= set(await site.listing(envdir))
    assert (await site.text(f"{envdir}/requirements.txt")) == "six\n"
    assert len((await site.text(f"{envdir}.builds")).splitlines()) == 1
    assert not [n for n in await site.listing(await cache.envs_dir()) if n.startswith(".stage-")]

    # The activation lines really put a job in the environment.
    probe = "\n".join([*lines, "python -c 'import six, sys; print(sys.prefix); print(six.__file__)'"])
    result = await site.runner.run(["/bin/bash", "-c", probe])
    assert result.ok, result
    prefix, module = result.stdout.splitlines()
    assert prefix == f"{envdir}/venv"
    assert module.startswith(f"{envdir}/venv/")

    # Fast path, from a fresh cache (a restarted agent): exactly one remote call, nothing built.
    counting = CountingRunner(site.runner)
    messages.clear()
    assert await site.cache(counting).ensure(SIX, progress=messages.append) == lines
    assert counting.calls == [f"exists {envdir}/.ready"]
    assert messages == []
    assert len((await site.text(f"{envdir}.builds")).splitlines()) == 1


async def test_concurrent_ensures_build_once(site: Site) -> None:
    # Two caches stand for two agents (or two processes): only the remote flock keeps them apart.
    first, second = site.cache(), site.cache()
    said: list[str] = []
    lines = await asyncio.gather(
        first.ensure(SIX, progress=said.append),
        second.ensure(SIX, progress=said.append),
    )
    assert lines[0] == lines[1]
    envdir = await first.envdir(SIX)
    assert len((await site.text(f"{envdir}.builds")).splitlines()) == 1
    assert sum("built in" in m for m in said) == 1
    assert sum("built meanwhile by another job" in m for m in said) == 1
    # And within one cache, concurrent calls share the build as well.
    third = site.cache()
    assert list(await asyncio.gather(third.ensure(SIX), third.ensure(SIX))) == [lines[0], lines[0]]
    assert len((await site.text(f"{envdir}.builds")).splitlines()) == 1


async def test_failed_build_leaves_nothing_to_reuse(site: Site) -> None:
    cache = site.cache()
    envdir = await cache.envdir(BROKEN)
    envs = await cache.envs_dir()
    with pytest.raises(EnvironmentBuildError) as caught:
        await cache.ensure(BROKEN)
    message = str(caught.value)
    assert "pip install failed" in message
    assert "cloudhpc-no-such-package-zzz" in message  # pip's own words, from the log tail
    assert not await site.runner.exists(envdir)
    assert not [n for n in await site.listing(envs) if n.startswith(".stage-")]
    # Nothing was kept: the next attempt builds again (and fails again).
    with pytest.raises(EnvironmentBuildError):
        await site.cache().ensure(BROKEN)
    assert len((await site.text(f"{envdir}.builds")).splitlines()) == 2
    assert not await site.runner.exists(envdir)


async def test_missing_python_version_fails_clearly(site: Site) -> None:
    with pytest.raises(EnvironmentBuildError, match=r"python3\.99 is not on PATH"):
        await site.cache().ensure(Environment(python="3.99"))


def slow_build(site: Site) -> tuple[EnvironmentCache, str]:
    """A cache whose builds hang (the cluster prelude, which runs inside the build, sleeps as
    `exec sleep 300`, its PID in a file): a cache and the PID file."""
    pidfile = f"{site.workdir}/build-{uuid.uuid4().hex[:8]}.pid"
    prelude = f"echo $BASHPID > {shlex.quote(pidfile)}\nexec sleep 300"
    return EnvironmentCache(site.runner, workdir=site.workdir, prelude=prelude, build_timeout=600), pidfile


async def build_pid(site: Site, pidfile: str, timeout: float = 60) -> str:
    """The PID of the hanging build step, once it runs."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await site.runner.exists(pidfile) or not (await site.text(pidfile)).strip():
        assert asyncio.get_running_loop().time() < deadline, "the build never started"
        await asyncio.sleep(0.1)
    return (await site.text(pidfile)).strip()


async def alive(site: Site, pid: str) -> bool:
    return (await site.runner.run(["kill", "-0", pid])).ok


async def gone_within(site: Site, pid: str, seconds: float) -> bool:
    deadline = asyncio.get_running_loop().time() + seconds
    while await alive(site, pid):
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


async def no_stage_within(site: Site, cache: EnvironmentCache, seconds: float) -> bool:
    """The stopped build's stage directory is removed (by the script, or after it by the cache)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while [n for n in await site.listing(await cache.envs_dir()) if n.startswith(".stage-")]:
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


async def test_cancelling_the_only_wait_stops_the_build(site: Site) -> None:
    """A job cancelled while its environment is built must not leave pip running on the login
    node for as long as it takes (issue 12): the caller gives up at once and the build stops."""
    cache, pidfile = slow_build(site)
    waiting = asyncio.create_task(cache.ensure(SIX))
    try:
        pid = await build_pid(site, pidfile)
        assert await alive(site, pid)
    finally:
        waiting.cancel()
    started = asyncio.get_running_loop().time()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert asyncio.get_running_loop().time() - started < 5
    assert await gone_within(site, pid, 15), f"the build step {pid} still runs"
    envdir = await cache.envdir(SIX)
    assert not await site.runner.exists(f"{envdir}/.ready")
    # the lock is free again: nothing of the stopped build holds it
    assert (await site.runner.run(["flock", "-n", f"{envdir}.lock", "true"])).ok
    assert await no_stage_within(site, cache, 10)


async def test_a_build_another_job_waits_for_goes_on(site: Site) -> None:
    cache, pidfile = slow_build(site)
    first = asyncio.create_task(cache.ensure(SIX))
    second = asyncio.create_task(cache.ensure(SIX))
    try:
        pid = await build_pid(site, pidfile)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await asyncio.sleep(1)
        assert await alive(site, pid), "one job's cancel stopped the build another job waits for"
        assert not second.done()
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        assert await gone_within(site, pid, 15), f"the build step {pid} still runs"
        assert await no_stage_within(site, cache, 10)
    finally:  # a failed check must not leave a build behind
        for task in (first, second):
            task.cancel()
        await asyncio.gather(first, second, return_exceptions=True)


def tiny_wheel(module: str, version: str, value: str) -> tuple[str, bytes]:
    """A pure-Python wheel of one module `module` with `VALUE = value`: (file name, bytes). Made here,
    so it is on no index: only the cluster's find_links can provide it."""
    dist_info = f"{module}-{version}.dist-info"
    files = {
        f"{module}.py": f"VALUE = {value!r}\n".encode(),
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {module}\nVersion: {version}\n".encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: cloudhpc-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}"
        for path, data in files.items()
    ]
    files[f"{dist_info}/RECORD"] = ("\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n").encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as wheel:
        for path, data in files.items():
            wheel.writestr(path, data)
    return f"{module}-{version}-py3-none-any.whl", buffer.getvalue()


async def test_packages_come_from_the_clusters_pip_section(site: Site) -> None:
    """`clusters.<name>.pip` (no_index + find_links): a package that is on no index, in a directory of
    wheels on the cluster, named by the job as a plain requirement, is built from there and nowhere
    else; the section is in the environment's hash and its spec.json."""
    module = f"cloudhpc_probe_{uuid.uuid4().hex[:8]}"
    value = f"built from the site's wheels {uuid.uuid4().hex[:6]}"
    filename, data = tiny_wheel(module, "1.0", value)
    wheels = f"{site.workdir}/site wheels"  # a path with a space: one quoted argument
    await site.runner.makedirs(wheels)
    await site.runner.write_file(f"{wheels}/{filename}", data)

    pip = PipConfig(no_index=True, find_links=[wheels])
    env = Environment(packages=[f"{module.replace('_', '-')}==1.0"])
    cache = EnvironmentCache(site.runner, workdir=site.workdir, pip=pip, build_timeout=300)
    lines = await cache.ensure(env)
    envdir = await cache.envdir(env)
    assert envdir != await site.cache().envdir(env)  # without the section: another environment

    probe = "\n".join([*lines, f"python -c 'import {module}; print({module}.VALUE)'"])
    result = await site.runner.run(["/bin/bash", "-c", probe])
    assert result.ok, result
    assert result.stdout.strip() == value
    spec = json.loads(await site.text(f"{envdir}/spec.json"))
    assert spec["pip"] == {
        "index_url": None,
        "extra_index_urls": [],
        "find_links": [wheels],
        "no_index": True,
    }
    log = await site.text(f"{envdir}.log")
    # (the local runner also passes on this process's own PIP_FIND_LINKS, if any)
    (links,) = [line for line in log.splitlines() if line.startswith("Looking in links: ")]
    assert wheels in links.removeprefix("Looking in links: ").split(", "), log
    assert "Looking in indexes" not in log, log
    # A fresh cache of the same cluster finds it ready: one check, nothing built.
    counting = CountingRunner(site.runner)
    assert await EnvironmentCache(counting, workdir=site.workdir, pip=pip).ensure(env) == lines
    assert counting.calls == [f"exists {envdir}/.ready"]
