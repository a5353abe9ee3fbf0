"""The one rule for `~` and relative work directories, and the one for memory units."""

from __future__ import annotations

from uuid import UUID

import pytest

from cloudhpc.domain.jobs import Resources, parse_mem
from cloudhpc.domain.paths import JobPaths, resolve_path


@pytest.mark.parametrize(
    ("workdir", "expected"),
    [
        ("~/.cloudhpc", "/home/u/.cloudhpc"),
        ("~", "/home/u"),
        ("~/", "/home/u"),
        ("rel/dir", "/home/u/rel/dir"),
        ("rel/dir/", "/home/u/rel/dir"),
        ("/scratch/p/", "/scratch/p"),
        ("/", "/"),
    ],
)
def test_workdir_resolves_against_the_home_directory(workdir: str, expected: str) -> None:
    assert resolve_path(workdir, "/home/u/") == expected


def test_a_local_relative_workdir_starts_from_the_given_directory() -> None:
    assert resolve_path(".cloudhpc/local", "/home/u", relative_to="/srv/x") == "/srv/x/.cloudhpc/local"
    assert resolve_path("~/w", "/home/u", relative_to="/srv/x") == "/home/u/w"
    assert resolve_path("x", "/") == "/x"


def test_job_paths_live_under_the_resolved_workdir() -> None:
    job = UUID(int=1)
    paths = JobPaths(resolve_path("~/w/", "/home/u"), job)
    assert paths.jobdir == f"/home/u/w/jobs/{job}"
    assert paths.batch_script == f"/home/u/w/jobs/{job}/.cloudhpc/job.sh"
    assert paths.output == f"/home/u/w/jobs/{job}/.cloudhpc/output.log"


def test_memory_units_are_slurms() -> None:
    assert parse_mem("4000") == 4000 * 2**20  # a bare number is megabytes
    assert parse_mem("512K") == 512 * 2**10
    assert parse_mem("16G") == 16 * 2**30
    assert parse_mem("1T") == 2**40
    assert Resources(mem="2G").mem_bytes == 2 * 2**30
    assert Resources().mem_bytes is None
