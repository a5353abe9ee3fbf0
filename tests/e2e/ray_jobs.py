"""The Ray job specs that the Ray e2e tests and the Ray bridge bench submit to the testbed."""

from __future__ import annotations

from typing import Any

import ray

RAY_ENV = {"packages": [f"ray[default]=={ray.__version__}"]}
"""The same version as this process's JobSubmissionClient; one cached environment for every test."""
NODE = {"cpus_per_task": 1, "mem": "1G"}


def ray_spec(name: str, kind: str, cluster: str = "testbed", **ray_fields: Any) -> dict[str, Any]:
    """A `kind` ("ray-cluster" or "ray-job") spec for `cluster`: a small head, `ray_fields` added."""
    return {
        "name": name,
        "cluster": cluster,
        "kind": kind,
        "ray": {"head": NODE, **ray_fields},
        "resources": {"time": "00:10:00"},
        "environment": RAY_ENV,
    }
