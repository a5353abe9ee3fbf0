"""porter's API under load: GET /api/v1/jobs/{id} and POST /api/v1/jobs with 50 concurrent clients.

A real `cloudhpc serve porter` process (uvicorn, as deployed) is started per job store: a fresh
SQLite file, and a fresh schema on the testbed's PostgreSQL. Its configuration names one `slurm`
cluster for which no agent runs, so posted jobs stay `pending` and the API alone is measured.

50 clients, each an asyncio task with its own keep-alive connection. Phases, each bounded by a
request budget and PHASE_SECONDS:

- GET paced: each client sends `GET /api/v1/jobs/{id}` (a random one of 200 jobs created
  beforehand) once every 50/PACED_RATE s, 250 requests/s offered in all. The latency target
  (p99 <= 25 ms) is judged here: the latency 50 clients see under a steady, busy load.
- GET saturated: each client sends its next request as soon as the last is answered (closed
  loop): the throughput. Its latency is queueing (p50 ~ 50 / throughput, Little's law), reported
  but not held to the 25 ms target.
- POST saturated: `POST /api/v1/jobs` with a small batch spec, closed loop; the target
  (>= 200 jobs/s) counts `201 Created` answers per second.

Two load generators run every phase. `raw`: a minimal HTTP/1.1 client on asyncio streams, so that
what is measured is porter; the targets are judged on it. `httpx`: the same phases through
`httpx.AsyncClient`, as a Python caller sees porter; httpx spends about 1 ms of CPU per request
and, with 50 connections in one event loop, adds tens of milliseconds of its own latency, on the
same 2 cores as porter and PostgreSQL. porter's own histogram (`/metrics`, time to first byte)
is read around each phase as a cross-check: the share of requests it answered within 25 ms.
The load average before and after is printed, because other work on the machine inflates every
figure.

Run on the testbed machine: `python bench/api.py [--store sqlite|postgres|both] [--client raw|httpx|both]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.*

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tests.e2e.harness import free_port
from tests.integration.stores import postgres_url, sqlite_url

from cloudhpc.store import Store

CLIENTS = 50
GET_REQUESTS = 6000
POST_REQUESTS = 4000
PHASE_SECONDS = 15.0
PACED_RATE = 250.0  # requests/s offered by all clients together in the paced GET phase
WARMUP_REQUESTS = 200
TARGET_GET_P99_MS = 25.0
TARGET_POST_PER_S = 200.0
JOB = {"name": "bench", "cluster": "bench", "script": "echo hello\n", "resources": {"time": "00:01:00"}}

Request = tuple[str, str, Any]  # method, path, JSON body or None


class Connection(Protocol):
    async def request(self, method: str, path: str, body: Any) -> int: ...

    async def close(self) -> None: ...


class RawConnection:
    """HTTP/1.1 keep-alive on asyncio streams: enough for porter's JSON answers (Content-Length)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: str) -> None:
        self._reader = reader
        self._writer = writer
        self._auth = f"Authorization: Bearer {token}\r\n"

    @classmethod
    async def open(cls, url: str, token: str) -> RawConnection:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        return cls(reader, writer, token)

    async def request(self, method: str, path: str, body: Any) -> int:
        payload = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: porter\r\n{self._auth}"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        self._writer.write(head.encode() + b"\r\n" + payload)
        status_line, *headers = (await self._reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        length = 0
        for header in headers:
            name, _, value = header.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        await self._reader.readexactly(length)
        return int(status_line.split()[1])

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


class HttpxConnection:
    def __init__(self, url: str, token: str) -> None:
        self._http = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)

    @classmethod
    async def open(cls, url: str, token: str) -> HttpxConnection:
        return cls(url, token)

    async def request(self, method: str, path: str, body: Any) -> int:
        return (await self._http.request(method, path, json=body)).status_code

    async def close(self) -> None:
        await self._http.aclose()


OPENERS = {"raw": RawConnection.open, "httpx": HttpxConnection.open}


@dataclass
class Phase:
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    elapsed: float = 0.0
    server_buckets: dict[float, float] = field(default_factory=dict)
    """porter's own latency histogram for this phase's route: cumulative count per upper bound."""

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    def server_share_within(self, bound: float) -> float:
        """Percentage of the phase's requests porter itself answered (first byte) within `bound` s."""
        total = self.server_buckets.get(float("inf"), 0.0)
        return round(100 * self.server_buckets.get(bound, 0.0) / total, 2) if total else 0.0

    def summary(self, ok_status: int) -> dict[str, float]:
        ok = self.statuses.get(ok_status, 0)
        return {
            "requests": len(self.latencies),
            "errors": self.errors + sum(n for s, n in self.statuses.items() if s != ok_status),
            "p50_ms": round(self.percentile(0.50), 2),
            "p99_ms": round(self.percentile(0.99), 2),
            "mean_ms": round(statistics.fmean(self.latencies) * 1000, 2),
            "per_s": round(ok / self.elapsed, 1),
            "server_within_25ms_pct": self.server_share_within(0.025),
        }


async def run_phase(
    client_kind: str,
    url: str,
    token: str,
    budget: int,
    make_request: Callable[[], Request],
    *,
    clients: int = CLIENTS,
    period: float | None = None,
) -> Phase:
    """`clients` tasks share `budget` requests and PHASE_SECONDS. Without `period` each sends its
    next request as soon as the last one is answered (closed loop: saturation); with it, each
    sends one request every `period` seconds (a fixed offered load)."""
    phase = Phase()
    remaining = budget
    connections = [await OPENERS[client_kind](url, token) for _ in range(clients)]
    deadline = time.monotonic() + PHASE_SECONDS

    async def client(conn: Connection) -> None:
        nonlocal remaining
        next_at = time.monotonic() + random.uniform(0, period or 0)
        while remaining > 0 and time.monotonic() < deadline:
            if period is not None:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                # a late client does not catch up with a burst: the offered load stays fixed
                next_at = max(next_at + period, time.monotonic())
            remaining -= 1
            method, path, body = make_request()
            started = time.perf_counter()
            try:
                status = await conn.request(method, path, body)
            except (OSError, asyncio.IncompleteReadError, httpx.HTTPError):
                phase.errors += 1
                return
            phase.latencies.append(time.perf_counter() - started)
            phase.statuses[status] = phase.statuses.get(status, 0) + 1

    started = time.perf_counter()
    try:
        await asyncio.gather(*(client(conn) for conn in connections))
    finally:
        phase.elapsed = time.perf_counter() - started
        for conn in connections:
            await conn.close()
    return phase


def server_histogram(url: str, route: str, method: str) -> dict[float, float]:
    """Cumulative bucket counts of `cloudhpc_api_request_duration_seconds` for one route (2xx)."""
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        if family.name != "cloudhpc_api_request_duration_seconds":
            continue
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name.endswith("_bucket")
                and labels.get("route") == route
                and labels.get("method") == method
                and labels.get("status", "").startswith("2")
            ):
                le = float(labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sample.value
    return buckets


@contextlib.contextmanager
def porter(database: str, root: Path) -> Iterator[tuple[str, str]]:
    """`cloudhpc serve porter` on `database`; yields its URL and a user token."""
    port = free_port()
    config = {
        "porter": {
            "listen": f"127.0.0.1:{port}",
            "database": database,
            "object_store": f"file://{root / 'objects'}",
            # the bench user may use the cluster (docs/security.md)
            "access": {"clusters": {"bench": {"users": ["bench"]}}},
        },
        "clusters": {
            # A SLURM cluster nobody serves: jobs are accepted and stay pending.
            "bench": {
                "backend": "slurm",
                "ssh": {"host": "127.0.0.1", "user": "nobody", "key_file": str(root / "no-key")},
            }
        },
    }
    (root / "cloudhpc.yaml").write_text(yaml.safe_dump(config))
    store = Store(database)
    try:
        store.migrate()
        token = store.create_token("bench", "user")
    finally:
        store.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDHPC_")}
    log = (root / "porter.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "cloudhpc", "serve", "porter", "--config", str(root / "cloudhpc.yaml")],
        cwd=root,
        env={**env, "CLOUDHPC_LOG_LEVEL": "WARNING"},
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"porter exited: {(root / 'porter.log').read_text()[-2000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("porter did not become ready in 30 s")
            time.sleep(0.1)
        yield url, token
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


async def measure(url: str, token: str, client_kinds: list[str]) -> dict[str, dict[str, float]]:
    post: Request = ("POST", "/api/v1/jobs", JOB)
    # Warm up (imports, connection pools, SQLite page cache) and create the jobs GET reads.
    warm = await run_phase("raw", url, token, WARMUP_REQUESTS, lambda: post, clients=10)
    assert warm.statuses == {201: WARMUP_REQUESTS}, warm.statuses
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}) as http:
        ids = [j["id"] for j in (await http.get("/api/v1/jobs", params={"limit": 500})).json()["jobs"]]

    def get() -> Request:
        return "GET", f"/api/v1/jobs/{random.choice(ids)}", None

    phases: list[tuple[str, str, int, Callable[[], Request], float | None]] = [
        ("get_paced", "/api/v1/jobs/{job_id}", GET_REQUESTS, get, CLIENTS / PACED_RATE),
        ("get", "/api/v1/jobs/{job_id}", GET_REQUESTS, get, None),
        ("post", "/api/v1/jobs", POST_REQUESTS, lambda: post, None),
    ]
    out: dict[str, dict[str, float]] = {}
    for kind in client_kinds:
        for name, route, budget, make, period in phases:
            method = make()[0]
            before = server_histogram(url, route, method)
            phase = await run_phase(kind, url, token, budget, make, period=period)
            after = server_histogram(url, route, method)
            phase.server_buckets = {le: after.get(le, 0.0) - before.get(le, 0.0) for le in after}
            out[f"{kind}_{name}"] = phase.summary(201 if method == "POST" else 200)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--client", choices=["raw", "httpx", "both"], default="both")
    args = parser.parse_args()
    stores = {"sqlite": sqlite_url, "postgres": postgres_url}
    chosen = list(stores) if args.store == "both" else [args.store]
    kinds = ["raw", "httpx"] if args.client == "both" else [args.client]
    labels = {
        "get_paced": f"GET  {PACED_RATE:.0f}/s offered",
        "get": "GET  saturated",
        "post": "POST saturated",
    }
    result: dict[str, Any] = {"bench": "api", "clients": CLIENTS, "paced_rate_per_s": PACED_RATE}
    load_before = os.getloadavg()[0]
    met = True
    for store in chosen:
        with tempfile.TemporaryDirectory(prefix=f"bench-api-{store}-") as tmp:
            root = Path(tmp)
            with stores[store](root) as database, porter(database, root) as (url, token):
                figures = asyncio.run(measure(url, token, kinds))
        for key, f in figures.items():
            kind, _, phase = key.partition("_")
            print(
                f"{store:8} {kind:5} {labels[phase]:19} {f['requests']:5.0f} requests, {f['errors']:.0f} errors: "
                f"p50 {f['p50_ms']:7.2f} ms, p99 {f['p99_ms']:7.2f} ms, {f['per_s']:6.1f}/s; "
                f"porter: {f['server_within_25ms_pct']:6.2f}% within 25 ms"
            )
            for name in ("p50_ms", "p99_ms", "per_s", "errors", "server_within_25ms_pct"):
                result[f"{store}_{key}_{name}"] = f[name]
        judged = "raw" if "raw" in kinds else "httpx"
        met = (
            met
            and figures[f"{judged}_get_paced"]["p99_ms"] <= TARGET_GET_P99_MS
            and figures[f"{judged}_post"]["per_s"] >= TARGET_POST_PER_S
            and all(f["errors"] == 0 for f in figures.values())
        )
    result["loadavg_before"], result["loadavg_after"] = round(load_before, 2), round(os.getloadavg()[0], 2)
    print(
        f"targets ({judged} client): GET p99 <= {TARGET_GET_P99_MS} ms with {CLIENTS} clients at "
        f"{PACED_RATE:.0f} requests/s offered; POST >= {TARGET_POST_PER_S} jobs/s accepted with "
        f"{CLIENTS} clients in a closed loop"
    )
    print(f"load average (1 min): {result['loadavg_before']} before, {result['loadavg_after']} after")
    result["target_get_p99_ms"] = TARGET_GET_P99_MS
    result["target_post_per_s"] = TARGET_POST_PER_S
    result["judged_on"] = judged
    result["met"] = met
    print(json.dumps(result))


if __name__ == "__main__":
    main()
