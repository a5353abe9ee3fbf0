"""`Store`, the one object callers hold, and `AsyncStore`, the same methods awaitable for porter.

`Store` is the union of the store's repositories, one per aggregate over one shared `Database`
(`engine.py`): callers keep one object and one set of method names, while each module stays about
one subject. It is synchronous on purpose: the agent protocol's guarantees come from database
transactions, not from Python locks, and the agent, the CLI and porter's background sweeps call it
from threads. Every public method returns domain models (`Job`) or small frozen records, never ORM
objects, so no caller can trigger a lazy load outside a transaction.

`AsyncStore` runs each call in the worker threads of the event loop (anyio's, which FastAPI's
`run_in_threadpool` uses too), so porter's routes `await store.get_job(...)` and never block the loop.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar

import anyio.to_thread

from cloudhpc.store.agents import AgentRepository
from cloudhpc.store.bridges import BridgeRepository
from cloudhpc.store.jobs import JobRepository
from cloudhpc.store.metrics_view import MetricsView
from cloudhpc.store.output import OutputRepository
from cloudhpc.store.queries import QueryRepository
from cloudhpc.store.tokens import TokenRepository

__all__ = ["AsyncStore", "Store"]

P = ParamSpec("P")
R = TypeVar("R")


class Store(
    JobRepository,
    AgentRepository,
    BridgeRepository,
    TokenRepository,
    OutputRepository,
    MetricsView,
    QueryRepository,
):
    """Jobs, their transitions and output, bridges, tokens and agent slots, in SQLite or PostgreSQL.

    `Store("sqlite:///.cloudhpc/state.db")` (the default, parent directory created) or
    `Store("postgresql://user:pass@host/db")`. Call `migrate()` once at start-up; it is a no-op
    when the schema is current and safe to run from several replicas at once.
    """


def _in_thread(
    method: Callable[Concatenate[Store, P], R],
) -> Callable[Concatenate[AsyncStore, P], Coroutine[Any, Any, R]]:
    """`method` of the wrapped `Store`, awaited in a worker thread, with the same signature.

    The method is looked up on the wrapped instance at each call, as `run_in_threadpool(store.x)`
    did, so a subclass or an instance attribute that replaces it is honoured."""
    name = method.__name__

    @functools.wraps(method)
    async def call(self: AsyncStore, /, *args: P.args, **kwargs: P.kwargs) -> R:
        bound: Callable[P, R] = getattr(self.sync, name)
        return await anyio.to_thread.run_sync(functools.partial(bound, *args, **kwargs))

    return call


class AsyncStore:
    """Every public method of `Store`, as a coroutine that runs the call in a worker thread.

    `sync` is the wrapped `Store`, for code that already runs in a thread (porter's mailbox relay,
    retention sweep and metrics scrape). A test checks that no public method of `Store` is missing.
    """

    def __init__(self, store: Store) -> None:
        self.sync = store

    # lifecycle
    migrate = _in_thread(Store.migrate)
    ping = _in_thread(Store.ping)
    close = _in_thread(Store.close)
    alembic_config = _in_thread(Store.alembic_config)
    # jobs
    create_job = _in_thread(Store.create_job)
    open_session = _in_thread(Store.open_session)
    get_job = _in_thread(Store.get_job)
    get_state = _in_thread(Store.get_state)
    list_jobs = _in_thread(Store.list_jobs)
    request_cancel = _in_thread(Store.request_cancel)
    job_bridges = _in_thread(Store.job_bridges)
    transitions = _in_thread(Store.transitions)
    job_tasks = _in_thread(Store.job_tasks)
    request_task_cancel = _in_thread(Store.request_task_cancel)
    # the agent protocol
    touch_agent = _in_thread(Store.touch_agent)
    take_agent_slot = _in_thread(Store.take_agent_slot)
    agents = _in_thread(Store.agents)
    claim_work = _in_thread(Store.claim_work)
    active_jobs = _in_thread(Store.active_jobs)
    reconciliation = _in_thread(Store.reconciliation)
    unaccounted_jobs = _in_thread(Store.unaccounted_jobs)
    seq_floor = _in_thread(Store.seq_floor)
    apply_report = _in_thread(Store.apply_report)
    report_counts = _in_thread(Store.report_counts)
    # bridges
    bridge_records = _in_thread(Store.bridge_records)
    set_bridge_ready = _in_thread(Store.set_bridge_ready)
    set_bridge_service = _in_thread(Store.set_bridge_service)
    release_bridges = _in_thread(Store.release_bridges)
    bridge_readiness = _in_thread(Store.bridge_readiness)
    # tokens
    create_token = _in_thread(Store.create_token)
    verify_token = _in_thread(Store.verify_token)
    revoke_token = _in_thread(Store.revoke_token)
    revoke_token_id = _in_thread(Store.revoke_token_id)
    list_tokens = _in_thread(Store.list_tokens)
    cluster_owners = _in_thread(Store.cluster_owners)
    # output, artifacts, accounting
    append_output = _in_thread(Store.append_output)
    output_size = _in_thread(Store.output_size)
    read_output = _in_thread(Store.read_output)
    set_artifacts = _in_thread(Store.set_artifacts)
    add_artifacts = _in_thread(Store.add_artifacts)
    expired_artifacts = _in_thread(Store.expired_artifacts)
    set_accounting = _in_thread(Store.set_accounting)
    get_accounting = _in_thread(Store.get_accounting)
    # agent queries
    ask_agent = _in_thread(Store.ask_agent)
    claim_queries = _in_thread(Store.claim_queries)
    query_cluster = _in_thread(Store.query_cluster)
    answer_query = _in_thread(Store.answer_query)
    query_answer = _in_thread(Store.query_answer)
    forget_query = _in_thread(Store.forget_query)
    purge_queries = _in_thread(Store.purge_queries)
    # the metrics read model
    count_by_state = _in_thread(Store.count_by_state)
    array_task_counts = _in_thread(Store.array_task_counts)
    restart_counts = _in_thread(Store.restart_counts)
    billed_units = _in_thread(Store.billed_units)
    billed_documents = _in_thread(Store.billed_documents)
    count_by_owner_and_state = _in_thread(Store.count_by_owner_and_state)
    transition_tally = _in_thread(Store.transition_tally)
    transition_counts_by_cluster = _in_thread(Store.transition_counts_by_cluster)
    transition_counts = _in_thread(Store.transition_counts)
    recent_jobs = _in_thread(Store.recent_jobs)
    accounting_facts = _in_thread(Store.accounting_facts)
    recent_job_facts = _in_thread(Store.recent_job_facts)
