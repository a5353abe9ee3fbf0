"""The cluster's `defaults` are applied once, by the agent: what a backend receives is complete."""

from __future__ import annotations

from typing import Any

from cloudhpc.config import ClusterConfig, ClusterDefaults
from cloudhpc.domain.jobs import Job, JobSpec, Resources
from cloudhpc.submitter.agent import Agent
from tests.jobs import job_from


def job(**body: Any) -> Job:
    return job_from(JobSpec.model_validate({"name": "j", "cluster": "c", **body}))


def agent() -> Agent:
    config = ClusterConfig(
        backend="local", defaults=ClusterDefaults(partition="debug", account="proj", time="00:10:00")
    )
    # staging reads neither the backend nor the channel
    return Agent("c", config, backend=None, channel=None, workdir="/w")  # type: ignore[arg-type]


async def test_a_batch_job_gets_the_cluster_defaults_where_it_names_none() -> None:
    submission = await agent().staging.prepare(job(script="true\n", resources={"time": "5", "nodes": 2}))
    assert submission.resources == Resources(nodes=2, time="5", partition="debug", account="proj")
    assert submission.spec.resources == Resources(nodes=2, time="5")  # the spec stays as sent


async def test_a_ray_job_gets_them_too_with_its_node_count() -> None:
    ray = {"entrypoint": "python -c 1", "workers": {"nodes": 1}}
    submission = await agent().staging.prepare(job(kind="ray-job", ray=ray))
    assert submission.resources == Resources(nodes=2, time="00:10:00", partition="debug", account="proj")
