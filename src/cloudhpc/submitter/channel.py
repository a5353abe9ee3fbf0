"""How the agent talks to porter. One interface, two transports: HTTP long-poll (default) and an S3
mailbox for agents that cannot reach porter at all."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import uuid
from typing import Any, Protocol
from uuid import UUID

import httpx

from cloudhpc.domain.jobs import Job
from cloudhpc.domain.reports import JobReport, Reconciliation
from cloudhpc.exceptions import ChannelError

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
        self._attempts = attempts

    def __repr__(self) -> str:
        return f"HttpChannel({str(self._http.base_url)!r})"

    async def _call(self, method: str, path: str, *, timeout: float = 30.0, **kwargs: Any) -> Any:
        delay = 0.2
        for attempt in range(1, self._attempts + 1):
            try:
                response = await self._http.request(method, path, timeout=timeout, **kwargs)
            except httpx.TransportError as exc:
                if attempt == self._attempts:
                    raise ChannelError(f"porter unreachable at {self._http.base_url}: {exc}") from exc
                log.warning("porter call %s %s failed (%s); retrying", method, path, exc)
            else:
                if response.status_code < 500:
                    if response.status_code >= 400:
                        raise ChannelError(
                            f"porter refused {method} {path}: {response.status_code} {response.text[:300]}"
                        )
                    return response.json()
                if attempt == self._attempts:
                    raise ChannelError(f"porter failed {method} {path}: {response.status_code}")
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")  # pragma: no cover

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

    async def close(self) -> None:
        await self._http.aclose()
