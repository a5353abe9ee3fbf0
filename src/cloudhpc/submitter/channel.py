"""How the agent talks to porter. One interface, two transports: HTTP long-poll (default) and an S3
mailbox for agents that cannot reach porter at all."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from typing import Any, Protocol
from uuid import UUID

import httpx

from cloudhpc.domain.jobs import Job
from cloudhpc.domain.queries import AgentQuery, QueryAnswer
from cloudhpc.domain.reports import JobReport, Reconciliation
from cloudhpc.exceptions import ChannelError
from cloudhpc.retries import RetryPolicy, porter_unavailable

__all__ = ["Channel", "HttpChannel"]

log = logging.getLogger(__name__)


class Channel(Protocol):
    async def claim_work(self, cluster: str, *, wait: float) -> list[Job]: ...

    async def reconciliation(self, cluster: str) -> Reconciliation: ...

    async def report(self, reports: list[JobReport]) -> None: ...

    async def upload_output(self, job_id: UUID, offset: int, data: bytes) -> int:
        """Store output bytes at `offset`; returns how many bytes porter now holds for the job."""

    async def put_accounting(self, job_id: UUID, record: dict[str, Any]) -> None: ...

    async def put_artifacts(self, job_id: UUID, keys: list[str]) -> None:
        """Tell porter which object-store keys the agent wrote for the job (added to its list)."""

    async def claim_queries(self, cluster: str, *, wait: float) -> list[AgentQuery]:
        """Questions porter asks this cluster's agent (`domain/queries.py`), waiting up to `wait` s."""

    async def answer_query(self, query_id: UUID, answer: QueryAnswer) -> None: ...

    async def close(self) -> None: ...


class HttpChannel:
    """The agent protocol over porter's `/api/v1/agent` routes, with retries on transient errors."""

    def __init__(self, url: str, token: str, *, agent_name: str | None = None, attempts: int = 5) -> None:
        self._http = httpx.AsyncClient(
            base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {token}"}, timeout=30.0
        )
        # unique per process: porter lets one agent at a time serve a cluster, and tells a restarted
        # agent from a second one by this name
        self._agent = agent_name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # about 3 s in all before a call fails: the agent's loops retry a failed call themselves
        self._retries = RetryPolicy(attempts=attempts, initial=0.2, maximum=5.0)

    def __repr__(self) -> str:
        return f"HttpChannel({str(self._http.base_url)!r})"

    async def _call(self, method: str, path: str, *, timeout: float = 30.0, **kwargs: Any) -> Any:
        """porter's JSON answer; no connection and 5xx are retried (every agent call is safe to
        repeat, `retries.porter_unavailable`), then a `ChannelError`, as is a 4xx at once."""
        try:
            async for attempt in self._retries.asynchronous(porter_unavailable, f"{method} {path}"):
                with attempt:
                    response = await self._http.request(method, path, timeout=timeout, **kwargs)
                    if response.status_code >= 500:
                        response.raise_for_status()
        except httpx.TransportError as exc:
            raise ChannelError(f"porter unreachable at {self._http.base_url}: {exc}") from exc
        except httpx.HTTPStatusError as exc:
            raise ChannelError(f"porter failed {method} {path}: {exc.response.status_code}") from exc
        if response.status_code >= 400:
            raise ChannelError(
                f"porter refused {method} {path}: {response.status_code} {response.text[:300]}"
            )
        return response.json()

    async def claim_work(self, cluster: str, *, wait: float) -> list[Job]:
        body = await self._call(
            "GET",
            "/api/v1/agent/work",
            params={"cluster": cluster, "wait": wait, "agent": self._agent},
            timeout=wait + 30,
        )
        return [Job.model_validate(j) for j in body["jobs"]]

    async def reconciliation(self, cluster: str) -> Reconciliation:
        body = await self._call(
            "GET", "/api/v1/agent/jobs", params={"cluster": cluster, "agent": self._agent}
        )
        return Reconciliation.model_validate(body)

    async def report(self, reports: list[JobReport]) -> None:
        if reports:
            payload = {"reports": [r.model_dump(mode="json") for r in reports]}
            await self._call("POST", "/api/v1/agent/reports", json=payload)

    async def upload_output(self, job_id: UUID, offset: int, data: bytes) -> int:
        body = await self._call(
            "POST", f"/api/v1/agent/jobs/{job_id}/output", params={"offset": offset}, content=data
        )
        return int(body["size"])

    async def put_accounting(self, job_id: UUID, record: dict[str, Any]) -> None:
        await self._call("PUT", f"/api/v1/agent/jobs/{job_id}/accounting", json=record)

    async def put_artifacts(self, job_id: UUID, keys: list[str]) -> None:
        if keys:
            await self._call("POST", f"/api/v1/agent/jobs/{job_id}/artifacts", json={"keys": keys})

    async def claim_queries(self, cluster: str, *, wait: float) -> list[AgentQuery]:
        body = await self._call(
            "GET",
            "/api/v1/agent/queries",
            params={"cluster": cluster, "wait": wait, "agent": self._agent},
            timeout=wait + 30,
        )
        return [AgentQuery.model_validate(q) for q in body["queries"]]

    async def answer_query(self, query_id: UUID, answer: QueryAnswer) -> None:
        await self._call(
            "POST", f"/api/v1/agent/queries/{query_id}/answer", json=answer.model_dump(mode="json")
        )

    async def close(self) -> None:
        await self._http.aclose()
