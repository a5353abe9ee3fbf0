"""The KFP components' `hpc_job` parameter takes the typed SLURM options of #13 item 2 like a job
spec does: they reach the training job's spec, and a bad value fails the step naming the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cloudhpc.domain.jobs import JobSpec
from cloudhpc.pipelines.fmnist.hpc_job import HpcJob
from cloudhpc.pipelines.fmnist.steps import training_job_spec
from cloudhpc.pipelines.fmnist.train import HParams

OPTIONS = {
    "qos": "normal",
    "constraint": "a100",
    "gres": "gpu:a100:1",
    "exclusive": True,
    "reservation": "training",
    "mail_type": "END,FAIL",
    "mail_user": "alice@example.org",
    "signal": "B:USR1@120",
    "licenses": "matlab:1",
}


def test_typed_options_in_hpc_job_reach_the_training_spec() -> None:
    job = HpcJob.from_parameter({"resources": OPTIONS})
    spec = JobSpec.model_validate(
        training_job_spec(
            name="fmnist-train",
            cluster="testbed",
            train_url="s3://bucket/t.npz",
            run_id="r",
            hp=HParams(),
            hpc_job=job,
            job_tracking_uri="http://mlflow",
        )
    )
    assert spec.resources.model_dump(include=set(OPTIONS)) == OPTIONS
    assert spec.resources.time == "00:30:00"  # the defaults of HPC_JOB stay for what is not given


@pytest.mark.parametrize(("field", "value"), [("gres", "gpu::1"), ("signal", "USR1@x"), ("qos", "a b")])
def test_a_bad_option_in_hpc_job_names_the_field(field: str, value: str) -> None:
    with pytest.raises(ValidationError) as exc:
        HpcJob.from_parameter({"resources": {field: value}})
    assert [e["loc"] for e in exc.value.errors()] == [("resources", field)]
