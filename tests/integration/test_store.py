"""The job store against real databases: a SQLite file and the testbed's PostgreSQL.

Every test that takes `store` (tests/integration/conftest.py) runs on both; on PostgreSQL each gets
a schema of its own (the testbed role may not create databases), migrated and dropped afterwards.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID, uuid4

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, insert, inspect, text, update

from cloudhpc.domain.jobs import Job, JobSpec
from cloudhpc.domain.reports import JobReport
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import IdempotencyConflict, StoreError, UnknownJob
from cloudhpc.store import Store, normalize_url
from cloudhpc.store.models import Base, JobRow

if TYPE_CHECKING:
    from tests.testbed import Testbed

T = TypeVar("T")
TABLES = (
    "job_output",
    "job_accounting",
    "job_transitions",
    "jobs",
    "tokens",
    "agents",
    "bridges",
    "agent_queries",
)


def _schema_url(testbed: Testbed, schema: str) -> str:
    url = normalize_url(testbed.pg_dsn).update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with no schema at all, to run the migrations from scratch."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/fresh.db"
        return
    testbed: Testbed = request.getfixturevalue("testbed")
    schema = f"cloudhpc_fresh_{uuid4().hex[:12]}"
    admin = create_engine(normalize_url(testbed.pg_dsn))
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield _schema_url(testbed, schema)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def spec(name: str = "train", cluster: str = "testbed", script: str = "echo hi\n") -> JobSpec:
    return JobSpec(name=name, cluster=cluster, script=script)


def report(job: Job, seq: int, state: JobState, **fields: Any) -> JobReport:
    return JobReport(job_id=job.id, seq=seq, state=state, **fields)


def concurrently(n: int, fn: Callable[[int], T]) -> list[T]:
    """Run fn(0..n-1) in n threads released together, to make the races actually happen."""
    barrier = threading.Barrier(n)

    def run(i: int) -> T:
        barrier.wait()
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def table_count(store: Store, table: str) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())  # noqa: S608


def move(store: Store, job: Job, *states: JobState) -> Job:
    """Walk a job through states with consecutive report numbers after its current one."""
    current: Job | None = job
    for seq, state in enumerate(states, start=1000):
        current = store.apply_report(report(job, seq, state), actor="agent-1")
    assert current is not None
    return current


# -- create, get, list --------------------------------------------------------------------------


def test_create_and_get(store: Store) -> None:
    before = datetime.now(UTC)
    job, created = store.create_job("alice", spec(name="train-1"))
    assert created
    assert job.state == JobState.PENDING
    assert (job.owner, job.name, job.cluster, job.kind.value) == ("alice", "train-1", "testbed", "batch")
    assert job.created_at.tzinfo == UTC
    assert before <= job.created_at <= datetime.now(UTC)

    got = store.get_job(job.id)
    assert got == job
    assert got is not None
    assert got.created_at.tzinfo == UTC
    assert got.spec == spec(name="train-1")
    assert store.get_state(job.id) == JobState.PENDING
    assert store.get_job(uuid4()) is None
    assert store.get_state(uuid4()) is None

    [first] = store.transitions(job.id)
    assert (first.from_state, first.to_state, first.actor) == (None, JobState.PENDING, "alice")
    assert first.at.tzinfo == UTC


def test_list_filters_and_paging(store: Store) -> None:
    made: list[Job] = []
    for i in range(7):
        owner = "alice" if i % 3 else "bob"
        cluster = "mahti" if i % 2 else "testbed"
        made.append(store.create_job(owner, spec(name=f"job-{i % 2}", cluster=cluster))[0])
    alice = [j for j in made if j.owner == "alice"]
    store.request_cancel(alice[0].id, "alice")

    jobs, cursor = store.list_jobs(owner="alice")
    assert cursor is None
    assert [j.id for j in jobs] == [j.id for j in reversed(alice)]  # newest first

    everyone, _ = store.list_jobs(owner=None, limit=100)
    assert {j.id for j in everyone} == {j.id for j in made}

    cancelled, _ = store.list_jobs(owner="alice", state=JobState.CANCELLED)
    assert [j.id for j in cancelled] == [alice[0].id]
    on_mahti, _ = store.list_jobs(owner=None, cluster="mahti")
    assert {j.id for j in on_mahti} == {j.id for j in made if j.cluster == "mahti"}
    named, _ = store.list_jobs(owner="alice", name="job-0")
    assert {j.id for j in named} == {j.id for j in alice if j.name == "job-0"}
    assert store.list_jobs(owner="carol") == ([], None)

    # Pages of 3 cover everything exactly once, in order, even with jobs added meanwhile.
    paged: list[UUID] = []
    page, cursor = store.list_jobs(owner=None, limit=3)
    paged += [j.id for j in page]
    store.create_job("alice", spec(name="late"))
    while cursor is not None:
        page, cursor = store.list_jobs(owner=None, limit=3, cursor=cursor)
        paged += [j.id for j in page]
    assert paged == [j.id for j in everyone]

    with pytest.raises(ValueError, match="cursor"):
        store.list_jobs(owner=None, cursor="not-a-cursor")
    with pytest.raises(ValueError, match="limit"):
        store.list_jobs(owner=None, limit=0)


def test_jobs_created_in_the_same_microsecond_page_correctly(store: Store) -> None:
    """Keyset paging breaks ties on id, so equal timestamps neither repeat nor vanish."""
    jobs = [store.create_job("alice", spec())[0] for _ in range(4)]
    same = datetime(2030, 1, 1, tzinfo=UTC)
    with store.engine.begin() as conn:
        conn.execute(update(JobRow).values(created_at=same))
    seen: list[UUID] = []
    page, cursor = store.list_jobs(owner="alice", limit=1)
    seen += [j.id for j in page]
    while cursor is not None:
        page, cursor = store.list_jobs(owner="alice", limit=1, cursor=cursor)
        seen += [j.id for j in page]
    assert sorted(seen) == sorted(j.id for j in jobs)
    assert len(seen) == 4
    assert all(j.created_at == same for j in store.list_jobs(owner="alice")[0])


# -- idempotency ---------------------------------------------------------------------------------


def test_idempotency_key_returns_the_same_job(store: Store) -> None:
    first, created = store.create_job("alice", spec(), idempotency_key="k-1")
    again, created_again = store.create_job("alice", spec(), idempotency_key="k-1")
    assert created
    assert not created_again
    assert again == first
    # Keys are per owner, and jobs without keys are always new.
    other, other_created = store.create_job("bob", spec(), idempotency_key="k-1")
    assert other_created
    assert other.id != first.id
    assert store.create_job("alice", spec())[0].id != store.create_job("alice", spec())[0].id
    assert table_count(store, "jobs") == 4


def test_idempotency_key_with_another_spec_conflicts(store: Store) -> None:
    store.create_job("alice", spec(script="echo 1\n"), idempotency_key="k")
    with pytest.raises(IdempotencyConflict, match="different spec"):
        store.create_job("alice", spec(script="echo 2\n"), idempotency_key="k")
    assert table_count(store, "jobs") == 1


def test_concurrent_creates_with_one_key_make_one_job(store: Store) -> None:
    results = concurrently(8, lambda _: store.create_job("alice", spec(), idempotency_key="race"))
    assert len({job.id for job, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert table_count(store, "jobs") == 1
    assert table_count(store, "job_transitions") == 1


def test_create_that_loses_the_race_returns_the_winner(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """Deterministic version of the race: the winner's row is inserted but not yet committed
    when our create checks for the key, so only the unique constraint can catch the duplicate."""
    caplog.set_level(logging.DEBUG, logger="cloudhpc.store")
    the_spec = spec()
    winner_id = str(uuid4())
    now = datetime.now(UTC)
    with store.engine.connect() as winner:
        winner.begin()
        winner.execute(
            insert(JobRow).values(
                id=winner_id,
                owner="alice",
                cluster=the_spec.cluster,
                name=the_spec.name,
                kind=the_spec.kind.value,
                state="pending",
                created_at=now,
                updated_at=now,
                spec=the_spec.model_dump_json(by_alias=True),
                idempotency_key="race",
            )
        )
        with ThreadPoolExecutor(1) as pool:
            loser = pool.submit(store.create_job, "alice", the_spec, idempotency_key="race")
            time.sleep(0.3)  # the loser is now blocked on the winner's lock
            assert not loser.done()
            winner.commit()
            job, created = loser.result(timeout=10)
    assert (str(job.id), created) == (winner_id, False)
    assert "lost the race" in caplog.text
    assert table_count(store, "jobs") == 1


# -- cancellation --------------------------------------------------------------------------------


def test_cancel_of_unclaimed_pending_job_is_immediate(store: Store) -> None:
    job, _ = store.create_job("alice", spec())
    cancelled = store.request_cancel(job.id, "alice")
    assert cancelled.state == JobState.CANCELLED
    assert cancelled.cancel_requested
    assert cancelled.ended_at is not None
    last = store.transitions(job.id)[-1]
    assert (last.from_state, last.to_state, last.actor) == (JobState.PENDING, JobState.CANCELLED, "alice")
    # Terminal jobs are left alone, and the agent has nothing to do for them.
    assert store.request_cancel(job.id, "admin") == cancelled
    assert store.claim_work("testbed", "agent-1") == []
    with pytest.raises(UnknownJob):
        store.request_cancel(uuid4(), "alice")


def test_cancel_of_running_job_is_a_request_for_the_agent(store: Store) -> None:
    job, _ = store.create_job("alice", spec())
    [claimed] = store.claim_work("testbed", "agent-1")
    move(store, claimed, JobState.PREPARING, JobState.QUEUED, JobState.RUNNING)
    assert store.claim_work("testbed", "agent-1") == []

    requested = store.request_cancel(job.id, "alice")
    assert requested.state == JobState.RUNNING
    assert requested.cancel_requested
    [offered] = store.claim_work("testbed", "agent-1")
    assert offered.id == job.id
    assert offered.cancel_requested
    # Leased like any offer, so a long-polling agent is not handed the same cancel in a loop.
    assert store.claim_work("testbed", "agent-1") == []

    done = store.apply_report(
        report(job, 2000, JobState.CANCELLED, reason="CANCELLED by 1000"), actor="agent-1"
    )
    assert done is not None
    assert done.state == JobState.CANCELLED
    assert store.transitions(job.id)[-1].reason == "CANCELLED by 1000"
    assert store.claim_work("testbed", "agent-1") == []


def test_cancel_of_claimed_pending_job_goes_through_the_agent(store: Store) -> None:
    """Once claimed, the job may already be in sbatch: only the agent can cancel it safely."""
    job, _ = store.create_job("alice", spec())
    store.claim_work("testbed", "agent-1", lease_seconds=300)
    requested = store.request_cancel(job.id, "alice")
    assert requested.state == JobState.PENDING
    assert requested.cancel_requested
    # The request clears the lease, so the agent hears about it at once, not after 300 s.
    [offered] = store.claim_work("testbed", "agent-1")
    assert offered.id == job.id
    assert offered.cancel_requested
    assert offered.state == JobState.PENDING


# -- the agent protocol --------------------------------------------------------------------------


def test_claim_work_leases_pending_jobs(store: Store) -> None:
    ids = {store.create_job("alice", spec())[0].id for _ in range(5)}
    store.create_job("alice", spec(cluster="elsewhere"))
    first = store.claim_work("testbed", "agent-a", limit=3)
    second = store.claim_work("testbed", "agent-b")
    assert len(first) == 3
    assert len(second) == 2
    assert {j.id for j in first} | {j.id for j in second} == ids
    assert store.claim_work("testbed", "agent-a") == []
    assert store.claim_work("testbed", "agent-b") == []


def test_lease_expiry_offers_the_job_again(store: Store) -> None:
    job, _ = store.create_job("alice", spec())
    # 2 s: the second claim must come within the lease also on a loaded CI machine
    assert [j.id for j in store.claim_work("testbed", "agent-a", lease_seconds=2)] == [job.id]
    assert store.claim_work("testbed", "agent-b") == []
    time.sleep(2.1)
    assert [j.id for j in store.claim_work("testbed", "agent-b")] == [job.id]
    # Once the agent reports progress, the job is no longer offered at all.
    move(store, job, JobState.PREPARING)
    time.sleep(0.05)
    assert store.claim_work("testbed", "agent-b", lease_seconds=0) == []


def test_concurrent_claims_never_share_a_job(store: Store) -> None:
    ids = {store.create_job("alice", spec())[0].id for _ in range(24)}
    results = concurrently(4, lambda i: store.claim_work("testbed", f"agent-{i}", limit=10))
    claimed = [j.id for batch in results for j in batch]
    assert len(claimed) == len(set(claimed)) == 24
    assert set(claimed) == ids


def test_active_jobs_are_the_non_terminal_ones(store: Store) -> None:
    pending, _ = store.create_job("alice", spec())
    running, _ = store.create_job("alice", spec())
    done, _ = store.create_job("alice", spec())
    store.create_job("alice", spec(cluster="elsewhere"))
    move(store, running, JobState.QUEUED, JobState.RUNNING)
    move(store, done, JobState.QUEUED, JobState.COMPLETED)
    assert {j.id for j in store.active_jobs("testbed")} == {pending.id, running.id}


def test_reconciliation_hands_back_ended_jobs_whose_accounting_never_arrived(store: Store) -> None:
    running, _ = store.create_job("alice", spec())
    unaccounted, _ = store.create_job("alice", spec())
    accounted, _ = store.create_job("alice", spec())
    never_ran, _ = store.create_job("alice", spec())
    long_ago, _ = store.create_job("alice", spec())
    elsewhere, _ = store.create_job("alice", spec(cluster="elsewhere"))

    def run(job: Job, seq: int, end: JobState | None, slurm_id: str, **fields: Any) -> None:
        store.apply_report(report(job, seq, JobState.QUEUED, slurm_job_id=slurm_id), actor="a")
        store.apply_report(report(job, seq + 1, end or JobState.RUNNING, **fields), actor="a")

    run(running, 10, None, "1")
    run(unaccounted, 12, JobState.FAILED, "2", exit_code=3)
    run(accounted, 14, JobState.COMPLETED, "3")
    store.set_accounting(accounted.id, {"slurm_job_id": "3", "records": []})
    store.apply_report(report(never_ran, 16, JobState.FAILED, reason="sbatch: invalid partition"), actor="a")
    ended = datetime.now(UTC) - timedelta(days=8)
    run(long_ago, 17, JobState.COMPLETED, "5", ended_at=ended)
    run(elsewhere, 98, JobState.COMPLETED, "6")

    view = store.reconciliation("testbed")
    assert [j.id for j in view.jobs] == [running.id]
    # ran in SLURM, ended within the window, no accounting: only this one needs collecting
    assert [j.id for j in view.unaccounted] == [unaccounted.id]
    assert view.unaccounted[0].slurm_job_id == "2"
    # the highest seq applied for this cluster, not another's
    assert view.seq_floor == 18
    wider = store.reconciliation("testbed", unaccounted_within=timedelta(days=9))
    assert [j.id for j in wider.unaccounted] == [long_ago.id, unaccounted.id]  # oldest end first
    assert store.reconciliation("nowhere").seq_floor == 0


def test_stale_and_duplicate_reports_are_ignored(store: Store) -> None:
    job, _ = store.create_job("alice", spec())
    queued = store.apply_report(report(job, 5, JobState.QUEUED, slurm_job_id="42"), actor="agent-1")
    assert queued is not None
    assert queued.state == JobState.QUEUED
    assert queued.slurm_job_id == "42"
    assert store.apply_report(report(job, 5, JobState.RUNNING), actor="agent-1") is None
    assert store.apply_report(report(job, 3, JobState.RUNNING, slurm_job_id="7"), actor="agent-1") is None
    after = store.get_job(job.id)
    assert after is not None
    assert after.state == JobState.QUEUED
    assert after.slurm_job_id == "42"
    assert store.apply_report(JobReport(job_id=uuid4(), seq=1, state=JobState.QUEUED), actor="a") is None
    assert store.report_counts() == {"applied": 1, "stale": 2, "unknown_job": 1}


def test_out_of_order_reports_end_in_the_newest_state(store: Store) -> None:
    job, _ = store.create_job("alice", spec())
    store.apply_report(report(job, 1, JobState.PREPARING), actor="agent-1")
    t0 = datetime(2030, 5, 1, 12, 0, tzinfo=UTC)
    reports = {
        2: report(job, 2, JobState.QUEUED, slurm_job_id="77", submitted_at=t0),
        3: report(job, 3, JobState.RUNNING, started_at=t0 + timedelta(seconds=5)),
        4: report(job, 4, JobState.COMPLETED, exit_code=0, ended_at=t0 + timedelta(seconds=65)),
    }
    results = [store.apply_report(reports[seq], actor="agent-1") for seq in (4, 2, 3)]
    assert results[1:] == [None, None]
    final = store.get_job(job.id)
    assert final is not None
    assert final.state == JobState.COMPLETED
    assert final.exit_code == 0
    assert final.ended_at == t0 + timedelta(seconds=65)
    assert [(t.from_state, t.to_state) for t in store.transitions(job.id)] == [
        (None, JobState.PENDING),
        (JobState.PENDING, JobState.PREPARING),
        (JobState.PREPARING, JobState.COMPLETED),
    ]


def test_illegal_transitions_are_ignored(store: Store) -> None:
    job, _ = store.create_job("alice", spec())
    move(store, job, JobState.QUEUED, JobState.RUNNING)
    # Backwards: the state stays, but the newer report's facts are kept.
    back = store.apply_report(report(job, 5000, JobState.QUEUED, slurm_job_id="99"), actor="agent-1")
    assert back is not None
    assert back.state == JobState.RUNNING
    assert back.slurm_job_id == "99"

    done = store.apply_report(report(job, 5001, JobState.FAILED, reason="OUT_OF_MEMORY"), actor="agent-1")
    assert done is not None
    assert done.state == JobState.FAILED
    assert done.reason == "OUT_OF_MEMORY"
    assert done.ended_at is not None  # stamped when the report had none
    # Out of a terminal state: ignored whole.
    revived = store.apply_report(report(job, 5002, JobState.RUNNING, exit_code=3), actor="agent-1")
    assert revived is not None
    assert revived.state == JobState.FAILED
    assert revived.exit_code is None
    # The same terminal state again may fill in a fact learnt late, such as the exit code.
    late = store.apply_report(report(job, 5003, JobState.FAILED, exit_code=137), actor="agent-1")
    assert late is not None
    assert late.state == JobState.FAILED
    assert late.exit_code == 137
    assert late.reason == "OUT_OF_MEMORY"

    # A never-submitted job cannot complete: pending -> completed is refused by the state machine.
    fresh, _ = store.create_job("alice", spec())
    refused = store.apply_report(report(fresh, 1, JobState.COMPLETED), actor="agent-1")
    assert refused is not None
    assert refused.state == JobState.PENDING

    states = [(t.from_state, t.to_state) for t in store.transitions(job.id)]
    assert states[-1] == (JobState.RUNNING, JobState.FAILED)
    assert store.report_counts()["illegal_transition"] == 3


def test_concurrent_reports_with_one_seq_apply_once(store: Store) -> None:
    job, _ = store.create_job("alice", spec())
    results = concurrently(6, lambda i: store.apply_report(report(job, 1, JobState.QUEUED), actor=f"a{i}"))
    assert sum(r is not None for r in results) == 1
    assert [t.to_state for t in store.transitions(job.id)] == [JobState.PENDING, JobState.QUEUED]


def test_transitions_and_counts(store: Store) -> None:
    a, _ = store.create_job("alice", spec())
    b, _ = store.create_job("bob", spec(cluster="mahti"))
    store.apply_report(report(a, 1, JobState.QUEUED, reason="Priority"), actor="agent-x")
    store.request_cancel(b.id, "bob")
    [created, queued] = store.transitions(a.id)
    assert (queued.from_state, queued.to_state, queued.actor, queued.reason) == (
        JobState.PENDING,
        JobState.QUEUED,
        "agent-x",
        "Priority",
    )
    assert created.at <= queued.at
    assert store.count_by_state() == {("testbed", "queued"): 1, ("mahti", "cancelled"): 1}
    assert store.transition_counts() == {
        ("none", "pending"): 2,
        ("pending", "queued"): 1,
        ("pending", "cancelled"): 1,
    }


# -- tokens, agents, artifacts -------------------------------------------------------------------


def test_tokens(store: Store) -> None:
    token = store.create_token("alice", "user")
    agent_token = store.create_token("submitter", "agent", clusters=["testbed", "mahti", "testbed"])
    assert token.startswith("chpc_")
    assert len(token) > 40

    alice = store.verify_token(token)
    assert alice is not None
    assert (alice.user, alice.role, alice.clusters) == ("alice", "user", ())
    agent = store.verify_token(agent_token)
    assert agent is not None
    assert agent.role == "agent"
    assert agent.clusters == ("mahti", "testbed")
    assert store.verify_token(token + "x") is None
    assert store.verify_token("") is None

    # Only the SHA-256 is stored: no column of any row holds the plaintext.
    with store.engine.connect() as conn:
        rows = [tuple(str(v) for v in row) for row in conn.execute(text("SELECT * FROM tokens"))]
        hashes = {h for (h,) in conn.execute(text("SELECT token_hash FROM tokens"))}
    assert not any(token in v or agent_token in v for row in rows for v in row)
    assert hashes == {hashlib.sha256(t.encode()).hexdigest() for t in (token, agent_token)}

    assert store.revoke_token(token)
    assert not store.revoke_token(token)
    assert store.verify_token(token) is None
    assert store.verify_token(agent_token) is not None
    [info] = [t for t in store.list_tokens() if t.user == "submitter"]
    assert store.revoke_token_id(info.id)
    assert store.verify_token(agent_token) is None
    assert all(t.revoked_at is not None for t in store.list_tokens())

    with pytest.raises(ValueError, match="role"):
        store.create_token("alice", "root")


def test_agents_heartbeat(store: Store) -> None:
    assert store.agents() == {}
    store.touch_agent("testbed", "agent-1")
    first = store.agents()["testbed"]
    store.touch_agent("testbed", "agent-2")
    store.touch_agent("mahti", "agent-2")
    seen = store.agents()
    assert set(seen) == {"testbed", "mahti"}
    assert seen["testbed"] >= first
    assert seen["testbed"].tzinfo == UTC


def test_one_agent_at_a_time_serves_a_cluster(store: Store) -> None:
    assert store.take_agent_slot("testbed", "a", hold_seconds=5) is None
    assert store.take_agent_slot("testbed", "a", hold_seconds=5) is None  # the holder renews
    refused = store.take_agent_slot("testbed", "b", hold_seconds=5)
    assert refused is not None
    assert refused[0] == "a"
    assert 0 <= refused[1] < 5
    assert store.take_agent_slot("mahti", "b", hold_seconds=5) is None  # another cluster is free
    time.sleep(0.3)
    # once the holder has been silent for the hold time, a newcomer (a restarted agent) takes over
    assert store.take_agent_slot("testbed", "b", hold_seconds=0.25) is None
    assert store.take_agent_slot("testbed", "a", hold_seconds=5) == ("b", pytest.approx(0, abs=1))


def test_artifacts(store: Store) -> None:
    job, _ = store.create_job("alice", spec())
    store.set_artifacts(job.id, ["jobs/x/script.sh", "jobs/x/output.log"])
    got = store.get_job(job.id)
    assert got is not None
    assert got.artifacts == ["jobs/x/script.sh", "jobs/x/output.log"]
    with pytest.raises(UnknownJob):
        store.set_artifacts(uuid4(), [])


def test_accounting(store: Store) -> None:
    job, _ = store.create_job("alice", spec())
    assert store.get_accounting(job.id) is None
    record = {"records": [{"job_id": "12", "state": "COMPLETED", "elapsed_seconds": 61}], "efficiency": None}
    store.set_accounting(job.id, record)
    assert store.get_accounting(job.id) == record
    store.set_accounting(job.id, {"records": []})  # a later, fuller sacct answer replaces it
    assert store.get_accounting(job.id) == {"records": []}
    with pytest.raises(UnknownJob):
        store.set_accounting(uuid4(), record)


def test_provisional_accounting_is_replaced_by_the_final_one_and_never_the_other_way(store: Store) -> None:
    """A short job's figures come first provisional (SLURM has not sent the job's own row yet),
    then final; an agent that restarted may send the provisional ones again after the final."""
    job, _ = store.create_job("alice", spec())
    provisional = {"final": False, "records": [{"job_id": "12", "name": "allocation"}]}
    final = {"final": True, "records": [{"job_id": "12", "name": "train", "partition": "debug"}]}
    assert store.set_accounting(job.id, provisional)
    assert store.get_accounting(job.id) == provisional
    assert store.set_accounting(job.id, final)
    assert not store.set_accounting(job.id, provisional)
    assert store.get_accounting(job.id) == final


def test_reconciliation_hands_back_jobs_whose_accounting_is_only_provisional(store: Store) -> None:
    """So that an agent that restarted before the final figures arrived collects them."""
    jobs = [store.create_job("alice", spec())[0] for _ in range(3)]
    for seq, job in enumerate(jobs):
        store.apply_report(report(job, 2 * seq + 1, JobState.QUEUED, slurm_job_id=str(seq)), actor="a")
        store.apply_report(report(job, 2 * seq + 2, JobState.COMPLETED), actor="a")
    provisional, final, older = jobs
    store.set_accounting(provisional.id, {"final": False, "records": []})
    store.set_accounting(final.id, {"final": True, "records": []})
    store.set_accounting(older.id, {"records": []})  # stored before `final` existed: final
    assert [j.id for j in store.reconciliation("testbed").unaccounted] == [provisional.id]


# -- job output ----------------------------------------------------------------------------------


def test_output_append_is_idempotent_by_offset(store: Store) -> None:
    job, _ = store.create_job("alice", spec())
    assert store.output_size(job.id) == 0
    assert store.read_output(job.id, 0, 100) == b""
    assert store.append_output(job.id, 0, b"hello ") == 6
    assert store.append_output(job.id, 0, b"hello ") == 6  # resent chunk
    assert store.append_output(job.id, 3, b"lo world\n") == 12  # overlapping resend, trimmed
    assert store.append_output(job.id, 50, b"gap") == 12  # would leave a hole: refused
    assert store.append_output(job.id, 12, b"") == 12
    assert store.append_output(job.id, 12, b"\x00\xffbinary") == 20
    assert store.output_size(job.id) == 20
    everything = b"hello world\n\x00\xffbinary"
    assert store.read_output(job.id, 0, 1000) == everything
    for offset in range(21):
        for limit in (0, 1, 5, 9, 30):
            assert store.read_output(job.id, offset, limit) == everything[offset : offset + limit]
    assert table_count(store, "job_output") == 3
    with pytest.raises(UnknownJob):
        store.append_output(uuid4(), 0, b"x")


def test_concurrent_appends_at_one_offset_store_one_chunk(store: Store) -> None:
    job, _ = store.create_job("alice", spec())
    sizes = concurrently(5, lambda _: store.append_output(job.id, 0, b"line 1\n"))
    assert sizes == [7] * 5
    assert store.read_output(job.id, 0, 100) == b"line 1\n"


def test_concurrent_overlapping_appends_store_the_stream_once(store: Store) -> None:
    """Senders that each resend what they read from their own offset, as a retried or doubled
    upload does (issue 12, item 5): whatever order the store sees them in, each byte is stored
    once and at its place, and a sender told where the store stands can go on from there."""
    job, _ = store.create_job("alice", spec())
    stream = bytes(range(256)) * 4

    def sender(i: int) -> int:
        offset = 0
        for length in (7 + i, 64, 100 + 3 * i, 1024):
            chunk = stream[offset : offset + length]
            if not chunk:
                break
            offset = store.append_output(job.id, offset, chunk)
        while offset < len(stream):  # catch up from where the store says it is
            offset = store.append_output(job.id, offset, stream[offset : offset + 50])
        return offset

    assert concurrently(8, sender) == [len(stream)] * 8
    assert store.read_output(job.id, 0, 1 << 20) == stream


# -- schema and migrations -----------------------------------------------------------------------


def test_migrations_match_the_models(store: Store) -> None:
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_migrating_twice_is_a_no_op(store: Store) -> None:
    job, _ = store.create_job("alice", spec())
    store.migrate()
    store.migrate()
    assert store.get_job(job.id) == job
    head = ScriptDirectory.from_config(store.alembic_config()).get_current_head()
    with store.engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == head
        assert set(inspect(conn).get_table_names()) == {*TABLES, "alembic_version"}


def test_replicas_migrating_a_fresh_database_together(empty_url: str) -> None:
    stores = [Store(empty_url) for _ in range(3)]
    try:
        concurrently(3, lambda i: stores[i].migrate())
        job, _ = stores[0].create_job("alice", spec())
        assert stores[2].get_job(job.id) == job
    finally:
        for s in stores:
            s.close()


def test_sqlite_settings(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "state.db"
    s = Store(f"sqlite:///{path}")
    try:
        s.migrate()
        assert path.exists()
        with s.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one() >= 1000
    finally:
        s.close()


def test_in_memory_sqlite_is_shared_across_threads() -> None:
    s = Store("sqlite://")
    try:
        s.migrate()
        job, _ = s.create_job("alice", spec())
        with ThreadPoolExecutor(2) as pool:
            assert pool.submit(s.get_job, job.id).result() == job
    finally:
        s.close()


def test_database_urls() -> None:
    assert normalize_url("postgresql://u:p@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://u:p@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgresql+psycopg://u:p@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"
    with pytest.raises(StoreError, match="unsupported"):
        normalize_url("mysql://u:p@h/db")


def test_driver_errors_become_store_errors() -> None:
    """An unreachable database: readiness says no, and calls raise StoreError, not driver errors."""
    s = Store("postgresql://nobody:secret@127.0.0.1:1/none?connect_timeout=2")
    try:
        assert s.ping() is False
        with pytest.raises(StoreError, match="get_job") as caught:
            s.get_job(uuid4())
        assert "secret" not in str(caught.value)
        with pytest.raises(StoreError, match="migrating"):
            s.migrate()
    finally:
        s.close()
