"""Estimates and billing (#15 item 3): the cost arithmetic, the choice of the earliest partition,
the units billed after the end, the billing configuration's refusals, the `sbatch --test-only`
argv (the submission's own) and the agent's answers to an estimate query and to `partition: auto`."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from cloudhpc.config import ClusterConfig
from cloudhpc.domain.billing import (
    BillingConfig,
    PartitionEstimate,
    PartitionRates,
    PredictedStart,
    UsageRow,
    billed_units,
    choose_earliest,
    requested_usage,
    with_costs,
)
from cloudhpc.domain.jobs import Job, JobSpec, Resources
from cloudhpc.domain.queries import AgentQuery
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import ParseError, SchedulerCommandError, StagingError
from cloudhpc.hpc.backend import CommandResult, JobPaths, JobSubmission
from cloudhpc.hpc.slurm.estimate import STUB_SCRIPT, SbatchTestOnly, parse_test_only
from cloudhpc.hpc.slurm.submit import Sbatch
from cloudhpc.porter.web_render import job_page
from cloudhpc.submitter.estimates import choose_partition
from cloudhpc.submitter.queries import answer_query
from tests.recordings import load_recording, recording_meta

PUHTI = BillingConfig(
    unit="BU",
    partitions={
        "small": PartitionRates(cpu_hour=1, mem_gib_hour=0.1),
        "gpu": PartitionRates(cpu_hour=1, mem_gib_hour=0.1, gpu_hour=60),
    },
)
T0 = datetime(2026, 12, 5, 18, 0, tzinfo=UTC)


def cost(resources: Resources, partition: str = "gpu", array: str | None = None) -> float | None:
    [estimate] = with_costs(resources, array, [PredictedStart(partition=partition, start=T0)], PUHTI)
    return estimate.cost


def test_cost_is_rates_times_what_the_job_holds_times_its_time_limit() -> None:
    # 4 tasks x 2 CPUs = 8 core-hours/h, 8 GiB x 0.1, 2 GPUs x 60: 128.8 BU per hour, for 2 hours
    resources = Resources(ntasks=4, cpus_per_task=2, mem="8G", gpus="a100:2", time="02:00:00")
    assert cost(resources) == pytest.approx(257.6)
    # the same on a partition without GPU rates: the GPUs cost nothing there
    assert cost(resources, "small") == pytest.approx(2 * (8 + 0.8))


@pytest.mark.parametrize(
    ("resources", "cpus", "gpus", "gib"),
    [
        (Resources(time="60"), 1, 0, 0),
        (Resources(nodes=2, ntasks_per_node=4, time="60"), 8, 0, 0),
        (Resources(nodes=2, cpus_per_task=3, mem="1G", time="60"), 6, 0, 2),
        (Resources(ntasks=3, mem_per_cpu="512M", time="60"), 3, 0, 1.5),
        (Resources(nodes=2, gpus_per_node=4, time="60"), 2, 8, 0),
        (Resources(nodes=2, gres="gpu:v100:2", time="60"), 2, 4, 0),
        (Resources(gres="gpu", time="60"), 1, 1, 0),
    ],
)
def test_what_resources_ask_for(resources: Resources, cpus: int, gpus: int, gib: float) -> None:
    usage = requested_usage(resources)
    assert usage is not None
    assert (usage.cpus, usage.gpus, usage.mem_bytes / 2**30, usage.seconds) == (cpus, gpus, gib, 3600)


def test_an_array_costs_each_task_and_no_time_limit_no_cost() -> None:
    one = cost(Resources(time="30"), "small")
    assert one == pytest.approx(0.5)
    assert cost(Resources(time="30"), "small", array="0-9%2") == pytest.approx(5.0)
    assert cost(Resources(), "small") is None
    assert cost(Resources(time="30"), "nosuch") is None  # no rates for that partition


def test_the_earliest_start_wins_then_the_cheaper_then_the_first() -> None:
    def e(partition: str, minutes: int | None, cost: float | None = None, error: str | None = None) -> Any:
        start = None if minutes is None else T0 + timedelta(minutes=minutes)
        return PartitionEstimate(partition=partition, start=start, cost=cost, error=error)

    assert choose_earliest([e("a", 10), e("b", 5), e("c", 7)]).partition == "b"  # type: ignore[union-attr]
    assert choose_earliest([e("a", 5, 3.0), e("b", 5, 2.0)]).partition == "b"  # type: ignore[union-attr]
    assert choose_earliest([e("a", 5), e("b", 5)]).partition == "a"  # type: ignore[union-attr]
    assert choose_earliest([e("a", None, error="refused"), e("b", 60)]).partition == "b"  # type: ignore[union-attr]
    assert choose_earliest([e("a", None, error="refused")]) is None


def row(**fields: Any) -> UsageRow:
    base: dict[str, Any] = {
        "partition": "gpu",
        "elapsed_seconds": 1800,
        "alloc_cpus": 4,
        "nodes": 1,
        "mem_bytes": 4 << 30,
        "alloc_tres": "billing=4,cpu=4,gres/gpu=1,mem=4G,node=1",
        "billing": 4.0,
    }
    return UsageRow(**(base | fields))


def test_billed_units_from_the_rates_and_the_elapsed_time() -> None:
    # half an hour of 4 cores, 4 GiB and 1 GPU: (4 + 0.4 + 60) / 2
    billed = billed_units([row()], PUHTI)
    assert billed is not None
    assert (billed.units, billed.unit, billed.source) == (pytest.approx(32.2), "BU", "rates")
    # an array: its tasks' allocations add up
    assert billed_units([row(), row(partition="small", alloc_tres="cpu=4")], PUHTI).units == pytest.approx(  # type: ignore[union-attr]
        32.2 + 2.2
    )


def test_billed_units_from_sacct_billing_tres_where_the_site_converts_it() -> None:
    config = PUHTI.model_copy(update={"billing_tres_hour": 1.5})
    billed = billed_units([row(billing=10.0)], config)
    assert billed is not None
    assert (billed.units, billed.source) == (pytest.approx(10 * 0.5 * 1.5), "sacct")
    # a row without the TRES: every row from the rates instead
    assert billed_units([row(billing=None)], config).source == "rates"  # type: ignore[union-attr]


def test_no_billed_units_without_rates_or_elapsed_time() -> None:
    assert billed_units([row()], None) is None
    assert billed_units([row(partition="other")], PUHTI) is None
    assert billed_units([row(elapsed_seconds=None)], PUHTI) is None


@pytest.mark.parametrize(
    ("billing", "field"),
    [
        ({"partitions": {}}, "billing.partitions"),
        ({"partitions": {"small": {"cpu_hour": -1}}}, "cpu_hour"),
        ({"partitions": {"small": {"cpu_hr": 1}}}, "cpu_hr"),
        ({"unit": "", "partitions": {"small": {}}}, "unit"),
        ({"partitions": {"medium": {"cpu_hour": 1}}}, "medium not among limits.partitions"),
    ],
)
def test_a_bad_billing_configuration_is_refused_naming_the_key(billing: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        ClusterConfig.model_validate(
            {"backend": "local", "billing": billing, "limits": {"partitions": {"small": {}}}}
        )


def test_test_only_is_the_submission_argv_with_test_only_and_the_script_on_stdin() -> None:
    job_id = uuid.uuid4()
    sbatch = Sbatch(
        job_id=job_id,
        paths=JobPaths("/home/u/.cloudhpc", job_id),
        resources=Resources(partition="small", time="10", mem="1G"),
        array="0-3",
    )
    real = sbatch.argv()
    asked = SbatchTestOnly(sbatch, "gpu").argv()
    assert asked[:3] == ["env", "SLURM_TIME_FORMAT=%s", "TZ=UTC"]
    assert asked[3:5] == ["sbatch", "--test-only"]
    assert asked[5:] == [a.replace("--partition=small", "--partition=gpu") for a in real[1:-1]]
    assert SbatchTestOnly(sbatch).argv()[5:] == real[1:-1]


class Predicting:
    """A backend whose `estimate` predicts a start per partition (None: SLURM refuses it)."""

    def __init__(self, minutes: dict[str | None, int | None]) -> None:
        self.minutes = minutes
        self.asked: list[tuple[JobSubmission, list[str | None]]] = []

    async def estimate(
        self, submission: JobSubmission, partitions: Sequence[str | None]
    ) -> list[PredictedStart]:
        self.asked.append((submission, list(partitions)))
        out = []
        for p in partitions:
            m = self.minutes.get(p)
            out.append(
                PredictedStart(partition=p, error="Requested node configuration is not available")
                if m is None
                else PredictedStart(partition=p, start=T0 + timedelta(minutes=m), processors=1, nodes="n1")
            )
        return out


CONFIG = ClusterConfig.model_validate(
    {
        "backend": "local",
        "defaults": {"time": "01:00:00"},
        "limits": {"partitions": {"small": {"max_time": "02:00:00"}, "gpu": {}, "test": {"max_time": "15"}}},
        "billing": PUHTI.model_dump(),
    }
)


def estimate_query(spec: dict[str, Any]) -> AgentQuery:
    return AgentQuery(id=uuid.uuid4(), cluster="c", kind="estimate", params={"spec": spec})


def test_the_agent_answers_an_estimate_for_each_allowed_partition_the_job_fits() -> None:
    backend = Predicting({"small": 30, "gpu": 5})
    spec = {"name": "j", "cluster": "c", "script": "true", "resources": {"cpus_per_task": 2}}
    answer = asyncio.run(answer_query(backend, estimate_query(spec), CONFIG))  # type: ignore[arg-type]
    assert answer.error is None
    assert answer.result is not None
    [(submission, asked)] = backend.asked
    assert asked == ["small", "gpu"]  # `test` allows 15 minutes, the default time is an hour
    assert submission.resources.time == "01:00:00"  # the cluster's defaults, as the stager applies them
    result = answer.result
    assert (result["earliest"], result["unit"], result["requested"]) == ("gpu", "BU", None)
    assert [(p["partition"], p["cost"]) for p in result["partitions"]] == [("small", 2.0), ("gpu", 2.0)]


@pytest.mark.parametrize(
    ("config", "status"),
    [(None, 501), (ClusterConfig(backend="local"), 422)],
    ids=["no configuration", "auto without partitions"],
)
def test_an_estimate_the_agent_cannot_make_is_an_error_answer(
    config: ClusterConfig | None, status: int
) -> None:
    spec = {"name": "j", "cluster": "c", "script": "true", "resources": {"partition": "auto"}}
    answer = asyncio.run(answer_query(Predicting({}), estimate_query(spec), config))  # type: ignore[arg-type]
    assert answer.error is not None
    assert answer.error.status == status, answer


def test_a_bad_spec_in_an_estimate_query_is_a_422() -> None:
    answer = asyncio.run(answer_query(Predicting({}), estimate_query({"name": "j"}), CONFIG))  # type: ignore[arg-type]
    assert answer.error is not None
    assert answer.error.status == 422


def auto_submission() -> JobSubmission:
    spec = JobSpec(name="j", cluster="c", script="true", resources=Resources(partition="auto"))
    return JobSubmission(
        job_id=uuid.uuid4(), spec=spec, resources=Resources(partition="auto", time="01:00:00")
    )


def test_partition_auto_takes_the_earliest_and_says_why() -> None:
    submission, reason = asyncio.run(
        choose_partition(Predicting({"small": 30, "gpu": 5}), CONFIG, "c", auto_submission())  # type: ignore[arg-type]
    )
    assert submission.resources.partition == "gpu"
    assert reason.startswith("partition auto: gpu, the earliest predicted start of ")
    assert "small 2026-12-05T18:30:00Z, 1 BU" in reason
    assert "gpu 2026-12-05T18:05:00Z" in reason


def test_partition_auto_fails_the_job_when_slurm_takes_it_nowhere() -> None:
    with pytest.raises(StagingError, match=r"no allowed partition.*small: Requested node configuration"):
        asyncio.run(choose_partition(Predicting({}), CONFIG, "c", auto_submission()))  # type: ignore[arg-type]


def test_test_only_as_the_testbed_answered_it() -> None:
    recorded = recording_meta("sbatch_test_only")
    prediction = parse_test_only(load_recording("sbatch_test_only"), None)
    assert prediction.error is None
    assert prediction.partition == "debug"  # the testbed's default: SLURM names it
    assert prediction.start is not None
    assert prediction.start.tzinfo is not None
    assert prediction.processors == 2
    assert prediction.nodes
    assert recorded["stdin"] == STUB_SCRIPT
    assert recorded["argv"][:5] == ["env", "SLURM_TIME_FORMAT=%s", "TZ=UTC", "sbatch", "--test-only"]


def test_a_test_only_refusal_is_the_partitions_error() -> None:
    prediction = parse_test_only(load_recording("sbatch_test_only_refused"), "nosuchpartition")
    assert (prediction.partition, prediction.start) == ("nosuchpartition", None)
    assert prediction.error is not None
    assert "invalid partition" in prediction.error.lower()


def test_test_only_in_local_time_and_an_unreachable_controller() -> None:
    line = "sbatch: Job 9 to start at 2026-12-05T18:20:00 using 4 processors on nodes n[1-2] in partition p\n"
    prediction = parse_test_only(CommandResult(argv=("sbatch",), exit_status=0, stdout="", stderr=line), None)
    assert (prediction.start, prediction.processors, prediction.nodes, prediction.partition) == (
        datetime(2026, 12, 5, 18, 20, tzinfo=UTC),
        4,
        "n[1-2]",
        "p",
    )
    down = CommandResult(
        argv=("sbatch",), exit_status=1, stdout="", stderr="sbatch: error: Unable to contact slurm controller"
    )
    with pytest.raises(SchedulerCommandError):
        parse_test_only(down, "p")
    with pytest.raises(ParseError):
        parse_test_only(CommandResult(argv=("sbatch",), exit_status=0, stdout="", stderr="huh"), "p")


def test_the_job_page_shows_the_billed_units_escaped() -> None:
    spec = JobSpec(name="j", cluster="c", script="true")
    job = Job(
        id=uuid.uuid4(),
        name="j",
        owner="alice",
        cluster="c",
        kind=spec.kind,
        state=JobState.COMPLETED,
        created_at=T0,
        spec=spec,
    )

    def page(accounting: dict[str, Any]) -> str:
        return job_page(
            job, reached={}, tasks=None, accounting=accounting, artifacts=[], nonce="n", user="alice"
        )

    billed = {"units": 32.2, "unit": "<b>BU", "source": "rates"}
    shown = page({"records": [], "efficiency": {}, "billed": billed})
    assert (
        '<p id="billed">32.2 &lt;b&gt;BU <span class="muted">(the cluster&#x27;s rates)</span></p>' in shown
    )
    assert 'id="billed"' not in page({"records": [], "efficiency": {}})
