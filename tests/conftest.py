from __future__ import annotations

import pytest

from cloudhpc.config import SSHConfig
from tests import deep_tree
from tests.slurm_jobs import ssh_config
from tests.testbed import Testbed, load_testbed
from tests.topology import Topology, load_topology


@pytest.fixture(scope="session", autouse=True)
def _no_deep_trees_from_earlier_sessions(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Before this session ends (when pytest deletes old sessions' directories, recursively), remove
    the trees deeper than the recursion limit that earlier sessions left: each one fails the run."""
    deep_tree.remove_left_behind(tmp_path_factory.getbasetemp().parent)


@pytest.fixture(scope="session")
def testbed() -> Testbed:
    """The real testbed; fails the test (never skips) when `scripts/testbed.sh up` has not run."""
    return load_testbed()


@pytest.fixture(scope="session")
def testbed_ssh(testbed: Testbed) -> SSHConfig:
    """SSH settings for the testbed's login node, with the host key pinned."""
    return ssh_config(testbed)


HOSTILE_STRINGS = [
    "$(touch /tmp/pwned)",
    "`touch /tmp/pwned`",
    "a; touch /tmp/pwned",
    "line1\nline2; touch /tmp/pwned",
    "'single' \"double\" \\back",
    "spaces  and\ttabs",
    "&& rm -rf ~ ||",
    "../../etc/passwd",
    "${HOME}",
    "*",
]
"""Strings that would execute something if they ever reached a shell unquoted."""


@pytest.fixture(scope="session")
def topology() -> Topology:
    """The multi-host topology (scripts/topology.sh); fails the test (never skips) when it is not up."""
    return load_topology()
