"""A bounded property-based fuzz of porter's OpenAPI schema with schemathesis (#12 item 6).

Every operation of `/openapi.json` is called with generated input, valid (positive) and invalid
(negative), against the real app in-process on a migrated job store, SQLite and PostgreSQL: user routes with a user
token, agent routes with an agent token. Path parameters named `job_id` are half the time pinned
to a real, ended job that has output and accounting, so the routes get past their 404 into the code that
reads the job. Every answer must be below 500 and conform to the schema (status documented,
content type, body and headers as described). Hypothesis runs derandomized (a fixed seed) with a
fixed number of examples per operation and mode, so a run is repeatable and takes well under a
minute; the figures are printed (`-s`).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from cloudhpc.config import PorterConfig, Settings
from cloudhpc.domain.jobs import JobSpec
from cloudhpc.domain.reports import JobReport
from cloudhpc.domain.states import JobState
from cloudhpc.porter.app import create_app
from cloudhpc.store import Store

EXAMPLES = 20
"""Per operation and generation mode."""
TIME_BUDGET = 60.0
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


@dataclass
class Findings:
    cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    no_agent: int = 0
    """Answers 504 `agent_timeout`: the route asked the cluster's agent, which no test runs."""


def _no_agent(response: Any) -> bool:
    """The 504 `agent_timeout` of a route that needs the cluster's agent (`GET /jobs/{id}/files`)."""
    if response.status_code != 504:
        return False
    try:
        return bool(response.json()["error"]["code"] == "agent_timeout")
    except (ValueError, KeyError, TypeError):
        return False


def fuzz(operation: Any, mode: GenerationMode, token: str, job_id: str | None, found: Findings) -> None:
    """Run one operation's examples in one mode; `job_id`: pin `{job_id}` to it in half of them."""

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode), pin=st.booleans())
    def call(case: Any, pin: bool) -> None:
        if pin and job_id is not None and mode == GenerationMode.POSITIVE:
            case.path_parameters = {**(case.path_parameters or {}), "job_id": job_id}
        wait = (case.query or {}).get("wait")
        if isinstance(wait, int | float) and not isinstance(wait, bool) and wait > 0.2:
            case.query["wait"] = 0.2  # a long-poll that finds nothing would hold the run up to 60 s
        response = case.call(headers={"Authorization": f"Bearer {token}"})
        found.cases += 1
        if _no_agent(response):
            found.no_agent += 1
            return  # a route that asks the cluster's agent, and no agent runs here: its documented 504
        found.statuses[response.status_code] += 1
        for check in CHECKS:
            try:
                case.validate_response(response, checks=[check])
            except BaseException as failure:  # schemathesis' FailureGroup is a BaseExceptionGroup
                if isinstance(failure, KeyboardInterrupt):
                    raise
                found.failures.append(
                    f"{operation.label} [{mode.value}] {check.__name__}: {response.status_code} "
                    f"{response.text[:300]!r}\n  {case.as_curl_command()[:600]}"
                )

    with contextlib.suppress(Unsatisfiable):  # nothing to make invalid: an operation without parameters
        call()


def test_openapi_fuzz_finds_no_server_error(store: Store, tmp_path: Path) -> None:
    """On both job stores (the `store` fixture): PostgreSQL refuses more than SQLite (NUL in text,
    integers past BIGINT), so bad input that SQLite stores can be a 5xx there."""
    fuzz_store = store
    user = fuzz_store.create_token("alice", "user")
    agent = fuzz_store.create_token("alice", "agent", ["local"])  # alice owns `local`
    job, _ = fuzz_store.create_job("alice", JobSpec(name="seen", cluster="local", script="echo hi"))
    fuzz_store.append_output(job.id, 0, b"hello\n" * 100)
    fuzz_store.set_accounting(job.id, {"slurm_job_id": "1", "records": [], "efficiency": {}})
    # ended, so that `?wait=` and `?follow=true` on it answer at once instead of waiting out their time
    for seq, state in enumerate(("preparing", "queued", "running", "completed"), start=1):
        assert fuzz_store.apply_report(
            JobReport(job_id=job.id, seq=seq, state=JobState(state)), actor="agent"
        )
    # an object store of its own: the agent's artifact upload route writes what the fuzz sends
    objects = f"file://{tmp_path / 'objects'}"
    # no agent answers here: a route that asks one gives up after 0.1 s (its 504 is counted apart)
    porter = PorterConfig(object_store=objects, agent_query_wait=0.1)
    app = create_app(Settings(porter=porter), store=fuzz_store)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    found = Findings()
    started = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        token = agent if operation.path.startswith("/api/v1/agent/") else user
        pinned = str(job.id) if any(p.name == "job_id" for p in operation.path_parameters) else None
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(operation, mode, token, pinned, found)
    seconds = time.monotonic() - started
    print(
        f"schemathesis: {found.cases} cases in {seconds:.1f} s; statuses {dict(sorted(found.statuses.items()))}; "
        f"{len(found.failures)} failures; {found.no_agent} answered 504 for want of an agent"
    )
    assert not found.failures, "\n".join(found.failures[:20])
    assert found.cases >= 500
    assert not any(status >= 500 for status in found.statuses)
    assert seconds < TIME_BUDGET
