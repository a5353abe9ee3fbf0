"""Fixtures most end-to-end modules share: one porter and submitter per module on the testbed.

A module-scoped fixture defined here is instantiated once per test module that uses it, so each
module still gets its own deployment (its own SQLite store and job directories) and starts it once:
each start costs seconds. A module that needs another configuration defines its own `deployment`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cloudhpc.client import Client
from tests.e2e.harness import Deployment, running
from tests.testbed import Testbed


@pytest.fixture(scope="module")
def deployment(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, testbed: Testbed
) -> Iterator[Deployment]:
    """porter and the submitter for this module, on the testbed's SLURM, with a SQLite store."""
    root = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    with running(Deployment(root / "deploy", testbed, f"sqlite:///{root / 'state.db'}")) as dep:
        yield dep


@pytest.fixture(scope="module")
def client(deployment: Deployment) -> Iterator[Client]:
    """An SDK client with the deployment's user token."""
    with deployment.client() as client:
        yield client
