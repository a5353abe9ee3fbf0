"""The store's side of job arrays and dependencies (#13 items 3, 4), on SQLite and on the testbed's
PostgreSQL: migration 0003 from 0002 with rows in place, tasks replaced by reports, task cancel
requests offered to the agent until it reports them done, and dependents held in `pending` until
every job they wait for has a SLURM id (or ended, failing the ones that can never run)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from alembic import command
from alembic.config import Config
from sqlalchemy import text

from cloudhpc.domain.arrays import TaskObservation
from cloudhpc.domain.jobs import JobSpec
from cloudhpc.domain.reports import JobReport
from cloudhpc.domain.states import JobState
from cloudhpc.metrics.porter import PorterMetrics
from cloudhpc.store import Store
from tests.integration.test_store import empty_url  # noqa: F401  (the fixture: a database without schema)


def spec(name: str = "j", **fields: object) -> JobSpec:
    return JobSpec.model_validate({"name": name, "cluster": "testbed", "script": "echo hi"} | fields)


def test_migration_0003_adds_the_task_columns_to_existing_jobs(empty_url: str) -> None:  # noqa: F811
    store = Store(empty_url)

    def to(revision: str, move: Callable[[Config, str], None] = command.upgrade) -> None:
        config = store.alembic_config()
        with store.engine.begin() as conn:
            config.attributes["connection"] = conn
            move(config, revision)

    try:
        to("0002")
        with store.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO jobs (id, owner, cluster, name, kind, state, created_at, updated_at, spec)"
                    " VALUES ('00000000-0000-4000-8000-000000000001', 'alice', 'testbed', 'old', 'batch',"
                    " 'pending', :t, :t, :spec)"
                ),
                {"t": datetime.now(UTC), "spec": spec("old").model_dump_json()},
            )
        store.migrate()
        (old,) = store.claim_work("testbed", "agent-1")
        assert old.name == "old"
        assert old.cancel_tasks == []
        assert store.job_tasks(old.id) is None
        to("0002", command.downgrade)
        to("head")
        assert store.job_tasks(old.id) is None
    finally:
        store.close()


def test_tasks_are_replaced_by_each_report(store: Store) -> None:
    job, _ = store.create_job("alice", spec(array="0-2"))
    now = datetime.now(UTC)
    first = [TaskObservation(index=i, state=JobState.QUEUED, native_state="PENDING") for i in range(3)]
    store.apply_report(
        JobReport(job_id=job.id, seq=1, state=JobState.QUEUED, slurm_job_id="55", tasks=first), actor="a"
    )
    later = [
        TaskObservation(
            index=0, state=JobState.COMPLETED, native_state="COMPLETED", exit_code=0, ended_at=now
        ),
        *first[1:],
    ]
    store.apply_report(JobReport(job_id=job.id, seq=2, state=JobState.RUNNING, tasks=later), actor="a")
    store.apply_report(JobReport(job_id=job.id, seq=3, state=JobState.RUNNING), actor="a")  # no tasks: kept
    assert store.job_tasks(job.id) == later
    # metrics count the tasks of live arrays (porter's cloudhpc_array_tasks)
    assert store.array_task_counts() == {("testbed", "completed"): 1, ("testbed", "queued"): 2}
    scraped = PorterMetrics(store).render().decode()
    assert 'cloudhpc_array_tasks{cluster="testbed",state="queued"} 2' in scraped
    store.apply_report(JobReport(job_id=job.id, seq=4, state=JobState.COMPLETED), actor="a")
    assert store.array_task_counts() == {}


def test_a_task_cancel_is_offered_until_the_agent_reports_it_done(store: Store) -> None:
    job, _ = store.create_job("alice", spec(array="0-9"))
    store.claim_work("testbed", "agent-1")
    store.apply_report(
        JobReport(job_id=job.id, seq=1, state=JobState.RUNNING, slurm_job_id="77"), actor="agent-1"
    )
    assert store.claim_work("testbed", "agent-1") == []
    store.request_task_cancel(job.id, 4)
    shown = store.request_task_cancel(job.id, 2)
    assert shown.cancel_tasks == [2, 4]
    (offered,) = store.claim_work("testbed", "agent-1")
    assert offered.cancel_tasks == [2, 4]
    assert not offered.cancel_requested
    store.apply_report(
        JobReport(job_id=job.id, seq=2, state=JobState.RUNNING, cancelled_tasks=[2, 4]), actor="agent-1"
    )
    current = store.get_job(job.id)
    assert current is not None
    assert current.cancel_tasks == []
    assert current.state == JobState.RUNNING
    assert store.claim_work("testbed", "agent-1") == []  # done: not offered again
    store.request_task_cancel(job.id, 9)  # clears the lease: offered at once
    assert [j.cancel_tasks for j in store.claim_work("testbed", "agent-1")] == [[9]]


def test_dependents_wait_for_slurm_ids_and_get_the_dependency(store: Store) -> None:
    first, _ = store.create_job("alice", spec("first"))
    second, _ = store.create_job("alice", spec("second", after=[{"job": str(first.id), "on": "ok"}]))
    third, _ = store.create_job(
        "alice", spec("third", after=[{"job": str(first.id), "on": "any"}, {"job": str(second.id)}])
    )
    offered = store.claim_work("testbed", "agent-1")
    assert [j.name for j in offered] == ["first"]  # the others wait in pending, not leased
    store.apply_report(
        JobReport(job_id=first.id, seq=1, state=JobState.QUEUED, slurm_job_id="100"), actor="agent-1"
    )
    shown = store.get_job(third.id)  # what GET /jobs/{id} shows while it waits
    assert shown is not None
    assert shown.dependency == "afterany:100"
    offered = store.claim_work("testbed", "agent-1")
    assert [(j.name, j.dependency) for j in offered] == [("second", "afterok:100")]
    store.apply_report(
        JobReport(job_id=second.id, seq=1, state=JobState.QUEUED, slurm_job_id="101"), actor="agent-1"
    )
    offered = store.claim_work("testbed", "agent-1")
    assert [(j.name, j.dependency) for j in offered] == [("third", "afterany:100,afterok:101")]
    submitted = store.get_job(second.id)
    assert submitted is not None
    assert submitted.dependency is None  # in SLURM: scontrol has SLURM's view
    # an agent restarted while `third` was being prepared gets the dependency again
    store.apply_report(JobReport(job_id=third.id, seq=1, state=JobState.PREPARING), actor="agent-1")
    active = {j.name: j for j in store.active_jobs("testbed")}
    assert active["third"].dependency == "afterany:100,afterok:101"


def test_a_dependency_that_ended_badly_before_slurm_fails_the_dependent(store: Store) -> None:
    first, _ = store.create_job("alice", spec("first"))
    ok, _ = store.create_job("alice", spec("ok", after=[{"job": str(first.id)}]))
    notok, _ = store.create_job("alice", spec("notok", after=[{"job": str(first.id), "on": "notok"}]))
    store.request_cancel(first.id, "alice")  # never claimed: cancelled at once, no SLURM id
    offered = store.claim_work("testbed", "agent-1")
    assert [(j.name, j.dependency) for j in offered] == [("notok", None)]  # nothing left to wait for
    failed = store.get_job(ok.id)
    assert failed is not None
    assert failed.state == JobState.FAILED
    assert failed.reason == (
        f"DependencyNeverSatisfied: job {first.id} ended cancelled, and this job was to run after it ended ok"
    )
    assert [t.to_state for t in store.transitions(ok.id)] == [JobState.PENDING, JobState.FAILED]
    assert store.get_job(notok.id) is not None


def test_waiting_jobs_do_not_hide_the_others_from_a_claim(store: Store) -> None:
    first, _ = store.create_job("other", spec("first", cluster="elsewhere"))  # never gets a SLURM id
    waiting = [store.create_job("alice", spec(f"w{i}", after=[{"job": str(first.id)}]))[0] for i in range(5)]
    ready = [store.create_job("alice", spec(f"r{i}"))[0] for i in range(4)]
    assert [j.name for j in store.claim_work("testbed", "agent-1", limit=3)] == ["r0", "r1", "r2"]
    assert [j.name for j in store.claim_work("testbed", "agent-2", limit=3)] == ["r3"]
    assert all(store.get_state(j.id) == JobState.PENDING for j in waiting)
    assert len(ready) == 4
